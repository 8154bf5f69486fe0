"""Tests for common/metrics.py against hand-derived values and independent
(slow, textbook) reference implementations -- not against the module itself."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from lifelines.utils import concordance_index
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, roc_auc_score

from common.metrics import (
    auc_from_histograms,
    binary_metrics,
    bootstrap_ci,
    brier,
    c_index,
    delong_auc_ci,
    delong_test,
    evaluate_predictions,
    expected_calibration_error,
    pool_histograms,
    reliability_curve,
    roc_from_histograms,
    score_histogram,
    youden_threshold,
)


# --------------------------------------------------------------------------- #
# independent O(n^2) DeLong (DeLong, DeLong & Clarke-Pearson 1988, eq. for
# structural components with the Mann-Whitney kernel psi)
# --------------------------------------------------------------------------- #
def _psi(x, y):
    return 1.0 if x > y else (0.5 if x == y else 0.0)


def _slow_delong(y, scores):
    """Return (aucs, covariance) for a list of score vectors, O(m*n) loops."""
    y = np.asarray(y)
    pos_idx = np.flatnonzero(y == 1)
    neg_idx = np.flatnonzero(y == 0)
    m, n = len(pos_idx), len(neg_idx)
    v10s, v01s, aucs = [], [], []
    for s in scores:
        s = np.asarray(s, dtype=float)
        psi = np.array([[_psi(s[i], s[j]) for j in neg_idx] for i in pos_idx])
        v10s.append(psi.mean(axis=1))  # one per positive
        v01s.append(psi.mean(axis=0))  # one per negative
        aucs.append(psi.mean())
    k = len(scores)
    s10 = np.empty((k, k))
    s01 = np.empty((k, k))
    for a in range(k):
        for b in range(k):
            s10[a, b] = np.sum((v10s[a] - aucs[a]) * (v10s[b] - aucs[b])) / (m - 1)
            s01[a, b] = np.sum((v01s[a] - aucs[a]) * (v01s[b] - aucs[b])) / (n - 1)
    return np.array(aucs), s10 / m + s01 / n


# --------------------------------------------------------------------------- #
# Youden / binary metrics
# --------------------------------------------------------------------------- #
def test_youden_obvious_threshold():
    y = [0, 0, 0, 0, 1, 1, 1, 1]
    s = [0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9]
    assert youden_threshold(y, s) == pytest.approx(0.6)
    m = binary_metrics(y, s, youden_threshold(y, s))
    assert m["sensitivity"] == 1.0 and m["specificity"] == 1.0


def test_youden_tie_break_and_never_inf():
    # thresholds 0.4 and 0.2 both give J = 0.5 -> highest one (0.4) wins
    y = [0, 1, 0, 1]
    s = [0.1, 0.2, 0.3, 0.4]
    assert youden_threshold(y, s) == pytest.approx(0.4)
    # one class: undefined -> default, never inf / crash
    assert youden_threshold([1, 1, 1], [0.2, 0.5, 0.9]) == 0.5
    assert youden_threshold([1, 1, 1], [0.2, 0.5, 0.9], default=0.3) == 0.3
    # all-equal scores: J = 0 everywhere, still a finite threshold
    t = youden_threshold([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5])
    assert math.isfinite(t)


def test_binary_metrics_hand_counted():
    y = [1, 1, 1, 0, 0, 0, 0, 1]
    p = [0.9, 0.8, 0.3, 0.7, 0.2, 0.1, 0.4, 0.6]
    # threshold 0.65: pred = [1,1,0,1,0,0,0,0] -> TP=2 FN=2 FP=1 TN=3
    m = binary_metrics(y, p, 0.65)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 2, 1, 3)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["sensitivity"] == pytest.approx(2 / 4)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["ppv"] == pytest.approx(2 / 3)
    assert m["npv"] == pytest.approx(3 / 5)
    assert m["n"] == 8 and m["n_pos"] == 4
    # score == threshold counts as positive
    assert binary_metrics([1], [0.5], 0.5)["tp"] == 1


def test_binary_metrics_undefined_is_nan():
    m = binary_metrics([0, 0, 1], [0.1, 0.2, 0.3], 2.0)  # nobody predicted positive
    assert math.isnan(m["ppv"]) and m["npv"] == pytest.approx(2 / 3)
    m = binary_metrics([0, 0, 0], [0.1, 0.2, 0.9], 0.5)  # no positives
    assert math.isnan(m["sensitivity"]) and m["specificity"] == pytest.approx(2 / 3)
    m = binary_metrics([], [], 0.5)
    assert math.isnan(m["accuracy"]) and m["n"] == 0
    # NaN labels are ignored
    m = binary_metrics([1, np.nan, 0], [0.9, 0.9, 0.1], 0.5)
    assert m["n"] == 2 and m["accuracy"] == 1.0


# --------------------------------------------------------------------------- #
# DeLong
# --------------------------------------------------------------------------- #
def test_delong_hand_derived_tiny_example():
    # positives X = {0.9, 0.7, 0.4}, negatives Y = {0.6, 0.3}
    # psi rows (per positive): [1,1], [1,1], [0,1] -> V10 = [1, 1, 1/2]
    # psi cols (per negative): [1,1,0], [1,1,1]     -> V01 = [2/3, 1]
    # AUC = 5/6; S10 = var([1,1,.5], ddof=1) = 1/12; S01 = var([2/3,1], ddof=1) = 1/18
    # Var = S10/m + S01/n = (1/12)/3 + (1/18)/2 = 1/18
    y = [1, 1, 1, 0, 0]
    s = [0.9, 0.7, 0.4, 0.6, 0.3]
    auc, lo, hi, se = delong_auc_ci(y, s)
    assert auc == pytest.approx(5 / 6)
    assert se == pytest.approx(math.sqrt(1 / 18))
    z = 1.959963984540054
    assert lo == pytest.approx(5 / 6 - z * math.sqrt(1 / 18))
    assert hi == 1.0  # 5/6 + 0.462 clipped to 1


def test_delong_tied_scores_hand_derived():
    # positives {2, 1}, negatives {1, 0}: psi = [[1,1],[.5,1]]
    # V10 = [1, .75], V01 = [.75, 1], AUC = .875
    # S10 = S01 = (0.125^2 * 2) / 1 = 1/32 ; Var = 1/64 + 1/64 = 1/32
    auc, _, _, se = delong_auc_ci([1, 1, 0, 0], [2.0, 1.0, 1.0, 0.0])
    assert auc == pytest.approx(0.875)
    assert se == pytest.approx(math.sqrt(1 / 32))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delong_matches_slow_reference(seed):
    rng = np.random.default_rng(seed)
    n = 60
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    a = np.round(rng.normal(size=n) + 0.8 * y, 1)  # rounding -> many ties
    b = np.round(a + rng.normal(scale=0.7, size=n), 1)
    aucs, cov = _slow_delong(y, [a, b])
    auc, lo, hi, se = delong_auc_ci(y, a)
    assert auc == pytest.approx(roc_auc_score(y, a))
    assert auc == pytest.approx(aucs[0])
    assert se == pytest.approx(math.sqrt(cov[0, 0]))
    assert 0.0 <= lo <= auc <= hi <= 1.0
    z, p = delong_test(y, a, b)
    z_ref = (aucs[0] - aucs[1]) / math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert z == pytest.approx(z_ref)
    assert p == pytest.approx(math.erfc(abs(z_ref) / math.sqrt(2)))
    z2, p2 = delong_test(y, b, a)
    assert z2 == pytest.approx(-z) and p2 == pytest.approx(p)


def test_delong_degenerate_cases():
    assert all(math.isnan(v) for v in delong_auc_ci([1, 1, 1], [0.1, 0.2, 0.3]))
    auc, lo, hi, se = delong_auc_ci([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])  # perfect
    assert (auc, lo, hi, se) == (1.0, 1.0, 1.0, 0.0)
    assert delong_test([0, 1, 0, 1], [0.1, 0.8, 0.3, 0.6], [0.1, 0.8, 0.3, 0.6]) == (0.0, 1.0)
    z, p = delong_test([1, 1], [0.1, 0.2], [0.3, 0.4])
    assert math.isnan(z) and math.isnan(p)
    # narrower alpha -> narrower interval
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 80)
    s = rng.normal(size=80) + y
    _, lo95, hi95, _ = delong_auc_ci(y, s, alpha=0.05)
    _, lo50, hi50, _ = delong_auc_ci(y, s, alpha=0.5)
    assert lo95 < lo50 < hi50 < hi95


# --------------------------------------------------------------------------- #
# calibration
# --------------------------------------------------------------------------- #
def test_ece_constructed_case():
    # bin [0.2,0.3): 4 x p=.25, 1 positive -> |.25-.25| = 0
    # bin [0.7,0.8): 4 x p=.75, 2 positives -> |.50-.75| = .25, weight 1/2
    p = [0.25] * 4 + [0.75] * 4
    y = [1, 0, 0, 0] + [1, 1, 0, 0]
    assert expected_calibration_error(y, p, n_bins=10) == pytest.approx(0.125)
    # all predictions 0.9, all labels 0 -> ECE = 0.9
    assert expected_calibration_error([0] * 5, [0.9] * 5) == pytest.approx(0.9)
    assert brier(y, p) == pytest.approx(brier_score_loss(y, p))


def test_ece_perfectly_calibrated_large_sample():
    rng = np.random.default_rng(0)
    p = rng.random(200_000)
    y = (rng.random(p.size) < p).astype(int)
    assert expected_calibration_error(y, p) < 0.01
    assert expected_calibration_error(y, p, strategy="quantile") < 0.01


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_reliability_curve_matches_sklearn(strategy):
    rng = np.random.default_rng(1)
    p = rng.random(500) ** 2
    y = (rng.random(500) < p).astype(int)
    rc = reliability_curve(y, p, n_bins=8, strategy=strategy)
    nz = rc["counts"] > 0
    pt, pp = calibration_curve(y, p, n_bins=8, strategy=strategy)
    np.testing.assert_allclose(rc["prob_true"][nz], pt)
    np.testing.assert_allclose(rc["prob_pred"][nz], pp)
    assert rc["counts"].sum() == 500
    assert np.all(np.isnan(rc["prob_true"][~nz]))


# --------------------------------------------------------------------------- #
# C-index
# --------------------------------------------------------------------------- #
def test_c_index_hand_computed():
    # times 1,2,3,4; patient 3 censored. Comparable pairs (i has event, T_i < T_j):
    # (1,2) (1,3) (1,4) (2,3) (2,4) -> 5 pairs.
    t = [1, 2, 3, 4]
    e = [1, 1, 0, 1]
    # risk [4,2,3,1]: only (2,3) discordant -> 4/5
    assert c_index(t, e, [4, 2, 3, 1]) == pytest.approx(0.8)
    # risk [4,2,2,1]: (2,3) tied -> 4.5/5
    assert c_index(t, e, [4, 2, 2, 1]) == pytest.approx(0.9)
    # higher risk = shorter survival -> C = 1 ; reversed -> 0
    assert c_index(t, e, [4, 3, 2, 1]) == pytest.approx(1.0)
    assert c_index(t, e, [1, 2, 3, 4]) == pytest.approx(0.0)


def _slow_harrell(t, e, r):
    num = den = 0.0
    for i in range(len(t)):
        if not e[i]:
            continue
        for j in range(len(t)):
            if t[i] < t[j]:
                den += 1
                num += 1.0 if r[i] > r[j] else (0.5 if r[i] == r[j] else 0.0)
    return num / den


def test_c_index_matches_lifelines_and_reference():
    rng = np.random.default_rng(4)
    n = 80
    r = rng.normal(size=n)
    t = rng.exponential(np.exp(-r)) + 1e-6 * np.arange(n)  # distinct times
    e = rng.random(n) < 0.7
    c = c_index(t, e, r)
    assert c == pytest.approx(concordance_index(t, -r, e))
    assert c == pytest.approx(_slow_harrell(t, e, r))
    assert c > 0.6  # risk drives the hazard -> concordant


def test_c_index_undefined_and_nan_dropped():
    assert math.isnan(c_index([1, 2, 3], [0, 0, 0], [1, 2, 3]))  # no events
    assert math.isnan(c_index([1], [1], [1]))
    c = c_index([1, 2, np.nan, 3, 4], [1, 1, 1, 0, 1], [4, 2, 99, 3, 1])
    assert c == pytest.approx(0.8)


# --------------------------------------------------------------------------- #
# bootstrap
# --------------------------------------------------------------------------- #
def test_bootstrap_mean_matches_normal_theory():
    rng = np.random.default_rng(5)
    x = rng.normal(loc=2.0, scale=1.0, size=400)
    lo, hi = bootstrap_ci(np.mean, x, n_boot=1000, seed=1)
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert lo == pytest.approx(x.mean() - half, abs=0.02)
    assert hi == pytest.approx(x.mean() + half, abs=0.02)
    assert bootstrap_ci(np.mean, x, n_boot=200, seed=3) == bootstrap_ci(np.mean, x, n_boot=200, seed=3)


def test_bootstrap_stratified_and_skips_undefined():
    y = np.array([0] * 15 + [1] * 3)
    s = np.linspace(0, 1, 18)
    # stratified: positives count is fixed in every resample
    assert bootstrap_ci(lambda yy, ss: yy.sum(), y, s, n_boot=100, stratify=y) == (3.0, 3.0)
    # unstratified AUC is undefined (raises) in resamples without positives: skipped
    lo, hi = bootstrap_ci(roc_auc_score, y, s, n_boot=300, seed=0)
    assert lo == pytest.approx(1.0) and hi == pytest.approx(1.0)
    # never defined -> NaN
    lo, hi = bootstrap_ci(lambda a: float("nan"), y, n_boot=20)
    assert math.isnan(lo) and math.isnan(hi)


# --------------------------------------------------------------------------- #
# histogram AUC (federated pooling)
# --------------------------------------------------------------------------- #
def _random_scores(seed, n=400):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.2 * y - 0.3)))
    return y, p


def test_score_histogram_layout():
    h = score_histogram([0, 0, 1, 1, 1, np.nan], [0.0, 0.49, 0.5, 1.0, 0.99, 0.7], bins=2)
    assert h.shape == (2, 2)
    np.testing.assert_array_equal(h, [[2, 0], [0, 3]])


def test_histogram_auc_many_bins_close_to_exact():
    y, p = _random_scores(0)
    exact = roc_auc_score(y, p)
    h = score_histogram(y, p, bins=1000)
    est, lo, hi = auc_from_histograms(h)
    n_neg, n_pos = h[0].sum(), h[1].sum()
    bound = 0.5 * np.sum(h[0] * h[1]) / (n_neg * n_pos)
    assert abs(est - exact) <= bound + 1e-12
    assert abs(est - exact) < 2e-3
    assert lo <= exact <= hi


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("bins", [1, 2, 5, 20, 100])
def test_histogram_auc_bounds_property(seed, bins):
    y, p = _random_scores(seed, n=150 + 37 * seed)
    if seed % 2:
        p = np.round(p, 2)  # ties in raw scores too
    exact = roc_auc_score(y, p)
    h = score_histogram(y, p, bins=bins)
    est, lo, hi = auc_from_histograms(h)
    assert lo - 1e-12 <= exact <= hi + 1e-12
    assert lo <= est <= hi
    bound = 0.5 * np.sum(h[0] * h[1]) / (h[0].sum() * h[1].sum())
    assert abs(est - exact) <= bound + 1e-12
    assert hi - lo == pytest.approx(2 * bound)


def test_histogram_auc_20_bins_bound_and_roc_area():
    y, p = _random_scores(7, n=1000)
    h = score_histogram(y, p, bins=20)
    est, lo, hi = auc_from_histograms(h)
    exact = roc_auc_score(y, p)
    bound = 0.5 * np.sum(h[0] * h[1]) / (h[0].sum() * h[1].sum())
    assert abs(est - exact) <= bound
    assert lo <= exact <= hi
    # the estimate is exactly the Mann-Whitney AUC of the bin indices
    bin_idx = np.minimum(np.floor(p * 20), 19)
    assert est == pytest.approx(roc_auc_score(y, bin_idx))
    # ROC from histograms: (0,0)->(1,1), monotone, trapezoid area == estimate
    fpr, tpr = roc_from_histograms(h)
    assert fpr.shape == tpr.shape == (21,)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(est)


def test_histograms_from_two_sites_pool():
    y1, p1 = _random_scores(10, n=300)
    y2, p2 = _random_scores(11, n=200)
    p2 = p2 ** 0.5  # the second site is differently distributed
    h1 = score_histogram(y1, p1, bins=50)
    h2 = score_histogram(y2, p2, bins=50)
    pooled = pool_histograms([h1, h2])
    np.testing.assert_array_equal(pooled, h1 + h2)
    y = np.concatenate([y1, y2])
    p = np.concatenate([p1, p2])
    np.testing.assert_array_equal(pooled, score_histogram(y, p, bins=50))
    est, lo, hi = auc_from_histograms(pooled)
    exact = roc_auc_score(y, p)
    assert lo <= exact <= hi
    assert est == pytest.approx(auc_from_histograms(h1 + h2)[0])


def test_histogram_auc_one_class_is_nan():
    h = score_histogram([1, 1, 1], [0.2, 0.5, 0.9], bins=10)
    assert all(math.isnan(v) for v in auc_from_histograms(h))
    with pytest.raises(ValueError):
        pool_histograms([np.zeros((2, 10)), np.zeros((2, 5))])


# --------------------------------------------------------------------------- #
# evaluate_predictions
# --------------------------------------------------------------------------- #
def _is_abstained(entry):
    return isinstance(entry, dict) and entry.get("abstained") is True and isinstance(entry.get("reason"), str)


def test_evaluate_predictions_full_report_json():
    rng = np.random.default_rng(12)
    n = 120
    y = rng.integers(0, 2, n).astype(float)
    p = np.clip(0.35 * y + 0.65 * rng.random(n), 0, 1)
    y[:7] = np.nan  # unlabelled patients
    t = rng.exponential(10, n)
    t[3] = np.nan
    e = rng.integers(0, 2, n)
    rep = evaluate_predictions(y, p, 0.5, time=t, event=e, risk=p, n_boot=200, seed=0)
    json.dumps(rep, allow_nan=False)
    assert rep["n"] == 113 and rep["n_unlabeled"] == 7
    assert rep["n_pos"] == int(np.nansum(y))
    assert rep["threshold"] == 0.5
    lab = ~np.isnan(y)
    assert rep["auc"]["method"] == "delong"
    assert rep["auc"]["value"] == pytest.approx(roc_auc_score(y[lab], p[lab]))
    bm = binary_metrics(y[lab], p[lab], 0.5)
    for k in ("accuracy", "sensitivity", "specificity", "ppv", "npv"):
        assert rep[k]["value"] == pytest.approx(bm[k])
        assert rep[k]["lo"] <= rep[k]["value"] <= rep[k]["hi"]
        assert isinstance(rep[k]["value"], float)
    assert rep["brier"]["value"] == pytest.approx(brier_score_loss(y[lab], p[lab]))
    assert rep["ece"]["value"] == pytest.approx(expected_calibration_error(y[lab], p[lab]))
    ok = ~np.isnan(t)
    assert rep["c_index"]["value"] == pytest.approx(concordance_index(t[ok], -p[ok], e[ok]))
    assert rep["c_index"]["lo"] <= rep["c_index"]["value"] <= rep["c_index"]["hi"]


def test_evaluate_predictions_abstains_below_min_patients():
    rep = evaluate_predictions([0, 1, 0, 1, np.nan], [0.1, 0.9, 0.2, 0.8, 0.5], 0.5, n_boot=50)
    json.dumps(rep, allow_nan=False)
    assert rep["n"] == 4
    for k in ("auc", "accuracy", "sensitivity", "brier", "ece", "c_index"):
        assert _is_abstained(rep[k]), k
    rep = evaluate_predictions([], [], 0.5, time=[], event=[], n_boot=50)
    json.dumps(rep, allow_nan=False)
    assert _is_abstained(rep["auc"]) and _is_abstained(rep["c_index"])


def test_evaluate_predictions_one_class_survives():
    y = [0] * 30
    p = np.linspace(0.05, 0.95, 30)
    t = np.arange(1, 31, dtype=float)
    rep = evaluate_predictions(y, p, 0.5, time=t, event=[0] * 30, n_boot=100)
    json.dumps(rep, allow_nan=False)
    assert _is_abstained(rep["auc"])
    assert _is_abstained(rep["sensitivity"])  # no positives
    assert rep["specificity"]["value"] == pytest.approx(15 / 30)
    assert rep["accuracy"]["value"] == pytest.approx(0.5)
    assert _is_abstained(rep["c_index"])  # no events


def test_evaluate_predictions_bad_input_never_raises():
    rep = evaluate_predictions([0, 1, 1], [0.2, 0.4], 0.5, time=[1, 2], event=[1], n_boot=10)
    json.dumps(rep, allow_nan=False)
    assert _is_abstained(rep["auc"]) and _is_abstained(rep["c_index"])
    rep = evaluate_predictions([0, 1, 2] * 5, np.linspace(0, 1, 15), None, n_boot=10)
    json.dumps(rep, allow_nan=False)
    assert _is_abstained(rep["auc"]) and rep["threshold"] == 0.5
