"""Which app bundles a site runs: its pinned publisher, name and version, and the bundles it approved.

A Flower app bundle (FAB) is a zip of the app's sources and its ``pyproject.toml``; ``flwr run``
builds one and the SuperLink hands it to every SuperNode with each run.  A site never installs or
imports it (``client/executor.py`` runs the ClientApp installed at the site), but it takes part in a
run only when the bundle is one it reviewed:

* its ``[tool.flwr.app] publisher``, ``[project] name`` and ``version`` are the site's pinned ones
  (``bundle_publisher``, ``bundle_name``, ``bundle_version`` in ``policy.toml``; the version defaults
  to that of the newadj package installed at the site), and
* the SHA-256 of the bundle file is on the site's ``approved_bundles``.

``newadj site approve --site DIR BUNDLE.fab`` shows what a bundle holds, which of its files differ
from the code installed at the site, and adds its hash to ``policy.toml`` (comments and order kept).
"""
from __future__ import annotations

import hashlib
import io
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

FAB_CONFIG = "pyproject.toml"
INSTALLED_ROOT = Path(__file__).resolve().parents[1]   # the folder holding the installed client/, common/, ...


class BundleError(ValueError):
    """A file that is not a readable app bundle."""


@dataclass(frozen=True)
class Bundle:
    publisher: str
    name: str
    version: str
    sha256: str
    files: tuple[str, ...] = field(default_factory=tuple)

    @property
    def fab_id(self) -> str:
        return f"{self.publisher}/{self.name}"


def read_bundle(content: bytes, source: str = "bundle") -> Bundle:
    """Identity and file list of a bundle's bytes (nothing in it is run or extracted)."""
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as zf:
            names = tuple(sorted(zf.namelist()))
            config = tomllib.loads(zf.read(FAB_CONFIG).decode("utf-8"))
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BundleError(f"{source}: not a Flower app bundle ({type(exc).__name__})") from exc
    try:
        publisher = str(config["tool"]["flwr"]["app"]["publisher"])
        name, version = str(config["project"]["name"]), str(config["project"]["version"])
    except (KeyError, TypeError) as exc:
        raise BundleError(f"{source}: {FAB_CONFIG} names no publisher, name or version") from exc
    return Bundle(publisher, name, version, hashlib.sha256(content).hexdigest(), names)


def pinned_app(policy) -> tuple[str, str]:
    """(publisher/name, version) of the app this site runs (its policy's ``bundle_*``)."""
    return f"{policy.bundle_publisher}/{policy.bundle_name}", policy.pinned_version


def admit(policy, fab_id: str, fab_version: str, content: bytes) -> str | None:
    """Why this site refuses a run's bundle (None: admitted). ``fab_id``/``fab_version`` as the SuperLink
    announced them; the identity inside the bundle and the hash of its bytes are checked too."""
    want, version = pinned_app(policy)
    if fab_id != want or fab_version != version:
        return f"the run's app is not {want} {version}, the one this site runs"
    try:
        bundle = read_bundle(content)
    except BundleError:
        return "the run's app bundle is not readable"
    if (bundle.fab_id, bundle.version) != (want, version):
        return f"the run's app bundle is not {want} {version}, the one this site runs"
    if bundle.sha256 not in policy.approved_bundles:
        return (f"the run's app bundle (sha256 {bundle.sha256[:16]}...) is not on this site's approved_bundles "
                "(`newadj site approve`)")
    return None


def installed_differences(bundle_content: bytes, root: Path | None = None) -> tuple[list[str], list[str]]:
    """(files of the bundle that differ from the code installed here, files it has that are not installed)."""
    root = Path(root or INSTALLED_ROOT)
    differ, extra = [], []
    with zipfile.ZipFile(io.BytesIO(bundle_content)) as zf:
        for name in sorted(zf.namelist()):
            if name == FAB_CONFIG or name.startswith(".info/"):
                continue
            local = root / name
            if not local.is_file():
                extra.append(name)
            elif local.read_bytes() != zf.read(name):
                differ.append(name)
    return differ, extra


def approve(site_dir: Path, bundle_path: Path) -> tuple[Bundle, bool]:
    """Add ``bundle_path``'s SHA-256 to ``SITE/policy.toml``'s ``approved_bundles`` (bundle, whether it was new).

    Refuses (``BundleError``) a bundle whose publisher, name or version is not the site's pinned one:
    approving it would admit nothing.
    """
    import tomlkit

    from common.data.policy import POLICY_FILE, load_policy

    bundle_path = Path(bundle_path)
    try:
        content = bundle_path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{bundle_path}: cannot read ({exc.strerror or type(exc).__name__})") from exc
    bundle = read_bundle(content, str(bundle_path))
    policy = load_policy(site_dir)
    want = pinned_app(policy)
    if (bundle.fab_id, bundle.version) != want:
        raise BundleError(f"{bundle_path}: {bundle.fab_id} {bundle.version} is not {want[0]} {want[1]}, the app "
                          "this site runs (bundle_publisher, bundle_name, bundle_version in policy.toml)")
    if bundle.sha256 in policy.approved_bundles:
        return bundle, False
    path = Path(site_dir) / POLICY_FILE
    doc = tomlkit.parse(path.read_text()) if path.exists() else tomlkit.document()
    if "approved_bundles" in doc:
        doc["approved_bundles"].append(bundle.sha256)
    else:   # top-level keys come before the first table
        doc = tomlkit.parse(f"approved_bundles = [{tomlkit.string(bundle.sha256).as_string()}]\n"
                            + tomlkit.dumps(doc))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(tomlkit.dumps(doc))
    tmp.replace(path)
    if bundle.sha256 not in load_policy(site_dir).approved_bundles:      # what the site's runtime will read
        raise BundleError(f"{path}: the approval did not take (approved_bundles unreadable)")
    return bundle, True
