"""Recalibration (Platt scaling) fitted on internal validation, per patient or from released cells only."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from common.metrics import (apply_platt, ece_floor, evaluate_predictions, expected_calibration_error, fit_platt,
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


def test_ece_floor_is_the_mean_ece_of_labels_drawn_from_the_probabilities():
    p = np.random.default_rng(4).beta(2, 3, 150)
    draws = np.random.default_rng(7).random((300, p.size)) < p[None, :]      # the floor's own draws (seed 7)
    by_hand = np.mean([expected_calibration_error(d.astype(int), p) for d in draws])
    assert ece_floor(p, n_sim=300, seed=7) == pytest.approx(by_hand, rel=1e-9)
    assert ece_floor(p, strategy="quantile", n_sim=300, seed=7) == pytest.approx(
        np.mean([expected_calibration_error(d.astype(int), p, strategy="quantile") for d in draws]), rel=1e-9)
    # a sampling floor: ten times the patients, about a third of the floor (1/sqrt(10))
    assert 0.05 < ece_floor(p) < 0.12 and ece_floor(np.tile(p, 10)) < 0.45 * ece_floor(p)
    assert np.isnan(ece_floor([np.nan])) and ece_floor([0.0, 1.0, 1.0]) == 0.0
    rep = evaluate_predictions((p > 0.5).astype(int), p, 0.5, n_boot=20, calibration={"a": 0.5, "b": 0.0})
    assert rep["ece_floor"]["value"] == pytest.approx(ece_floor(p))
    assert rep["ece_calibrated_floor"]["value"] == pytest.approx(ece_floor(apply_platt(p, {"a": 0.5, "b": 0.0})))
    assert "ece_floor" not in evaluate_predictions([0, 1], [0.2, 0.8], 0.5, n_boot=5)   # below min_patients


def test_a_map_fitted_on_other_centers_transfers_and_never_sees_its_own_center():
    from common.learn.baseline import transfer_recalibration

    # every center meets an over-confident model (slope 2.5, shift 1 on the logit), as an unseen center does
    held = {f"c{i}": dict(zip("yp", _miscalibrated(600, 10 + i))) for i in range(4)}
    per_fold, params = transfer_recalibration(held)
    assert params["a"] == pytest.approx(0.4, abs=0.08) and params["method"] == "platt"
    raw = [expected_calibration_error(h["y"], h["p"]) for h in held.values()]
    moved = [per_fold[c]["ece_loco_calibrated"]["value"] for c in held]
    assert np.mean(moved) < 0.5 * np.mean(raw)
    # c0's map is fitted on c1-c3 only: c0's labels do not move it, c1's do
    flipped = {**held, "c0": {"y": 1 - held["c0"]["y"], "p": held["c0"]["p"]}}
    again, _ = transfer_recalibration(flipped)
    assert again["c0"]["loco_calibration"] == per_fold["c0"]["loco_calibration"]
    assert again["c1"]["loco_calibration"] != per_fold["c1"]["loco_calibration"]
    one_label = {c: {"y": np.zeros(20), "p": np.full(20, 0.3)} for c in ("a", "b")}
    assert transfer_recalibration(one_label) == ({"a": {"ece_loco_calibrated": {"value": None}},
                                                  "b": {"ece_loco_calibrated": {"value": None}}}, None)


def test_calibration_intercept_and_slope_recover_a_known_miscalibration_and_cover_a_calibrated_model():
    from common.metrics import calibration_intercept_slope

    # the model says sigmoid(2.5 z + 1) where the truth is sigmoid(z): slope 1 / 2.5, and too high in the large
    y, p = _miscalibrated(4000, 2)
    cal = calibration_intercept_slope(y, p)
    lp = np.log(p / (1 - p))
    assert cal["slope"][0] == pytest.approx(0.4, abs=0.03) and cal["slope"][1] < 0.4 < cal["slope"][2]
    # an independent fit: Newton's method on the two-parameter log-likelihood, and the Wald half-width from
    # its inverse Hessian (the slope's diagonal entry), which a wrong entry of the information would miss
    X = np.column_stack([np.ones_like(lp), lp])
    beta = np.zeros(2)
    for _ in range(50):
        q = 1 / (1 + np.exp(-X @ beta))
        hess = X.T @ (X * (q * (1 - q))[:, None])
        beta += np.linalg.solve(hess, X.T @ (y - q))
    half = 1.959964 * np.sqrt(np.linalg.inv(hess)[1, 1])
    assert cal["slope"][0] == pytest.approx(beta[1], abs=1e-4)
    assert cal["slope"][2] - cal["slope"][0] == pytest.approx(half, rel=1e-3)
    assert half != pytest.approx(1.959964 / np.sqrt(hess[1, 1]), rel=0.05)   # the correlation matters here
    # the intercept's score equation: the recalibrated mean prediction equals the event rate
    a = cal["intercept"][0]
    q_a = 1 / (1 + np.exp(-(a + lp)))
    assert cal["intercept"][2] - a == pytest.approx(1.959964 / np.sqrt(np.sum(q_a * (1 - q_a))), rel=1e-6)
    assert a < -0.5 and np.mean(1 / (1 + np.exp(-(a + lp)))) == pytest.approx(y.mean(), abs=1e-6)
    assert cal["intercept"][2] < 0 and cal["slope"][2] < 1     # both visible: the intervals exclude 0 and 1
    # a calibrated model on 150 patients: the Wald intervals cover 0 and 1 at about their nominal rate
    rng = np.random.default_rng(3)
    cover = np.zeros(2)
    for _ in range(200):
        q = rng.uniform(0.05, 0.95, 150)
        c = calibration_intercept_slope((rng.random(150) < q).astype(int), q)
        cover += [c["intercept"][1] <= 0 <= c["intercept"][2], c["slope"][1] <= 1 <= c["slope"][2]]
    assert np.all(cover / 200 > 0.88) and np.all(cover / 200 < 0.995)
    # nothing to estimate: one class, or every prediction the same (the intercept still is)
    assert all(np.isnan(v) for v in calibration_intercept_slope([0, 0, 0], [0.1, 0.2, 0.3])["slope"])
    flat = calibration_intercept_slope([0, 1, 1, 0], [0.3] * 4)
    assert np.isnan(flat["slope"][0]) and flat["intercept"][0] == pytest.approx(np.log(0.5 / 0.5) - np.log(0.3 / 0.7))
    # labels perfectly separated by the predictions (either way round, ties at the border included): the slope's
    # likelihood has no maximum, so no slope rather than wherever the solver stopped
    for probs in ([0.1, 0.2, 0.3, 0.6, 0.7, 0.8], [0.6, 0.7, 0.8, 0.1, 0.2, 0.3], [0.1, 0.2, 0.5, 0.5, 0.7, 0.8]):
        sep = calibration_intercept_slope([0, 0, 0, 1, 1, 1], probs)
        assert all(np.isnan(v) for v in sep["slope"]) and np.isfinite(sep["intercept"][0])
    assert np.isfinite(calibration_intercept_slope([0, 0, 1, 0, 1, 1], [0.1, 0.2, 0.3, 0.6, 0.7, 0.8])["slope"][0])


def test_the_report_carries_the_calibration_intercept_and_slope_with_their_intervals():
    from common.metrics import calibration_intercept_slope

    y, p = _miscalibrated(300, 5)
    rep = evaluate_predictions(y, p, 0.5, n_boot=20)
    cal = calibration_intercept_slope(y, p)
    for key, part in (("cal_intercept", "intercept"), ("cal_slope", "slope")):
        assert rep[key]["method"] == "wald"
        assert [rep[key][k] for k in ("value", "lo", "hi")] == pytest.approx(list(cal[part]))
    json.dumps(rep, allow_nan=False)
    small = evaluate_predictions([0, 1], [0.2, 0.8], 0.5, n_boot=5)       # below min_patients: abstains
    assert small["cal_slope"]["abstained"] and small["cal_intercept"]["abstained"]
    one = evaluate_predictions(np.zeros(20), np.full(20, 0.3), 0.5, n_boot=5)
    assert one["cal_intercept"]["abstained"] and "one class" in one["cal_intercept"]["reason"]
