"""Evaluate replies in, pooled validation metrics and the round's selection key out.

Each center's reply holds what its site released (``common/federation/reply_schema.py``):
benefit score cells, Harrell's pair counts, time-dependent-AUC cells per DFS horizon,
baseline-hazard cells, and -- in a full report -- exact values with CIs.  Pooling:

* AUC from the benefit cells (``common.metrics.auc_from_cells``: estimate and exact
  bounds) and the Youden threshold on a cell edge;
* the center-stratified Harrell's C from the summed pair counts, with its CI
  (``common.metrics.pooled_c_index``): exactly Harrell's C within centers on the pooled
  predictions;
* the time-dependent AUC at each horizon from the DFS cells, with bounds;
* the validation loss, weighted by patients;
* with ``train.calibration: platt``, Platt scaling of the benefit probability fitted on the
  pooled cells (``common.metrics.fit_platt_cells``), which the selected round's model carries.
"""
from __future__ import annotations

import logging

import numpy as np

from common.federation import reply_schema as W
from common.federation.roles import trains
from common.metrics import (auc_from_cells, baseline_hazard_from_cells, fit_platt_cells, pooled_c_index,
                            quantiles_from_cells, youden_from_cells)

log = logging.getLogger("newadj.server")

SELECT_METRICS = ("auto", "pooled_auc", "weighted_auc", "pooled_c_index", "val_loss")
# set by the ServerApp from train.calibration: fit Platt scaling on pooled cells only when the run uses it
# (the same pattern as messaging.POLL_SECONDS); off, no round pays for a logistic regression it discards
RECALIBRATE = False


def _cells(m: dict, keys) -> tuple | None:
    e, n, p = (m.get(k) for k in keys)
    return None if e is None or n is None or p is None else (list(e), list(n), list(p))


def _td_horizons(m: dict) -> list[str]:
    return sorted({k[len("td-"):-len("-edges")] for k in m if k.startswith("td-") and k.endswith("-edges")},
                  key=float)


def center_entry(m: dict) -> tuple[dict, dict]:
    """One center's evaluate metrics as a history entry, and what it released for pooling."""
    released: dict = {"cells": None, "pairs": None, "td": {}, "hazard": None, "risk": None}
    entry = {"n": int(m.get("num-examples", 0)), "n_pos": int(m.get("n-pos", 0)),
             "abstained": bool(m.get("abstained", 1)), "dfs_abstained": bool(m.get("dfs-abstained", 1))}
    if "loss" in m:
        entry["loss"] = float(m["loss"])
    if not entry["abstained"]:
        cells = _cells(m, W.BENEFIT_CELLS)
        released["cells"] = cells
        est, lo, hi = auc_from_cells([cells])
        entry.update({"auc_cells": est, "auc_lower": lo, "auc_upper": hi, "cells": len(cells[1]),
                      "threshold_used": float(m.get("threshold-used", float("nan"))),
                      **{k: int(m[k]) for k in W.CONFUSION if k in m}})
    if not entry["dfs_abstained"]:
        pairs = {name: float(m[key]) for name, key in W.PAIR_WIRE.items() if key in m}
        if len(pairs) == len(W.PAIR_WIRE):
            released["pairs"] = pairs
            c, lo, hi = pooled_c_index([pairs])
            entry.update({"c_index": c, "c_index_lo": lo, "c_index_hi": hi})
        entry.update({"n_dfs": int(m.get("n-dfs", 0)), "n_events": int(m.get("n-events", 0))})
        for h in _td_horizons(m):
            released["td"][h] = _cells(m, W.td_keys(float(h)))
    if all(k in m for k in W.HAZARD_CELLS):   # a baseline-hazard reply (nothing else in it)
        released["hazard"] = tuple(list(m[k]) for k in W.HAZARD_CELLS)
    if all(k in m for k in W.RISK_CELLS):
        released["risk"] = tuple(list(m[k]) for k in W.RISK_CELLS)
    # a full report: exact values computed at the site (flat: name, name_lo, name_hi)
    for key in (*(k for name in W.FULL_REPORT + W.FULL_REPORT_LISTED for k in W.full_report_keys(name)),
                *W.FULL_REPORT_POINTS):
        if key in m:
            entry[key.replace("-", "_")] = float(m[key])
    for key, v in m.items():
        if (key.startswith("td-auc-") or key.startswith("dfs-cal-")) and isinstance(v, (int, float)):
            entry[key.replace("-", "_")] = float(v)
    return entry, released


