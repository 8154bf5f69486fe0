"""Percentile bootstrap over patients (optionally stratified), the CIs of every report metric."""
from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import numpy as np


# --------------------------------------------------------------------------- #
# bootstrap
# --------------------------------------------------------------------------- #
def _resample_indices(rng: np.random.Generator, n: int, strata: list[np.ndarray] | None) -> np.ndarray:
    if strata is None:
        return rng.integers(0, n, size=n)
    return np.concatenate([s[rng.integers(0, s.size, size=s.size)] for s in strata])


def _bootstrap_values(
    fn: Callable[..., Any],
    arrays: Sequence[np.ndarray],
    n_boot: int,
    seed: int,
    stratify: Any = None,
) -> np.ndarray:
    """Matrix (n_valid_or_nan, k) of metric values over bootstrap resamples.

    ``fn`` may return a scalar or a 1-D vector; resamples where ``fn`` raises
    are recorded as all-NaN rows (the caller skips NaN per component).
    """
    arrays = [np.asarray(a) for a in arrays]
    if not arrays:
        raise ValueError("bootstrap needs at least one array")
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError("all arrays must have the same length")
    if n == 0:
        return np.full((max(int(n_boot), 1), 1), np.nan)
    strata = None
    if stratify is not None:
        lab = np.asarray(stratify).ravel()
        if len(lab) != n:
            raise ValueError("stratify must have the same length as the arrays")
        _, inv = np.unique(lab.astype(str) if lab.dtype == object else lab, return_inverse=True)
        strata = [np.flatnonzero(inv == k) for k in range(int(inv.max()) + 1)]
    rng = np.random.default_rng(seed)
    rows = []
    width = None
    for _ in range(int(n_boot)):
        idx = _resample_indices(rng, n, strata)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                val = np.atleast_1d(np.asarray(fn(*[a[idx] for a in arrays]), dtype=float)).ravel()
        except Exception:  # undefined metric on this resample
            val = None
        if val is not None and width is None:
            width = val.size
        rows.append(val)
    width = width or 1
    out = np.full((len(rows), width), np.nan)
    for i, v in enumerate(rows):
        if v is not None and v.size == width:
            out[i] = v
    return out


def _percentiles(vals: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Column-wise percentile interval, ignoring non-finite values."""
    lo = np.full(vals.shape[1], np.nan)
    hi = np.full(vals.shape[1], np.nan)
    for k in range(vals.shape[1]):
        col = vals[:, k]
        col = col[np.isfinite(col)]
        if col.size:
            lo[k], hi[k] = np.percentile(col, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return lo, hi


def bootstrap_ci(
    fn: Callable[..., float],
    *arrays: Any,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    stratify: Any = None,
) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) CI of ``fn(*arrays)`` over patients.

    Each resample draws patients (rows, shared across ``arrays``) with
    replacement; with ``stratify`` (e.g. the labels) it resamples within each
    stratum so class counts stay fixed.  Resamples where ``fn`` raises or
    returns a non-finite value (metric undefined) are skipped.  Returns
    ``(NaN, NaN)`` if no resample is valid.  Deterministic given ``seed``.
    """
    vals = _bootstrap_values(fn, arrays, n_boot, seed, stratify)
    lo, hi = _percentiles(vals[:, :1], alpha)
    return (float(lo[0]), float(hi[0]))
