"""One malicious center against Flower's robust strategies (real Flower simulation runs).

center_c sends ``global - 20 x (its honest update)`` every round (``NEWADJ_FAULTS``,
client/fault_injection.py).  The server's norm screen is switched off here
(``federation.update_checks.max_norm_ratio=null``) so that the strategy alone has
to hold: FedMedian and FedTrimmedAvg end close to their clean runs, FedAvg does not.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from client.fault_injection import ENV as FAULTS_ENV
from common.config import load_config
from common.engine import seed_everything
from common.task import model_from_config
from tests.conftest import TEST_OVERRIDES

pytestmark = [pytest.mark.slow]

ATTACK = "center_c:scale=-20"
OVERRIDES = TEST_OVERRIDES + ["federation.num_rounds=3", "federation.update_checks.max_norm_ratio=null"]


def _flat(sd: dict) -> np.ndarray:
    return np.concatenate([v.detach().cpu().numpy().ravel().astype(np.float64) for _, v in sorted(sd.items())
                           if v.is_floating_point()])


def _final(run_dir, rounds: int) -> np.ndarray:
    return _flat(torch.load(run_dir / "checkpoints" / f"round_{rounds:03d}.pt", weights_only=False)["state_dict"])


def _initial(overrides) -> np.ndarray:
    cfg = load_config(overrides)
    seed_everything(int(cfg.seed))          # as the ServerApp builds the initial global model
    return _flat(model_from_config(cfg).state_dict())


def _pair(tiny_cohort, tmp_path, monkeypatch, strategy: str):
    from server.simulation import run_simulation

    over = OVERRIDES + [f"federation.strategy={strategy}"]
    monkeypatch.delenv(FAULTS_ENV, raising=False)
    clean = run_simulation(tiny_cohort, tmp_path / f"{strategy}-clean", over, stream=False)
    monkeypatch.setenv(FAULTS_ENV, ATTACK)
    attacked = run_simulation(tiny_cohort, tmp_path / f"{strategy}-attacked", over, stream=False)
    monkeypatch.delenv(FAULTS_ENV)
    w0, wc, wa = _initial(over), _final(tmp_path / f"{strategy}-clean", 3), _final(tmp_path / f"{strategy}-attacked", 3)
    deviation = float(np.linalg.norm(wa - wc) / np.linalg.norm(wc - w0))
    auc = lambda m: m["external"]["pooled"]["auc"]  # noqa: E731
    return clean, attacked, deviation, abs(auc(attacked) - auc(clean))


@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg"])
def test_robust_strategy_holds_against_one_scaled_update(tiny_cohort, tmp_path, monkeypatch, strategy):
    clean, attacked, deviation, d_auc = _pair(tiny_cohort, tmp_path, monkeypatch, strategy)
    assert all(h["n_train_replies"] == 6 and not h["rejected_updates"] for h in attacked["history"]), \
        "the attacker's update must reach the strategy (screening is off)"
    assert deviation < 0.5, f"{strategy}: the attacked model moved {deviation:.2f}x the clean training path"
    assert d_auc <= 0.02, f"{strategy}: external AUC moved by {d_auc:.3f}"


def test_fedavg_is_not_robust_to_the_same_attack_but_the_norm_screen_catches_it(tiny_cohort, tmp_path, monkeypatch):
    from server.simulation import run_simulation

    _, _, deviation, _ = _pair(tiny_cohort, tmp_path, monkeypatch, "fedavg")
    assert deviation > 2.0, f"the attack should wreck plain FedAvg (moved only {deviation:.2f}x)"
    # with the default screen on, the same attacker is named and left out every round
    monkeypatch.setenv(FAULTS_ENV, ATTACK)
    m = run_simulation(tiny_cohort, tmp_path / "fedavg-screened", TEST_OVERRIDES + ["federation.num_rounds=3"],
                       stream=False)
    for h in m["history"]:
        assert "center_c" in h["rejected_updates"] and "norm" in h["rejected_updates"]["center_c"]
        assert h["n_train_replies"] == 5
