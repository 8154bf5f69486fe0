"""Per-round checkpoints with metadata and a SHA-256 of the weights file.

``<run>/checkpoints/round_007.pt`` holds the global weights; ``round_007.json``
holds round, config hash, metrics, threshold and the file's SHA-256, which is
checked on every load (a changed byte is refused).
"""
from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import torch

from common.hashing import sha256_file


class CheckpointError(Exception):
    pass


def save_checkpoint(run_dir: Path, rnd: int, state_dict: dict, meta: dict, server_state: dict | None = None) -> Path:
    ck = Path(run_dir) / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    path = ck / f"round_{rnd:03d}.pt"
    buf = io.BytesIO()
    torch.save({"state_dict": state_dict, "server_state": pickle.dumps(server_state or {})}, buf)
    tmp = path.with_suffix(".pt.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    meta = dict(meta, round=rnd, file=path.name, sha256=sha256_file(path))
    side = path.with_suffix(".json")
    side.with_suffix(".json.tmp").write_text(json.dumps(meta, indent=1))
    os.replace(side.with_suffix(".json.tmp"), side)
    return path


def load_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """(state_dict, metadata, server_state); raises CheckpointError if the file does not match its SHA-256."""
    path = Path(path)
    side = path.with_suffix(".json")
    if not side.exists():
        raise CheckpointError(f"{side}: checkpoint metadata missing")
    meta = json.loads(side.read_text())
    digest = sha256_file(path)
    if digest != meta.get("sha256"):
        raise CheckpointError(f"{path}: SHA-256 {digest[:16]}... does not match the recorded "
                              f"{str(meta.get('sha256'))[:16]}...; the checkpoint was modified or is corrupt")
    blob = torch.load(path, map_location="cpu", weights_only=False)
    return blob["state_dict"], meta, pickle.loads(blob["server_state"])


def latest_checkpoint(run_dir: Path) -> Path | None:
    files = sorted((Path(run_dir) / "checkpoints").glob("round_*.pt"))
    return files[-1] if files else None
