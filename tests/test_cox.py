"""The exact federated Cox model (``model=cox``): the centers' derivatives, Newton on their sums, and the run.

The reference is lifelines' ``CoxPHFitter`` on the pooled data, stratified by center, with the same ridge
penalty (``penalizer / sd**2`` per covariate undoes lifelines' normalisation; common/learn/cox.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.data.splits import fold_of
from common.learn.cox import Fit, efron_derivatives, newton_update, site_derivatives

FEATURES = ["age", "estrec", "progrec", "pnodes", "tsize", "horTh", "menostat", "tgrade"]
CENTERS = ("center_a", "center_b", "center_c")


def _sites(seed=0, S=3, p=4):
    rng = np.random.default_rng(seed)
    out = []
    for s in range(S):
        n = 30 + 15 * s
        X = rng.normal(size=(n, p)) + 0.3 * s
        t = np.round(rng.exponential(10 * np.exp(-0.5 * X[:, 0]), n)) + 1     # rounded: many tied times
        e = (rng.random(n) < 0.7).astype(float)
        out.append((X, t, e))
    return out


def _lifelines(sites, penalizer):
    from lifelines import CoxPHFitter

    p = sites[0][0].shape[1]
    df = pd.DataFrame(np.vstack([s[0] for s in sites]), columns=[f"x{j}" for j in range(p)])
    df["T"], df["E"] = np.concatenate([s[1] for s in sites]), np.concatenate([s[2] for s in sites])
    df["center"] = np.repeat(np.arange(len(sites)), [len(s[1]) for s in sites])
    sd = df[[f"x{j}" for j in range(p)]].std(0).to_numpy()
    cph = CoxPHFitter(penalizer=penalizer / sd ** 2, strata=["center"])
    cph.fit(df, "T", "E", fit_options={"precision": 1e-12, "r_precision": 1e-15, "max_steps": 200})
    return cph


def test_efron_derivatives_are_the_derivatives_of_the_log_partial_likelihood():
    X, t, e = _sites()[1]
    b = np.array([0.2, -0.1, 0.05, 0.3])
    ll, g, h = efron_derivatives(X, t, e, b)
    eps = 1e-6
    unit = np.eye(len(b))
    g_num = [(efron_derivatives(X, t, e, b + eps * u)[0] - efron_derivatives(X, t, e, b - eps * u)[0]) / (2 * eps)
             for u in unit]
    h_num = [(efron_derivatives(X, t, e, b + eps * u)[1] - efron_derivatives(X, t, e, b - eps * u)[1]) / (2 * eps)
             for u in unit]
    assert np.allclose(g, g_num, atol=1e-6) and np.allclose(h, h_num, atol=1e-6)
    # the log-likelihood itself is lifelines' (unpenalised, one stratum, at its own solution)
    cph = _lifelines([(X, t, e)], 0.0)
    assert efron_derivatives(X, t, e, cph.params_.to_numpy())[0] == pytest.approx(cph.log_likelihood_, abs=1e-8)


def test_newton_on_summed_derivatives_reaches_the_pooled_stratified_lifelines_fit():
    sites = _sites()
    n, p = sum(len(s[1]) for s in sites), sites[0][0].shape[1]
    for penalizer in (0.0, 0.1):
        fit = Fit(penalizer, None, np.zeros(p))
        for rounds in range(1, 30):
            parts = [efron_derivatives(X, t, e, fit.beta) for X, t, e in sites]
            newton_update(fit, sum(q[0] for q in parts), sum(q[1] for q in parts), sum(q[2] for q in parts), n, 1e-10)
            if fit.converged:
                break
        cph = _lifelines(sites, penalizer)
        assert rounds <= 8
        assert np.max(np.abs(fit.beta - cph.params_.to_numpy())) < 1e-6
        se = np.sqrt(np.diag(np.linalg.inv(-fit.hessian)))
        assert np.max(np.abs(se - cph.standard_errors_.to_numpy())) < 1e-6


def test_a_step_that_lowers_the_likelihood_is_halved():
    X, t, e = _sites()[2]
    fit = Fit(0.0, None, np.zeros(X.shape[1]))
    newton_update(fit, *efron_derivatives(X, t, e, fit.beta), len(t), 1e-10)
    start, step = fit.beta - fit.step, fit.step.copy()
    fit.beta = start + 50 * step            # pretend the step was far too long
    fit.step = 50 * step
    newton_update(fit, *efron_derivatives(X, t, e, fit.beta), len(t), 1e-10)
    assert fit.halvings == 1 and np.allclose(fit.beta, start + 25 * step)


def test_folds_depend_on_the_patients_only_and_are_balanced():
    ids = [f"P{i:03d}" for i in range(23)]
    folds = fold_of(ids, 5)
    assert sorted(np.bincount(folds).tolist()) == [4, 4, 5, 5, 5]
    shuffled = ids[::-1]
    assert dict(zip(shuffled, fold_of(shuffled, 5))) == dict(zip(ids, folds))


def test_a_center_answers_each_coefficient_vector_over_all_its_patients():
    X, t, e = _sites()[2]
    betas = np.array([np.zeros(X.shape[1]), np.full(X.shape[1], 0.1)])
    ll, g, h = site_derivatives(X, t, e, betas)
    for m in range(2):
        ref = efron_derivatives(X, t, e, betas[m])
        assert ll[m] == pytest.approx(ref[0]) and np.allclose(g[m], ref[1]) and np.allclose(h[m], ref[2])


# --------------------------------------------------------------------------- a real federation

@pytest.fixture(scope="module")
def gbsg_cohort(tmp_path_factory) -> Path:
    """GBSG2 (scikit-survival's copy; 686 patients) as three training centers by tumour grade and an external."""
    from sksurv.datasets import load_gbsg2

    from tests.conftest import write_site_policy

    X, y = load_gbsg2()
    df = pd.DataFrame({"dfs_months": np.round(y["time"] / 30.4375, 2), "dfs_event": y["cens"].astype(int),
                       "age": X["age"], "estrec": X["estrec"], "progrec": X["progrec"], "pnodes": X["pnodes"],
                       "tsize": X["tsize"], "horTh": (X["horTh"] == "yes").astype(int),
                       "menostat": (X["menostat"] == "Post").astype(int),
                       "tgrade": X["tgrade"].map({"I": 1, "II": 2, "III": 3}).astype(int)})
    df.insert(0, "patient_id", [f"G{i:04d}" for i in range(len(df))])
    df.insert(3, "split", "")
    rng = np.random.default_rng(0)
    where = np.where(rng.random(len(df)) < 0.2, 3, rng.integers(0, 3, len(df)))
    root = tmp_path_factory.mktemp("gbsg-cox")
    for k, name in enumerate(CENTERS + ("external",)):
        site = root / name
        site.mkdir()
        df[where == k].to_csv(site / "clinical.csv", index=False)
        role = "external" if name == "external" else "train"
        (site / "site.toml").write_text(f'center_id = "{name}"\nrole = "{role}"\n')
        write_site_policy(site, 'allowed_run_keys_extra = ["seed", "train.n_boot"]\n'
                                "min_patients = { benefit = 10, dfs = 10 }\nmin_cell_count = 5\n")
    return root


def _pooled_design(cohort: Path, overrides: list[str]):
    from common.config import load_config
    from common.data.cohort import discover_sites
    from common.learn.cox import design
    from common.learn.dataset import site_dataset
    from common.preprocess.cache import ensure_caches

    cfg = load_config(overrides)
    caches = ensure_caches(discover_sites(cohort), cfg, progress=False)
    return [design(site_dataset(caches[c], ["train", "val"], cfg))[:3] for c in CENTERS]


def test_federated_cox_equals_pooled_lifelines_and_reports_hazard_ratios(gbsg_cohort, tmp_path):
    from server.ops.simulation import run_simulation

    features = ["data.genomic_features=[]", "data.clinical_features=[" + ",".join(FEATURES) + "]"]
    overrides = ["model=cox", "model.cox.penalizer=[0.05]", "train.n_boot=20", *features]
    metrics = run_simulation(gbsg_cohort, tmp_path / "run", overrides, stream=False)
    cox = metrics["cox"]
    cph = _lifelines(_pooled_design(gbsg_cohort, overrides), 0.05)
    assert np.max(np.abs(np.array(cox["beta"]) - cph.params_.to_numpy())) < 1e-6
    assert cox["rounds"] <= 8 and cox["converged"] and cox["penalizer"] == 0.05
    table = {r["covariate"]: r for r in cox["coefficients"]}
    assert list(table) == FEATURES
    se = cph.standard_errors_.to_numpy()
    for j, name in enumerate(FEATURES):
        assert table[name]["se"] == pytest.approx(se[j], abs=1e-6)
        assert table[name]["hr_lo"] < table[name]["hr"] < table[name]["hr_hi"]
    # the external center's report of the fitted model, and a package that scores the same risk
    ext = metrics["external"]["centers"]["external"]
    assert 0.6 < ext["c_index"] < 0.8
    card = json.loads(json.dumps(metrics["cox"]))
    assert card["patients"] == sum(len(d[1]) for d in _pooled_design(gbsg_cohort, overrides))
    # the coordinator reads the coefficients in the console and on the run's page
    from common.reports.console import render_cox
    from common.reports.run_report import run_report

    assert render_cox(metrics).row_count == len(FEATURES)
    page = run_report(tmp_path / "run").read_text()
    assert "Cox model (stratified by center)" in page and f"{table['pnodes']['hr']:.3f}" in page


def test_the_penalizer_is_chosen_by_leave_one_center_out_cross_validation(gbsg_cohort, tmp_path):
    from server.ops.simulation import run_simulation

    features = ["data.genomic_features=[]", "data.clinical_features=[" + ",".join(FEATURES) + "]"]
    overrides = ["model=cox", "model.cox.penalizer=[0.001,0.1,10.0]", "train.n_boot=20", *features]
    metrics = run_simulation(gbsg_cohort, tmp_path / "run", overrides, stream=False)
    cox = metrics["cox"]
    cv = {r["penalizer"]: r["cv_partial_loglik"] for r in cox["cv"]}
    assert set(cv) == {0.001, 0.1, 10.0} and cox["penalizer"] == max(cv, key=cv.get)
    assert cox["cv_basis"] == "leave-one-center-out"
    # a penalty that shrinks every coefficient to ~0 predicts a held-out center worse than a light one
    assert cv[10.0] < max(cv[0.001], cv[0.1])
    assert metrics["selection"]["patients"] == cox["patients"] > 400
    assert cox["rounds"] <= 12
    # each CV term is the held-out center's log partial likelihood at the fit of the others: recompute centrally
    sites = _pooled_design(gbsg_cohort, overrides)
    expected = 0.0
    for h in range(len(sites)):
        others = [s for j, s in enumerate(sites) if j != h]
        expected += efron_derivatives(*sites[h], _central_fit(others, 0.1))[0]
    assert cv[0.1] == pytest.approx(expected, abs=1e-6)
    # the chosen penalizer's fit on every center is lifelines' with that penalty
    cph = _lifelines(sites, cox["penalizer"])
    assert np.max(np.abs(np.array(cox["beta"]) - cph.params_.to_numpy())) < 1e-6


def _central_fit(sites, penalizer):
    p = sites[0][0].shape[1]
    n = sum(len(s[1]) for s in sites)
    fit = Fit(penalizer, None, np.zeros(p))
    for _ in range(40):
        parts = [efron_derivatives(X, t, e, fit.beta) for X, t, e in sites]
        newton_update(fit, sum(q[0] for q in parts), sum(q[1] for q in parts), sum(q[2] for q in parts), n, 1e-10)
        if fit.converged:
            break
    return fit.beta


def test_a_center_that_refuses_newton_rounds_is_left_out_and_the_fit_goes_on(gbsg_cohort, tmp_path):
    """The site decides (policy newton_rounds false): the Cox model is then the other centers' strata, and
    the run says which center is missing and why."""
    import shutil

    from server.ops.simulation import run_simulation
    from tests.conftest import write_site_policy

    cohort = tmp_path / "cohort"
    shutil.copytree(gbsg_cohort, cohort, ignore=shutil.ignore_patterns(".newadj*", "cache*"))
    write_site_policy(cohort / "center_b", 'allowed_run_keys_extra = ["seed", "train.n_boot"]\n'
                                           "min_patients = { benefit = 10, dfs = 10 }\nmin_cell_count = 5\n"
                                           "newton_rounds = false\n")
    overrides = ["model=cox", "model.cox.penalizer=[0.05]", "train.n_boot=20", "data.genomic_features=[]",
                 "data.clinical_features=[" + ",".join(FEATURES) + "]"]
    metrics = run_simulation(cohort, tmp_path / "run", overrides, stream=False)
    cox = metrics["cox"]
    assert sorted(cox["centers"]) == ["center_a", "center_c"]
    assert "newton_rounds false" in cox["dropped_centers"]["center_b"]
    sites = _pooled_design(cohort, overrides)
    cph = _lifelines([sites[0], sites[2]], 0.05)
    assert np.max(np.abs(np.array(cox["beta"]) - cph.params_.to_numpy())) < 1e-6
