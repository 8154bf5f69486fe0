"""Survival from aggregates: pair counts, the pooled C-index, time-dependent AUC cells, the baseline hazard."""
from __future__ import annotations

import numpy as np
import pytest

from common.metrics import (auc_from_cells, baseline_hazard_from_cells, c_index, concordance_pairs, dfs_report,
                            hazard_cells, pooled_c_index, quantiles_from_cells, survival_at, td_auc_labels)


def _cohort(rng, n, ties=False):
    r = rng.normal(size=n)
    t = rng.exponential(20 * np.exp(-0.8 * r))
    c = rng.uniform(6, 60, n)
    e = (t <= c).astype(float)
    t = np.minimum(t, c)
    if ties:
        t, r = np.round(t), np.round(r, 1)
    return t, e, r


def _harrell_brute(t, e, r) -> tuple[float, float]:
    """(concordant + tied/2, comparable) by looping over every ordered pair (Harrell's definition)."""
    num = den = 0.0
    for i in range(len(t)):
        for j in range(len(t)):
            if i == j or not e[i]:
                continue
            if t[i] < t[j] or (t[i] == t[j] and not e[j]):
                den += 1
                num += 1.0 if r[i] > r[j] else 0.5 if r[i] == r[j] else 0.0
    return num, den


@pytest.mark.parametrize("ties", [False, True])
def test_pair_counts_match_sksurv_and_lifelines(ties):
    from sksurv.metrics import concordance_index_censored

    rng = np.random.default_rng(1)
    t, e, r = _cohort(rng, 120, ties)
    p = concordance_pairs(t, e, r, block=17)             # blocks of rows: same counts
    cidx, conc, disc, tied, _ = concordance_index_censored(e.astype(bool), t, r)
    assert (p["concordant"], p["discordant"], p["tied_risk"]) == (conc, disc, tied)
    assert pooled_c_index([p])[0] == pytest.approx(cidx, abs=1e-12) == pytest.approx(c_index(t, e, r), abs=1e-12)


def test_pooled_c_index_is_harrell_within_centers_on_the_pooled_predictions():
    rng = np.random.default_rng(7)
    centers = [_cohort(rng, n, ties=n % 2 == 0) for n in (15, 40, 23, 60)]
    # each center's risk on its own scale: pairs across centers would mean nothing, and are never formed
    centers = [(t, e, r + 3 * k) for k, (t, e, r) in enumerate(centers)]
    num = sum(_harrell_brute(*c)[0] for c in centers)
    den = sum(_harrell_brute(*c)[1] for c in centers)
    c, lo, hi = pooled_c_index([concordance_pairs(*c) for c in centers])
    assert c == pytest.approx(num / den, abs=1e-12)
    assert 0 <= lo < c < hi <= 1
    # Harrell's C over all pooled pairs would differ: the offsets make cross-center pairs concordant
    t, e, r = (np.concatenate(x) for x in zip(*centers))
    assert abs(c_index(t, e, r) - c) > 0.05


def test_pooled_interval_matches_the_jackknife_and_covers():
    rng = np.random.default_rng(3)
    t, e, r = _cohort(rng, 80)
    c, lo, hi = pooled_c_index([concordance_pairs(t, e, r)])
    loo = np.array([c_index(np.delete(t, i), np.delete(e, i), np.delete(r, i)) for i in range(len(t))])
    se_jk = np.sqrt((len(t) - 1) / len(t) * ((loo - loo.mean()) ** 2).sum())
    assert (hi - lo) / (2 * 1.959964) == pytest.approx(se_jk, rel=0.1)
    # coverage over repeated cohorts from one model (true C estimated on a very large sample)
    big = _cohort(np.random.default_rng(99), 4000)
    true_c = pooled_c_index([concordance_pairs(*big)])[0]
    hits = 0
    for s in range(60):
        ci = pooled_c_index([concordance_pairs(*_cohort(np.random.default_rng(1000 + s), 60))])
        hits += ci[1] <= true_c <= ci[2]
    assert hits >= 50                                     # nominal 95%: ~57 of 60


def test_td_auc_cells_bound_the_exact_time_dependent_auc():
    from client.disclosure import dfs_score, release_histogram

    rng = np.random.default_rng(5)
    t, e, r = _cohort(rng, 300)
    lab = td_auc_labels(t, e, 24.0)
    assert set(np.unique(lab[np.isfinite(lab)])) == {0.0, 1.0}
    assert np.isnan(lab[(t < 24) & (e == 0)]).all()       # censored before the horizon: not used
    ok = np.isfinite(lab)
    from sklearn.metrics import roc_auc_score

    exact = roc_auc_score(lab[ok], r[ok])
    cells = release_histogram(lab, dfs_score(r), 20, 5)
    est, lo, hi = auc_from_cells([(cells.edges, cells.neg, cells.pos)])
    assert lo <= exact <= hi and abs(est - exact) < 0.03


