"""Which center this ClientApp is, and its data, resolved once per process.

Deployment: the SuperNode's ``--node-config`` names ``data-dir`` (the site
folder), and optionally ``role`` and ``center-id``.  The configuration is the
site's (``common.data.policy.site_config``): the run contributes only the keys
the site's policy allows.  Simulation: Flower gives
only ``partition-id``; it indexes the sorted site folders of the run config's
``cohort-dir``.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from common.config import split_overrides
from common.data.identity import site_identity
from common.data.policy import site_config

# a simulation worker serves many virtual centers: keep the most recently used ones only
# (federation.client_site_cache); a site's warm runtime serves its own center, run after run, and keeps the
# runs it serves now (client/executor.py sets RUNS_KEPT), whatever a run asks
_RUNTIMES: "OrderedDict[tuple, SiteRuntime]" = OrderedDict()
RUNS_KEPT: int | None = None


@dataclass
class SiteRuntime:
    center_id: str
    role: str
    site_dir: Path
    cfg: object
    dims: dict
    train: object | None          # common.learn.dataset.SiteDataset
    val: object | None
    test: object                  # every patient: the external center's evaluation set

    model: object | None = None   # built once per run and reused: every message loads its weights into it

    def split(self, name: str):
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    def fit_patients(self):
        """Every training and validation patient of this training center as one dataset: what the Cox model's
        Newton rounds and a cross-validated run's folds are computed over."""
        from common.learn.dataset import ConcatSites

        return ConcatSites([d for d in (self.train, self.val) if d is not None and len(d)])

    def model_with(self, arrays):
        """The run's model holding the weights of a received record (every parameter and buffer replaced)."""
        from common.federation.wire import from_arrays
        from common.learn.task import model_from_config

        if self.model is None:
            self.model = model_from_config(self.cfg, dims=self.dims)
        self.model.load_state_dict(from_arrays(arrays, self.model.state_dict()))
        return self.model


def overrides_of(run_config) -> list[str]:
    return split_overrides(run_config.get("overrides"))


def _resolve_site(run_config, node_config) -> tuple[Path, str | None, str | None]:
    if "data-dir" in node_config:
        return Path(str(node_config["data-dir"])), node_config.get("role"), node_config.get("center-id")
    if "partition-id" not in node_config:
        raise RuntimeError("node config has neither `data-dir` (deployment) nor `partition-id` (simulation)")
    from common.data.cohort import discover_sites

    cohort = run_config.get("cohort-dir")
    if not cohort:
        raise RuntimeError("simulation needs the run config key `cohort-dir`")
    sites = discover_sites(Path(str(cohort)))
    pid, n = int(node_config["partition-id"]), int(node_config.get("num-partitions", len(sites)))
    if n != len(sites):
        raise RuntimeError(f"simulation has {n} SuperNodes but {cohort} has {len(sites)} sites")
    return sites[pid].path, None, None


class _Bounded(OrderedDict):
    """A dict that forgets its least recently added entries beyond ``size`` (a warm runtime serves run after run)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        while len(self) > self.size:
            self.popitem(last=False)


_SETTINGS: dict = _Bounded(64)
_MANIFESTS: dict = _Bounded(64)
# what each run (key) found in the site folder when it first read it: files and their (size, mtime)
_SNAPSHOTS: dict = _Bounded(64)
_CHANGED: dict = _Bounded(64)


# what a run reads from a site folder (the data contract, ../shared/data-contract.md): its tables and images
SITE_INPUTS = ("site.toml", "clinical.csv", "genomics.csv", "mri", "pathology")


def site_files(site_dir: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime in ns) of every file a run reads from the site folder (``SITE_INPUTS``); not ``policy.toml``
    (re-read on every message by design), the cache, the audit log or anything else the site keeps there."""
    import os

    out: dict[str, tuple[int, int]] = {}
    stack = [str(Path(site_dir) / name) for name in SITE_INPUTS if (Path(site_dir) / name).is_dir()]
    for name in SITE_INPUTS:
        f = Path(site_dir) / name
        if f.is_file():
            st = f.stat()
            out[str(f)] = (st.st_size, st.st_mtime_ns)
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir(follow_symlinks=False):
                stack.append(e.path)
            else:
                try:
                    st = e.stat()
                except OSError:
                    continue
                out[e.path] = (st.st_size, st.st_mtime_ns)
    return out


