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
# (federation.client_site_cache); a deployment ClientApp serves its own center alone
_RUNTIMES: "OrderedDict[tuple, SiteRuntime]" = OrderedDict()


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

    def split(self, name: str):
        return {"train": self.train, "val": self.val, "test": self.test}[name]


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


_SETTINGS: dict = {}
_MANIFESTS: dict = {}


def _key(run_config, node_config) -> tuple:
    return (tuple(sorted((k, str(v)) for k, v in run_config.items())),
            tuple(sorted((k, str(v)) for k, v in node_config.items())))


def site_settings(run_config, node_config) -> tuple[Path, str, str, object]:
    """(site folder, center id, role, config) of this ClientApp, without loading any data (once a process)."""
    key = _key(run_config, node_config)
    if key not in _SETTINGS:
        _SETTINGS[key] = _site_settings(run_config, node_config)
    return _SETTINGS[key]


def _site_settings(run_config, node_config) -> tuple[Path, str, str, object]:
    site_dir, role, center = _resolve_site(run_config, node_config)
    # defaults + the run's allowed overrides + the site's own [config] (a disallowed key raises, naming it)
    cfg, _ = site_config(site_dir, overrides_of(run_config))
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
    if key not in _MANIFESTS:
        site_dir, center, role, cfg = site_settings(run_config, node_config)
        res = preprocess_site(site_dir, cfg, progress=False)
        _MANIFESTS[key] = (center, role, site_dir, json.loads(res.manifest.read_text()))
    return _MANIFESTS[key]


def site_runtime(run_config, node_config) -> SiteRuntime:
    key = _key(run_config, node_config)
    if key in _RUNTIMES:
        _RUNTIMES.move_to_end(key)
        return _RUNTIMES[key]
    site_dir, center, role, cfg = site_settings(run_config, node_config)
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
    while len(_RUNTIMES) > max(1, int(cfg.federation.client_site_cache)):
        _RUNTIMES.popitem(last=False)
    return rt


def round_seed(seed: int, center_id: str, server_round: int) -> int:
    """Local training seed: same round, same center -> same randomness (resume-safe)."""
    return int(hashlib.sha256(f"{seed}:{center_id}:{server_round}".encode()).hexdigest()[:8], 16)
