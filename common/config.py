"""Configuration: every command composes ``conf/config.yaml`` with Hydra.

Command-line overrides use Hydra's grammar (``train.epochs=5``, ``model=small``).
``save_config`` writes the resolved configuration into a run directory so that a
run can always be reproduced, and ``config_hash`` identifies it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def load_config(overrides: Iterable[str] = (), config_name: str = "config") -> DictConfig:
    """Compose the project configuration with optional Hydra overrides."""
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    return cfg


def to_plain(node: Any) -> Any:
    """A DictConfig/ListConfig as plain Python containers (dicts, lists, scalars)."""
    if isinstance(node, (DictConfig,)) or OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def deep_merge(base: dict, over) -> dict:
    """A copy of ``base`` with ``over`` merged in, recursively for nested dicts."""
    import copy
    from collections.abc import Mapping

    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def config_hash(node: Any) -> str:
    """Stable SHA-256 of a config node (key order independent)."""
    blob = json.dumps(to_plain(node), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def save_config(cfg: DictConfig, run_dir: Path) -> Path:
    """Write the resolved config to ``run_dir/config.yaml`` and return its path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return path
