"""Losses for New-adj-Net: Cox partial likelihood (Breslow / Efron ties),
masked BCE for the benefit label, and their weighted multitask sum."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["benefit_loss", "cox_ph_loss", "multitask_loss", "unimodal_loss"]


def _zero_with_grad(x: torch.Tensor) -> torch.Tensor:
    """A scalar 0 that is connected to the graph of ``x`` (NaN-safe)."""
    return torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device)).sum() * 0.0


def cox_ph_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor, ties: str = "efron") -> torch.Tensor:
    """Negative Cox partial log-likelihood, averaged over the events of the batch.

    ``risk`` is the log-hazard (any shape, flattened), ``time``/``event`` the
    follow-up time and event indicator (1 = event, 0 = censored).  Entries with a
    non-finite time or event are ignored.  Ties among event times are handled
    exactly with Breslow's or Efron's approximation (``ties``).  Fully vectorised:
    O(n log n).  Returns a zero that still has a graph when there is no event.
    """
    ties = str(ties).lower()
    if ties not in ("efron", "breslow"):
        raise ValueError(f"ties must be 'efron' or 'breslow', got {ties!r}")
    risk = risk.reshape(-1)
    time = time.reshape(-1).to(risk.device)
    event = event.reshape(-1).to(risk.device)
    valid = torch.isfinite(time) & torch.isfinite(event.float())
    r = risk[valid]
    t = time[valid].to(torch.float64)
    e = event[valid] > 0.5
    n_events = int(e.sum())
    if n_events == 0:
        return _zero_with_grad(risk)

    # Group by distinct time (ascending); inv[i] = group of sample i.
    uniq, inv = torch.unique(t, sorted=True, return_inverse=True)
    U = uniq.numel()

    # log of the risk-set sums: log sum_{k: t_k >= t_j} exp(r_k).
    order = torch.argsort(t, descending=True, stable=True)
    lcse = torch.logcumsumexp(r[order], dim=0)
    pos = torch.arange(order.numel(), device=r.device)
    last_pos = torch.zeros(U, dtype=torch.long, device=r.device).scatter_reduce(
        0, inv[order], pos, reduce="amax", include_self=False)
    log_risk_set = lcse[last_pos]  # [U]

    # Events only, sorted by group so tied events are contiguous.
    r_e, g_e = r[e], inv[e]
    g_sorted, perm = torch.sort(g_e, stable=True)
    r_e = r_e[perm]
    log_r_set = log_risk_set[g_sorted]
    log_lik = r_e.sum() - log_r_set.sum() if ties == "breslow" else None

    if ties == "efron":
        d = torch.bincount(g_sorted, minlength=U)  # events per group
        starts = torch.cumsum(d, 0) - d
        rank = torch.arange(n_events, device=r.device) - starts[g_sorted]  # l = 0..d_j-1
        frac = rank.to(r.dtype) / d[g_sorted].to(r.dtype)
        # log of the tied-event sums D_j = sum_{events at t_j} exp(r), per-group max for stability
        gmax = torch.zeros(U, dtype=r.dtype, device=r.device).scatter_reduce(
            0, g_sorted, r_e.detach(), reduce="amax", include_self=False)
        m = gmax[g_sorted]
        D = torch.zeros(U, dtype=r.dtype, device=r.device).index_add(0, g_sorted, torch.exp(r_e - m))
        log_D = torch.log(D[g_sorted]) + m
        # log(R_j - l/d_j * D_j) = log R_j + log1p(-l/d_j * D_j / R_j)
        ratio = torch.exp(log_D - log_r_set).clamp(max=1.0)
        log_denom = log_r_set + torch.log1p(-frac * ratio)
        log_lik = r_e.sum() - log_denom.sum()

    return -log_lik / n_events


def benefit_loss(logit: torch.Tensor, benefit: torch.Tensor, pos_weight: float | torch.Tensor | None = None) -> torch.Tensor:
    """BCE-with-logits over labeled entries (``benefit`` NaN = unlabeled); mean over labeled.
    Returns a zero that still has a graph when nothing is labeled."""
    logit = logit.reshape(-1)
    benefit = benefit.reshape(-1).to(device=logit.device, dtype=logit.dtype)
    lab = torch.isfinite(benefit)
    if not bool(lab.any()):
        return _zero_with_grad(logit)
    pw = None
    if pos_weight is not None:
        pw = torch.as_tensor(pos_weight, dtype=logit.dtype, device=logit.device)
    return F.binary_cross_entropy_with_logits(logit[lab], benefit[lab], pos_weight=pw)


def _get(cfg: Any, key: str, default: Any) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        v = cfg.get(key, default)
    else:
        v = getattr(cfg, key, default)
    return default if v is None and default is not None else v


def multitask_loss(outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor], cfg_loss: Any = None):
    """Weighted sum ``benefit_weight * BCE + dfs_weight * Cox`` (+ ``unimodal_weight`` x the same loss of each
    modality's unimodal output, averaged over modalities, where the model returned them: train mode).

    ``cfg_loss`` is the ``model.loss`` node (keys ``benefit_weight``, ``dfs_weight``,
    ``ties``, ``pos_weight``, ``unimodal_weight``).  A head whose weight is 0 is not evaluated.
    Returns ``(total, parts)`` where ``parts`` holds detached 0-d tensors ``total``,
    ``benefit``, ``dfs`` and the ints ``n_labeled`` / ``n_events`` (use ``float()`` to log).
    """
    wb = float(_get(cfg_loss, "benefit_weight", 1.0))
    wd = float(_get(cfg_loss, "dfs_weight", 0.5))
    ties = str(_get(cfg_loss, "ties", "efron"))
    pos_weight = _get(cfg_loss, "pos_weight", None)
    logit, risk = outputs["logit"], outputs["risk"]
    total = _zero_with_grad(logit) + _zero_with_grad(risk)
    parts: dict[str, Any] = {}
    if wb > 0:
        lb = benefit_loss(logit, batch["benefit"], pos_weight=pos_weight)
        total = total + wb * lb
        parts["benefit"] = lb.detach()
        parts["n_labeled"] = int(torch.isfinite(batch["benefit"]).sum())
    if wd > 0:
        ld = cox_ph_loss(risk, batch["dfs_time"], batch["dfs_event"], ties=ties)
        total = total + wd * ld
        parts["dfs"] = ld.detach()
        ok = torch.isfinite(batch["dfs_time"]) & torch.isfinite(batch["dfs_event"])
        parts["n_events"] = int(((batch["dfs_event"] > 0.5) & ok).sum())
    wu = float(_get(cfg_loss, "unimodal_weight", 0.0) or 0.0)
    uni = outputs.get("unimodal")
    if wu > 0 and uni is not None:
        lu = unimodal_loss(uni, batch, cfg_loss)
        total = total + wu * lu
        parts["unimodal"] = lu.detach()
    parts["total"] = total.detach()
    return total, parts


def unimodal_loss(uni: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor], cfg_loss: Any = None):
    """Mean over modalities of the multitask loss (:func:`multitask_loss`, the same weights) of each modality's
    unimodal output (``uni``: ``logit`` and ``risk`` [B, M], ``present`` [B, M] bool), each on the samples
    where that modality is present."""
    losses = []
    for j in range(uni["present"].shape[1]):
        sel = uni["present"][:, j]
        if bool(sel.any()):
            alone = {"logit": uni["logit"][sel, j], "risk": uni["risk"][sel, j]}
            losses.append(multitask_loss(alone, {k: batch[k][sel] for k in ("benefit", "dfs_time", "dfs_event")},
                                         cfg_loss)[0])
    if not losses:
        return _zero_with_grad(uni["logit"])
    return torch.stack(losses).mean()