def pool(per_center: dict, released: dict) -> dict:
    """Pooled validation metrics of one round from every center's released aggregates."""
    pooled: dict = {}
    cells = [r["cells"] for r in released.values() if r["cells"] is not None]
    if cells:
        est, lo, hi = auc_from_cells(cells)
        scored = [e for e in per_center.values() if not e["abstained"]]
        w_auc = [(e["auc_cells"], e["n"]) for e in scored if not np.isnan(e["auc_cells"])]
        pooled.update({"auc": est, "auc_lower": lo, "auc_upper": hi, "n": sum(e["n"] for e in scored),
                       "n_centers": len(scored),
                       "weighted_auc": (sum(a * n for a, n in w_auc) / max(1, sum(n for _, n in w_auc))
                                        if w_auc else float("nan")),
                       "youden_threshold": youden_from_cells(cells)})
        platt = fit_platt_cells(cells) if RECALIBRATE else None   # from the same cells (no patient's score)
        if platt is not None:
            pooled["platt"] = {"a": platt["a"], "b": platt["b"]}
    pairs = [r["pairs"] for r in released.values() if r["pairs"] is not None]
    if pairs:
        c, lo, hi = pooled_c_index(pairs)
        dfs = [e for e in per_center.values() if not e["dfs_abstained"]]
        pooled.update({"c_index": c, "c_index_lo": lo, "c_index_hi": hi, "n_dfs": sum(e["n_dfs"] for e in dfs),
                       "n_events": sum(e["n_events"] for e in dfs), "n_centers_dfs": len(dfs)})
    for h in sorted({h for r in released.values() for h in r["td"]}, key=float):
        td = [r["td"][h] for r in released.values() if r["td"].get(h)]
        est, lo, hi = auc_from_cells(td)
        pooled.update({f"td_auc_{h}": est, f"td_auc_{h}_lower": lo, f"td_auc_{h}_upper": hi})
    with_loss = [e for e in per_center.values() if "loss" in e and np.isfinite(e["loss"])]
    if with_loss:
        n = [max(e["n"], e.get("n_dfs", 0)) for e in with_loss]
        pooled["loss"] = sum(e["loss"] * k for e, k in zip(with_loss, n)) / max(1, sum(n))
    hazard = [r["hazard"] for r in released.values() if r["hazard"] is not None]
    if hazard:
        times, cumhaz = baseline_hazard_from_cells(hazard)
        pooled["baseline_hazard"] = {"times": times, "cumhaz": cumhaz, "n_centers": len(hazard)}
    risk = [r["risk"] for r in released.values() if r["risk"] is not None]
    if risk:   # the model's risk tertiles on the training patients (score = logistic(risk))
        cuts = [float(np.log(q / (1 - q))) if 0 < q < 1 else float("nan") for q in quantiles_from_cells(risk, (1 / 3, 2 / 3))]
        pooled["risk_groups"] = {"cuts": cuts, "basis": "tertiles of the training centers' predicted risk"}
    return pooled


def resolve_select_metric(metric: str, endpoints: dict) -> str | None:
    """The configured selection metric; ``auto`` is decided by :func:`decide_auto` (None until then)."""
    if metric not in SELECT_METRICS:
        raise ValueError(f"federation.select_metric={metric!r}: choose one of {', '.join(SELECT_METRICS)}")
    return None if metric == "auto" else metric


def decide_auto(pooled: dict, endpoints: dict, final: bool = False) -> tuple[str | None, str]:
    """``auto`` at the first round whose validation ranks models: (metric, why), or (None, why) to wait.

    The pooled AUC when the training centers have benefit labels and their cells rank models (exact
    bounds narrower than [0, 1]). While they do not, the decision waits: the first rounds' near-constant
    scores fall into one or two cells even where a trained model's would rank, and deciding there would
    select the whole run on another metric. ``final`` (after the last round, ``pooled`` the last
    validation): the cells never ranked, so the pooled C-index, else the loss. Small validation splits
    under the sites' floors often release one cell per label or none, while the pair counts still rank.
    """
    if endpoints.get("benefit") and "auc" in pooled and pooled["auc_upper"] - pooled["auc_lower"] < 1.0:
        return "pooled_auc", "the training centers' benefit cells rank models"
    if endpoints.get("benefit") and not final:
        return None, "the training centers' released benefit cells do not rank models yet"
    why = ("no benefit label at the training centers" if not endpoints.get("benefit") else
           "the training centers' released benefit cells never ranked models (AUC bounds [0, 1])")
    if pooled.get("c_index") is not None and pooled["c_index"] == pooled["c_index"]:
        return "pooled_c_index", why
    if "loss" in pooled:
        return "val_loss", why + "; no DFS pair counts either"
    return None, "no training center released validation metrics"


def decide_auto_at_end(history: list[dict], endpoints: dict) -> tuple[str | None, str]:
    """``auto`` after the last round, the benefit cells having never ranked one: :func:`decide_auto` (``final``)
    on the latest round that released a finite C-index, else a finite loss, so that one round without them
    does not hide what the others released."""
    def released(v: dict, k: str) -> bool:
        return v.get(k) is not None and bool(np.isfinite(v[k]))
    last = next((h["val"] for k in ("c_index", "loss") for h in reversed(history) if released(h["val"], k)),
                history[-1]["val"])
    return decide_auto(last, endpoints, final=True)