def test_baseline_hazard_from_cells_recovers_the_truth_and_pools_exactly():
    rng = np.random.default_rng(11)
    n = 6000
    r = rng.normal(size=n) * 0.7
    t = rng.exponential(20 * np.exp(-r))                   # true baseline hazard 1/20 per month
    c = rng.uniform(12, 60, n)
    e, t = (t <= c).astype(float), np.minimum(t, c)
    edges = np.arange(0, 61, 3.0)
    h = hazard_cells(t, e, r, edges)
    times, cumhaz = baseline_hazard_from_cells([(edges, h["events"], h["exposure"])])
    assert np.interp(24, times, cumhaz) == pytest.approx(24 / 20, rel=0.05)
    # two centers that merged their intervals differently: pooled on the coarsest common cells, exactly
    m = rng.random(n) < 0.4
    h1, h2 = hazard_cells(t[m], e[m], r[m], edges), hazard_cells(t[~m], e[~m], r[~m], edges[::2])
    times2, cum2 = baseline_hazard_from_cells([(edges, h1["events"], h1["exposure"]),
                                               (edges[::2], h2["events"], h2["exposure"])])
    coarse = hazard_cells(t, e, r, edges[::2])
    ref = np.cumsum(coarse["events"] / coarse["exposure"] * 6.0)
    assert times2 == pytest.approx(list(edges[::2][1:])) and cum2 == pytest.approx(list(ref), rel=1e-9)
    s = survival_at(np.array([0.0, 1.0]), times, cumhaz, [24.0])
    assert s[0, 0] == pytest.approx(np.exp(-24 / 20), rel=0.06) and s[1, 0] < s[0, 0]


def test_hazard_cells_released_by_a_site_hold_no_small_count():
    from client.disclosure import release_hazard

    rng = np.random.default_rng(2)
    t, e, r = _cohort(rng, 40)
    hz = release_hazard(t, e, r, np.arange(0, 61, 3.0), 5)
    assert hz is not None
    assert all(v == 0 or v >= 5 for v in hz["events"]) and len(hz["edges"]) == len(hz["events"]) + 1
    assert sum(hz["events"]) == pytest.approx(float(((t < 60) & (e == 1)).sum()))
    assert release_hazard(t[:4], e[:4], r[:4], np.arange(0, 61, 3.0), 5) is None     # fewer than 5 at risk


def test_quantiles_from_cells_of_two_sites():
    rng = np.random.default_rng(4)
    a, b = rng.uniform(0.1, 0.5, 300), rng.uniform(0.4, 0.9, 200)
    edges = np.linspace(0, 1, 21)
    cells = [(edges, np.histogram(a, edges)[0]), (edges, np.histogram(b, edges)[0])]
    q = quantiles_from_cells(cells, (1 / 3, 2 / 3))
    assert q == pytest.approx(list(np.quantile(np.concatenate([a, b]), (1 / 3, 2 / 3))), abs=0.03)


def test_dfs_report_abstains_and_computes():
    rng = np.random.default_rng(8)
    t, e, r = _cohort(rng, 150)
    rep = dfs_report(t, e, r, (12, 24, 36), n_boot=40, min_patients=10)
    assert rep["c_index"]["lo"] <= rep["c_index"]["value"] <= rep["c_index"]["hi"]
    assert all(v["value"] > 0.5 for v in rep["td_auc"].values())
    assert rep["ibs"]["abstained"] and "baseline hazard" in rep["ibs"]["reason"]
    edges = np.arange(0, 61, 3.0)
    h = hazard_cells(t, e, r, edges)
    times, cum = baseline_hazard_from_cells([(edges, h["events"], h["exposure"])])
    rep = dfs_report(t, e, r, (12, 24, 36), times, cum, n_boot=40)
    assert 0 < rep["ibs"]["value"] < 0.25
    for row in rep["calibration"]["24"]:
        assert abs(row["predicted"] - row["observed"]) < 0.15  # calibrated on the data it was fitted on
    few = dfs_report(t[:5], e[:5], r[:5], (12,), n_boot=10, min_patients=10)
    assert few["c_index"]["abstained"] and few["ibs"]["abstained"] and few["td_auc"]["12"]["abstained"]
