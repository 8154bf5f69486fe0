"""benchmarks/bench_quality.py: the issue-17 quantities from one seed's runs, and the verdicts over seeds."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("bench_quality", Path(__file__).parents[1] / "benchmarks" / "bench_quality.py")
bq = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bq)


def _arm(auc, ece=0.1, c=0.6):
    return {"external": {"auc": {"value": auc}, "ece": {"value": ece}, "c_index": {"value": c}}}


def _runs(pooled, fed, local_best):
    base = {"oracle_external_auc": 0.8, "oracle_external_ece": {"observed": 0.07, "floor": 0.08}, "arms": {
        "pooled": _arm(pooled, ece=0.04), "unimodal:mri": _arm(0.70), "unimodal:genomics": _arm(0.72),
        "local:center_a": _arm(local_best), "local:center_b": _arm(local_best - 0.1)},
        "loco": {"summary": {"auc": {"mean": 0.81}, "ece": {"mean": 0.13}, "c_index": {"mean": 0.6},
                             "ece_loco_calibrated": {"mean": 0.11}, "ece_floor": {"mean": None},
                             "auc_over_oracle": {"mean": 0.9}}}}
    base["arms"]["pooled"]["external"].update(ece_floor={"value": 0.075}, ece_loco_calibrated={"value": 0.06})
    fedm = {"external": {"centers": {"external": {"auc": fed, "ece": 0.07, "c_index": 0.61}}},
            "history": [{"seconds": 10.0, "client_train_seconds": {"a": 2.0, "b": 5.0}},
                        {"seconds": 12.0, "client_train_seconds": {"a": 4.0, "b": 4.0}}]}
    return base, fedm


def test_seed_row_ratios():
    row = bq.seed_row(*_runs(pooled=0.76, fed=0.75, local_best=0.74))
    assert row["pooled_over_oracle"] == pytest.approx(0.95)
    assert row["multimodal_minus_best_unimodal"] == pytest.approx(0.04)
    assert row["best_local_center"] == "center_a"
    assert row["fed_over_pooled"] == pytest.approx(0.75 / 0.76)
    assert row["fed_minus_best_local"] == pytest.approx(0.01)
    assert row["fed_round_over_slowest_train"] == pytest.approx(2.5)   # median of 10/5 and 12/4
    k = min(os.cpu_count() or 1, 2)                                    # the two centers' training per core
    assert row["fed_round_over_train_per_core"] == pytest.approx((10 / (7 / k) + 12 / (8 / k)) / 2)
    assert row["loco_auc"] == 0.81
    assert (row["oracle_ece"], row["oracle_ece_floor"], row["pooled_ece_floor"]) == (0.07, 0.08, 0.075)
    assert row["pooled_ece_minus_floor"] == pytest.approx(0.04 - 0.075)
    assert row["pooled_ece_loco_calibrated"] == 0.06 and row["loco_ece_loco_calibrated"] == 0.11
    assert row["loco_auc_over_oracle"] == 0.9 and "loco_oracle_auc" not in row
    assert "loco_ece_floor" not in row                                 # no fold had it


def test_verdicts_follow_the_mean_over_seeds():
    rows = [bq.seed_row(*_runs(0.76, 0.75, 0.74)), bq.seed_row(*_runs(0.70, 0.66, 0.72))]
    s = bq.summarise(rows)
    assert s["metrics"]["pooled_auc"]["mean"] == pytest.approx(0.73)
    assert s["metrics"]["pooled_auc"]["sd"] == pytest.approx(0.0424, abs=1e-3)
    t = s["targets"]
    assert not t["fed_minus_best_local"]["met"]          # (0.01 - 0.06) / 2 < 0
    assert t["pooled_ece"]["met"] and not t["fed_ece"]["met"]
    assert not t["pooled_over_oracle"]["met"]            # 0.73 / 0.8 = 0.9125 < 0.92
    assert "| pooled_auc | 0.730 +- 0.042 |" in bq.markdown(s, [0, 1])


def test_federated_loco_row_stands_alone_or_beside_the_baseline():
    loco = {"summary": {"auc": {"mean": 0.79}, "ece": {"mean": 0.12}, "c_index": {"mean": None},
                        "auc_over_oracle": {"mean": 0.88}}, "failed": {"center_f": "boom"}}
    alone = bq.seed_row(None, None, loco)                # --arms '' --fed-loco: no baseline, no federation
    assert alone == {"fed_loco_auc": 0.79, "fed_loco_ece": 0.12, "fed_loco_auc_over_oracle": 0.88,
                     "fed_loco_failed_folds": 1.0}        # a C-index every fold abstained on is left out
    base, fedm = _runs(0.76, 0.75, 0.74)
    both = bq.seed_row(base, fedm, loco)
    assert both["fed_loco_auc"] == 0.79 and both["fed_minus_best_local"] == pytest.approx(0.01)
    assert bq.seed_row(base, fedm) == {k: v for k, v in both.items() if not k.startswith("fed_loco")}


def test_loco_folds_compare_with_the_best_local_only_model_on_the_same_center():
    local = {"summary": {"best_local_auc": {"mean": 0.78}, "mean_local_auc": {"mean": 0.70}},
             "folds": {"center_a": {"best_local_auc": {"value": 0.80}}, "center_b": {"best_local_auc": {"value": 0.76}},
                       "center_c": {"best_local_auc": {"value": None}}}}
    pooled = {"folds": {"center_a": {"auc": {"value": 0.82}}, "center_b": {"auc": {"value": 0.75}},
                        "center_c": {"auc": {"value": 0.9}}}}
    fed = {"summary": {"auc": {"mean": 0.8}}, "folds": {"center_a": {"auc": {"value": 0.79}},
                                                        "center_b": {"auc": {"value": 0.78}}}}
    row = bq.seed_row({"arms": {}, "loco_local": local, "loco": pooled}, None, fed)
    assert row["loco_best_local_auc"] == 0.78 and row["loco_mean_local_auc"] == 0.70
    assert row["loco_minus_best_local"] == pytest.approx((0.02 - 0.01) / 2)     # center_c: no local score
    assert row["loco_above_best_local_share"] == 0.5
    assert row["fed_loco_minus_best_local"] == pytest.approx((-0.01 + 0.02) / 2)
    assert bq.summarise([row])["targets"]["fed_loco_minus_best_local"]["met"]
    assert "fed_loco_minus_best_local" not in bq.seed_row(None, None, fed)        # no local-only models ran
