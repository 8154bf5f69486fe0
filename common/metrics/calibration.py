"""Calibration of predicted probabilities: Brier score, reliability curve, expected calibration error."""
from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import brier_score_loss

from common.metrics._base import _NAN, _as_float, _finite_pair  # noqa: F401


# --------------------------------------------------------------------------- #
# calibration
# --------------------------------------------------------------------------- #
def brier(y_true: Any, y_prob: Any) -> float:
    """Brier score (sklearn ``brier_score_loss``) over finite entries; NaN if empty."""
    y, p = _finite_pair(y_true, y_prob)
    if y.size == 0:
        return _NAN
    return float(brier_score_loss(y, np.clip(p, 0.0, 1.0), pos_label=1))


def _bin_edges(p: np.ndarray, n_bins: int, strategy: str) -> np.ndarray:
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    if strategy == "uniform":
        return np.linspace(0.0, 1.0, n_bins + 1)
    if strategy == "quantile":
        if p.size == 0:
            return np.linspace(0.0, 1.0, n_bins + 1)
        return np.percentile(p, np.linspace(0.0, 100.0, n_bins + 1))
    raise ValueError("strategy must be 'uniform' or 'quantile'")


def reliability_curve(y_true: Any, y_prob: Any, n_bins: int = 10, strategy: str = "uniform") -> dict:
    """Per-bin calibration statistics.

    Binning is identical to :func:`sklearn.calibration.calibration_curve`
    (``np.searchsorted`` on the inner edges), so for non-empty bins
    ``prob_true``/``prob_pred`` equal sklearn's output.  Unlike sklearn, all
    ``n_bins`` bins are returned (``NaN`` means for empty bins) together with
    their ``counts`` and ``bin_edges``.
    """
    y, p = _finite_pair(y_true, y_prob)
    p = np.clip(p, 0.0, 1.0)
    edges = _bin_edges(p, n_bins, strategy)
    ids = np.searchsorted(edges[1:-1], p)
    counts = np.bincount(ids, minlength=n_bins).astype(int)
    sum_p = np.bincount(ids, weights=p, minlength=n_bins)
    sum_y = np.bincount(ids, weights=y.astype(float), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        prob_pred = np.where(counts > 0, sum_p / np.maximum(counts, 1), np.nan)
        prob_true = np.where(counts > 0, sum_y / np.maximum(counts, 1), np.nan)
    return {
        "prob_true": prob_true,
        "prob_pred": prob_pred,
        "counts": counts,
        "bin_edges": edges,
    }


def expected_calibration_error(y_true: Any, y_prob: Any, n_bins: int = 10, strategy: str = "uniform") -> float:
    """ECE = sum_b (n_b / N) * |mean(y)_b - mean(p)_b| over the bins of
    :func:`reliability_curve`.  NaN when there are no finite entries."""
    rc = reliability_curve(y_true, y_prob, n_bins=n_bins, strategy=strategy)
    counts = rc["counts"]
    total = counts.sum()
    if total == 0:
        return _NAN
    nz = counts > 0
    gaps = np.abs(rc["prob_true"][nz] - rc["prob_pred"][nz])
    return float(np.sum(counts[nz] * gaps) / total)