def best_entry(rec: dict, key: float) -> dict:
    """A round as the selection's current best: its key, threshold, validation and calibration."""
    return {"round": rec["round"], "key": key, **decision_threshold(rec["val"]), "val": rec["val"],
            "calibration": rec["val"].get("platt")}


def better(key: float, best: dict | None) -> bool:
    """Whether a round with selection ``key`` replaces ``best``: a higher key; the first of equal keys; the
    latest round while no round could be ranked (every key -inf)."""
    return best is None or key > best["key"] or (key == -np.inf and best["key"] == -np.inf)


def best_of(history: list[dict], metric: str | None) -> dict | None:
    """The selected round over ``history`` (records with their pooled ``val``) on ``metric``."""
    best = None
    for rec in history:
        key = selection_key(rec["val"], metric) if metric else -np.inf
        if better(key, best):
            best = best_entry(rec, key)
    return best


def selection_key(pooled: dict, metric: str) -> float:
    """The round's validation score (higher is better); -inf when the centers released nothing to rank it by."""
    if not pooled:
        return -np.inf
    if metric in ("pooled_auc", "weighted_auc") and pooled.get("auc_upper", 1.0) - pooled.get("auc_lower", 0.0) >= 1.0:
        return -np.inf   # every released cell mixes both labels over the same scores: the AUC is anywhere in [0, 1]
    v = {"pooled_auc": pooled.get("auc"), "weighted_auc": pooled.get("weighted_auc"),
         "pooled_c_index": pooled.get("c_index"), "val_loss": -pooled.get("loss", np.inf)}[metric]
    return -np.inf if v is None or np.isnan(v) else float(v)


def selection_basis(pooled: dict, metric: str) -> tuple[int, int]:
    """(patients, centers) behind a round's selection key."""
    if metric == "pooled_c_index":
        return int(pooled.get("n_dfs", 0)), int(pooled.get("n_centers_dfs", 0))
    if metric in ("pooled_auc", "weighted_auc"):
        return int(pooled.get("n", 0)), int(pooled.get("n_centers", 0))
    return max(int(pooled.get("n", 0)), int(pooled.get("n_dfs", 0))), max(int(pooled.get("n_centers", 0)),
                                                                           int(pooled.get("n_centers_dfs", 0)))


def decision_threshold(pooled: dict) -> dict:
    """The decision threshold: Youden's on the pooled validation cells when they rank models, else 0.5."""
    if "auc" in pooled and pooled["auc_upper"] - pooled["auc_lower"] < 1.0:
        return {"threshold": float(pooled["youden_threshold"]), "threshold_source": "Youden on pooled validation"}
    return {"threshold": 0.5, "threshold_source": "default 0.5: the validation cells do not rank models"}


def selection_summary(best: dict, metric: str, fed) -> dict:
    """Which round was selected, on what, and whether that rests on enough validation data (warned if not)."""
    n, k = selection_basis(best["val"], metric)
    out = {"round": best["round"], "metric": metric, "value": None if best["key"] == -np.inf else best["key"],
           "patients": n, "centers": k, "warning": None}
    if best["key"] == -np.inf:
        out["warning"] = ("no training center released validation metrics that rank the rounds (each abstained "
                          "under its site's floors, or released one cell); the last round's model is used, not "
                          "one selected on validation")
    elif n < int(fed.selection_warn_patients) or k < int(fed.selection_warn_centers):
        short = [f"{k} center(s) < selection_warn_centers {fed.selection_warn_centers}"] if k < int(
            fed.selection_warn_centers) else []
        short += [f"{n} patients < selection_warn_patients {fed.selection_warn_patients}"] if n < int(
            fed.selection_warn_patients) else []
        out["warning"] = (f"round {best['round']} was selected on {metric} over the validation of {k} center(s) "
                          f"and {n} patients ({'; '.join(short)}): a noisy choice")
    if out["warning"] and not int(fed.get("cv_folds", 0) or 0):
        out["warning"] += ("; federation.cv_folds=5 validates every round on every training patient (out-of-fold), "
                           "without lowering any site's floor")
    if out["warning"]:
        log.warning("%s", out["warning"])
    return out


def endpoints_of(roles) -> dict:
    """Which endpoints the training centers can train and validate (their role replies' counts)."""
    train = [i for i in roles.values() if trains(i.get("role"))]
    return {"benefit": sum(int(i.get("n-benefit", 0)) for i in train),
            "dfs": sum(int(i.get("n-dfs", 0)) for i in train)}
