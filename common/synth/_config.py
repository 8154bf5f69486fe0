"""The generator's configuration (``conf/synth/default.yaml``) and its random streams."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common.config import CONF_DIR, deep_merge, to_plain  # noqa: F401

DEFAULT_CONFIG = CONF_DIR / "synth" / "default.yaml"
DATA_CONFIG = CONF_DIR / "data" / "default.yaml"

# random stream ids (4th element of the seed sequence)
_S_TABLE, _S_MRI, _S_PATH = 0, 1, 2


# --------------------------------------------------------------------------- config
def _load_yaml(path: Path) -> dict:
    import yaml

    with open(path) as f:
        return yaml.safe_load(f) or {}


def load_config(cfg: dict | None = None) -> dict:
    """Default synth config deep-merged with ``cfg``; phases/genes resolved."""
    base = _load_yaml(DEFAULT_CONFIG)
    if cfg is not None:
        cfg = to_plain(cfg)
        if "synth" in cfg and "sites" not in cfg and isinstance(cfg["synth"], dict):
            cfg = cfg["synth"]  # a whole Hydra root config was passed
        base = deep_merge(base, cfg)
    data_cfg = None
    if base.get("phases") is None or base.get("genomic_features") is None:
        data_cfg = _load_yaml(DATA_CONFIG) if DATA_CONFIG.exists() else {}
    if base.get("phases") is None:
        base["phases"] = list(data_cfg.get("phases") or ["arterial", "portal", "delayed"])
    if base.get("genomic_features") is None:
        base["genomic_features"] = list(data_cfg.get("genomic_features") or [])
    return base


def _rng(seed: int, site_idx: int, pidx: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), site_idx, pidx + 1, stream]))


def _sigmoid(x):
    from scipy.special import expit

    return expit(x)
