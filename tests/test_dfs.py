"""A consortium with DFS and a gene panel only: no benefit label, no image, no clinical covariate.

It runs end to end with no endpoint override (``simulate``, ``evaluate``, ``report``, ``screen``,
``baseline``), selects rounds on the pooled validation loss, and the pooled C-index each round equals
Harrell's C computed within centers on the predictions of that round's model.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TEST_OVERRIDES, write_site_policy

DFS_SYNTH = ["synth.endpoints=[dfs]", "synth.modalities=[genomics]", "synth.clinical_covariates=false"]


@pytest.fixture(scope="module")
def dfs_cohort(tmp_path_factory) -> Path:
    from common.data.cohort import discover_sites
    from common.config import load_config, to_plain
    from common.synth import generate_cohort

    out = tmp_path_factory.mktemp("dfs-cohort")
    generate_cohort(out, seed=5, scale=0.3, cfg=to_plain(load_config(DFS_SYNTH).synth), progress=False)
    for s in discover_sites(out):
        write_site_policy(s.path)
    truth = out / "_truth.csv"                      # a cohort with no benefit probability to compare with
    import pandas as pd

    pd.read_csv(truth).drop(columns=["true_prob", "benefit"]).to_csv(truth, index=False)
    return out


@pytest.fixture(scope="module")
def dfs_run(dfs_cohort, tmp_path_factory) -> Path:
    from server.ops.simulation import run_simulation

    run = tmp_path_factory.mktemp("dfs-run")
    run_simulation(dfs_cohort, run, TEST_OVERRIDES + ["federation.num_rounds=3"], stream=False)
    return run


def _strict_json(path: Path):
    def bad(token):
        raise AssertionError(f"{path}: {token} is not JSON")

    return json.loads(path.read_text(), parse_constant=bad)


def test_the_layout_is_dfs_and_genomics_only(dfs_cohort):
    site = dfs_cohort / "center_a"
    assert (site / "clinical.csv").read_text().splitlines()[0] == "patient_id,dfs_months,dfs_event,split"
    assert sorted(p.name for p in site.iterdir() if not p.name.startswith(".")) == [
        "clinical.csv", "genomics.csv", "policy.toml", "site.toml"]


def test_dfs_only_federation_selects_on_the_pooled_validation_loss(dfs_run):
    """The default ``select_metric: val_loss`` selects a DFS-only run on its (Cox) validation loss; ``auto``'s
    DFS-only choice, the pooled C-index, is tested in tests/test_federation_units.py."""
    m = _strict_json(dfs_run / "metrics.json")
    assert m["endpoints"]["benefit"] == 0 and m["endpoints"]["dfs"] > 0
    assert m["selection_metric"] == "val_loss"
    best = next(h for h in m["history"] if h["round"] == m["selected_round"])
    assert -m["selection"]["value"] == pytest.approx(min(h["val"]["loss"] for h in m["history"]))
    assert best["val"]["loss"] == pytest.approx(-m["selection"]["value"])
    for h in m["history"]:
        v = h["val"]
        assert v["c_index_lo"] <= v["c_index"] <= v["c_index_hi"] and v["n_dfs"] > 0 and "auc" not in v
        assert any(c.get("c_index") is not None for c in h["val_centers"].values())
    ext = m["external"]["centers"]["external"]
    assert ext["abstained"] and not ext["dfs_abstained"]          # no benefit label; DFS reported
    assert ext["c_index_lo"] <= ext["c_index"] <= ext["c_index_hi"]
    assert ext["n_dfs"] > 0 and any(k.startswith("td_auc_") for k in ext)
    assert m["baseline_hazard"]["times"] and ext["ibs_lo"] <= ext["ibs"] <= ext["ibs_hi"]
    assert any(k.startswith("dfs_cal_") and k.endswith("_all_pred") for k in ext)


def test_pooled_c_index_equals_harrell_within_centers_on_the_round_models(dfs_run, dfs_cohort):
    """Recompute, outside the federation, each round's pooled validation C from per-patient predictions."""
    from common.config import load_config
    from common.learn.dataset import site_dataset
    from common.learn.engine import predict
    from common.preprocess.cache import resolve_cache_dir
    from common.data.policy import load_policy
    from common.learn.task import model_from_config
    from tests.conftest import round_weights

    m = _strict_json(dfs_run / "metrics.json")
    cfg = load_config(TEST_OVERRIDES + ["federation.num_rounds=3"])
    for h in m["history"]:
        model = model_from_config(cfg)
        model.load_state_dict(round_weights(dfs_run, h["round"]))
        num = den = 0.0
        released = {c for c, e in h["val_centers"].items() if not e["dfs_abstained"]}
        for center in released:
            site = dfs_cohort / center
            pol = load_policy(site)
            pred = predict(model, site_dataset(resolve_cache_dir(site, cfg), ["val"], cfg), 64)
            t, e, r = pred["dfs_time"], pred["dfs_event"], pred["risk"]
            ok = np.isfinite(t) & np.isfinite(e)
            assert ok.sum() >= pol.min_patients["dfs"] and e[ok].sum() >= pol.min_cell_count
            for i in np.flatnonzero(ok & (e == 1)):           # Harrell's pairs, within this center only
                later = ok & ((t > t[i]) | ((t == t[i]) & (e == 0)))
                # risks within 1e-8 are tied (sksurv's tied_tol): two patients without data get the same
                # risk up to float32 rounding in different batches
                tie = np.abs(r[i].astype(float) - r[later].astype(float)) <= 1e-8
                den += later.sum()
                num += ((r[i] > r[later]) & ~tie).sum() + 0.5 * tie.sum()
        assert h["val"]["c_index"] == pytest.approx(num / den, abs=1e-9)


