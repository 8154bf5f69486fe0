"""Per-round checkpoints with metadata and a SHA-256 of the weights file.

``<run>/checkpoints/round_007.pt`` holds the global weights, the strategy's arrays
(FedOpt moments) and the server's state as JSON text; ``round_007.json`` holds round,
config hash, metrics, threshold and the file's SHA-256, which is checked on every load
(a changed byte is refused).  Nothing is pickled: the file is written with
``torch.save`` of tensors, and read with ``torch.load(weights_only=True)``, which
refuses any object that would run code when loaded.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import torch

from common.hashing import sha256_file


class CheckpointError(Exception):
    pass


def _split_state(server_state: dict) -> tuple[dict, dict]:
    """(JSON-able part, arrays part) of the server state: numpy arrays of the strategy become tensors."""
    state = dict(server_state or {})
    arrays = {}
    if "strategy" in state:
        strat = dict(state["strategy"] or {})
        for key, val in list(strat.items()):
            if isinstance(val, dict) and val and all(isinstance(v, np.ndarray) for v in val.values()):
                arrays[key] = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in val.items()}
                del strat[key]
        state["strategy"] = strat
    return state, arrays


def save_checkpoint(run_dir: Path, rnd: int, state_dict: dict, meta: dict, server_state: dict | None = None) -> Path:
    ck = Path(run_dir) / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    path = ck / f"round_{rnd:03d}.pt"
    plain, arrays = _split_state(server_state or {})
    # Python's float repr round-trips exactly (resume is bit-exact); NaN / -inf are kept as such
    text = json.dumps(plain, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
    buf = io.BytesIO()
    torch.save({"state_dict": state_dict, "strategy_arrays": arrays,
                "server_state_json": torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)}, buf)
    tmp = path.with_suffix(".pt.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    meta = dict(meta, round=rnd, file=path.name, sha256=sha256_file(path))
    side = path.with_suffix(".json")
    side.with_suffix(".json.tmp").write_text(json.dumps(meta, indent=1))
    os.replace(side.with_suffix(".json.tmp"), side)
    return path


def annotate_checkpoint(run_dir: Path, rnd: int, fields: dict) -> None:
    """Add to a round's metadata what was learnt after it was written (its validation arrives with the next
    round's replies); the weights file and its SHA-256 stay as they are."""
    side = Path(run_dir) / "checkpoints" / f"round_{rnd:03d}.json"
    if not side.exists():
        return
    meta = {**json.loads(side.read_text()), **fields}
    side.with_suffix(".json.tmp").write_text(json.dumps(meta, indent=1))
    os.replace(side.with_suffix(".json.tmp"), side)


def _restore_state(blob: dict) -> dict:
    state = json.loads(bytes(blob["server_state_json"].numpy()).decode())
    if state.get("py_random") is not None:   # random.setstate needs tuples
        v, internal, gauss = state["py_random"]
        state["py_random"] = (v, tuple(internal), gauss)
    for key, arrs in (blob.get("strategy_arrays") or {}).items():
        state.setdefault("strategy", {})[key] = {k: t.numpy() for k, t in arrs.items()}
    return state


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
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError for anything but tensors and plain containers
        raise CheckpointError(f"{path}: not a checkpoint of tensors and JSON ({type(exc).__name__}); refused") from exc
    return blob["state_dict"], meta, _restore_state(blob)


def latest_checkpoint(run_dir: Path) -> Path | None:
    files = sorted((Path(run_dir) / "checkpoints").glob("round_*.pt"))
    return files[-1] if files else None
