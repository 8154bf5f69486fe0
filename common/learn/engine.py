"""The one training engine: trains and validates a model on one site's data.

``train_model`` is called by every consumer -- the federated client (a few local
epochs from the global weights, optionally with a FedProx proximal term) and the
pooled / local-only / unimodal baselines (many epochs with early stopping).  Model
selection and the decision threshold (Youden) use the validation split only.
Deterministic on CPU for a given seed; on CUDA it uses mixed precision.
"""
from __future__ import annotations

import copy
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from common.config import to_plain
from common.learn.dataset import ConcatSites, make_collate
from common.learn.losses import multitask_loss
from common.metrics import evaluate_predictions, fit_platt, youden_threshold

log = logging.getLogger(__name__)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _autocast(device: torch.device, amp: str):
    if device.type == "cuda" and amp in ("auto", True, "true", "on"):
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, enabled=False)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


VAL_KEYS = ("val_auc", "val_c_index", "val_loss")


@dataclass
class TrainResult:
    state_dict: dict
    threshold: float
    best_epoch: int
    epochs_run: int
    history: list = field(default_factory=list)
    val: dict = field(default_factory=dict)      # auc, loss, n, n_pos at the selected epoch
    train_loss: float = float("nan")
    n_train: int = 0
    n_val: int = 0
    samples_per_s: float = 0.0
    seconds: float = 0.0
    calibration: dict | None = None              # Platt scaling fitted on the validation split (train.calibration)
    refit: bool = False                          # train.refit: final weights trained on train + validation


@torch.no_grad()
def predict(model: torch.nn.Module, dataset, batch_size: int = 64, device: torch.device | None = None,
            amp: str = "auto") -> dict:
    """Per-patient outputs of ``model`` on ``dataset`` (stays where it is computed)."""
    device = device or next(model.parameters()).device
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                        collate_fn=make_collate(dataset.mri_shape, dataset.path_dim))
    out = {k: [] for k in ("prob", "logit", "risk", "benefit", "dfs_time", "dfs_event")}
    for batch in loader:
        batch = _to(batch, device)
        with _autocast(device, amp):
            res = model(batch)
        out["logit"].append(res["logit"].float().cpu())
        out["prob"].append(torch.sigmoid(res["logit"].float()).cpu())
        out["risk"].append(res["risk"].float().cpu())
        for k in ("benefit", "dfs_time", "dfs_event"):
            out[k].append(batch[k].cpu())
    return {k: (torch.cat(v).numpy() if v else np.zeros(0)) for k, v in out.items()}


def prediction_loss(pred: dict, loss_cfg) -> float:
    """The training loss of a set of predictions (from ``predict``); NaN when empty."""
    if not len(pred["benefit"]):
        return float("nan")
    with torch.no_grad():
        batch = {k: torch.as_tensor(pred[k]) for k in ("benefit", "dfs_time", "dfs_event")}
        outs = {"logit": torch.as_tensor(pred["logit"]), "risk": torch.as_tensor(pred["risk"])}
        return float(multitask_loss(outs, batch, loss_cfg)[0])


def _val_score(pred: dict, loss_cfg) -> dict:
    """Validation AUC (benefit), Harrell's C (DFS) and loss of a set of predictions; NaN where undefined."""
    from common.metrics import c_index

    y, p = pred["benefit"], pred["prob"]
    lab = ~np.isnan(y)
    auc = float("nan")
    if lab.sum() > 0 and len(np.unique(y[lab])) == 2:
        from sklearn.metrics import roc_auc_score

        auc = float(roc_auc_score(y[lab], p[lab]))
    return {"val_auc": auc, "val_c_index": float(c_index(pred["dfs_time"], pred["dfs_event"], pred["risk"])),
            "val_loss": prediction_loss(pred, loss_cfg)}


