"""Evaluation metrics for the federated HCC models (one package, one place for every metric).

Modules: ``classification`` (AUC, DeLong, confusion metrics), ``calibration``, ``bootstrap``,
``survival`` (C-index, pair counts, time-dependent AUC, baseline hazard, predicted DFS),
``federated`` (pooling histograms and released cells), ``report`` (the full report).
Everything public is importable from ``common.metrics``.

Everything that scikit-learn or lifelines already provides is delegated to
them (ROC curve, AUC, Brier score, Harrell's C-index).  This module only adds
what they lack:

* DeLong's variance / confidence interval for the AUC and DeLong's paired test,
  computed with the fast mid-rank algorithm of Sun & Xu (2014),
* expected calibration error (ECE) and a reliability curve that also reports
  bin counts; the calibration intercept and slope with Wald intervals,
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

from common.metrics.bootstrap import bootstrap_ci  # noqa: F401
from common.metrics.calibration import (apply_platt, brier, calibration_intercept_slope, ece_floor,  # noqa: F401
                                        expected_calibration_error, fit_platt, fit_platt_cells, reliability_curve)
from common.metrics.classification import binary_metrics, delong_auc_ci, delong_test, youden_threshold  # noqa: F401
from common.metrics.federated import (auc_from_cells, auc_from_histograms, pool_histograms,  # noqa: F401
                                     quantiles_from_cells, roc_from_histograms, score_histogram,
                                     youden_from_cells, youden_from_histograms)
from common.metrics.report import WEAK_CAL_KEYS, evaluate_predictions  # noqa: F401
from common.metrics.survival import (PAIR_KEYS, baseline_hazard_from_cells, c_index, concordance_pairs,  # noqa: F401
                                     dfs_report, hazard_cells, km_at, pooled_c_index, survival_at, td_auc_labels)

__all__ = [
    "youden_threshold",
    "binary_metrics",
    "delong_auc_ci",
    "delong_test",
    "brier",
    "expected_calibration_error",
    "ece_floor",
    "calibration_intercept_slope",
    "reliability_curve",
    "fit_platt",
    "fit_platt_cells",
    "apply_platt",
    "c_index",
    "bootstrap_ci",
    "evaluate_predictions",
    "WEAK_CAL_KEYS",
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
