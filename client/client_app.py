"""The ClientApp every center runs.

Replies carry model weights and aggregate statistics only -- never a patient
id, row or per-patient score.  An ``external`` center refuses to train.
"""
from __future__ import annotations

import logging

import numpy as np
import psutil
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.audit import audit_mod
from client.fault_injection import fault_injection_mod
from client.disclosure import release_histogram
from client.policy import evaluate_terms, load_policy, policy_mod
from client.secure_aggregation import dp_clipping_mod, secure_aggregation_mod
from client.site_runtime import round_seed, site_runtime
from common.engine import prediction_loss, predict, train_model
from common.metrics import c_index, evaluate_predictions
from common.task import model_from_config
from common.wire import from_arrays, to_arrays

log = logging.getLogger(__name__)
# audit outermost: it logs exactly what leaves the site (masked vectors under SecAgg+, refusals of the
# policy).  Fault injection (tests only, off unless NEWADJ_FAULTS is set) acts on what is sent.  Secure
# aggregation and DP clipping wrap the same policy-checked handlers as a plain run.
app = ClientApp(mods=[audit_mod, fault_injection_mod, secure_aggregation_mod, dp_clipping_mod, policy_mod])

ERR_REFUSED = 403


def _refuse(msg: Message, reason: str) -> Message:
    log.warning("refused %s: %s", msg.metadata.message_type, reason)
    return Message(Error(code=ERR_REFUSED, reason=reason), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    rt = site_runtime(context.run_config, context.node_config)
    info = {"role": rt.role, "center-id": rt.center_id,
            "n-train": len(rt.train or []), "n-val": len(rt.val or []), "n-test": len(rt.test)}
    return Message(RecordDict({"info": ConfigRecord(info)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    rt = site_runtime(context.run_config, context.node_config)
    if rt.role == "external":
        return _refuse(msg, f"center {rt.center_id} is the external validation center and never trains")
    cfg = rt.cfg
    conf = msg.content["config"]
    rnd = int(conf.get("server-round", 0))
    model = model_from_config(cfg, dims=rt.dims)
    model.load_state_dict(from_arrays(msg.content["arrays"]))
    res = train_model(model, rt.train, rt.val, cfg.train, cfg.model.loss,
                      seed=round_seed(int(cfg.seed), rt.center_id, rnd),
                      epochs=int(conf.get("local-epochs", cfg.federation.local_epochs)),
                      select_best=False, early_stopping=False,
                      proximal_mu=float(conf.get("proximal-mu", 0.0)))
    metrics = {"num-examples": res.n_train, "train-loss": float(res.train_loss),
               "train-seconds": float(res.seconds), "samples-per-s": float(res.samples_per_s),
               "n-skipped": len(rt.train.skipped), "rss-mb": psutil.Process().memory_info().rss / 2**20}
    return Message(RecordDict({"arrays": to_arrays(res.state_dict, bool(conf.get("fp16", False))),
                               "metrics": MetricRecord(metrics)}), reply_to=msg)


def _nan_to_num(d: dict) -> dict:
    return {k: (float("nan") if v is None else v) for k, v in d.items()}


def _with_notices(metrics: dict, notices: list[str]) -> RecordDict:
    content = {"metrics": MetricRecord(metrics)}
    if notices:
        content["info"] = ConfigRecord({"notice": "; ".join(notices)})
    return RecordDict(content)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the received model on a split; reply with what the site's disclosure rules release.

    config (requests; the site decides, client/disclosure.py): ``split`` (val | test),
    ``threshold`` (from internal validation), ``bins`` (score histogram bins),
    ``full-report`` (metrics with CIs).  Floors come from the site policy, never the run.
    """
    rt = site_runtime(context.run_config, context.node_config)
    cfg = rt.cfg
    conf = msg.content["config"]
    split = str(conf.get("split", "val"))
    ds = rt.split(split)
    if ds is None:
        return _refuse(msg, f"center {rt.center_id} ({rt.role}) has no `{split}` split")
    try:
        terms = evaluate_terms(msg, context)
    except PermissionError as exc:
        return _refuse(msg, f"policy of {rt.center_id}: {exc}")
    policy = load_policy(rt.site_dir)
    k = int(policy.min_cell_count)
    notices = list(terms.notices)
    model = model_from_config(cfg, dims=rt.dims)
    model.load_state_dict(from_arrays(msg.content["arrays"]))
    pred = predict(model, ds, int(cfg.train.eval_batch_size))
    y, p = pred["benefit"], pred["prob"]
    lab = ~np.isnan(y)
    n, n_pos = int(lab.sum()), int(np.nansum(y[lab]))
    out: dict = {"num-examples": n, "abstained": 1, "n-skipped": len(ds.skipped)}
    if not terms.release:
        return Message(_with_notices(out, notices), reply_to=msg)
    # --- benefit endpoint: labelled patients, each label a releasable cell
    floor = int(policy.min_patients["benefit"])
    if n < floor or min(n_pos, n - n_pos) < k:
        notices.append(f"benefit metrics withheld: {n} labelled patients" if n < floor else
                       f"benefit metrics withheld: a label has fewer than min_cell_count {k} patients")
    else:
        cells = release_histogram(y, p, terms.bins, k)
        thr_used, confusion = cells.confusion(terms.threshold)
        if abs(thr_used - terms.threshold) > 1e-12:
            notices.append(f"threshold {terms.threshold:g} moved to the nearest released cell edge {thr_used:g}")
        out.update({"n-pos": n_pos, "abstained": 0, "hist-edges": cells.edges, "hist-neg": cells.neg,
                    "hist-pos": cells.pos, "loss": prediction_loss(pred, cfg.model.loss),
                    "threshold-used": thr_used, **confusion})
    # --- DFS endpoint: patients with a DFS time, enough events
    t, e = np.asarray(pred["dfs_time"], float), np.asarray(pred["dfs_event"], float)
    has_dfs = np.isfinite(t) & np.isfinite(e)
    n_dfs, n_events = int(has_dfs.sum()), int(e[has_dfs].sum()) if has_dfs.any() else 0
    dfs_ok = n_dfs >= int(policy.min_patients["dfs"]) and n_events >= k
    if dfs_ok:
        out["c-index"] = float(c_index(pred["dfs_time"], pred["dfs_event"], pred["risk"]))
    if terms.full_report and (out["abstained"] == 0 or dfs_ok):
        rep = evaluate_predictions(y, p, out.get("threshold-used", terms.threshold), time=pred["dfs_time"],
                                   event=pred["dfs_event"], risk=pred["risk"], n_boot=int(cfg.train.n_boot),
                                   seed=int(cfg.seed), min_patients=floor)
        for key, val in rep.items():
            if not (isinstance(val, dict) and "value" in val):
                continue
            if (key == "c_index" and not dfs_ok) or (key != "c_index" and out["abstained"]):
                continue
            out.update(_nan_to_num({f"{key}": val.get("value"), f"{key}-lo": val.get("lo"),
                                    f"{key}-hi": val.get("hi")}))
    return Message(_with_notices(out, notices), reply_to=msg)
