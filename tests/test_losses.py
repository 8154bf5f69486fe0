"""Tests for common/learn/losses.py (Cox partial likelihood, masked BCE, multitask sum)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from common.learn.losses import benefit_loss, cox_ph_loss, multitask_loss

# Small survival data set with ties among events and between events and censorings.
TIME = np.array([1.0, 2.0, 2.0, 2.0, 3.0, 4.0, 4.0, 5.0, 6.0, 6.0, 7.0, 8.0, 8.0, 9.0, 10.0])
EVENT = np.array([1, 1, 1, 0, 1, 0, 1, 1, 1, 1, 0, 1, 1, 0, 1], dtype=float)
X = np.array([0.5, 1.2, -0.3, 0.8, 0.1, -1.0, 0.7, -0.2, 1.5, 0.3, -0.6, 0.9, -1.1, 0.4, -0.5])


def breslow_reference(risk, time, event):
    """Hand-written O(n^2) Breslow negative log partial likelihood / n_events."""
    nll, n_ev = 0.0, 0
    for i in range(len(time)):
        if event[i] != 1:
            continue
        n_ev += 1
        denom = sum(math.exp(risk[k]) for k in range(len(time)) if time[k] >= time[i])
        nll -= risk[i] - math.log(denom)
    return nll / n_ev


def efron_reference(risk, time, event):
    """Hand-written Efron negative log partial likelihood / n_events."""
    nll, n_ev = 0.0, 0
    for t in sorted(set(time[event == 1])):
        ev = [i for i in range(len(time)) if time[i] == t and event[i] == 1]
        d = len(ev)
        R = sum(math.exp(risk[k]) for k in range(len(time)) if time[k] >= t)
        D = sum(math.exp(risk[i]) for i in ev)
        for l in range(d):
            nll -= -math.log(R - l / d * D)
        nll -= sum(risk[i] for i in ev)
        n_ev += d
    return nll / n_ev


def test_efron_matches_lifelines():
    pd = pytest.importorskip("pandas")
    lifelines = pytest.importorskip("lifelines")
    df = pd.DataFrame({"T": TIME, "E": EVENT, "x": X})
    cph = lifelines.CoxPHFitter().fit(df, duration_col="T", event_col="E")
    beta = float(cph.params_["x"])
    risk = torch.tensor(beta * X, dtype=torch.float64)
    loss = cox_ph_loss(risk, torch.tensor(TIME), torch.tensor(EVENT), ties="efron")
    n_events = EVENT.sum()
    assert float(loss) * n_events == pytest.approx(-cph.log_likelihood_, rel=1e-6, abs=1e-6)
    # and at an arbitrary (non-optimal) beta against the hand-written Efron formula
    risk2 = 0.7 * X + 0.3 * X**2
    loss2 = cox_ph_loss(torch.tensor(risk2), torch.tensor(TIME), torch.tensor(EVENT), ties="efron")
    assert float(loss2) == pytest.approx(efron_reference(risk2, TIME, EVENT), rel=1e-10)


def test_breslow_matches_reference():
    rng = np.random.default_rng(0)
    for trial in range(5):
        n = 40
        time = rng.integers(1, 8, n).astype(float)  # many ties
        event = (rng.random(n) < 0.6).astype(float)
        event[0] = 1.0
        risk = rng.normal(size=n) * (1 + trial)
        got = cox_ph_loss(torch.tensor(risk), torch.tensor(time), torch.tensor(event), ties="breslow")
        assert float(got) == pytest.approx(breslow_reference(risk, time, event), rel=1e-10)
        got_e = cox_ph_loss(torch.tensor(risk), torch.tensor(time), torch.tensor(event), ties="efron")
        assert float(got_e) == pytest.approx(efron_reference(risk, time, event), rel=1e-10)


def test_no_ties_efron_equals_breslow():
    time = torch.tensor([5.0, 3.0, 8.0, 1.0, 6.0])
    event = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0])
    risk = torch.tensor([0.2, -1.0, 0.5, 1.3, -0.1])
    assert float(cox_ph_loss(risk, time, event, "efron")) == pytest.approx(
        float(cox_ph_loss(risk, time, event, "breslow")), rel=1e-6)


def test_large_risks_are_stable():
    time = torch.tensor([1.0, 1.0, 2.0, 3.0], dtype=torch.float32)
    event = torch.ones(4)
    risk = torch.tensor([200.0, 190.0, -200.0, 150.0], requires_grad=True)
    for ties in ("efron", "breslow"):
        loss = cox_ph_loss(risk, time, event, ties)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(risk.grad).all()
        risk.grad = None


def test_gradient_exists_and_matches_finite_difference():
    risk = torch.tensor(0.4 * X, dtype=torch.float64, requires_grad=True)
    t, e = torch.tensor(TIME), torch.tensor(EVENT)
    assert torch.autograd.gradcheck(lambda r: cox_ph_loss(r, t, e, "efron"), (risk,))
    assert torch.autograd.gradcheck(lambda r: cox_ph_loss(r, t, e, "breslow"), (risk,))


def test_no_events_returns_zero_with_grad():
    risk = torch.randn(6, requires_grad=True)
    loss = cox_ph_loss(risk, torch.arange(6.0), torch.zeros(6))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(risk.grad, torch.zeros(6))
    # only NaN-timed events -> also no usable event
    loss2 = cox_ph_loss(risk, torch.full((6,), float("nan")), torch.ones(6))
    assert loss2.item() == 0.0 and loss2.requires_grad


def test_nan_entries_are_masked():
    rng = np.random.default_rng(1)
    risk = rng.normal(size=10)
    time = rng.integers(1, 5, 10).astype(float)
    event = (rng.random(10) < 0.7).astype(float)
    event[0] = 1
    ref = cox_ph_loss(torch.tensor(risk), torch.tensor(time), torch.tensor(event))
    # add unknown rows: NaN time, NaN event; their risk must not matter
    risk2 = torch.tensor(np.concatenate([risk, [5.0, -3.0]]), requires_grad=True)
    time2 = torch.tensor(np.concatenate([time, [np.nan, 2.0]]))
    event2 = torch.tensor(np.concatenate([event, [1.0, np.nan]]))
    got = cox_ph_loss(risk2, time2, event2)
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    got.backward()
    assert torch.isfinite(risk2.grad).all() and risk2.grad[-2:].abs().sum() == 0


def test_benefit_loss_ignores_unlabeled():
    logit = torch.tensor([0.3, -1.2, 2.0, 0.1, 5.0], requires_grad=True)
    benefit = torch.tensor([1.0, 0.0, float("nan"), 1.0, float("nan")])
    got = benefit_loss(logit, benefit)
    lab = ~torch.isnan(benefit)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logit[lab], benefit[lab])
    assert got.item() == pytest.approx(ref.item())
    got.backward()
    assert logit.grad[2] == 0 and logit.grad[4] == 0 and torch.isfinite(logit.grad).all()
    # pos_weight
    gw = benefit_loss(logit, benefit, pos_weight=3.0)
    refw = torch.nn.functional.binary_cross_entropy_with_logits(
        logit[lab], benefit[lab], pos_weight=torch.tensor(3.0))
    assert gw.item() == pytest.approx(refw.item())
    # nothing labeled -> 0 with grad
    z = benefit_loss(logit, torch.full((5,), float("nan")))
    assert z.item() == 0.0 and z.requires_grad


def _outputs_batch():
    g = torch.Generator().manual_seed(0)
    out = {"logit": torch.randn(8, generator=g, requires_grad=True),
           "risk": torch.randn(8, generator=g, requires_grad=True)}
    batch = {"benefit": torch.tensor([1.0, 0.0, float("nan"), 1.0, 0.0, 1.0, float("nan"), 0.0]),
             "dfs_time": torch.tensor([3.0, 5.0, 2.0, float("nan"), 7.0, 2.0, 9.0, 4.0]),
             "dfs_event": torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0])}
    return out, batch


def test_multitask_weighting_and_heads_switch():
    out, batch = _outputs_batch()
    lb = benefit_loss(out["logit"], batch["benefit"])
    ld = cox_ph_loss(out["risk"], batch["dfs_time"], batch["dfs_event"], "efron")
    total, parts = multitask_loss(out, batch, {"benefit_weight": 1.0, "dfs_weight": 0.5, "ties": "efron"})
    assert total.item() == pytest.approx(lb.item() + 0.5 * ld.item(), rel=1e-6)
    assert parts["n_labeled"] == 6 and parts["n_events"] == 4
    assert float(parts["total"]) == pytest.approx(total.item())

    total_b, parts_b = multitask_loss(out, batch, {"benefit_weight": 1.0, "dfs_weight": 0.0})
    assert "dfs" not in parts_b and total_b.item() == pytest.approx(lb.item())
    total_b.backward()
    assert out["risk"].grad is None or out["risk"].grad.abs().sum() == 0
    total_d, parts_d = multitask_loss(out, batch, {"benefit_weight": 0.0, "dfs_weight": 2.0, "ties": "breslow"})
    assert "benefit" not in parts_d
    assert total_d.item() == pytest.approx(
        2.0 * cox_ph_loss(out["risk"], batch["dfs_time"], batch["dfs_event"], "breslow").item(), rel=1e-6)


def test_multitask_accepts_dictconfig():
    omegaconf = pytest.importorskip("omegaconf")
    out, batch = _outputs_batch()
    cfg = omegaconf.OmegaConf.load(Path(__file__).resolve().parents[1] / "conf/model/newadjnet.yaml")
    total, parts = multitask_loss(out, batch, cfg.loss)
    total.backward()
    assert torch.isfinite(total) and set(parts) >= {"benefit", "dfs", "total"}
