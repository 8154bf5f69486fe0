"""Configuration: every command composes ``conf/config.yaml`` with Hydra.

Command-line overrides use Hydra's grammar (``train.epochs=5``, ``model=small``).
``save_config`` writes the resolved configuration into a run directory so that a
run can always be reproduced, and ``config_hash`` identifies it.
"""
from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path
from typing import Any, Iterable

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

import conf as _conf

CONF_DIR = Path(_conf.__file__).resolve().parent   # installed with the code (conf/__init__.py)


def load_config(overrides: Iterable[str] = (), config_name: str = "config") -> DictConfig:
    """Compose the project configuration with optional Hydra overrides."""
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    return cfg


def join_overrides(overrides: Iterable[str]) -> str:
    """The run config's ``overrides`` string: each Hydra override shell-quoted, so that lists, spaces and
    quotes inside one survive the trip to the ServerApp and every ClientApp (:func:`split_overrides`)."""
    return " ".join(shlex.quote(str(o)) for o in overrides)


def split_overrides(text: str | None) -> list[str]:
    """The overrides a run config's ``overrides`` string holds (inverse of :func:`join_overrides`)."""
    return shlex.split(str(text or ""))


def feature_overrides(path: str | Path) -> list[str]:
    """Hydra overrides that put a federation feature file (``newadj schema``) into a run's config."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read the feature file ({' '.join(str(exc).split())})") from exc
    out = []
    for key, target in (("genomic_features", "data.genomic_features"), ("clinical_features", "data.clinical_features"),
                        ("modalities", "model.modalities")):
        if key not in doc:
            continue
        vals = doc[key] or []
        if not isinstance(vals, list) or not all(isinstance(v, str) for v in vals):
            raise ValueError(f"{path}: `{key}` must be a list of names")
        out.append(f"{target}=[" + ",".join(json.dumps(v) for v in vals) + "]")
    if doc.get("scaling"):
        rules = doc["scaling"]
        if not isinstance(rules, dict) or not all(isinstance(v, dict) and set(v) <= {"log", "center", "scale"}
                                                  for v in rules.values()):
            raise ValueError(f"{path}: `scaling` must map a feature to {{log, center, scale}}")
        # Hydra cannot quote a dict key, and a feature name may need quotes: a list of {name, ...} entries
        entries = [f"{{name:{json.dumps(str(k))},log:{str(bool(v.get('log', False))).lower()},"
                   f"center:{float(v.get('center', 0.0))!r},scale:{float(v.get('scale', 1.0))!r}}}"
                   for k, v in rules.items()]
        out.append("data.scaling=[" + ",".join(entries) + "]")
    if not out:
        raise ValueError(f"{path}: no genomic_features, clinical_features or modalities list in it")
    return out


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