def check_unchanged(key, site_dir: Path) -> None:
    """Refuse (``SiteDataChanged``) a message of a run whose site files changed since the run first read them;
    the run stays refused (a later run reads the site afresh)."""
    from client.errors import SiteDataChanged

    if key in _CHANGED:
        raise SiteDataChanged(_CHANGED[key])
    now = site_files(site_dir)
    before = _SNAPSHOTS.setdefault(key, now)
    if now != before:
        changed = sorted(set(now) ^ set(before) | {f for f in now if f in before and now[f] != before[f]})
        _CHANGED[key] = (f"{len(changed)} file(s) of {site_dir} changed after this run read them "
                         f"(first: {changed[0]}); the run is refused from now on")
        _RUNTIMES.pop(key, None)
        _MANIFESTS.pop(key, None)
        raise SiteDataChanged(_CHANGED[key])


def _key(run_config, node_config) -> tuple:
    return (tuple(sorted((k, str(v)) for k, v in run_config.items())),
            tuple(sorted((k, str(v)) for k, v in node_config.items())))


def site_settings(run_config, node_config) -> tuple[Path, str, str, object]:
    """(site folder, center id, role, config) of this ClientApp, without loading any data (once a process)."""
    key = _key(run_config, node_config)
    if key not in _SETTINGS:
        _SETTINGS[key] = _site_settings(run_config, node_config)
    check_unchanged(key, _SETTINGS[key][0])
    return _SETTINGS[key]


def _site_settings(run_config, node_config) -> tuple[Path, str, str, object]:
    site_dir, role, center = _resolve_site(run_config, node_config)
    # defaults + the run's allowed overrides + the site's own [config] (a disallowed key raises, naming it)
    cfg = site_config(site_dir, overrides_of(run_config))
    ident = site_identity(site_dir)               # site.toml, [site] table or top-level keys
    role = str(role or ident.role)
    center = str(center or ident.center_id)
    return site_dir, center, role, cfg


def site_manifest(run_config, node_config) -> tuple[str, str, Path, dict]:
    """(center id, role, site folder, cache manifest) of this ClientApp, the cache built or refreshed if needed;
    no torch, no array is loaded (what a role query needs)."""
    import json

    from common.preprocess.cache import preprocess_site

    key = _key(run_config, node_config)
    site_dir, center, role, cfg = site_settings(run_config, node_config)    # refuses a run whose data changed
    if key not in _MANIFESTS:
        res = preprocess_site(site_dir, cfg, progress=False)
        _MANIFESTS[key] = (center, role, site_dir, json.loads(res.manifest.read_text()))
    return _MANIFESTS[key]


def site_runtime(run_config, node_config) -> SiteRuntime:
    key = _key(run_config, node_config)
    site_dir, center, role, cfg = site_settings(run_config, node_config)    # refuses a run whose data changed
    if key in _RUNTIMES:
        _RUNTIMES.move_to_end(key)
        return _RUNTIMES[key]
    # torch and the site's arrays are loaded here, by the handlers that need them, not at the app's import
    from common.learn.dataset import site_dataset
    from common.learn.task import check_dataset_matches, input_dims
    from common.preprocess.cache import preprocess_site
    from client import timing

    timing.mark("handler_imports_done")   # the handler's and the site's imports (torch...) are done
    # idempotent: reuses the cache that `newadj preprocess` built
    res = preprocess_site(site_dir, cfg, progress=False)
    dims = input_dims(cfg)
    test = site_dataset(res.manifest, None, cfg)
    check_dataset_matches(test, dims)
    train = val = None
    if role != "external":
        train = site_dataset(res.manifest, ["train"], cfg)
        val = site_dataset(res.manifest, ["val"], cfg)
    rt = SiteRuntime(center, role, site_dir, cfg, dims, train, val, test)
    timing.mark("site_loaded")
    _RUNTIMES[key] = rt
    limit = max(1, int(cfg.federation.client_site_cache))
    while len(_RUNTIMES) > (min(limit, RUNS_KEPT) if RUNS_KEPT else limit):
        _RUNTIMES.popitem(last=False)
    return rt


def round_seed(seed: int, center_id: str, server_round: int) -> int:
    """Local training seed: same round, same center -> same randomness (resume-safe)."""
    return int(hashlib.sha256(f"{seed}:{center_id}:{server_round}".encode()).hexdigest()[:8], 16)
