"""Recalibration (Platt scaling) fitted on internal validation, per patient or from released cells only."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from common.metrics import (apply_platt, evaluate_predictions, expected_calibration_error, fit_platt,
                            fit_platt_cells, score_histogram)


def _miscalibrated(n: int, seed: int, slope: float = 2.5, shift: float = 1.0):
    """Labels from sigmoid(z); the model says sigmoid(slope z + shift): overconfident and shifted."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
    return y, 1 / (1 + np.exp(-(slope * z + shift)))


def test_platt_recovers_the_true_map_and_lowers_ece_on_new_patients():
    y, p = _miscalibrated(2000, 0)
    fit = fit_platt(y, p)
    # the true inverse map: a = 1/2.5, b = -1/2.5
    assert fit["a"] == pytest.approx(0.4, abs=0.05) and fit["b"] == pytest.approx(-0.4, abs=0.12)
    y2, p2 = _miscalibrated(1000, 1)
    assert expected_calibration_error(y2, p2) > 0.15
    assert expected_calibration_error(y2, apply_platt(p2, fit)) < 0.05
    assert roc_auc_score(y2, apply_platt(p2, fit)) == pytest.approx(roc_auc_score(y2, p2))


def test_platt_from_released_cells_is_close_to_the_per_patient_fit():
    y, p = _miscalibrated(600, 2)
    hist = score_histogram(y, p, 20)
    edges = np.linspace(0, 1, 21)
    # a site merges small cells: here, pairs of bins
    merged = (edges[::2], hist[0].reshape(-1, 2).sum(1), hist[1].reshape(-1, 2).sum(1))
    direct = fit_platt(y, p)
    for cells in ([(edges, hist[0], hist[1])], [merged]):
        fit = fit_platt_cells(cells)
        assert fit["a"] == pytest.approx(direct["a"], abs=0.08) and fit["b"] == pytest.approx(direct["b"], abs=0.15)
        assert fit["n"] == pytest.approx(600)
    y2, p2 = _miscalibrated(1000, 3)
    assert expected_calibration_error(y2, apply_platt(p2, fit_platt_cells([merged]))) < 0.06


def test_platt_never_reverses_the_ranking_and_needs_both_labels():
    rng = np.random.default_rng(4)
    p = rng.random(200)
    y = (rng.random(200) > p).astype(int)           # the model ranks backwards on this validation
    fit = fit_platt(y, p)
    assert fit["a"] > 0
    q = apply_platt(p, fit)
    assert np.all(np.diff(q[np.argsort(p)]) >= 0)
    assert np.mean(q) == pytest.approx(np.mean(y), abs=0.02)   # the level is still calibrated
    assert fit_platt(np.ones(10), rng.random(10)) is None
    assert np.isnan(apply_platt(np.array([np.nan, 0.3]), fit)[0])
    np.testing.assert_array_equal(apply_platt(p, None), p)


def test_the_full_report_adds_recalibrated_scores_and_keeps_discrimination_and_decisions():
    y, p = _miscalibrated(300, 5)
    fit = fit_platt(*_miscalibrated(1000, 6))
    plain = evaluate_predictions(y, p, 0.6, n_boot=200, seed=0)
    recal = evaluate_predictions(y, p, 0.6, n_boot=200, seed=0, calibration=fit)
    assert "ece_calibrated" not in plain
    for k in ("auc", "accuracy", "sensitivity", "specificity", "brier", "ece"):
        assert recal[k] == plain[k]
    assert recal["ece_calibrated"]["value"] < 0.5 * plain["ece"]["value"]
    assert recal["brier_calibrated"]["value"] < plain["brier"]["value"]
    assert recal["ece_calibrated"]["lo"] <= recal["ece_calibrated"]["value"] <= recal["ece_calibrated"]["hi"]
    json.dumps(recal, allow_nan=False)


def test_a_site_accepts_one_recalibration_per_run_and_only_with_the_full_report(tmp_path):
    import client.disclosure as D
    from client.policy import load_policy

    site = tmp_path / "site"
    site.mkdir()
    (site / "site.toml").write_text('center_id = "ext"\nrole = "external"\n')
    pol = load_policy(site)
    ledger = tmp_path / D.LEDGER_FILE
    cal = {"calibration-a": 0.4, "calibration-b": -0.3}
    t, why = D.admit_evaluate(pol, ledger, 1, {"split": "test", **cal})
    assert t is None and "only with the full report" in why
    t, why = D.admit_evaluate(pol, ledger, 1, {"split": "test", "full-report": True, **cal})
    assert why is None and t.calibration == {"a": 0.4, "b": -0.3}
    assert D.admit_evaluate(pol, ledger, 1, {"split": "test", "full-report": True, **cal})[1] is None   # the same: fine
    t, why = D.admit_evaluate(pol, ledger, 1, {"split": "test", "full-report": True,
                                               "calibration-a": 3.0, "calibration-b": 0.0})
    assert t is None and "already used the calibration a=0.4, b=-0.3" in why
    t, why = D.admit_evaluate(pol, ledger, 2, {"full-report": True, "calibration-a": -1.0, "calibration-b": 0.0})
    assert t is None and "slope > 0" in why
    assert json.loads(ledger.read_text())["1"]["calibration"] == [0.4, -0.3]
