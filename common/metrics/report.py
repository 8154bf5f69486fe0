"""A full, JSON-serialisable evaluation report of one model on one cohort (value, CI or abstention)."""
from __future__ import annotations

from typing import Any

import numpy as np

from common.metrics._base import _NAN, _abstain, _as_float, _ci_entry, _jsonify, _two_classes  # noqa: F401
from common.metrics.bootstrap import _bootstrap_values, _percentiles
from common.metrics.calibration import apply_platt, calibration_intercept_slope, ece_floor, expected_calibration_error
from common.metrics.classification import binary_metrics, delong_auc_ci
from common.metrics.survival import _c_index_entry


# --------------------------------------------------------------------------- #
# full report
# --------------------------------------------------------------------------- #
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
# calibration after recalibration (Platt scaling fitted on internal validation): beside the raw ones
_RECAL_KEYS = ("brier_calibrated", "ece_calibrated")
# weak calibration (common.metrics.calibration_intercept_slope): Wald CIs, abstained with the classification metrics
WEAK_CAL_KEYS = ("cal_intercept", "cal_slope")
_UNDEFINED.update({k: "undefined (no labelled patients)" for k in _RECAL_KEYS})


def _calibration_pair(y: np.ndarray, p: np.ndarray, n_bins: int) -> list[float]:
    # same value as brier() (sklearn brier_score_loss on clipped p), without
    # sklearn's per-call validation overhead inside the bootstrap loop
    return [float(np.mean((np.clip(p, 0.0, 1.0) - y) ** 2)) if y.size else _NAN,
            expected_calibration_error(y, p, n_bins=n_bins)]


def _cls_vector(y: np.ndarray, p: np.ndarray, threshold: float, n_bins: int, recal: dict | None = None) -> np.ndarray:
    m = binary_metrics(y, p, threshold)
    extra = _calibration_pair(y, apply_platt(p, recal), n_bins) if recal else []
    return np.array([m[k] for k in _CLS_KEYS[:5]] + _calibration_pair(y, p, n_bins) + extra, dtype=float)


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
    calibration: dict | None = None,
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
    ``cal_intercept`` and ``cal_slope`` (:func:`calibration_intercept_slope`, Wald CIs, ``method="wald"``)
    are the calibration intercept (0 when calibrated in the large) and slope (1 when calibrated).
    ``ece_floor`` (with a calibration also ``ece_calibrated_floor``) is the ECE that a perfectly calibrated
    model with these probabilities would show on this many patients (:func:`ece_floor`): a point value
    to read the ECE against, present when the classification metrics are.
    ``calibration``: Platt parameters (``{"a", "b"}``, fitted on internal validation) adds
    ``brier_calibrated`` and ``ece_calibrated``, the same scores of the recalibrated
    probabilities (in the same bootstrap); the threshold metrics do not change (a monotone map
    with the threshold mapped alike decides every patient the same way).
    """
    thr = 0.5 if threshold is None or not np.isfinite(threshold) else float(threshold)
    report: dict[str, Any] = {"threshold": thr}
    keys = _CLS_KEYS + (_RECAL_KEYS if calibration else ())
    if calibration:
        report["calibration"] = {"method": "platt", "a": float(calibration["a"]), "b": float(calibration["b"])}
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
            for k in ("auc",) + keys + WEAK_CAL_KEYS:
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
                point = _cls_vector(y, p, thr, ece_bins, calibration)
                boot = _bootstrap_values(
                    lambda yy, pp: _cls_vector(yy, pp, thr, ece_bins, calibration), [y, p], n_boot, seed, stratify=y
                )
                lo, hi = _percentiles(boot, alpha)
                for i, k in enumerate(keys):
                    report[k] = _ci_entry(float(point[i]), float(lo[i]), float(hi[i]), "bootstrap", _UNDEFINED[k])
            except Exception as exc:  # pragma: no cover - defensive
                for k in keys:
                    report[k] = _abstain(f"error: {exc}")
            # the ECE a perfectly calibrated model with these probabilities would show on this many
            # patients: the raw ECE is read against it (a point value, no CI)
            report["ece_floor"] = {"value": ece_floor(p, ece_bins, seed=seed), "method": "simulated"}
            if calibration:
                report["ece_calibrated_floor"] = {"value": ece_floor(apply_platt(p, calibration), ece_bins, seed=seed),
                                                  "method": "simulated"}
            # calibration intercept and slope (0 and 1 when calibrated; Wald CIs, no sampling floor)
            try:
                weak = calibration_intercept_slope(y, p, alpha=alpha)
                for k, part, why in (("cal_intercept", "intercept", "one class"),
                                     ("cal_slope", "slope", "one class, one predicted value, or labels perfectly "
                                                            "separated by the predictions")):
                    report[k] = _ci_entry(*weak[part], "wald", f"undefined ({why})")
            except Exception as exc:  # pragma: no cover - defensive
                for k in WEAK_CAL_KEYS:
                    report[k] = _abstain(f"error: {exc}")
    except Exception as exc:
        report.setdefault("n", None)
        report.setdefault("n_pos", None)
        for k in ("auc",) + keys + WEAK_CAL_KEYS:
            report.setdefault(k, _abstain(f"error: {exc}"))

    report["c_index"] = _c_index_entry(y_prob, time, event, risk, n_boot, seed, min_patients, alpha)
    return _jsonify(report)
