"""A trained model as one self-describing file: weights, resolved config, threshold, model card.

``save_model_package`` writes ``<name>.pt`` (tensors, plain dicts, lists, strings
and numbers only) and ``<name>.json`` (metadata with the SHA-256 of the .pt file,
for the coordinator's own records).

``load_model_package`` never runs code from the file: it is read with
``torch.load(weights_only=True)``, which refuses any pickled object other than
tensors and plain containers.  Its integrity is checked against ``expected_sha256``,
a hash the evaluator got by another channel (the run's final log, ``metrics.json``
sent by the coordinator); the ``.json`` beside a package comes from the same sender
as the package and proves nothing, so it is not trusted.  The model is rebuilt
from the config stored inside, so a package from another model configuration can
never be loaded silently into the wrong architecture.
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


def load_model_package(path: Path, expected_sha256: str | None = None):
    """(model in eval mode, package dict with config/threshold/card/sha256).

    ``expected_sha256``: the package's hash as the evaluator received it from the
    coordinator by another channel; a mismatch is refused before the file is read.
    """
    from common.learn.task import model_from_config

    path = Path(path)
    if not path.exists():
        raise ModelPackageError(f"{path}: no such model file")
    digest = sha256_file(path)
    if expected_sha256 is not None:
        want = str(expected_sha256).strip().lower()
        if want != digest:
            raise ModelPackageError(f"{path}: SHA-256 {digest[:16]}... is not the expected {want[:16]}...; "
                                    "the file is not the model the coordinator announced (refused, not loaded)")
    try:
        pkg = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError names the refused global
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelPackageError(f"{path}: refused: not a package of tensors and plain data, nothing in it was run "
                                f"({first})") from exc
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
