"""The default fusion (model.fusion: late) in a real simulated federation: every term trains and is averaged.

The other federation tests run conf/model/small.yaml (mean fusion, for speed); this one runs the same tiny
federation with the default's fusion."""
from __future__ import annotations

import math

from tests.conftest import TEST_OVERRIDES, round_weights


def test_late_fusion_trains_in_a_real_federation(tiny_cohort, tmp_path, flwr_home):
    from server.ops.simulation import run_simulation

    run = tmp_path / "late"
    m = run_simulation(tiny_cohort, run, TEST_OVERRIDES + ["model.fusion=late"], stream=False)
    assert [h["round"] for h in m["history"]] == [1, 2]
    for h in m["history"]:
        assert h["n_train_replies"] == 6 and not h["failures"]
    w1, w2 = round_weights(run, 1), round_weights(run, 2)
    assert not any(k.startswith("benefit_head") for k in w2)
    terms = [k for k in w2 if k.startswith(("benefit_terms.", "risk_terms.")) or k == "absent_terms"]
    assert {k.split(".")[1] for k in terms if "." in k} >= {"mri", "pathology", "genomics"}
    # every modality's weights and the absent constants moved between rounds: trained and aggregated (the
    # per-term biases share one offset, so a single one may stand still in a round)
    moved = {k: float((w2[k] - w1[k]).abs().max()) for k in terms if not k.endswith(".bias")}
    assert len(moved) >= 7 and all(moved.values()), moved
    auc = m["external"]["centers"]["external"]["auc"]
    assert auc is None or math.isfinite(auc)
