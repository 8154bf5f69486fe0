"""benchmarks/bench_real_cohorts.py: real public multi-center survival cohorts, scored by leave-one-center-out."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

spec = importlib.util.spec_from_file_location("bench_real_cohorts",
                                              Path(__file__).parents[1] / "benchmarks" / "bench_real_cohorts.py")
brc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(brc)

LUNG_SIZES = {"center_inst01": 36, "center_inst12": 23, "center_inst13": 20, "center_inst03": 19,
              "center_inst11": 18, "center_inst22": 17, "external": 95}


@pytest.fixture(scope="module")
def lung(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lung")
    assert brc.write_lung(out) == LUNG_SIZES
    return out


def _read(site: Path) -> pd.DataFrame:
    return pd.read_csv(site / "clinical.csv", dtype={"split": str}, keep_default_na=False, na_values=[""])


def test_lung_is_six_institutions_and_an_external_center_with_its_missing_cells(lung):
    from lifelines.datasets import load_lung

    from common.data.cohort import discover_sites

    sites = {s.name: s for s in discover_sites(lung)}
    assert set(sites) == set(LUNG_SIZES)
    assert [n for n, s in sites.items() if s.role == "external"] == ["external"]
    frames = {n: _read(lung / n) for n in sites}
    assert {n: len(f) for n, f in frames.items()} == LUNG_SIZES
    for n, f in frames.items():
        assert f["split"].isna().all(), n                  # the contract's hash rule splits train / validation
        assert list(f.columns[:4]) == ["patient_id", "dfs_months", "dfs_event", "split"]
    allp = pd.concat(frames.values())
    raw = load_lung()
    assert allp["patient_id"].is_unique and len(allp) == len(raw)
    # lifelines codes status 1 = dead (165), 0 = censored; every death is an event, nothing else
    assert int(allp["dfs_event"].sum()) == 165 == int((raw["status"] == 1).sum())
    # missing values stay missing (empty cells), none invented, none dropped
    for src, dst in brc.LUNG_COVARIATES.items():
        assert int(allp[dst].isna().sum()) == int(raw[src].isna().sum()), dst
    assert int(allp["meal_cal"].isna().sum()) == 47
    assert ",," in (lung / "center_inst01" / "clinical.csv").read_text()     # an empty cell, not "nan"
    # the patient without an institution is the external center's
    ext_ids = set(frames["external"]["patient_id"])
    assert {f"L{i:03d}" for i in np.flatnonzero(raw["inst"].isna())} <= ext_ids


def test_status_codings_and_fed_arm_specs():
    assert brc.lung_event([0, 1, 1]).tolist() == [0, 1, 1]            # lifelines
    assert brc.lung_event([1, 2, 2]).tolist() == [0, 1, 1]            # R's survival::lung
    with pytest.raises(ValueError):
        brc.lung_event([0, 3])
    arms = brc.fed_arms_of(["cv5=federation.cv_folds=5", "cox=model=cox federation.local_epochs=2"])
    assert arms == {"fed_engine": [], "fed:cv5": ["federation.cv_folds=5"],
                    "fed:cox": ["model=cox", "federation.local_epochs=2"]}
    with pytest.raises(SystemExit):
        brc.fed_arms_of(["no-equals-sign"])


def test_cv_folds_balance_centers_and_events():
    rng = np.random.default_rng(0)
    strata, e = rng.integers(0, 4, 200), rng.integers(0, 2, 200)
    fold = brc.cv_folds(strata, e, 5, seed=1)
    assert np.array_equal(fold, brc.cv_folds(strata, e, 5, seed=1))
    for s in range(4):
        for v in (0, 1):
            counts = np.bincount(fold[(strata == s) & (e == v)], minlength=5)
            assert counts.max() - counts.min() <= 1


def _offline_cfg(cohort: Path):
    """The run config `newadj schema` would propose (its features, pooled training-center moments), without the
    Flower run: what the engine's tabular branch reads."""
    from common.config import feature_overrides, load_config

    train = pd.concat(_read(cohort / c) for c in LUNG_SIZES if c != "external")
    names = list(brc.LUNG_COVARIATES.values())
    doc = {"genomic_features": [], "clinical_features": names, "modalities": [],
           "scaling": {n: {"log": False, "center": float(train[n].mean()), "scale": float(train[n].std())}
                       for n in names}}
    path = cohort / "features.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_config(["seed=0", *feature_overrides(path)])


def test_pooled_cox_on_a_lung_fold_beats_chance(lung):
    cohort = brc.Cohort(lung, _offline_cfg(lung))
    assert cohort.centers == sorted(c for c in LUNG_SIZES if c != "external") and cohort.external == "external"
    assert cohort.features() == list(brc.LUNG_COVARIATES.values())
    X, t, e, s = cohort.design(["center_inst01", "center_inst22"])
    assert X.shape == (53, 7) and set(s.tolist()) == {0, 1}
    assert (X[:, cohort.features().index("meal_cal")] == 0).sum() >= 1    # missing -> 0, as the engine reads it
    h = "center_inst01"
    others = [c for c in cohort.centers if c != h]
    log = brc.CoxFitLog()
    r = brc.pooled_cox(cohort, others, seed=0, log=log)
    assert r["lambda"] in brc.LAMBDA_GRID and set(r["cv_c"]) == set(brc.LAMBDA_GRID)
    assert r["n_train"] == sum(LUNG_SIZES[c] for c in others)
    c = brc.cox_c(cohort, r["beta"], h)
    assert 0.5 < c < 1.0
    assert not log.failures


@pytest.mark.slow
def test_a_quick_run_without_the_federation_writes_its_json(tmp_path, flwr_home):
    rc = brc.main(["--cohort", "lung", "--quick", "--skip-fed", "--work", str(tmp_path / "work"),
                   "--out-dir", str(tmp_path / "out")])
    assert rc == 0
    res = json.loads((tmp_path / "out" / "real_lung.json").read_text())
    assert res["held_out_centers"] == ["center_inst01", "center_inst03"] and res["quick"]
    assert res["features"] == list(brc.LUNG_COVARIATES.values())
    for arm in ("pooled_engine", "pooled_cox", "local_cox:best", "local_cox:mean", "local_engine:best",
                "local_engine:mean"):
        row = res["summary"][arm]
        assert row["loco"]["n_folds"] == 2 and 0.0 <= row["loco"]["mean"] <= 1.0, arm
        assert row["external"]["mean"] is not None
    assert not any(a.startswith("fed") for a in res["summary"])
    fold = res["folds"]["center_inst01"]
    assert fold["n_held_out"] == 36 and "center_inst01" not in fold["train_centers"]
