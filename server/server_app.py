"""The ServerApp: roles, rounds, internal-validation model selection, checkpoints.

Each round: the strategy (Flower's FedAvg / FedProx / FedAdam / FedYogi /
FedMedian / FedTrimmedAvg) sends the global weights to the training centers
only, aggregates their updates, then every training center scores the new
global model on its validation split and returns aggregates (score histograms,
counts, loss).  The best round by the configured validation metric is kept.
The external center is scored at the end with the selected model and the
threshold chosen on pooled internal validation (and, if configured, every k
rounds for monitoring only: those numbers are never used for selection).
"""
from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import psutil
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.exception import PrivacyBudgetExhausted

from common.hashing import json_safe
from common.config import config_hash, load_config, save_config, split_overrides, to_plain
from common.learn.engine import seed_everything
from common.federation.model_io import save_model_package
from common.learn.task import model_from_config
from common.federation.transport import shorten_object_pull_backoff
from common.federation.wire import (CV_ARRAYS, WEIGHTS, fold_key, from_arrays, state_dict_bytes, to_arrays,
                                   weights_sha256)
from server import evaluation, messaging
from server.progress import Events
from server.rounds import (centers_of, evaluate_centers, membership, merge_failures, plain_round,
                           secure_round)
from server.evaluation import (best_entry, best_of, better, endpoints_of, selection_summary, decide_auto,
                               decide_auto_at_end, resolve_select_metric, selection_key)
from server.checkpoints import annotate_checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from server.roles import NodeView, admit_new_nodes, apply_holdout, query_roles, wait_for_nodes
from server.secure_aggregation import check_secure_config
from server.strategies import DP_WEIGHT, build_strategy, is_dp, privacy_spent, restore_strategy_state, strategy_state
from common.federation.roles import trains

