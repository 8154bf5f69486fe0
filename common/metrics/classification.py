"""Discrimination: Youden threshold, confusion-matrix metrics, AUC with DeLong's CI and paired test."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from common.metrics._base import _NAN, _as_float, _finite_pair, _safe_div, _two_classes, finite_rows  # noqa: F401


# --------------------------------------------------------------------------- #
# threshold & confusion-matrix metrics
# --------------------------------------------------------------------------- #
def youden_threshold(y_true: Any, y_score: Any, default: float = 0.5) -> float:
    """Threshold maximising Youden's J = sensitivity + specificity - 1.

    Candidate thresholds come from :func:`sklearn.metrics.roc_curve`
    (``drop_intermediate=False``); the rule is ``score >= threshold``.  The
    ``inf`` threshold that sklearn prepends (predict nobody positive, J = 0) is
    never returned.  Ties in J are broken deterministically in favour of the
    *highest* threshold (the first maximum in sklearn's decreasing order).
    Returns ``default`` when the threshold is undefined (fewer than two classes
    among the finite entries).
    """
    from sklearn.metrics import roc_curve

    y, s = _finite_pair(y_true, y_score)
    if not _two_classes(y):
        return float(default)
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    finite = np.isfinite(thr)
    fpr, tpr, thr = fpr[finite], tpr[finite], thr[finite]
    j = tpr - fpr
    best = int(np.flatnonzero(j >= j.max() - 1e-12)[0])
    return float(thr[best])


def binary_metrics(y_true: Any, y_prob: Any, threshold: float) -> dict:
    """Confusion-matrix metrics at ``y_prob >= threshold``.

    Returns accuracy, sensitivity, specificity, ppv, npv (``NaN`` where the
    denominator is zero), the counts tp/fp/tn/fn, ``n`` and ``n_pos``.
    Entries with non-finite label or probability are ignored.
    """
    y, p = _finite_pair(y_true, y_prob)
    pred = p >= threshold
    pos = y == 1
    tp = int(np.sum(pred & pos))
    fp = int(np.sum(pred & ~pos))
    tn = int(np.sum(~pred & ~pos))
    fn = int(np.sum(~pred & pos))
    n = int(y.size)
    return {
        "accuracy": _safe_div(tp + tn, n),
        "sensitivity": _safe_div(tp, tp + fn),
        "specificity": _safe_div(tn, tn + fp),
        "ppv": _safe_div(tp, tp + fp),
        "npv": _safe_div(tn, tn + fn),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "n": n,
        "n_pos": int(pos.sum()),
    }


# --------------------------------------------------------------------------- #
# DeLong (fast mid-rank algorithm, Sun & Xu 2014)
# --------------------------------------------------------------------------- #
def _delong_components(y: np.ndarray, scores: np.ndarray):
    """AUCs and DeLong covariance for ``k`` score vectors (rows of ``scores``).

    Sun X, Xu W. "Fast implementation of DeLong's algorithm for comparing the
    areas under correlated receiver operating characteristic curves."
    IEEE Signal Processing Letters 21(11):1389-1393, 2014.

    With m positives X and n negatives Y, mid-ranks T_z (pooled), T_x (within
    positives) and T_y (within negatives) give the structural components
        V10_i = (T_z(X_i) - T_x(X_i)) / n
        V01_j = 1 - (T_z(Y_j) - T_y(Y_j)) / m
    AUC = mean(V10) and Cov = S10/m + S01/n, where S10/S01 are the sample
    covariance matrices (ddof=1) of the components across the k scores.
    """
    from scipy import stats

    scores = np.atleast_2d(scores)
    pos = y == 1
    m = int(pos.sum())
    n = int(y.size - m)
    x = scores[:, pos]
    yy = scores[:, ~pos]
    tz = np.vstack([stats.rankdata(r) for r in scores])
    tx = np.vstack([stats.rankdata(r) for r in x])
    ty = np.vstack([stats.rankdata(r) for r in yy])
    v10 = (tz[:, pos] - tx) / n
    v01 = 1.0 - (tz[:, ~pos] - ty) / m
    aucs = v10.mean(axis=1)
    s10 = np.atleast_2d(np.cov(v10, ddof=1)) if m > 1 else np.zeros((len(scores),) * 2)
    s01 = np.atleast_2d(np.cov(v01, ddof=1)) if n > 1 else np.zeros((len(scores),) * 2)
    cov = s10 / m + s01 / n
    return aucs, cov


def delong_auc_ci(y_true: Any, y_score: Any, alpha: float = 0.05) -> tuple[float, float, float, float]:
    """AUC with DeLong's asymptotic (1 - alpha) confidence interval.

    Returns ``(auc, lo, hi, se)``; the interval is ``auc +- z_{1-alpha/2} * se``
    clipped to [0, 1].  The AUC itself is sklearn's ``roc_auc_score`` (ties
    count 1/2).  All four values are ``NaN`` when fewer than two classes are
    present among the finite entries.
    """
    from scipy import stats
    from sklearn.metrics import roc_auc_score

    y, s = _finite_pair(y_true, y_score)
    if not _two_classes(y):
        return (_NAN, _NAN, _NAN, _NAN)
    auc = float(roc_auc_score(y, s))
    _, cov = _delong_components(y, s[None, :])
    se = float(math.sqrt(max(float(cov[0, 0]), 0.0)))
    z = float(stats.norm.ppf(1.0 - alpha / 2.0))
    lo = min(max(auc - z * se, 0.0), 1.0)
    hi = min(max(auc + z * se, 0.0), 1.0)
    return (auc, float(lo), float(hi), se)


def delong_test(y_true: Any, score_a: Any, score_b: Any) -> tuple[float, float]:
    """DeLong's paired two-sided test of AUC(a) == AUC(b) on the same patients.

    Returns ``(z, p)`` with ``z = (AUC_a - AUC_b) / sqrt(Var_a + Var_b - 2 Cov)``.
    If the variance of the difference is zero, returns ``(0, 1)`` when the AUCs
    are equal and ``(+-inf, 0)`` otherwise.  ``(NaN, NaN)`` with one class.
    """
    from scipy import stats

    y, a, b = finite_rows("y_true, score_a and score_b", y_true, score_a, score_b)
    y = y.astype(int)
    if not _two_classes(y):
        return (_NAN, _NAN)
    aucs, cov = _delong_components(y, np.vstack([a, b]))
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    if var <= 1e-15:
        if abs(diff) < 1e-12:
            return (0.0, 1.0)
        return (math.copysign(math.inf, diff), 0.0)
    z = diff / math.sqrt(var)
    return (float(z), float(2.0 * stats.norm.sf(abs(z))))
