"""The site runs only its own code: bundle approval, error categories, data changed under a run, Flower's waits.

The real-process side (a warm runtime serving a real SuperNode, hostile bundles, the closed Control API) is in
``tests/test_hostile_bundles.py``; here are the decisions each of those rests on, in one process.
"""
from __future__ import annotations

import shutil
import time
import zipfile
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

from client.bundles import BundleError, admit, approve, installed_differences, read_bundle
from client.errors import SiteDataChanged, error_reply, errors_mod
from common.data.policy import load_policy
from common.federation.reply_schema import ERR_DATA_CHANGED, ERR_INTERNAL, ERROR_CATEGORIES
from tests.conftest import TEST_OVERRIDES, project_bundle


def _msg(mtype: str = "query", config: dict | None = None) -> Message:
    md = Metadata(run_id=7, message_id=f"msg-{time.monotonic_ns()}", src_node_id=1, dst_node_id=5,
                  reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600, message_type=mtype)
    return Message(RecordDict({"config": ConfigRecord(config or {})}), metadata=md)


def _bundle_with(src: Path, dst: Path, replace: dict[str, bytes]) -> Path:
    """A copy of the bundle ``src`` with some files' contents replaced (a hostile coordinator's edit)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, replace.get(info.filename, zin.read(info.filename)))
    return dst


# --------------------------------------------------------------------------- bundles


def test_a_site_admits_only_the_bundle_it_approved(tmp_path):
    fab, digest = project_bundle()
    site = tmp_path / "site"
    site.mkdir()
    (site / "policy.toml").write_text("# the site's own file: comments stay\nmin_cell_count = 7\n\n[config]\n"
                                      "train.num_threads = 1\n")
    bundle = read_bundle(fab.read_bytes())
    assert (bundle.fab_id, bundle.version, bundle.sha256) == ("newadj/newadj", load_policy(None).pinned_version, digest)
    assert "client/client_app.py" in bundle.files and "conf/policy/default.yaml" in bundle.files
    policy = load_policy(site)
    assert "approved_bundles" in admit(policy, bundle.fab_id, bundle.version, fab.read_bytes())
    assert approve(site, fab) == (bundle, True)
    assert approve(site, fab) == (bundle, False)                  # once
    text = (site / "policy.toml").read_text()
    assert "# the site's own file: comments stay" in text and "train.num_threads = 1" in text
    policy = load_policy(site)
    assert policy.approved_bundles == (digest,) and policy.min_cell_count == 7
    assert admit(policy, bundle.fab_id, bundle.version, fab.read_bytes()) is None
    # the same name and version with one file changed: another hash, refused
    evil = _bundle_with(fab, tmp_path / "evil.fab", {"client/disclosure.py": b"RAW = True\n"})
    assert "not on this site's approved_bundles" in admit(policy, bundle.fab_id, bundle.version, evil.read_bytes())
    assert installed_differences(evil.read_bytes())[0] == ["client/disclosure.py"]
    assert installed_differences(fab.read_bytes()) == ([], [])   # the approved bundle is the installed code
    # another name or version than the site's pinned one: refused, and not approvable
    assert "not newadj/newadj" in admit(policy, "mallory/newadj", bundle.version, fab.read_bytes())
    assert "not newadj/newadj" in admit(policy, bundle.fab_id, "9.9.9", fab.read_bytes())
    other = _bundle_with(fab, tmp_path / "other.fab", {"pyproject.toml": zipfile.ZipFile(fab).read(
        "pyproject.toml").replace(b'version = "', b'version = "9.')})
    with pytest.raises(BundleError, match="is not newadj/newadj"):
        approve(site, other)
    with pytest.raises(BundleError, match="not a Flower app bundle"):
        approve(site, tmp_path / "site" / "policy.toml")


def test_the_bundle_the_coordinator_submits_is_the_one_the_sites_approved():
    """`newadj bundle` and `flwr run` build the same bytes (Flower's builder: fixed dates, sorted files), so the
    hash a site approves is the hash its runtime sees; and the bundle's version is the installed package's."""
    import hashlib

    from server.ops.processes import app_dir, build_bundle

    assert hashlib.sha256(build_bundle(app_dir())).hexdigest() == project_bundle()[1]
    assert read_bundle(build_bundle()).version == load_policy(None).pinned_version


# --------------------------------------------------------------------------- what an error says


def test_an_error_leaves_as_its_category_and_the_text_stays_in_the_sites_log(caplog):
    secret = "P0042 afp_ng_ml=1234.5 hunter2"

    def handler(_msg, _ctx):
        raise ValueError(f"clinical.csv row 17: {secret}")

    msg = _msg()
    reply = errors_mod(msg, None, handler)
    assert reply.has_error() and reply.error.code == ERR_INTERNAL
    reason = reply.error.reason
    assert reason.startswith(ERROR_CATEGORIES[ERR_INTERNAL]) and "(data or configuration)" in reason
    assert msg.metadata.message_id in reason
    assert "P0042" not in reason and "1234" not in reason and "hunter2" not in reason and "clinical" not in reason
    assert secret in caplog.text and msg.metadata.message_id in caplog.text     # the site's own log has it all
    for exc, category in ((MemoryError(), "memory"), (OSError(2, "x"), "file access"),
                          (RuntimeError("x"), "computation"), (AssertionError("x"), "other")):
        assert f"({category})" in error_reply(msg, exc).error.reason
    assert errors_mod(msg, None, lambda m, c: "the reply") == "the reply"


def test_data_changed_under_a_run_is_refused_not_read(tiny_cohort, tmp_path):
    """A site's table edited after a run read it: every later message of that run is refused (409, nothing of
    the table in the reply); a new run reads the site afresh."""
    from client import client_app
    from common.config import join_overrides

    site = tmp_path / "center_a"
    shutil.copytree(tiny_cohort / "center_a", site)
    run_config = {"overrides": join_overrides(TEST_OVERRIDES)}
    node = {"data-dir": str(site), "role": "train", "center-id": "center_a"}

    def ask(run_id: int, rc: dict) -> Message:
        ctx = Context(run_id=run_id, node_id=5, node_config=node, state=RecordDict(), run_config=rc)
        msg = _msg()
        msg.metadata.__dict__["_run_id"] = run_id
        return client_app.app(message=msg, context=ctx)

    first = ask(7, run_config)
    assert not first.has_error(), first.error.reason
    rows = (site / "clinical.csv").read_text().splitlines()
    header, row = rows[0].split(","), rows[1].split(",")
    pid = row[header.index("patient_id")]
    row[header.index("age")] = "98765.25"
    (site / "clinical.csv").write_text("\n".join([rows[0], ",".join(row), *rows[2:]]) + "\n")
    for _ in range(2):
        again = ask(7, run_config)
        assert again.has_error() and again.error.code == ERR_DATA_CHANGED
        said = again.error.reason.split("; see the site's log, message ")[0]
        assert said == ERROR_CATEGORIES[ERR_DATA_CHANGED], said     # the category, nothing of the table
        assert pid not in again.error.reason and "98765" not in again.error.reason
    other_run = {**run_config, "run-dir": "another"}
    assert not ask(8, other_run).has_error()


# --------------------------------------------------------------------------- Flower's SuperNode waits


def test_the_installed_flower_is_the_release_whose_waits_are_tuned():
    """Moving to another Flower release means reading its SuperNode's waits again (client/supernode.py)."""
    import flwr

    import client.supernode as launcher

    assert flwr.__version__ == launcher.PINNED_FLOWER
    assert f'"flwr[simulation]=={launcher.PINNED_FLOWER}"' in (Path(launcher.__file__).parents[1] / "pyproject.toml") \
        .read_text()


def test_the_supernode_launcher_shortens_flowers_waits_and_only_for_the_pinned_release(monkeypatch):
    import flwr
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supernode import start_client_internal as sci

    import client.supernode as launcher

    real_time = sci.time
    kw = dict(inflatable_utils.pull_objects.__kwdefaults__)
    try:
        monkeypatch.setattr(flwr, "__version__", "0.0.0")
        assert launcher.tune(0.2) is False and sci.time is real_time     # another release: Flower's own waits
        monkeypatch.setattr(flwr, "__version__", launcher.PINNED_FLOWER)
        assert launcher.tune(0.2) is True
        t0 = time.perf_counter()
        sci.time.sleep(3)                                               # the SuperNode's idle pull wait
        assert time.perf_counter() - t0 < 1.0
        assert inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"] == launcher.BACKOFF
    finally:
        sci.time = real_time
        inflatable_utils.pull_objects.__kwdefaults__.update(kw)
