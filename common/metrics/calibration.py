"""Calibration of predicted probabilities: Brier score, reliability curve, expected calibration error."""
from __future__ import annotations

from typing import Any

import numpy as np

from common.metrics._base import _NAN, _as_float, _finite_pair  # noqa: F401


# --------------------------------------------------------------------------- #
# calibration
# --------------------------------------------------------------------------- #
def brier(y_true: Any, y_prob: Any) -> float:
    """Brier score (sklearn ``brier_score_loss``) over finite entries; NaN if empty."""
    from sklearn.metrics import brier_score_loss

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


def ece_floor(y_prob: Any, n_bins: int = 10, strategy: str = "uniform", n_sim: int = 1000, seed: int = 0) -> float:
    """The ECE a perfectly calibrated model with these probabilities would show on this many patients: the
    mean of :func:`expected_calibration_error` over ``n_sim`` label sets drawn as ``y ~ Bernoulli(p)``.

    The ECE is biased upwards on small samples (each bin's observed rate is a binomial draw around its true
    rate), so a raw ECE is read against this floor: on 150 patients and 10 bins it is typically 0.06-0.09,
    whatever the model.  Same bins as the ECE; NaN when there are no finite probabilities."""
    p = np.asarray(y_prob, dtype=float)
    p = np.clip(p[np.isfinite(p)], 0.0, 1.0)
    if p.size == 0:
        return _NAN
    edges = _bin_edges(p, n_bins, strategy)
    ids = np.searchsorted(edges[1:-1], p)
    counts = np.bincount(ids, minlength=n_bins).astype(float)
    sum_p = np.bincount(ids, weights=p, minlength=n_bins)
    onehot = np.zeros((p.size, n_bins))
    onehot[np.arange(p.size), ids] = 1.0
    draws = (np.random.default_rng(seed).random((int(n_sim), p.size)) < p[None, :]).astype(float)
    sum_y = draws @ onehot                                           # (n_sim, n_bins) positives per bin
    return float(np.mean(np.abs(sum_y - sum_p[None, :]).sum(axis=1)) / counts.sum())


def calibration_intercept_slope(y_true: Any, y_prob: Any, alpha: float = 0.05) -> dict:
    """The calibration intercept and slope of predicted probabilities (weak calibration, the first two levels
    of Van Calster et al.'s calibration hierarchy, as in TRIPOD external validations): with ``lp = logit(p)``,

    - ``intercept`` (calibration-in-the-large): ``a`` in ``logit P(y=1) = a + lp``, the slope fixed at 1;
      0 when the mean prediction matches the event rate, > 0 when the model predicts too low;
    - ``slope``: ``b`` in ``logit P(y=1) = c + b * lp``; 1 when the predictions are as spread as the outcomes,
      < 1 when they are too extreme (overfitting), > 1 when too modest.

    Maximum likelihood: the intercept is the root of its score equation (scipy's ``brentq``), the slope a
    logistic regression without penalty (scikit-learn); each with a Wald interval from the Fisher information.
    Unlike the ECE, neither is biased away from its calibrated value by sampling alone (a Wald interval's
    coverage is approximate on few patients, where the estimated slope also runs a little above 1), so the
    intervals say whether miscalibration is visible on this many patients.
    Returns ``{"intercept": (value, lo, hi), "slope": (value, lo, hi), "n": n}``: NaN without both labels; the
    slope NaN where it has no finite estimate (every prediction the same, or the labels perfectly separated by
    the predictions); probabilities are clipped to [1e-6, 1 - 1e-6] before the logit."""
    from scipy.optimize import brentq
    from scipy.special import expit
    from scipy.stats import norm
    from sklearn.linear_model import LogisticRegression

    y, p = _finite_pair(y_true, y_prob)
    nan3 = (_NAN, _NAN, _NAN)
    if y.size == 0 or y.min() == y.max():
        return {"intercept": nan3, "slope": nan3, "n": int(y.size)}
    z = float(norm.ppf(1.0 - alpha / 2.0))
    lp = _logit(p)
    a = float(brentq(lambda t: float(np.sum(y - expit(t + lp))), -50.0, 50.0, xtol=1e-10))
    q = expit(a + lp)
    se_a = 1.0 / np.sqrt(max(float(np.sum(q * (1.0 - q))), 1e-300))
    intercept = (a, float(a - z * se_a), float(a + z * se_a))
    if float(np.ptp(lp)) < 1e-9 or lp[y == 0].max() <= lp[y == 1].min() or lp[y == 1].max() <= lp[y == 0].min():
        # every prediction the same, or (quasi-)complete separation: the slope's likelihood has no maximum
        return {"intercept": intercept, "slope": nan3, "n": int(y.size)}
    lr = LogisticRegression(C=np.inf, solver="lbfgs", max_iter=1000, tol=1e-10).fit(lp[:, None], y)
    c, b = float(lr.intercept_[0]), float(lr.coef_[0, 0])
    q = expit(c + b * lp)
    w = q * (1.0 - q)
    info = np.array([[w.sum(), (w * lp).sum()], [(w * lp).sum(), (w * lp * lp).sum()]])
    det = float(np.linalg.det(info))
    if not det > 0:
        return {"intercept": intercept, "slope": nan3, "n": int(y.size)}
    se_b = float(np.sqrt(info[0, 0] / det))   # the slope's entry of the inverse information
    return {"intercept": intercept, "slope": (b, b - z * se_b, b + z * se_b), "n": int(y.size)}


