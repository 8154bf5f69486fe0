"""Shared helpers of the metrics package: float arrays, abstentions, JSON-safe reports."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

_NAN = float("nan")


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _as_float(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=float).ravel()


def _finite_pair(y_true: Any, y_score: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return (y, s) restricted to entries where both are finite; y as 0/1 int."""
    y = _as_float(y_true)
    s = _as_float(y_score)
    if y.shape != s.shape:
        raise ValueError(f"length mismatch: {y.shape[0]} labels vs {s.shape[0]} scores")
    keep = np.isfinite(y) & np.isfinite(s)
    y, s = y[keep], s[keep]
    if y.size and not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0/1 (or NaN for unlabelled)")
    return y.astype(int), s


def _safe_div(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else _NAN


def _two_classes(y: np.ndarray) -> bool:
    return y.size > 0 and 0 < int(y.sum()) < y.size


def _jsonify(obj: Any) -> Any:
    """Recursively convert numpy scalars/arrays to Python; NaN/inf -> None."""
    if isinstance(obj, dict):
        return {str(k): _jsonify(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonify(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_jsonify(v) for v in obj.tolist()]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj


def _abstain(reason: str) -> dict:
    return {"abstained": True, "reason": reason}


def _ci_entry(value: float, lo: float, hi: float, method: str, undefined_reason: str) -> dict:
    if not math.isfinite(value):
        return _abstain(undefined_reason)
    return {"value": value, "lo": lo, "hi": hi, "method": method}


def finite_rows(names: str, *arrays: Any) -> list[np.ndarray]:
    """The arrays as floats, keeping only the rows where every one of them is finite.

    ``names`` ("time, event and risk") names them in the error raised when their lengths differ.
    """
    xs = [_as_float(a) for a in arrays]
    if any(x.shape != xs[0].shape for x in xs[1:]):
        raise ValueError(f"{names} must have the same length")
    keep = np.all([np.isfinite(x) for x in xs], axis=0) if xs[0].size else np.zeros(0, bool)
    return [x[keep] for x in xs]