log = logging.getLogger("newadj.server")
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    shorten_object_pull_backoff()    # replies are pulled as they land, not a second later
    rc = context.run_config
    cfg = load_config(split_overrides(rc.get("overrides")))
    fed = cfg.federation
    if str(rc.get("mode", "run")) == "schema":   # `newadj schema`: names and counts, no training
        from server.schema import run_schema

        run_dir = Path(str(rc.get("run-dir") or f"runs/schema-{int(time.time())}")).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        run_schema(grid, cfg, run_dir, int(rc.get("expected-nodes", 0) or fed.expected_nodes or fed.min_available_nodes))
        return
    run_dir = Path(str(rc.get("run-dir") or f"runs/run-{int(time.time())}")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    events = Events(run_dir, resume=bool(rc.get("resume", False)))
    try:
        _federate(grid, context, cfg, run_dir, events)
    except Exception as exc:
        events("failed", text=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        events.close()


def capacity_candidates(cfg) -> list[tuple[str, object]]:
    """[(label, config)] of the capacity candidates of a run (``federation.capacity``: every combination of the
    listed ``train.l2`` and ``federation.local_epochs`` values); one entry, the run's own config, when none is listed."""
    from itertools import product

    from omegaconf import OmegaConf

    cap = cfg.federation.get("capacity") or {}
    l2s = [float(v) for v in (cap.get("l2") or [])] or [None]
    epochs = [int(v) for v in (cap.get("local_epochs") or [])] or [None]
    if l2s == [None] and epochs == [None]:
        return [("the run's settings", cfg)]
    if any(v is not None and (not np.isfinite(v) or v < 0) for v in l2s) or any(e is not None and e < 1 for e in epochs):
        raise ValueError(f"federation.capacity: l2 values must be >= 0 and local_epochs >= 1, got {to_plain(cap)}")
    out = []
    for l2, ep in product(l2s, epochs):
        c = OmegaConf.create(to_plain(cfg))
        if l2 is not None:
            c.train.l2 = l2
        if ep is not None:
            c.federation.local_epochs = ep
        out.append((f"train.l2={c.train.l2:g}, local_epochs={c.federation.local_epochs}", c))
    return out


def _choose_capacity(grid, context, candidates, run_dir: Path, events: Events, roles, unanswered, train_ids,
                     endpoints, select_metric, secure: bool) -> tuple[dict, dict]:
    """Every capacity candidate trained in turn, its round selected on the federated out-of-fold validation;
    the candidate whose selected round validates best wins (its rounds' model is the run's).  Needs
    ``federation.cv_folds`` >= 2, so that every candidate is judged on every training patient, and one
    selection metric for all (``federation.select_metric``, not ``auto``)."""
    fed = candidates[0][1].federation
    if int(fed.get("cv_folds", 0) or 0) < 2 or select_metric is None:
        raise RuntimeError("federation.capacity needs federation.cv_folds >= 2 and a fixed federation.select_metric "
                           "(not auto): every candidate is judged on the same out-of-fold validation")
    results, table = [], []
    for j, (label, c) in enumerate(candidates):
        phase = run_dir / "capacity" / f"candidate-{j + 1}"
        phase.mkdir(parents=True, exist_ok=True)
        log.info("capacity candidate %d/%d: %s", j + 1, len(candidates), label)
        events("note", text=f"capacity candidate {j + 1}/{len(candidates)}: {label}")
        res = _rounds(grid, context, c, phase, events, roles, unanswered, train_ids, endpoints, select_metric,
                      config_hash(c), secure, phase / "history.jsonl")
        results.append(res)
        b = res["best"] or {"round": None, "key": -np.inf, "val": {}}
        table.append({"candidate": label, "l2": float(c.train.l2), "local_epochs": int(c.federation.local_epochs),
                      "selected_round": b["round"], "key": None if b["key"] == -np.inf else float(b["key"]),
                      "val_loss": (b.get("val") or {}).get("loss"), "c_index": (b.get("val") or {}).get("c_index"),
                      "auc": (b.get("val") or {}).get("auc"), "dir": str(phase)})
    win = max(range(len(results)), key=lambda j: (-np.inf if table[j]["key"] is None else table[j]["key"], -j))
    chosen = dict(results[win])
    chosen["comm"] = {k: sum(r["comm"][k] for r in results) for k in chosen["comm"]}
    log.info("capacity: %s chosen (selected round %s)", table[win]["candidate"], table[win]["selected_round"])
    events("note", text=f"capacity chosen on {select_metric}: {table[win]['candidate']}")
    return chosen, {"chosen": table[win]["candidate"], "metric": select_metric, "candidates": table}


def cox_kind(cfg) -> bool:
    return str(cfg.model.get("kind", "network")) == "cox"


def aggregate_folds(strategies: list, current: ArrayRecord, replies: dict, rnd: int) -> ArrayRecord:
    """Each fold model aggregated by its own strategy (FedAdam keeps moments per fold) from the centers' fold
    updates ``{center: (record, num-examples)}``; a fold nothing came back for stays as it was."""
    from flwr.app import MessageType, MetricRecord, RecordDict
    from flwr.app import Message as FlowerMessage

    out = {}
    for f, strat in enumerate(strategies):
        msgs = [FlowerMessage(RecordDict({"arrays": ArrayRecord({WEIGHTS: rec[fold_key(f)]}),
                                          "metrics": MetricRecord({"num-examples": n})}),
                              dst_node_id=0, message_type=MessageType.TRAIN)
                for _, (rec, n) in sorted(replies.items()) if fold_key(f) in rec]
        new = strat.aggregate_train(rnd, msgs)[0] if msgs else None
        out[fold_key(f)] = new[WEIGHTS] if new is not None else current[fold_key(f)]
    return ArrayRecord(out)


def _federate(grid: Grid, context: Context, cfg, run_dir: Path, events: Events) -> None:
    """Roles, rounds, selection, the baseline hazard and the external center's report of one run."""
    rc = context.run_config
    fed = cfg.federation
    messaging.POLL_SECONDS = float(fed.reply_poll_seconds)
    evaluation.RECALIBRATE = str(cfg.train.calibration) == "platt"
    events("start", run_id=int(context.run_id), run_dir=str(run_dir), strategy=str(fed.strategy),
           rounds=int(fed.num_rounds), resume=bool(rc.get("resume", False)))
    check_secure_config(fed)
    secure = bool(fed.secure_aggregation.enabled)
    save_config(cfg, run_dir)
    cfg_hash = config_hash(cfg)
    seed_everything(int(cfg.seed))
    random.seed(int(cfg.seed))
    history_path = run_dir / "history.jsonl"

    # --- who is who -------------------------------------------------------------
    expected = int(rc.get("expected-nodes", 0) or fed.expected_nodes or fed.min_available_nodes)
    node_ids = wait_for_nodes(grid, expected, float(fed.wait_nodes_timeout))
    roles, role_errors = query_roles(grid, node_ids, float(fed.query_timeout))
    unanswered = set(role_errors)
    for line in apply_holdout(roles, fed.get("holdout_center")):
        log.info("%s", line)
        events("note", text=line)
    train_ids, ext_ids = membership(grid, roles)
    centers = centers_of(roles)
    log.info("roles: %s", {i["center-id"]: i["role"] for i in roles.values()})
    endpoints = endpoints_of(roles)
    select_metric = resolve_select_metric(str(fed.select_metric), endpoints)   # None: auto, decided below
    log.info("endpoints at the training centers: %d patients with a benefit label, %d with DFS; selecting "
             "rounds on %s", endpoints["benefit"], endpoints["dfs"], select_metric or "auto")
    events("roles", centers={i["center-id"]: i["role"] for i in roles.values()}, endpoints=endpoints,
           select_metric=select_metric or "auto", unanswered=len(role_errors))
    if len(train_ids) < int(fed.min_train_nodes):
        by_reason: dict[str, list[str]] = {}
        for nid, reason in role_errors.items():   # "policy of X: why" from many centers: one line per why
            center, _, why = reason.partition(": ") if reason.startswith("policy of ") else (str(nid), "", reason)
            by_reason.setdefault(why or reason, []).append(center.removeprefix("policy of "))
        why = "; ".join(f"{', '.join(sorted(c))}: {r}" for r, c in sorted(by_reason.items())) or "no refusal reported"
        raise RuntimeError(f"only {len(train_ids)} training centers answered; federation.min_train_nodes="
                           f"{fed.min_train_nodes} ({why})")

    # --- rounds: one training run, or one per capacity candidate chosen on the same validation ---------------
    candidates = capacity_candidates(cfg)
    if len(candidates) > 1 and cox_kind(cfg):
        raise RuntimeError("federation.capacity applies to the network (model.kind network); model=cox chooses its "
                           "penalizer by leave-one-center-out CV over model.cox.penalizer")
    capacity = None
    if cox_kind(cfg):   # exact Newton-Raphson instead of rounds of local training
        res = _cox_rounds(grid, cfg, run_dir, events, roles, cfg_hash, secure)
    elif len(candidates) == 1:
        res = _rounds(grid, context, cfg, run_dir, events, roles, unanswered, train_ids, endpoints, select_metric,
                      cfg_hash, secure, history_path)
    else:
        res, capacity = _choose_capacity(grid, context, candidates, run_dir, events, roles, unanswered, train_ids,
                                         endpoints, select_metric, secure)
    best, history, select_metric, strategy = res["best"], res["history"], res["select_metric"], res["strategy"]
    comm, stopped_early, cox_fit, num_rounds = res["comm"], res["stopped_early"], res["cox_fit"], res["num_rounds"]
    weights_bytes, fp16, ck_dir = res["weights_bytes"], res["fp16"], res["run_dir"] / "checkpoints"
    if capacity is not None:    # the chosen candidate's settings are the model's
        cfg = res["cfg"]
        fed, cfg_hash = cfg.federation, config_hash(cfg)

    # --- the selected model on the external center -----------------------------------
    if best is None:
        raise RuntimeError(f"no round completed ({stopped_early or 'no rounds to run'}); no model to select")
    selection = (selection_summary(best, select_metric, fed) if cox_fit is None else
                 {"round": best["round"], "metric": select_metric, "value": best["key"] if cox_fit["cv_basis"] else None,
                  "patients": cox_fit["patients"], "centers": len(cox_fit["centers"]), "warning": None,
                  "penalizer": cox_fit["penalizer"],
                  "basis": ("leave-one-center-out cross-validated partial likelihood over every training "
                            "center" if cox_fit["cv_basis"] else "fixed penalizer")})
    events("selected", **selection, threshold=best["threshold"],
           threshold_source=best.get("threshold_source", "Youden on pooled validation"))
    best_state, best_meta, _ = load_checkpoint(ck_dir / f"round_{best['round']:03d}.pt")
    best_arrays = to_arrays(best_state)
    admit_new_nodes(grid, roles, float(fed.query_timeout), unanswered)
    train_ids, ext_ids = membership(grid, roles)
    # the selected model's baseline hazard, from the training centers' training splits (DFS probabilities)
    baseline_hazard = None
    if endpoints["dfs"] and train_ids:
        bh, s5, r5 = evaluate_centers(grid, train_ids, roles, best_arrays,
                                       {"split": "train", "bins": int(fed.histogram_bins), "threshold": 0.5,
                                        "baseline-hazard": True}, float(fed.round_timeout))
        comm["bytes_sent"] += s5
        comm["bytes_received"] += r5
        baseline_hazard = bh["pooled"].get("baseline_hazard")
        if baseline_hazard is not None and "risk_groups" in bh["pooled"]:
            baseline_hazard["risk_groups"] = bh["pooled"]["risk_groups"]
        if baseline_hazard is None:
            log.warning("no training center released baseline-hazard cells: predicted DFS probabilities, their "
                        "calibration and the integrated Brier score are not available")
    calibration = ({"method": "platt", **best["calibration"],
                    "fitted_on": f"pooled validation cells of round {best['round']}"} if best.get("calibration") else None)
    external = {}
    if ext_ids:
        request = {"split": "test", "bins": int(fed.histogram_bins), "threshold": float(best["threshold"]),
                   "full-report": True}
        if best.get("calibration"):
            request.update({"calibration-a": float(best["calibration"]["a"]),
                            "calibration-b": float(best["calibration"]["b"])})
        if baseline_hazard:
            request.update({"bh-times": baseline_hazard["times"], "bh-cumhaz": baseline_hazard["cumhaz"]})
            cuts = (baseline_hazard.get("risk_groups") or {}).get("cuts")
            if cuts and all(np.isfinite(c) for c in cuts):
                request["risk-cuts"] = [float(c) for c in cuts]
        ext, s4, r4 = evaluate_centers(grid, ext_ids, roles, best_arrays, request, float(fed.round_timeout))
        comm["bytes_sent"] += s4
        comm["bytes_received"] += r4
        external = ext
    centers.update(centers_of(roles))   # late joiners too
    dp_spent = privacy_spent(strategy)
    privacy = {"secure_aggregation": secure, "differential_privacy": dp_spent,
               "secure_aggregation_settings": to_plain(fed.secure_aggregation) if secure else None}
    if dp_spent is not None:
        log.info("privacy spent: epsilon %.3f at delta %g after %d private releases (noise multiplier %g, "
                 "clipping norm %g)", dp_spent["epsilon"], dp_spent["delta"], dp_spent["releases"],
                 dp_spent["noise_multiplier"], dp_spent["clipping_norm"])
    card = {"training_centers": {c: v for c, v in centers.items() if trains(v["role"])},
            "external_centers": [c for c, v in centers.items() if v["role"] == "external"],
            "strategy": str(fed.strategy), "rounds": num_rounds, "selected_round": best["round"],
            "local_epochs": int(fed.local_epochs), "config_hash": cfg_hash, "seed": int(cfg.seed),
            "selection": f"{select_metric} on internal validation", "privacy": privacy,
            "holdout_center": fed.get("holdout_center"),
            "endpoints": [k for k, v in endpoints.items() if v], "baseline_hazard": baseline_hazard,
            "calibration": calibration}
    if capacity is not None:
        card["capacity"] = {"chosen": capacity["chosen"], "metric": capacity["metric"],
                            "candidates": [{k: c[k] for k in ("candidate", "selected_round", "key")}
                                           for c in capacity["candidates"]]}
    if cox_fit is not None:
        card["cox"] = {k: cox_fit[k] for k in ("penalizer", "cv_basis", "coefficients", "rounds", "patients")}
    package = save_model_package(run_dir / "best_model.pt", best_state, cfg, float(best["threshold"]), card)
    per_round = [h["bytes_sent"] / max(1, h.get("messages_out", 1)) for h in history]
    summary = {
        "status": "finished", "run_dir": str(run_dir), "config_hash": cfg_hash, "strategy": str(fed.strategy),
        "rounds": num_rounds, "centers": centers, "role_query_errors": role_errors,
        "selected_round": best["round"], "selection_metric": select_metric, "selection": selection,
        "endpoints": endpoints, "baseline_hazard": baseline_hazard,
        "threshold": best["threshold"], "calibration": calibration, "selected_val": best["val"],
        "best_model": {"file": "best_model.pt", "sha256": package["sha256"],
                       "checkpoint_sha256": best_meta["sha256"], "weights_sha256": best_meta.get("weights_sha256")},
        "external": external, "history": history, "privacy": privacy, "stopped_early": stopped_early,
        "communication": {**comm, "model_bytes_fp32": weights_bytes, "fp16_weights": fp16,
                          "mean_bytes_per_message_out": float(np.mean(per_round)) if per_round else None},
        "config": to_plain(cfg),
    }
    if capacity is not None:
        summary["capacity"] = capacity
    if cox_fit is not None:
        summary["cox"] = {k: v for k, v in cox_fit.items() if k not in ("communication",)}
    (run_dir / "metrics.json").write_text(json.dumps(json_safe(summary), indent=1))
    events("finished", metrics=str(run_dir / "metrics.json"))
    log.info("finished: selected round %d; metrics in %s; best model %s sha256 %s", best["round"],
             run_dir / "metrics.json", run_dir / "best_model.pt", package["sha256"])


def _cox_rounds(grid: Grid, cfg, run_dir: Path, events: Events, roles: dict, cfg_hash: str, secure: bool) -> dict:
    """``model=cox``: the Newton rounds (server/cox.py) and the fitted model as the run's one checkpoint, in the
    shape :func:`_rounds` returns."""
    import torch

    from server.cox import fit_cox

    fed = cfg.federation
    if secure or bool(fed.differential_privacy.enabled):
        raise RuntimeError("model=cox sums the centers' derivatives in the clear: it runs without "
                           "federation.secure_aggregation and differential_privacy")
    cox_fit = fit_cox(grid, roles, cfg, events, float(fed.round_timeout))
    state = {"beta": torch.as_tensor(cox_fit["beta"], dtype=torch.float32)}
    save_checkpoint(run_dir, cox_fit["rounds"], state, {"config_hash": cfg_hash, "weights_sha256": weights_sha256(state)})
    key = next(r["cv_partial_loglik"] for r in cox_fit["cv"] if r["penalizer"] == cox_fit["penalizer"])
    best = {"round": cox_fit["rounds"], "threshold": 0.5, "val": {}, "calibration": None, "key": key or 0.0}
    return {"best": best, "history": [], "select_metric": "cox_cv_partial_loglik", "strategy": None,
            "comm": dict(cox_fit["communication"]), "stopped_early": None, "cox_fit": cox_fit, "num_rounds": 0,
            "weights_bytes": state_dict_bytes(state), "fp16": False, "run_dir": run_dir, "cfg": cfg}


def _rounds(grid: Grid, context: Context, cfg, run_dir: Path, events: Events, roles: dict, unanswered: set,
            train_ids: list, endpoints: dict, select_metric, cfg_hash: str, secure: bool, history_path: Path) -> dict:
    """The training rounds of one configuration (or the Newton rounds of ``model=cox``) and their selection:
    its history, the selected round (``best``, its checkpoint under ``run_dir``), and what the run spent."""
    rc = context.run_config
    fed = cfg.federation
    # --- model and (maybe) resume -------------------------------------------------
    strategy = build_strategy(fed, n_train_centers=len(train_ids))
    model = model_from_config(cfg)
    state, start_round, history, best, pending = model.state_dict(), 1, [], None, None
    comm = {"bytes_sent": 0, "bytes_received": 0}
    resume = bool(rc.get("resume", False))
    last = latest_checkpoint(run_dir) if resume else None
    if last is not None:
        state, meta, server_state = load_checkpoint(last)
        if meta.get("config_hash") != cfg_hash:
            raise RuntimeError(f"{last}: written with another config (hash {meta.get('config_hash', '')[:12]} vs "
                               f"{cfg_hash[:12]}); resume with the same overrides")
        start_round = int(meta["round"]) + 1
        history, best, comm = server_state["history"], server_state["best"], server_state["comm"]
        pending = server_state.get("pending")   # the last round's record, its validation still to come
        select_metric = select_metric or server_state.get("select_metric")
        restore_strategy_state(strategy, server_state.get("strategy", {}))
        random.setstate(server_state["py_random"])
        log.warning("resuming %s after round %d", run_dir, meta["round"])
        history_path.write_text("".join(json.dumps(json_safe(h)) + "\n" for h in history))
    elif history_path.exists():
        history_path.unlink()
    # federated k-fold CV of the rounds (federation.cv_folds): k fold models, each aggregated by a strategy of its
    # own, travel with the model; the centers' out-of-fold scores select the round of the global model
    k_folds = int(fed.get("cv_folds", 0) or 0)
    fold_strategies, fold_arrays = [], None
    if k_folds:
        if k_folds < 2 or secure or is_dp(strategy) or fed.get("local_norm") or last is not None:
            raise RuntimeError(f"federation.cv_folds={k_folds}: needs k >= 2 and runs without secure aggregation, "
                               "differential privacy, local_norm or --resume")
        fold_strategies = [build_strategy(fed, n_train_centers=len(train_ids)) for _ in range(k_folds)]
        flat = to_arrays(state)[WEIGHTS]
        fold_arrays = ArrayRecord({fold_key(f): flat for f in range(k_folds)})
    weights_bytes = state_dict_bytes(state)
    layout = {k: v.detach().clone() for k, v in state.items()}   # names and shapes of every weight record
    arrays = to_arrays(state)
    fp16 = bool(fed.fp16_weights) and not secure   # SecAgg+ quantises fp32 weights itself

    # --- rounds ---------------------------------------------------------------------
    # One message per training center per round (plain runs): round r's train message carries the model of
    # round r-1 and asks the center to score it on its validation split first, so round r-1's validation
    # comes back with round r's update and completes round r-1's record; the last round's model is scored
    # in a message of its own after the loop.  SecAgg+ rounds (four messages already) are scored right away.
    num_rounds = int(fed.num_rounds)
    stopped_early = None
    eval_request = {"split": "val", "bins": int(fed.histogram_bins), "threshold": 0.5,
                    **({"cv-folds": k_folds} if fold_arrays is not None else {})}

    def decided(rnd: int, why: str) -> None:
        """``auto`` chose ``select_metric`` at round ``rnd``: say so, and select again over every round so far."""
        nonlocal best
        log.info("round %d: rounds are selected on %s (select_metric auto: %s)", rnd, select_metric, why)
        events("note", text=f"rounds are selected on {select_metric} (select_metric auto: {why})")
        best = best_of(history, select_metric)

    def complete(rec: dict, val: dict) -> None:
        """Round ``rec``'s model was scored: fill in its validation, select, write it down."""
        nonlocal best, select_metric
        rnd = rec["round"]
        rec.update({"val": dict(val["pooled"]), "val_notices": val["notices"],
                    "val_centers": {c: {"auc": e.get("auc_cells"), **{k: e.get(k) for k in (
                        "n", "c_index", "n_dfs", "loss", "abstained", "dfs_abstained")}}
                        for c, e in val["centers"].items()},
                    "failures": merge_failures(rec["failures"], val["failures"])})
        history.append(rec)
        if select_metric is None:
            select_metric, why = decide_auto(val["pooled"], endpoints)
            if select_metric is not None:   # every round so far is ranked on it, not only those from now on
                decided(rnd, why)
        key = selection_key(val["pooled"], select_metric) if select_metric else -np.inf
        # nothing ranks this round (no center released validation metrics under its floors, or auto still waits
        # for cells that rank): while no round ranks, the latest model
        if better(key, best):
            best = best_entry(rec, key)
        rec["best_round"] = best["round"]
        events("round", of=num_rounds, **{k: rec.get(k) for k in ("round", "train_loss", "val", "failures", "dropped",
                                                                 "bytes_sent", "seconds")},
               abstained=sum(1 for e in rec["val_centers"].values() if e["abstained"] and e["dfs_abstained"]),
               answered=len(rec["val_centers"]))
        with history_path.open("a") as f:
            f.write(json.dumps(json_safe(rec)) + "\n")
        annotate_checkpoint(run_dir, rnd, {"metrics": json_safe(rec["val"]),
                                           "threshold": best["threshold"] if best["round"] == rnd else None})
        log.info("round %d/%d: train loss %s, val pooled AUC %.3f, C %.3f", rnd, num_rounds, rec["train_loss"],
                 rec["val"].get("auc", float("nan")), rec["val"].get("c_index", float("nan")))

    for rnd in range(start_round, num_rounds + 1):
        t0 = time.perf_counter()
        # centers that (re)connected since the last round join; nodes the SuperLink no longer lists are skipped
        for event in admit_new_nodes(grid, roles, float(fed.query_timeout), unanswered):
            log.warning("round %d: %s", rnd, event)
        apply_holdout(roles, fed.get("holdout_center"))   # a center that rejoined keeps its part in the run
        train_ids, ext_ids = membership(grid, roles)
        train_view = NodeView(grid, train_ids)
        send_arrays = to_arrays(from_arrays(arrays, layout), fp16)
        config = ConfigRecord({"local-epochs": int(fed.local_epochs), "fp16": fp16,
                               **({"l2": float(cfg.train.l2)} if (fed.get("capacity") or {}).get("l2") else {}),
                               **({"cv-folds": k_folds} if fold_arrays is not None else {}),
                               **({"local-norm": True} if fed.get("local_norm") else {}),
                               **({} if secure or pending is None else {"evaluate": "val", **{
                                   k: v for k, v in eval_request.items() if k != "split"}})})
        try:
            msgs = list(strategy.configure_train(rnd, send_arrays, config, train_view))
        except PrivacyBudgetExhausted as exc:
            stopped_early = f"privacy budget exhausted before round {rnd}: {exc}"
            log.warning("%s; stopping", stopped_early)
            break
        if fold_arrays is not None:
            for m in msgs:
                m.content[CV_ARRAYS] = fold_arrays
        if secure:
            rt = secure_round(grid, context, train_ids, roles, rnd, send_arrays, msgs, fed)
        else:
            rt = plain_round(grid, roles, rnd, msgs, arrays, fed, fp16)
            if pending is not None:                  # these replies scored the model of round rnd - 1
                complete(pending, rt["evaluation"])
                pending = None
        sent, received, train_fail = rt["sent"], rt["received"], rt["failures"]
        good = rt["good"]
        if is_dp(strategy):
            for r in good:      # client-level DP: every center weighs the same (Flower's accountant requires it)
                r.content["metrics"][DP_WEIGHT] = 1.0
        t_agg = time.perf_counter()
        dropped = None
        if rt["n_good"] >= int(fed.min_train_nodes) and good:
            new_arrays, train_metrics = strategy.aggregate_train(rnd, good)
            if new_arrays is not None:
                arrays = new_arrays
            else:
                dropped = f"the {fed.strategy} strategy aggregated nothing from {len(good)} updates"
        else:
            train_metrics = None
            dropped = f"{rt['n_good']} usable training updates < min_train_nodes={fed.min_train_nodes}"
        if dropped:
            log.error("round %d dropped: %s; global model unchanged", rnd, dropped)
        elif fold_arrays is not None:
            fold_arrays = aggregate_folds(fold_strategies, fold_arrays, rt.get("folds", {}), rnd)
        t_train, t_agg = time.perf_counter() - t0, time.perf_counter() - t_agg
        rec = {"round": rnd, "train_loss": float(train_metrics["train-loss"]) if train_metrics else None,
               "client_train_seconds": rt["client_seconds"], "failures": dict(train_fail),
               "rejected_updates": rt.get("rejected", {}), "update_norms": rt.get("norms", {}),
               "n_skipped_train": rt.get("n_skipped", {}), "n_train_replies": rt["n_good"], "dropped": dropped,
               "aggregate_seconds": t_agg, "server_rss_mb": psutil.Process().memory_info().rss / 2**20,
               "client_rss_mb": rt.get("client_rss", {})}
        if (spent := privacy_spent(strategy)) is not None:
            rec["privacy"] = spent
        if secure:                                   # SecAgg+: scored in a message of its own, now
            val, s2, r2 = evaluate_centers(grid, train_ids, roles, to_arrays(from_arrays(arrays, layout), fp16),
                                           eval_request, float(fed.round_timeout))
            sent, received = sent + s2, received + r2
        if int(fed.external_every) > 0 and rnd % int(fed.external_every) == 0 and ext_ids:
            mon, s3, r3 = evaluate_centers(grid, ext_ids, roles, to_arrays(from_arrays(arrays, layout), fp16),
                                           {"split": "test", "bins": int(fed.histogram_bins), "threshold": 0.5},
                                           float(fed.round_timeout))
            rec["external_monitoring"] = {"auc": mon["pooled"].get("auc"), "used_for_selection": False}
            sent, received = sent + s3, received + r3
        comm["bytes_sent"] += sent
        comm["bytes_received"] += received
        n_msgs = len(msgs) + (len(train_ids) if secure else 0) + (len(ext_ids) if "external_monitoring" in rec else 0)
        rec.update({"bytes_sent": sent, "bytes_received": received, "messages_out": n_msgs,
                    "seconds": time.perf_counter() - t0, "train_phase_seconds": t_train})
        sd = from_arrays(arrays, layout)
        if secure:
            complete(rec, val)
        else:
            pending = rec
        save_checkpoint(run_dir, rnd, sd, {"config_hash": cfg_hash, "metrics": json_safe(rec.get("val")),
                                           "threshold": best["threshold"] if best and best["round"] == rnd else None,
                                           "weights_sha256": weights_sha256(sd)},
                        {"history": history, "best": best, "comm": comm, "strategy": strategy_state(strategy),
                         "py_random": random.getstate(), "select_metric": select_metric, "pending": pending})
    if pending is not None:                          # the last round's model: scored in a message of its own
        t0 = time.perf_counter()
        val, s2, r2 = evaluate_centers(grid, membership(grid, roles)[0], roles, to_arrays(from_arrays(arrays, layout), fp16),
                                       eval_request, float(fed.round_timeout),
                                       extra={CV_ARRAYS: fold_arrays} if fold_arrays is not None else None)
        comm["bytes_sent"] += s2
        comm["bytes_received"] += r2
        pending["final_evaluation_seconds"] = time.perf_counter() - t0
        complete(pending, val)
        pending = None

    if select_metric is None and history:           # auto, and the benefit cells never ranked a round
        select_metric, why = decide_auto_at_end(history, endpoints)
        if select_metric is not None:
            decided(history[-1]["round"], why)
    select_metric = select_metric or "val_loss"     # nothing that ranks was ever released: the last round
    return {"best": best, "history": history, "select_metric": select_metric, "strategy": strategy, "comm": comm,
            "stopped_early": stopped_early, "cox_fit": None, "num_rounds": num_rounds,
            "weights_bytes": weights_bytes, "fp16": fp16, "run_dir": run_dir, "cfg": cfg}