# --------------------------------------------------------------------------- #
# recalibration: Platt scaling on the logit of the score
# --------------------------------------------------------------------------- #
_EPS = 1e-6


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), _EPS, 1.0 - _EPS)
    return np.log(p / (1.0 - p))


def fit_platt(y_true: Any, y_prob: Any, sample_weight: Any = None, min_slope: float = 1e-3) -> dict | None:
    """Platt scaling ``q = sigmoid(a * logit(p) + b)`` by weighted maximum likelihood (scikit-learn's
    logistic regression, a weak L2 penalty on ``a`` only, so a separable set stays finite);
    ``{"a", "b", "n"}``, or None without both labels.  ``a`` is kept >= ``min_slope`` so that
    recalibration never reverses the model's ranking (AUC and the thresholded decision unchanged)."""
    from sklearn.linear_model import LogisticRegression

    y, p = np.asarray(y_true, dtype=float), np.asarray(y_prob, dtype=float)
    w = np.ones_like(p) if sample_weight is None else np.asarray(sample_weight, dtype=float)
    keep = np.isfinite(y) & np.isfinite(p) & (w > 0)
    y, p, w = y[keep].astype(int), p[keep], w[keep]
    if y.size == 0 or w[y == 1].sum() == 0 or w[y == 0].sum() == 0:
        return None
    lr = LogisticRegression(C=10.0, solver="lbfgs", max_iter=1000)   # weak L2 on the slope: finite when separable
    lr.fit(_logit(p)[:, None], y, sample_weight=w)
    a, b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
    if a < min_slope:   # a model that does not rank: keep the order, calibrate the level
        a = min_slope
        b = float(_logit(np.array([np.average(y, weights=w)]))[0] - a * np.average(_logit(p), weights=w))
    return {"a": a, "b": b, "n": float(w.sum())}


def fit_platt_cells(cells, points: int = 8) -> dict | None:
    """Platt scaling from released score cells, no patient's score needed: every ``(edges, neg, pos)``
    cell's counts are spread evenly over ``points`` scores inside it (the uniform-within-cell reading
    of the pooled AUC, ``common.metrics.federated``), and :func:`fit_platt` is fitted on those weights."""
    from common.metrics.federated import _cell_arrays

    lo, hi, neg, pos = _cell_arrays(cells)
    frac = (np.arange(points) + 0.5) / points
    scores = lo[:, None] + (hi - lo)[:, None] * frac[None, :]            # (cells, points)
    s = np.concatenate([scores.ravel(), scores.ravel()])
    y = np.concatenate([np.zeros(scores.size), np.ones(scores.size)])
    w = np.concatenate([np.repeat(neg / points, points), np.repeat(pos / points, points)])
    return fit_platt(y, s, sample_weight=w)


def apply_platt(y_prob: Any, params: dict | None) -> np.ndarray:
    """Recalibrated probabilities (``params`` None: unchanged); NaN stays NaN."""
    p = np.asarray(y_prob, dtype=float)
    if not params:
        return p
    z = float(params["a"]) * _logit(p) + float(params["b"])
    return np.where(np.isfinite(p), 1.0 / (1.0 + np.exp(-z)), np.nan)