def _selection(rec: dict, metric: str, train_loss: float) -> tuple:
    """An epoch's selection key (higher is better): the metric asked for, else the next that is defined."""
    order = {"auto": ("val_auc", "val_c_index"), "auc": ("val_auc",), "c_index": ("val_c_index",),
             "loss": ()}.get(metric)
    if order is None:
        raise ValueError(f"train.select_metric={metric!r}: choose auto, auc, c_index or loss")
    for k in order:
        if not math.isnan(rec.get(k, float("nan"))):
            return (rec[k], -rec.get("val_loss", 0.0))
    if not math.isnan(rec.get("val_loss", float("nan"))):
        return (-rec["val_loss"], 0.0)
    return (-train_loss, 0.0)


def l2_penalised(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters ``train.l2`` penalises: weight matrices and kernels (not biases, LayerNorm scales, the
    no-data embedding or the absent-modality constants)."""
    return [(n, q) for n, q in model.named_parameters() if n.endswith("weight") and q.dim() >= 2]


def train_model(model: torch.nn.Module, train_ds, val_ds, train_cfg, loss_cfg, *, seed: int = 0,
                epochs: int | None = None, select_best: bool = True, early_stopping: bool = True,
                proximal_mu: float = 0.0, on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """Train ``model`` on ``train_ds``, validate on ``val_ds`` each epoch.

    ``select_best`` keeps the weights of the best validation epoch (baselines);
    federated clients pass ``select_best=False, early_stopping=False`` and a small
    ``epochs`` so that the server does model selection across rounds.
    ``proximal_mu`` > 0 adds FedProx's (mu/2)||w - w_start||^2 term.
    """
    tc = to_plain(train_cfg)
    seed_everything(seed)
    if tc.get("num_threads"):
        torch.set_num_threads(int(tc["num_threads"]))
    device = pick_device(tc.get("device", "auto"))
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    model.to(device)
    epochs = int(epochs if epochs is not None else tc["epochs"])
    amp = tc.get("amp", "auto")
    refit = bool(tc.get("refit", False)) and select_best and val_ds is not None and len(val_ds) > 0
    init_state = copy.deepcopy(model.state_dict()) if refit else None
    ema_decay = float(tc.get("ema", 0) or 0) if select_best else 0.0
    asked_schedule = str(tc.get("lr_schedule", "constant") or "constant")
    schedule = asked_schedule if select_best else "constant"
    if schedule not in ("constant", "cosine", "plateau"):
        raise ValueError(f"train.lr_schedule={schedule!r}: choose constant, cosine or plateau")
    if not select_best and (tc.get("refit") or tc.get("ema") or asked_schedule != "constant"):
        log.info("train.refit / train.ema / train.lr_schedule apply where the engine selects epochs; these %d "
                 "local epochs use none of them", epochs)
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"train.ema={ema_decay!r}: a decay per step in [0, 1) (0 = off)")

    def new_ema():
        """Exponential moving average of the weights (torch.optim.swa_utils), validated and selected in place
        of the raw weights where train.ema > 0 and the engine selects epochs."""
        if not ema_decay:
            return None
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and amp != "off"
                                  and not torch.cuda.is_bf16_supported()) if device.type == "cuda" else None
    start = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    l2 = float(tc.get("l2", 0.0) or 0.0)
    if l2 < 0:
        raise ValueError(f"train.l2={l2!r}: a penalty strength >= 0 (0 = off)")
    # train.l2: (l2/2) x the squared norm of every weight matrix or kernel, added to the training loss: a coupled
    # L2 penalty, whose optimum the optimiser approaches (up to AdamW's small decoupled weight_decay, which is
    # not a penalty on the loss)
    penalised = [q for _, q in l2_penalised(model)] if l2 > 0 else []
    from common.learn.augment import build_mri_augmentation

    def new_optimizer():
        return torch.optim.AdamW(model.parameters(), lr=float(tc["lr"]), weight_decay=float(tc["weight_decay"]))

    def new_scheduler(opt):
        """train.lr_schedule (torch.optim.lr_scheduler), stepped once an epoch: cosine from train.lr to 0 over
        the epoch budget, or halved when the validation selection key has not improved (ReduceLROnPlateau)."""
        if schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        if schedule == "plateau":
            pc = tc.get("lr_plateau") or {}
            return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=float(pc.get("factor", 0.5)),
                                                              patience=int(pc.get("patience", 2)))
        return None

    def epochs_on(ds, opt, ema=None):
        """A fresh data order and augmentation stream for training on ``ds`` with the optimiser ``opt`` (a
        generator of epochs: each ``next`` trains one epoch and gives its mean loss and sample count)."""
        gen = torch.Generator().manual_seed(seed)
        loader = DataLoader(ds, batch_size=int(tc["batch_size"]), shuffle=True, generator=gen,
                            collate_fn=make_collate(ds.mri_shape, ds.path_dim), drop_last=False)
        augment_mri = build_mri_augmentation((tc.get("augment") or {}).get("mri"), seed)
        while True:
            model.train()
            total, count = 0.0, 0
            for batch in loader:
                if augment_mri is not None:
                    batch["mri"] = augment_mri(batch["mri"], batch["has_mri"])
                batch = _to(batch, device)
                with _autocast(device, amp):
                    out = model(batch)
                    loss, _ = multitask_loss(out, batch, loss_cfg)
                if penalised:
                    loss = loss + 0.5 * l2 * sum((q ** 2).sum() for q in penalised)
                if start is not None:
                    loss = loss + 0.5 * proximal_mu * sum(((p - s) ** 2).sum()
                                                          for p, s in zip(model.parameters(), start))
                opt.zero_grad(set_to_none=True)
                if scaler is not None and scaler.is_enabled():
                    scaler.scale(loss).backward()
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), float(tc["grad_clip"]))
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), float(tc["grad_clip"]))
                    opt.step()
                if ema is not None:
                    ema.update_parameters(model)
                bs = len(batch["benefit"])
                total += float(loss.detach()) * bs
                count += bs
            yield total / max(count, 1), count

    metric = str(tc.get("select_metric", "auto"))
    best_key, best_state, best_epoch, best_val = None, None, 0, {}
    history, stale, t0, n_seen = [], 0, time.perf_counter(), 0
    train_loss = float("nan")
    ema = new_ema()
    scored = ema.module if ema is not None else model
    opt = new_optimizer()
    scheduler = new_scheduler(opt)
    stream = epochs_on(train_ds, opt, ema)
    for epoch in range(1, epochs + 1):
        lr = float(opt.param_groups[0]["lr"])
        train_loss, count = next(stream)
        n_seen += count
        rec = {"epoch": epoch, "train_loss": train_loss}
        if scheduler is not None:
            rec["lr"] = lr
        if val_ds is not None and len(val_ds) and (select_best or early_stopping):
            rec.update(_val_score(predict(scored, val_ds, int(tc["eval_batch_size"]), device, amp), loss_cfg))
        history.append(rec)
        if on_epoch:
            on_epoch(rec)
        key = _selection(rec, metric, train_loss)
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(key[0])
        elif scheduler is not None:
            scheduler.step()
        if best_key is None or key > best_key:
            best_key, best_epoch, stale = key, epoch, 0
            best_val = {k: rec[k] for k in VAL_KEYS if k in rec}
            if select_best:
                best_state = copy.deepcopy(scored.state_dict())
        else:
            stale += 1
            if early_stopping and stale >= int(tc["patience"]):
                break
    seconds = time.perf_counter() - t0
    if select_best and best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_epoch = len(history)
        best_val = {k: history[-1][k] for k in VAL_KEYS if history and k in history[-1]}

    threshold, calibration = 0.5, None
    n_val = len(val_ds) if val_ds is not None else 0
    if n_val and select_best:    # federated clients: the server selects and thresholds on pooled validation
        pred = predict(model, val_ds, int(tc["eval_batch_size"]), device, amp)
        y, p = pred["benefit"], pred["prob"]
        lab = ~np.isnan(y)
        if lab.sum() and len(np.unique(y[lab])) == 2:
            threshold = float(youden_threshold(y[lab], p[lab]))
            if str(tc.get("calibration", "none")) == "platt":
                calibration = fit_platt(y[lab], p[lab])
        best_val["n"] = int(lab.sum())
        best_val["n_pos"] = int(np.nansum(y[lab]))
    if refit:
        # train.refit: the selected epoch count, again from the same initial weights and seed, on training
        # and validation patients together; the threshold and any calibration stay those fitted above on
        # the validation split (a model cannot pick its threshold on patients it was trained on)
        model.load_state_dict(init_state)
        seed_everything(seed)
        ema = new_ema()
        opt = new_optimizer()
        stream = epochs_on(ConcatSites([train_ds, val_ds]), opt, ema)
        for rec in history[:best_epoch]:
            if "lr" in rec:      # train.lr_schedule: the selection run's learning rate at each epoch, replayed
                for group in opt.param_groups:
                    group["lr"] = rec["lr"]
            train_loss, count = next(stream)
            n_seen += count
        if ema is not None:
            model.load_state_dict(ema.module.state_dict())
        seconds = time.perf_counter() - t0
    return TrainResult(state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
                       threshold=threshold, best_epoch=best_epoch, epochs_run=len(history), history=history,
                       val=best_val, train_loss=train_loss, n_train=len(train_ds), n_val=n_val,
                       samples_per_s=n_seen / seconds if seconds > 0 else 0.0, seconds=seconds,
                       calibration=calibration, refit=refit)


def baseline_hazard(model: torch.nn.Module, dataset, train_cfg) -> dict | None:
    """The model's piecewise-constant baseline hazard on ``dataset`` (one site or pooled data, in one place)
    -- the same estimator the federation pools from the centers' cells (common.metrics)."""
    from common.metrics import baseline_hazard_from_cells, hazard_cells

    tc = to_plain(train_cfg)
    pred = predict(model, dataset, int(tc["eval_batch_size"]))
    ok = np.isfinite(pred["dfs_time"]) & np.isfinite(pred["dfs_event"])
    if not (pred["dfs_event"][ok] != 0).any():
        return None
    step, top = float(tc["hazard_step_months"]), float(tc["hazard_max_months"])
    edges = np.arange(0.0, top + step / 2, step)
    h = hazard_cells(pred["dfs_time"], pred["dfs_event"], pred["risk"], edges)
    times, cumhaz = baseline_hazard_from_cells([(edges, h["events"], h["exposure"])])
    cuts = [float(c) for c in np.quantile(pred["risk"][ok], [1 / 3, 2 / 3])]
    return {"times": times, "cumhaz": cumhaz, "n_centers": 1,
            "risk_groups": {"cuts": cuts, "basis": "tertiles of the training patients' predicted risk"}}


def evaluate_model(model: torch.nn.Module, dataset, threshold: float, train_cfg, seed: int = 0,
                   hazard: dict | None = None, calibration: dict | None = None, predictions: dict | None = None) -> dict:
    """Full metrics (with CIs) of ``model`` on ``dataset`` at a threshold fixed beforehand; ``dfs`` holds the
    DFS report (C-index, time-dependent AUC, and with ``hazard`` the IBS and calibration of predicted DFS);
    ``calibration`` (Platt parameters fitted on validation) adds the recalibrated Brier score and ECE.
    ``predictions``: a dict that receives the per-patient benefit labels and probabilities (``y``, ``p``), for
    a caller that recalibrates afterwards in the same process (nothing per patient is in the report)."""
    from common.metrics import dfs_report

    tc = to_plain(train_cfg)
    device = pick_device(tc.get("device", "auto"))
    model.to(device)
    pred = predict(model, dataset, int(tc["eval_batch_size"]), device, tc.get("amp", "auto"))
    if predictions is not None:
        predictions.update(y=pred["benefit"], p=pred["prob"])
    out = evaluate_predictions(pred["benefit"], pred["prob"], threshold, time=pred["dfs_time"],
                               event=pred["dfs_event"], risk=pred["risk"], n_boot=int(tc["n_boot"]),
                               seed=seed, min_patients=int(tc["min_patients"]), calibration=calibration)
    out["dfs"] = dfs_report(pred["dfs_time"], pred["dfs_event"], pred["risk"], tc["dfs_horizons"],
                            (hazard or {}).get("times"), (hazard or {}).get("cumhaz"), n_boot=int(tc["n_boot"]),
                            seed=seed, min_patients=int(tc["min_patients"]))
    return out