def test_evaluate_report_and_screen_follow_the_dfs_head(dfs_run, dfs_cohort, tmp_path):
    from common.reports.evaluate import evaluate_site
    from common.reports.run_report import run_report
    from common.reports.screening import format_screening, screen_patient

    m = _strict_json(dfs_run / "metrics.json")
    sha = m["best_model"]["sha256"]
    out = evaluate_site(dfs_run / "best_model.pt", dfs_cohort / "external", tmp_path / "ev", n_boot=50,
                        expected_sha256=sha)
    assert out["endpoints"] == ["dfs"]
    assert out["discrimination"]["auc"]["not_computable"].startswith("the model has no trained benefit head")
    s = out["survival"]
    assert s["c_index"]["lo"] <= s["c_index"]["value"] <= s["c_index"]["hi"]
    assert s["group_names"] == ["low_predicted_risk", "middle_predicted_risk", "high_predicted_risk"]
    assert s["grouping"] == "tertiles of the training centers' predicted risk"
    assert sum(g["n"] for g in s["groups"].values()) == s["n"]
    assert all(g["at_risk"]["0"] == g["n"] for g in s["groups"].values())
    assert "value" in s["logrank"] or "not_computable" in s["logrank"]
    html = (tmp_path / "ev" / "report.html").read_text()
    assert "trained for disease-free survival only" in html and "time-dependent AUC at 24 months" in html
    assert run_report(dfs_run).exists()
    pid = json.loads(json.dumps(out))["n_patients"] and \
        (dfs_cohort / "external" / "clinical.csv").read_text().splitlines()[1].split(",")[0]
    row = screen_patient(dfs_run / "best_model.pt", dfs_cohort / "external", pid, passes=5, expected_sha256=sha)
    assert row["head"] == "dfs" and "DFS head" in row["criterion_8"] and 0 <= row["dfs_prob"] <= 1
    assert "predicted 24-month DFS probability" in format_screening(row)


def test_baseline_follows_the_data(dfs_cohort, tmp_path):
    from common.learn.baseline import run_baseline
    from common.config import load_config

    cfg = load_config(TEST_OVERRIDES + ["train.min_patients=3"])
    summary = run_baseline(dfs_cohort, tmp_path / "b", cfg, arms=("pooled", "unimodal", "local"))
    on_disk = _strict_json(tmp_path / "b" / "metrics.json")          # null, never NaN
    assert on_disk["complete"] and on_disk["oracle_external_auc"] is None   # _truth.csv has no true_prob
    assert on_disk["modalities"] == ["genomics"] and on_disk["endpoints"] == ["dfs"]
    assert set(on_disk["skipped_arms"]) == {"unimodal:mri", "unimodal:pathology"}
    assert "unimodal:genomics" not in summary["arms"]                 # the same as pooled here
    pooled = on_disk["arms"]["pooled"]
    assert pooled["modalities"] == ["genomics"] and math.isfinite(pooled["external"]["c_index"]["value"])
    assert pooled["external"]["auc"]["abstained"] and pooled["val"]["val_auc"] is None
    assert {a for a in on_disk["arms"] if a.startswith("local:")} == {f"local:center_{c}" for c in "abcdef"}
