"""A trained model as one self-describing file: weights, resolved config, threshold, model card.

``save_model_package`` writes ``<name>.pt`` and ``<name>.json`` (metadata with
the SHA-256 of the .pt file); ``load_model_package`` refuses a file whose hash
does not match and rebuilds the model from the config stored inside it, so a
checkpoint from another model configuration can never be loaded silently into
the wrong architecture.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch
from omegaconf import OmegaConf

from common.hashing import sha256_file


class ModelPackageError(Exception):
    pass


def save_model_package(path: Path, state_dict: dict, cfg, threshold: float, card: dict | None = None) -> dict:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plain_cfg = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
    buf = io.BytesIO()
    torch.save({"state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}, "config": plain_cfg,
                "threshold": float(threshold), "card": card or {}}, buf)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    meta = {"file": path.name, "sha256": sha256_file(path), "threshold": float(threshold), "card": card or {}}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1, default=str))
    return meta


def load_model_package(path: Path):
    """(model in eval mode, package dict with config/threshold/card/sha256)."""
    from common.task import model_from_config

    path = Path(path)
    if not path.exists():
        raise ModelPackageError(f"{path}: no such model file")
    side = path.with_suffix(".json")
    digest = sha256_file(path)
    if side.exists():
        want = json.loads(side.read_text()).get("sha256")
        if want and want != digest:
            raise ModelPackageError(f"{path}: SHA-256 {digest[:16]}... does not match {side.name} "
                                    f"({want[:16]}...); the file was modified or is corrupt")
    try:
        pkg = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelPackageError(f"{path}: not a model package ({exc})") from exc
    if not isinstance(pkg, dict) or "state_dict" not in pkg or "config" not in pkg:
        raise ModelPackageError(f"{path}: not a newadj model package (no state_dict/config inside)")
    cfg = OmegaConf.create(pkg["config"])
    model = model_from_config(cfg)
    missing, unexpected = model.load_state_dict(pkg["state_dict"], strict=False)
    if missing or unexpected:
        raise ModelPackageError(f"{path}: weights do not fit the model its config describes "
                                f"(missing {len(missing)}, unexpected {len(unexpected)} tensors)")
    model.eval()
    pkg["sha256"] = digest
    pkg["config"] = cfg
    return model, pkg
