"""Secure aggregation (Flower SecAgg+) and differential privacy, on real Flower simulation runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from client.audit import AUDIT_FILE, read_audit
from common.config import load_config
from server.secure_aggregation import check_secure_config
from server.strategies import build_strategy, privacy_spent, restore_strategy_state, strategy_state
from tests.conftest import TEST_OVERRIDES, max_abs_diff, round_weights
from tests.test_policy_audit import _bins, _copy_cohort, _sites, replay_audit

ONE_ROUND = TEST_OVERRIDES + ["federation.num_rounds=1", "federation.secure_aggregation.max_weight=100"]
SECURE = ["federation.secure_aggregation.enabled=true"]
# what a center's reply may hold during SecAgg+: the protocol record (keys, encrypted shares, masked
# vectors) and the FitRes envelope whose parameters secaggplus_mod empties before sending
SECAGG_RECORDS = {"secaggplus_configs", "fitres.parameters", "fitres.metrics", "fitres.num_examples", "fitres.status"}


def _quantisation_bound(cfg, n_centers: int, n_examples: int) -> float:
    """Largest error SecAgg+'s quantisation can add to the weighted mean of one round.

    Each center sends q_i = quantise(w_i * n_i / max_weight) with a step of 2 * clipping_range /
    quantization_range; the server divides the sum by sum(n_i) / max_weight.
    """
    sa = cfg.federation.secure_aggregation
    step = 2 * float(sa.clipping_range) / int(sa.quantization_range)
    return n_centers * step * float(sa.max_weight) / n_examples


def test_secagg_round_equals_plain_round_and_no_plain_update_leaves_a_site(tiny_cohort, tmp_path, flwr_home):
    from server.ops.simulation import run_simulation

    plain = run_simulation(tiny_cohort, tmp_path / "plain", ONE_ROUND, stream=False)
    cohort = _copy_cohort(tiny_cohort, tmp_path / "cohort")
    secure = run_simulation(cohort, tmp_path / "secure", ONE_ROUND + SECURE, stream=False)

    assert secure["privacy"]["secure_aggregation"] is True and plain["privacy"]["secure_aggregation"] is False
    h = secure["history"][0]
    assert not h["failures"] and h["n_train_replies"] == 6 and h["train_loss"] is not None
    n_train = sum(v["n_train"] for v in secure["centers"].values() if v["role"] == "train")
    bound = _quantisation_bound(load_config(ONE_ROUND + SECURE), 6, n_train)
    diff = max_abs_diff(round_weights(tmp_path / "plain", 1), round_weights(tmp_path / "secure", 1))
    assert diff <= bound + 1e-6, f"SecAgg+ mean differs from the plain mean by {diff:.2e} > bound {bound:.2e}"
    assert h["train_loss"] == pytest.approx(plain["history"][0]["train_loss"], rel=1e-6)
    # the secure round really is different traffic: 4 protocol stages, masked vectors instead of weights
    assert secure["history"][0]["bytes_received"] > plain["history"][0]["bytes_received"]

    run_id = int(secure["flwr_run_id"])
    for site in _sites(cohort):
        lines = replay_audit(site, _bins(), run_id, allowed={"arrays", "metrics", "info"} | SECAGG_RECORDS)
        for ln in (x for x in lines if x["direction"] == "out" and x["message_type"] == "train"):
            assert "arrays" not in ln["records"], f"{site.name} sent its plain weights under SecAgg+"
            fp = ln["records"].get("fitres.parameters")
            assert fp is None or not fp["arrays"], f"{site.name} sent unmasked parameters"
        stages = [ln for ln in read_audit(site / AUDIT_FILE) if ln["direction"] == "out"
                  and "secaggplus_configs" in ln["records"]]
        if site.name != "external":
            assert len(stages) == 4, f"{site.name}: {len(stages)} SecAgg+ stages (setup, share keys, masked, unmask)"


def test_dp_run_clips_adds_noise_and_accounts_epsilon(tiny_cohort, tmp_path):
    from flwr.supercore.privacy_accounting import (GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig,
                                                   SamplingMethod)
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    run = tmp_path / "dp"
    dp = ["federation.differential_privacy.enabled=true", "federation.differential_privacy.noise_multiplier=0.8"]
    res = subprocess.run([sys.executable, "-m", "common.cli", "simulate", "--data", str(tiny_cohort), "--out",
                          str(run), *TEST_OVERRIDES, *dp], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "COLUMNS": "200", "FLWR_HOME": str(tmp_path / "home")})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    m = json.loads((run / "metrics.json").read_text())
    spent = m["privacy"]["differential_privacy"]
    rounds = m["rounds"]
    # an independent accountant with the same mechanism: one Gaussian release per round over 6 centers
    acc = RdpAccountant(PrivacyConfig(target_delta=1e-5, population_size=6,
                                      neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                      sampling_method=SamplingMethod.NO_AMPLIFICATION))
    acc.compose(GaussianPrivacyEvent(noise_multiplier=0.8, sample_size=6, population_size=6), count=rounds)
    assert spent["releases"] == rounds and spent["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    eps = [h["privacy"]["epsilon"] for h in m["history"]]
    assert eps == sorted(eps) and eps[0] < eps[-1]
    assert f"epsilon {spent['epsilon']:.2f} at delta 1e-05" in res.stdout
    card = torch.load(run / "best_model.pt", weights_only=False)["card"]
    assert card["privacy"]["differential_privacy"]["epsilon"] == pytest.approx(spent["epsilon"])
    # clipping happened at the centers (the mod logs it) and noise at the server
    log = (run / "logs" / "flwr-run.log").read_text()
    assert "fixedclipping_mod: parameters are clipped" in log and "central DP noise" in log


def _fed(*overrides):
    return load_config(TEST_OVERRIDES + list(overrides)).federation


@pytest.mark.parametrize("overrides, needle", [
    (["federation.strategy=fedmedian"], "needs each center's update"),
    (["federation.strategy=fedtrimmedavg"], "needs each center's update"),
    (["federation.differential_privacy.enabled=true"], "cannot be combined"),
])
def test_secure_aggregation_refuses_what_it_cannot_serve(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        check_secure_config(_fed("federation.secure_aggregation.enabled=true", *overrides))


def test_dp_needs_fedavg_aggregation_and_its_accountant_survives_a_resume():
    with pytest.raises(ValueError, match="fedavg or fedprox"):
        build_strategy(_fed("federation.differential_privacy.enabled=true", "federation.strategy=fedadam"), 6)
    fed = _fed("federation.differential_privacy.enabled=true")
    s = build_strategy(fed, 6)
    assert privacy_spent(s)["epsilon"] == 0.0 and privacy_spent(build_strategy(_fed(), 6)) is None
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent
    s.accountant.compose(GaussianPrivacyEvent(noise_multiplier=1.0, sample_size=6, population_size=6), count=3)
    state = strategy_state(s)
    fresh = build_strategy(fed, 6)
    restore_strategy_state(fresh, state)
    assert privacy_spent(fresh)["epsilon"] == pytest.approx(privacy_spent(s)["epsilon"])
    assert privacy_spent(fresh)["releases"] == 3
