"""Evaluation metrics for the federated HCC models.

Everything that scikit-learn or lifelines already provides is delegated to
them (ROC curve, AUC, Brier score, Harrell's C-index).  This module only adds
what they lack:

* DeLong's variance / confidence interval for the AUC and DeLong's paired test,
  computed with the fast mid-rank algorithm of Sun & Xu (2014),
* expected calibration error (ECE) and a reliability curve that also reports
  bin counts,
* a percentile bootstrap over patients,
* a JSON-serialisable evaluation report that abstains instead of crashing,
* a *privacy-preserving pooled AUC* computed from per-site score histograms,
  with exact lower/upper bounds (no per-patient score has to leave a site).

Conventions
-----------
* Labels are 0/1 (``1`` = positive class).  ``NaN`` labels mean "unlabelled".
* A patient is predicted positive when ``y_prob >= threshold`` (same rule as
  :func:`sklearn.metrics.roc_curve`).
* For survival, ``risk`` is "higher = worse" (shorter survival).  lifelines
  expects "higher = longer survival", so :func:`c_index` passes ``-risk``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Sequence

import numpy as np
from scipy import stats
from sklearn.metrics import brier_score_loss, roc_auc_score, roc_curve

__all__ = [
    "youden_threshold",
    "binary_metrics",
    "delong_auc_ci",
    "delong_test",
    "brier",
    "expected_calibration_error",
    "reliability_curve",
    "c_index",
    "bootstrap_ci",
    "evaluate_predictions",
    "score_histogram",
    "pool_histograms",
    "auc_from_histograms",
    "roc_from_histograms",
    "auc_from_cells",
    "youden_from_cells",
    "quantiles_from_cells",
    "concordance_pairs",
    "pooled_c_index",
    "td_auc_labels",
    "hazard_cells",
    "baseline_hazard_from_cells",
    "dfs_report",
]

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
    y = _as_float(y_true)
    a = _as_float(score_a)
    b = _as_float(score_b)
    if not (y.shape == a.shape == b.shape):
        raise ValueError("y_true, score_a and score_b must have the same length")
    keep = np.isfinite(y) & np.isfinite(a) & np.isfinite(b)
    y, a, b = y[keep].astype(int), a[keep], b[keep]
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


# --------------------------------------------------------------------------- #
# survival
# --------------------------------------------------------------------------- #
def c_index(time: Any, event: Any, risk: Any) -> float:
    """Harrell's C-index via :func:`lifelines.utils.concordance_index`.

    ``risk`` is "higher = shorter survival", so ``-risk`` is passed to
    lifelines.  Entries with non-finite time/event/risk are dropped.  Returns
    NaN when there is no comparable pair (e.g. no events).
    """
    from lifelines.utils import concordance_index

    t = _as_float(time)
    e = _as_float(event)
    r = _as_float(risk)
    if not (t.shape == e.shape == r.shape):
        raise ValueError("time, event and risk must have the same length")
    keep = np.isfinite(t) & np.isfinite(e) & np.isfinite(r)
    t, e, r = t[keep], e[keep] != 0, r[keep]
    if t.size < 2 or not e.any():
        return _NAN
    try:
        return float(concordance_index(t, -r, e))
    except ZeroDivisionError:  # lifelines: "No admissable pairs in the dataset."
        return _NAN


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


# --------------------------------------------------------------------------- #
# full report
# --------------------------------------------------------------------------- #
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


_CLS_KEYS = ("accuracy", "sensitivity", "specificity", "ppv", "npv", "brier", "ece")
_UNDEFINED = {
    "accuracy": "undefined (no labelled patients)",
    "sensitivity": "undefined (no positive patients)",
    "specificity": "undefined (no negative patients)",
    "ppv": "undefined (no predicted positives)",
    "npv": "undefined (no predicted negatives)",
    "brier": "undefined (no labelled patients)",
    "ece": "undefined (no labelled patients)",
}


def _cls_vector(y: np.ndarray, p: np.ndarray, threshold: float, n_bins: int) -> np.ndarray:
    m = binary_metrics(y, p, threshold)
    return np.array(
        [m[k] for k in _CLS_KEYS[:5]]
        # same value as brier() (sklearn brier_score_loss on clipped p), without
        # sklearn's per-call validation overhead inside the bootstrap loop
        + [float(np.mean((np.clip(p, 0.0, 1.0) - y) ** 2)) if y.size else _NAN,
           expected_calibration_error(y, p, n_bins=n_bins)],
        dtype=float,
    )


def evaluate_predictions(
    y_true: Any,
    y_prob: Any,
    threshold: float | None = 0.5,
    time: Any = None,
    event: Any = None,
    risk: Any = None,
    n_boot: int = 1000,
    seed: int = 0,
    min_patients: int = 10,
    alpha: float = 0.05,
    ece_bins: int = 10,
) -> dict:
    """Full, JSON-serialisable evaluation report for one model on one cohort.

    Keys: ``n``, ``n_pos``, ``n_unlabeled``, ``threshold``, ``auc`` (DeLong CI,
    ``method="delong"``), ``accuracy``, ``sensitivity``, ``specificity``,
    ``ppv``, ``npv``, ``brier``, ``ece`` and ``c_index`` (percentile bootstrap
    CIs, ``method="bootstrap"``; classification resamples are stratified by
    label, C-index resamples by event).  Each metric is either
    ``{"value", "lo", "hi", "method"}`` or ``{"abstained": True, "reason": ...}``
    (fewer than ``min_patients`` usable patients, only one class, metric
    undefined, or an unexpected error).  NaN labels/probabilities are dropped
    for classification metrics; NaN time/event/risk for the C-index.  If
    ``risk`` is None but ``time``/``event`` are given, ``y_prob`` is used as
    the risk score (higher = worse).  ``threshold=None`` means 0.5.  All
    values are Python floats/ints/None (NaN -> None); never raises on data.
    """
    thr = 0.5 if threshold is None or not np.isfinite(threshold) else float(threshold)
    report: dict[str, Any] = {"threshold": thr}
    try:
        y_all = _as_float(y_true)
        p_all = _as_float(y_prob)
        if y_all.shape != p_all.shape:
            raise ValueError(f"length mismatch: {y_all.size} labels vs {p_all.size} probabilities")
        keep = np.isfinite(y_all) & np.isfinite(p_all)
        y = y_all[keep]
        p = p_all[keep]
        if y.size and not np.all((y == 0) | (y == 1)):
            raise ValueError("labels must be 0/1 (or NaN for unlabelled)")
        y = y.astype(int)
        n, n_pos = int(y.size), int(y.sum())
        report.update({"n": n, "n_pos": n_pos, "n_unlabeled": int(y_all.size - n)})

        if n < min_patients:
            reason = f"only {n} labelled patients (< min_patients={min_patients})"
            for k in ("auc",) + _CLS_KEYS:
                report[k] = _abstain(reason)
        else:
            # AUC with DeLong CI
            if not _two_classes(y):
                report["auc"] = _abstain(f"only one class present (n_pos={n_pos}, n={n})")
            else:
                try:
                    auc, lo, hi, _se = delong_auc_ci(y, p, alpha=alpha)
                    report["auc"] = {"value": auc, "lo": lo, "hi": hi, "method": "delong"}
                except Exception as exc:  # pragma: no cover - defensive
                    report["auc"] = _abstain(f"error: {exc}")
            # confusion-matrix + calibration metrics with one joint bootstrap
            try:
                point = _cls_vector(y, p, thr, ece_bins)
                boot = _bootstrap_values(
                    lambda yy, pp: _cls_vector(yy, pp, thr, ece_bins), [y, p], n_boot, seed, stratify=y
                )
                lo, hi = _percentiles(boot, alpha)
                for i, k in enumerate(_CLS_KEYS):
                    report[k] = _ci_entry(float(point[i]), float(lo[i]), float(hi[i]), "bootstrap", _UNDEFINED[k])
            except Exception as exc:  # pragma: no cover - defensive
                for k in _CLS_KEYS:
                    report[k] = _abstain(f"error: {exc}")
    except Exception as exc:
        report.setdefault("n", None)
        report.setdefault("n_pos", None)
        for k in ("auc",) + _CLS_KEYS:
            report.setdefault(k, _abstain(f"error: {exc}"))

    report["c_index"] = _c_index_entry(y_prob, time, event, risk, n_boot, seed, min_patients, alpha)
    return _jsonify(report)


def _c_index_entry(y_prob, time, event, risk, n_boot, seed, min_patients, alpha) -> dict:
    if time is None or event is None:
        return _abstain("no survival data")
    try:
        t = _as_float(time)
        e = _as_float(event)
        r = _as_float(y_prob if risk is None else risk)
        if not (t.shape == e.shape == r.shape):
            raise ValueError("time, event and risk must have the same length")
        keep = np.isfinite(t) & np.isfinite(e) & np.isfinite(r)
        t, e, r = t[keep], (e[keep] != 0).astype(int), r[keep]
        if t.size < min_patients:
            return _abstain(f"only {t.size} patients with survival data (< min_patients={min_patients})")
        if not e.any():
            return _abstain("no events observed")
        value = c_index(t, e, r)
        if not math.isfinite(value):
            return _abstain("no comparable pairs")
        lo, hi = bootstrap_ci(c_index, t, e, r, n_boot=n_boot, alpha=alpha, seed=seed, stratify=e)
        return {"value": value, "lo": lo, "hi": hi, "method": "bootstrap"}
    except Exception as exc:
        return _abstain(f"error: {exc}")


# --------------------------------------------------------------------------- #
# pooled AUC from aggregate statistics (federated, no per-patient scores)
# --------------------------------------------------------------------------- #
def score_histogram(y_true: Any, y_prob: Any, bins: int = 20) -> np.ndarray:
    """Per-class counts of scores in ``bins`` equal-width bins over [0, 1].

    Returns an int64 array of shape ``(2, bins)``: row 0 = negatives, row 1 =
    positives.  Bin ``b`` holds scores in ``[b/bins, (b+1)/bins)`` (the last
    bin also holds 1.0); scores are clipped to [0, 1] and entries with a
    non-finite label or score are dropped.  The bin index ``floor(p * bins)``
    is monotone in ``p``, so the bin order is consistent with the score order,
    which is what makes the bounds of :func:`auc_from_histograms` exact.
    Histograms from several sites add up element-wise (:func:`pool_histograms`).
    """
    bins = int(bins)
    if bins < 1:
        raise ValueError("bins must be a positive integer")
    y, p = _finite_pair(y_true, y_prob)
    p = np.clip(p, 0.0, 1.0)
    idx = np.minimum(np.floor(p * bins).astype(np.int64), bins - 1)
    hist = np.zeros((2, bins), dtype=np.int64)
    hist[0] = np.bincount(idx[y == 0], minlength=bins)
    hist[1] = np.bincount(idx[y == 1], minlength=bins)
    return hist


def pool_histograms(hists: Sequence[Any]) -> np.ndarray:
    """Element-wise sum of per-site histograms (all with the same binning)."""
    arrs = [np.asarray(h, dtype=np.int64) for h in hists]
    if not arrs:
        raise ValueError("no histograms to pool")
    shape = arrs[0].shape
    if len(shape) != 2 or shape[0] != 2 or any(a.shape != shape for a in arrs):
        raise ValueError("histograms must all have shape (2, n_bins)")
    return np.sum(arrs, axis=0)


def _hist_parts(hist: Any) -> tuple[np.ndarray, np.ndarray, float, float]:
    h = np.asarray(hist, dtype=float)
    if h.ndim != 2 or h.shape[0] != 2:
        raise ValueError("hist must have shape (2, n_bins)")
    if np.any(h < 0):
        raise ValueError("hist counts must be non-negative")
    return h[0], h[1], float(h[0].sum()), float(h[1].sum())


def auc_from_histograms(hist: Any) -> tuple[float, float, float]:
    """AUC estimate and exact bounds from a ``(2, n_bins)`` score histogram.

    Let ``neg_b``/``pos_b`` be the counts in bin ``b`` (bins ordered by score),
    ``N = sum neg_b``, ``P = sum pos_b``,
    ``C = sum_b pos_b * sum_{b' < b} neg_b'`` (pairs whose positive lies in a
    strictly higher bin: concordant whatever the exact scores) and
    ``T = sum_b neg_b * pos_b`` (pairs sharing a bin: order unknown).

    * estimate ``= (C + T/2) / (N P)`` -- the exact Mann-Whitney AUC of the
      binned scores (within-bin pairs count as ties, i.e. half-concordant);
      equals the trapezoidal area under :func:`roc_from_histograms`.
    * lower ``= C / (N P)`` (every within-bin pair discordant) and
      upper ``= (C + T) / (N P)`` (every within-bin pair concordant).

    Each within-bin pair contributes between 0 and 1 to the exact AUC (ties in
    the raw scores count 1/2), so the exact AUC of the unbinned scores is
    guaranteed to satisfy ``lower <= AUC_exact <= upper``, and

        |estimate - AUC_exact| <= 0.5 * (sum_b neg_b * pos_b) / (N * P).

    Because counts simply add up, the histogram pooled over sites gives the
    same result as binning the pooled scores.  Returns ``(NaN, NaN, NaN)``
    when either class is empty.
    """
    neg, pos, n_neg, n_pos = _hist_parts(hist)
    if n_neg == 0 or n_pos == 0:
        return (_NAN, _NAN, _NAN)
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])  # negatives strictly lower
    conc = float(np.sum(pos * below))
    ties = float(np.sum(pos * neg))
    denom = n_neg * n_pos
    return ((conc + 0.5 * ties) / denom, conc / denom, (conc + ties) / denom)


def roc_from_histograms(hist: Any) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve from a ``(2, n_bins)`` histogram, thresholds at bin edges.

    Point ``k`` (k = 0..n_bins) predicts positive every bin with index
    ``>= n_bins - k``; so ``fpr``/``tpr`` run from (0, 0) to (1, 1), are
    non-decreasing and have ``n_bins + 1`` points.  The trapezoidal area under
    the curve equals the estimate of :func:`auc_from_histograms`.  Arrays are
    NaN when a class is empty.
    """
    neg, pos, n_neg, n_pos = _hist_parts(hist)
    cum_neg = np.concatenate([[0.0], np.cumsum(neg[::-1])])
    cum_pos = np.concatenate([[0.0], np.cumsum(pos[::-1])])
    fpr = cum_neg / n_neg if n_neg > 0 else np.full(cum_neg.shape, np.nan)
    tpr = cum_pos / n_pos if n_pos > 0 else np.full(cum_pos.shape, np.nan)
    return fpr, tpr


def youden_from_histograms(hist: Any, default: float = 0.5) -> float:
    """Youden threshold chosen on a pooled ``(2, n_bins)`` histogram.

    Candidate thresholds are the bin edges ``(n_bins - k) / n_bins`` of
    :func:`roc_from_histograms` (predict positive when ``p >= threshold``);
    returns ``default`` when a class is empty.  Ties go to the highest threshold.
    """
    neg, pos, n_neg, n_pos = _hist_parts(hist)
    if n_neg == 0 or n_pos == 0:
        return float(default)
    fpr, tpr = roc_from_histograms(hist)
    n_bins = len(neg)
    j = tpr - fpr
    k = int(np.argmax(j[1:n_bins])) + 1 if n_bins > 1 else 1
    return float((n_bins - k) / n_bins)


# --------------------------------------------------------------------------- #
# pooled AUC from released cells (histograms whose bins were merged at the site)
# --------------------------------------------------------------------------- #
def _cell_arrays(cells: Sequence[tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(lo, hi, neg, pos) of every cell of every ``(edges, neg, pos)`` histogram."""
    lo, hi, neg, pos = [], [], [], []
    for edges, n, m in cells:
        e = np.asarray(edges, dtype=float)
        n, m = np.asarray(n, dtype=float), np.asarray(m, dtype=float)
        if e.ndim != 1 or len(e) != len(n) + 1 or len(n) != len(m) or np.any(np.diff(e) <= 0):
            raise ValueError("each histogram needs increasing edges (len m+1) and m counts per label")
        if np.any(n < 0) or np.any(m < 0):
            raise ValueError("hist counts must be non-negative")
        lo.append(e[:-1]), hi.append(e[1:]), neg.append(n), pos.append(m)
    if not lo:
        raise ValueError("no histograms")
    return np.concatenate(lo), np.concatenate(hi), np.concatenate(neg), np.concatenate(pos)


def _spread(lo, hi, counts, grid) -> np.ndarray:
    """Counts of cells spread uniformly (by length) over the sub-intervals of ``grid``."""
    out = np.zeros(len(grid) - 1)
    for a, b, c in zip(lo, hi, counts):
        if c == 0:
            continue
        i, j = np.searchsorted(grid, a), np.searchsorted(grid, b)
        widths = np.diff(grid[i:j + 1])
        out[i:j] += c * widths / widths.sum()
    return out


def auc_from_cells(cells: Sequence[tuple]) -> tuple[float, float, float]:
    """AUC estimate and exact bounds from per-site histograms with site-specific cells.

    ``cells``: one ``(edges, neg, pos)`` per site; a site's cells are intervals
    ``[edges[i], edges[i+1])`` of score (the last one closed) with its negative / positive
    counts.  A pair (negative in cell I, positive in cell J) is concordant whatever the
    exact scores when ``J`` starts at or above the end of ``I``, discordant when ``J``
    ends at or below the start of ``I``, and unknown otherwise, so

    * lower = (sure concordant pairs) / (N P), upper = 1 - (sure discordant pairs) / (N P)
      bound the exact AUC of the unreleased scores;
    * the estimate spreads every cell uniformly over the common refinement of all edges
      and takes the Mann-Whitney AUC with within-bin ties as 1/2.  When every site uses
      the same bins this is exactly :func:`auc_from_histograms`.
    """
    lo, hi, neg, pos = _cell_arrays(cells)
    n_neg, n_pos = float(neg.sum()), float(pos.sum())
    if n_neg == 0 or n_pos == 0:
        return (_NAN, _NAN, _NAN)
    denom = n_neg * n_pos
    sure_conc = float(np.sum(np.outer(neg, pos) * (lo[None, :] >= hi[:, None])))
    sure_disc = float(np.sum(np.outer(neg, pos) * (hi[None, :] <= lo[:, None])))
    grid = np.unique(np.concatenate([lo, hi]))
    est = auc_from_histograms(np.vstack([_spread(lo, hi, neg, grid), _spread(lo, hi, pos, grid)]))[0]
    return (float(est), sure_conc / denom, 1.0 - sure_disc / denom)


def quantiles_from_cells(cells: Sequence[tuple], qs: Sequence[float]) -> list[float]:
    """Quantiles of scores released as ``(edges, counts)`` cells by several sites (uniform within a cell)."""
    lo, hi, counts, _ = _cell_arrays([(e, c, np.zeros(len(c))) for e, c in cells])
    grid = np.unique(np.concatenate([lo, hi]))
    mass = _spread(lo, hi, counts, grid)
    cdf = np.concatenate([[0.0], np.cumsum(mass)]) / max(mass.sum(), 1e-12)
    return [float(np.interp(q, cdf, grid)) for q in qs]


def youden_from_cells(cells: Sequence[tuple], default: float = 0.5) -> float:
    """Youden threshold on pooled site histograms: a cell edge strictly inside (0, 1).

    Sensitivity and specificity at an edge are exact for the sites whose cells have that
    edge and spread uniformly for the others; ties go to the highest threshold.
    """
    lo, hi, neg, pos = _cell_arrays(cells)
    if neg.sum() == 0 or pos.sum() == 0:
        return float(default)
    grid = np.unique(np.concatenate([lo, hi]))
    n, m = _spread(lo, hi, neg, grid), _spread(lo, hi, pos, grid)
    best, best_j = float(default), -np.inf
    for i in range(len(grid) - 2, 0, -1):        # interior edges, highest first
        tpr, fpr = m[i:].sum() / m.sum(), n[i:].sum() / n.sum()
        if tpr - fpr > best_j + 1e-12:
            best, best_j = float(grid[i]), tpr - fpr
    return best


# --------------------------------------------------------------------------- #
# survival from aggregate statistics (federated, no per-patient risk leaves a site)
# --------------------------------------------------------------------------- #
PAIR_KEYS = ("concordant", "discordant", "tied_risk", "comparable", "var_n", "cov_nd", "var_d")


def concordance_pairs(time: Any, event: Any, risk: Any, block: int = 1024) -> dict:
    """Harrell's pair counts on one cohort, with the jackknife components of their variance.

    A pair ``(i, j)`` is *comparable* when ``event_i`` and ``time_i < time_j``, or the times
    are equal and ``j`` was censored (the definition of
    :func:`sksurv.metrics.concordance_index_censored`; two events at the same time are not
    comparable); it is *concordant* when ``risk_i > risk_j``, *tied* when the risks
    are equal, *discordant* otherwise.  Harrell's C is ``(concordant + tied_risk / 2) /
    comparable``.  With ``N = concordant + tied_risk / 2`` and ``D = comparable``, patient
    ``i`` takes part in ``n_i`` of ``N`` and ``d_i`` of ``D``; leaving it out gives the
    jackknife estimates ``var_n``, ``cov_nd``, ``var_d`` of (N, D)'s covariance, so that
    centers' counts can be summed into a pooled C with a confidence interval
    (:func:`pooled_c_index`).  Rows with a non-finite value are dropped.
    """
    t, e, r = _as_float(time), _as_float(event), _as_float(risk)
    if not (t.shape == e.shape == r.shape):
        raise ValueError("time, event and risk must have the same length")
    keep = np.isfinite(t) & np.isfinite(e) & np.isfinite(r)
    t, e, r = t[keep], e[keep] != 0, r[keep]
    n = t.size
    n_i, d_i = np.zeros(n), np.zeros(n)
    conc = disc = tied = 0.0
    for a in range(0, n, block):
        ti, ei, ri = t[a:a + block, None], e[a:a + block, None], r[a:a + block, None]
        # i (row) had the event first; an event and a censoring at the same time: the event came first
        comp = ei & ((ti < t[None, :]) | ((ti == t[None, :]) & ~e[None, :]))
        c = comp & (ri > r[None, :])
        ti_ = comp & np.isclose(ri, r[None, :], rtol=0.0, atol=1e-8)
        c &= ~ti_
        dsc = comp & ~c & ~ti_
        conc += float(c.sum())
        tied += float(ti_.sum())
        disc += float(dsc.sum())
        half = c + 0.5 * ti_
        n_i[a:a + block] += half.sum(axis=1)
        n_i += half.sum(axis=0)
        d_i[a:a + block] += comp.sum(axis=1)
        d_i += comp.sum(axis=0)
    if n > 1:
        f = (n - 1) / n
        dn, dd = n_i - n_i.mean(), d_i - d_i.mean()
        var_n, cov_nd, var_d = f * float(dn @ dn), f * float(dn @ dd), f * float(dd @ dd)
    else:
        var_n = cov_nd = var_d = 0.0
    return {"concordant": conc, "discordant": disc, "tied_risk": tied, "comparable": conc + disc + tied,
            "var_n": var_n, "cov_nd": cov_nd, "var_d": var_d}


def pooled_c_index(pairs: Sequence[dict], alpha: float = 0.05) -> tuple[float, float, float]:
    """Center-stratified Harrell's C from the centers' :func:`concordance_pairs`, with a CI.

    Pairs are only ever formed within a center, so the sums are exactly Harrell's C
    computed within centers on the pooled predictions.  The interval is Wald's, with the
    delta-method variance ``sum_k (var_n - 2 C cov_nd + C^2 var_d)_k / D^2`` (centers
    independent), clipped to [0, 1].  ``(nan, nan, nan)`` when no pair is comparable.
    """
    num = sum(p["concordant"] + 0.5 * p["tied_risk"] for p in pairs)
    den = sum(p["comparable"] for p in pairs)
    if den <= 0:
        return (_NAN, _NAN, _NAN)
    c = num / den
    var = sum(p["var_n"] - 2.0 * c * p["cov_nd"] + c * c * p["var_d"] for p in pairs) / den ** 2
    half = float(stats.norm.ppf(1 - alpha / 2)) * math.sqrt(max(var, 0.0))
    return (float(c), max(0.0, c - half), min(1.0, c + half))


def td_auc_labels(time: Any, event: Any, horizon: float) -> np.ndarray:
    """Case (1) / control (0) / not used (NaN) of each patient for the AUC at ``horizon``.

    Cumulative/dynamic definition: cases had the event by ``horizon``, controls were
    still event-free after it; patients censored before ``horizon`` are not used (no
    inverse-probability-of-censoring weights, so that centers can release plain counts
    and the pooled AUC keeps the exact bounds of :func:`auc_from_cells`).
    """
    t, e = _as_float(time), _as_float(event)
    out = np.full(t.shape, np.nan)
    ok = np.isfinite(t) & np.isfinite(e)
    out[ok & (e != 0) & (t <= horizon)] = 1.0
    out[ok & (t > horizon)] = 0.0
    return out


def hazard_cells(time: Any, event: Any, risk: Any, edges: Sequence[float]) -> dict:
    """Per interval of ``edges``: events, exposure ``sum_j exp(risk_j) * (time j spent at risk in it)``,
    and the number of patients at risk at its start (what a site needs to release the cells)."""
    t, e, r = _as_float(time), _as_float(event), _as_float(risk)
    ok = np.isfinite(t) & np.isfinite(e) & np.isfinite(r)
    t, e, w = t[ok], e[ok] != 0, np.exp(r[ok])
    a, b = np.asarray(edges[:-1], float), np.asarray(edges[1:], float)
    inside = np.clip(np.minimum(t[:, None], b[None, :]) - a[None, :], 0.0, None)        # (patients, intervals)
    ev = e[:, None] & (t[:, None] >= a[None, :]) & (t[:, None] < b[None, :])
    return {"events": ev.sum(axis=0).astype(float), "exposure": (w[:, None] * inside).sum(axis=0),
            "at_risk": (t[:, None] >= a[None, :]).sum(axis=0)}


def baseline_hazard_from_cells(cells: Sequence[tuple]) -> tuple[list, list]:
    """Pooled piecewise-constant baseline hazard from the centers' ``(edges, events, exposure)`` cells.

    With the model's risk score fixed, the hazard's maximum-likelihood value on an interval
    is events / exposure (summed over centers).  Centers merge intervals differently, so
    the pooled cells are the coarsest partition that every center's cells refine: there
    the sums are exact.  Returns (times, cumulative hazard at each time), ``times`` the
    right edges of the pooled cells.
    """
    if not cells:
        return [], []
    common = set(np.round(np.asarray(cells[0][0], float), 9))
    for edges, _, _ in cells[1:]:
        common &= set(np.round(np.asarray(edges, float), 9))
    grid = np.array(sorted(common))
    ev, ex = np.zeros(len(grid) - 1), np.zeros(len(grid) - 1)
    for edges, events, exposure in cells:
        e = np.asarray(edges, float)
        if len(e) != len(events) + 1 or len(events) != len(exposure):
            raise ValueError("each center needs len(edges) - 1 events and exposures")
        idx = np.searchsorted(grid, np.round(e[:-1], 9), side="right") - 1
        np.add.at(ev, idx, np.asarray(events, float))
        np.add.at(ex, idx, np.asarray(exposure, float))
    rate = np.divide(ev, ex, out=np.zeros_like(ev), where=ex > 0)
    return [float(v) for v in grid[1:]], [float(v) for v in np.cumsum(rate * np.diff(grid))]


def survival_at(risk: Any, bh_times: Sequence[float], bh_cumhaz: Sequence[float], times: Sequence[float]) -> np.ndarray:
    """Predicted DFS probabilities ``S(t | x) = exp(-H0(t) exp(risk))``, shape (patients, times).

    ``H0`` is the baseline cumulative hazard at ``bh_times`` (from
    :func:`baseline_hazard_from_cells`), 0 at time 0 and linear in between (a constant hazard
    within each interval); beyond the last time it stays at its last value.
    """
    r = _as_float(risk)
    h = np.interp(np.asarray(times, float), np.concatenate([[0.0], np.asarray(bh_times, float)]),
                  np.concatenate([[0.0], np.asarray(bh_cumhaz, float)]))
    return np.exp(-np.outer(np.exp(r), h))


def _structured(event: np.ndarray, time: np.ndarray):
    from sksurv.util import Surv

    return Surv.from_arrays(event=event.astype(bool), time=time.astype(float))


def _td_auc_vector(t: np.ndarray, e: np.ndarray, r: np.ndarray, horizons: np.ndarray) -> np.ndarray:
    from sksurv.metrics import cumulative_dynamic_auc

    y = _structured(e, t)
    out = np.full(len(horizons), np.nan)
    ok = (horizons >= t.min()) & (horizons < t.max())
    if ok.any():
        out[ok] = cumulative_dynamic_auc(y, y, r, horizons[ok])[0]
    return out


def _ibs(t: np.ndarray, e: np.ndarray, surv: np.ndarray, grid: np.ndarray) -> float:
    from sksurv.metrics import integrated_brier_score

    y = _structured(e, t)
    keep = (grid >= t.min()) & (grid < t.max())
    if keep.sum() < 2:
        return _NAN
    return float(integrated_brier_score(y, y, surv[:, keep], grid[keep]))


def km_at(time: Any, event: Any, horizon: float, alpha: float = 0.05) -> tuple[float, float, float]:
    """Kaplan-Meier DFS probability at ``horizon`` with its (log-log) confidence interval."""
    from sksurv.nonparametric import kaplan_meier_estimator

    t, e = _as_float(time), _as_float(event)
    ok = np.isfinite(t) & np.isfinite(e)
    if ok.sum() == 0 or horizon > t[ok].max():
        return (_NAN, _NAN, _NAN)
    x, s, ci = kaplan_meier_estimator(e[ok] != 0, t[ok], conf_level=1 - alpha, conf_type="log-log")
    j = np.searchsorted(x, horizon, side="right") - 1
    if j < 0:
        return (1.0, 1.0, 1.0)
    return (float(s[j]), float(ci[0][j]), float(ci[1][j]))


def dfs_report(time: Any, event: Any, risk: Any, horizons: Sequence[float] = (12, 24, 36),
               bh_times: Sequence[float] | None = None, bh_cumhaz: Sequence[float] | None = None,
               n_boot: int = 500, seed: int = 0, min_patients: int = 10, min_events: int = 1,
               alpha: float = 0.05, risk_cuts: Sequence[float] | None = None) -> dict:
    """The DFS part of a full report: C-index, time-dependent AUC, and -- with a baseline hazard --
    the integrated Brier score and the calibration of predicted DFS at each horizon.

    * ``td_auc``: cumulative/dynamic AUC at each horizon with inverse-probability-of-
      censoring weights (:func:`sksurv.metrics.cumulative_dynamic_auc`, censoring
      estimated on the same patients), percentile-bootstrap CI;
    * ``ibs``: integrated Brier score of ``S(t | x)`` (:func:`survival_at`) over monthly
      times up to the last horizon (:func:`sksurv.metrics.integrated_brier_score`),
      bootstrap CI; lower is better, 0.25 is a coin toss;
    * ``calibration``: mean predicted DFS probability against the Kaplan-Meier estimate at
      each horizon (log-log CI), overall and by predicted-risk group: the model's own cut
      points ``risk_cuts`` (tertiles of its training patients) or, without them, this
      cohort's tertiles.

    Entries abstain (``{"abstained": True, "reason"}``) below ``min_patients`` patients with
    DFS or ``min_events`` events, or when a horizon lies beyond follow-up.
    """
    out: dict[str, Any] = {}
    t, e, r = _as_float(time), _as_float(event), _as_float(risk)
    keep = np.isfinite(t) & np.isfinite(e) & np.isfinite(r)
    t, e, r = t[keep], (e[keep] != 0).astype(int), r[keep]
    hz = np.asarray(horizons, float)
    out["n"], out["n_events"] = int(t.size), int(e.sum())
    out["c_index"] = _c_index_entry(None, t, e, r, n_boot, seed, min_patients, alpha)
    reason = None
    if t.size < min_patients:
        reason = f"only {t.size} patients with DFS (< min_patients={min_patients})"
    elif e.sum() < max(1, min_events):
        reason = f"only {int(e.sum())} DFS events (< {max(1, min_events)})"
    if reason:
        out["td_auc"] = {f"{h:g}": _abstain(reason) for h in hz}
        out["ibs"] = _abstain(reason)
        out["calibration"] = _abstain(reason)
        return _jsonify(out)
    point = _td_auc_vector(t, e, r, hz)
    boot = _bootstrap_values(lambda tt, ee, rr: _td_auc_vector(tt, ee, rr, hz), [t, e, r], n_boot, seed,
                             stratify=e)
    lo, hi = _percentiles(boot, alpha)
    out["td_auc"] = {f"{h:g}": _ci_entry(float(point[i]), float(lo[i]), float(hi[i]), "bootstrap (IPCW AUC)",
                                         f"horizon {h:g} beyond follow-up or without cases")
                     for i, h in enumerate(hz)}
    if bh_times is None or bh_cumhaz is None or not len(bh_times):
        why = "no baseline hazard in the model package"
        out["ibs"], out["calibration"] = _abstain(why), _abstain(why)
        return _jsonify(out)
    grid = np.arange(1.0, float(hz.max()) + 1.0)
    ibs_point = _ibs(t, e, survival_at(r, bh_times, bh_cumhaz, grid), grid)
    boot = _bootstrap_values(lambda tt, ee, rr: _ibs(tt, ee, survival_at(rr, bh_times, bh_cumhaz, grid), grid),
                             [t, e, r], n_boot, seed, stratify=e)
    lo, hi = _percentiles(boot, alpha)
    out["ibs"] = _ci_entry(ibs_point, float(lo[0]), float(hi[0]), "bootstrap", "follow-up too short")
    pred = survival_at(r, bh_times, bh_cumhaz, hz)
    cuts = np.asarray(risk_cuts, float) if risk_cuts is not None else np.quantile(r, [1 / 3, 2 / 3])
    tertile = np.searchsorted(cuts, r, side="right")
    cal = {}
    for i, h in enumerate(hz):
        rows = []
        for name, m in (("all", np.ones(t.size, bool)), ("low risk", tertile == 0), ("middle risk", tertile == 1),
                        ("high risk", tertile == 2)):
            obs, olo, ohi = km_at(t[m], e[m], h, alpha) if m.sum() >= min_patients else (_NAN, _NAN, _NAN)
            rows.append({"group": name, "n": int(m.sum()), "predicted": float(pred[m, i].mean()) if m.any() else None,
                         "observed": obs, "lo": olo, "hi": ohi})
        cal[f"{h:g}"] = rows
    out["calibration"] = cal
    return _jsonify(out)
