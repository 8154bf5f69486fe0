"""The ClientApp every center runs.

Replies carry model weights and aggregate statistics only -- never a patient
id, row or per-patient score.  An ``external`` center refuses to train.
"""
from __future__ import annotations

import logging

from client import timing

timing.mark("app_import_start")

import psutil
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.audit import audit_mod
from client.cross_validation import CV_ARRAYS, cv_data, out_of_fold_predictions, train_folds
from client.errors import errors_mod
from client.fault_injection import fault_injection_mod
from client.disclosure import release_metrics
from client.policy import evaluate_terms, load_policy, policy_mod
from client.secure_aggregation import dp_clipping_mod, secure_aggregation_mod
from client.site_runtime import round_seed, site_manifest, site_runtime
from common.federation.reply_schema import ERR_REFUSED
from common.federation.wire import to_arrays

timing.mark("imports_done")
log = logging.getLogger(__name__)
# audit outermost: it logs exactly what leaves the site (masked vectors under SecAgg+, refusals of the
# policy).  Errors next: a handler that raises is answered with a code and a category, never its text.
# Fault injection (tests only, off unless NEWADJ_FAULTS is set) acts on what is sent.  Secure
# aggregation and DP clipping wrap the same policy-checked handlers as a plain run.
app = ClientApp(mods=[timing.timing_mod, audit_mod, errors_mod, fault_injection_mod, secure_aggregation_mod,
                      dp_clipping_mod, policy_mod])


def _refuse(msg: Message, reason: str) -> Message:
    log.warning("refused %s: %s", msg.metadata.message_type, reason)
    return Message(Error(code=ERR_REFUSED, reason=reason), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Who this center is; with ``schema`` in the config, which columns and modalities it has (counts only)."""
    conf = msg.content["config"] if "config" in msg.content else {}
    if conf.get("schema", False):   # before any run: the site's data is not loaded, only its tables listed
        from client.schema import site_schema
        from client.site_runtime import site_settings

        site_dir, center, role, cfg = site_settings(context.run_config, context.node_config)
        info = site_schema(site_dir, center, role, cfg, load_policy(site_dir))
    else:                            # from the cache's manifest: no array loaded, no torch imported
        center, role, site_dir, manifest = site_manifest(context.run_config, context.node_config)
        pts = manifest["patients"]
        n = {sp: sum(1 for p in pts if p["split"] == sp) for sp in ("train", "val")}
        info = {"role": role, "center-id": center, "n-train": n["train"] if role != "external" else 0,
                "n-val": n["val"] if role != "external" else 0, "n-test": len(pts),
                **endpoint_counts(pts, load_policy(site_dir))}
    return Message(RecordDict({"info": ConfigRecord(info)}), reply_to=msg)


def endpoint_counts(patients: list[dict], policy) -> dict:
    """Patients with a benefit label / with DFS (the server's endpoint detection); 0 below the site's floor."""
    n_b = sum(1 for p in patients if p["benefit"] is not None)
    n_d = sum(1 for p in patients if p["dfs_months"] is not None and p["dfs_event"] is not None)
    return {"n-benefit": n_b if n_b >= int(policy.min_patients["benefit"]) else 0,
            "n-dfs": n_d if n_d >= int(policy.min_patients["dfs"]) else 0}


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train from the received global model; with ``evaluate`` (a split) in the config, first score that
    model there and release what the site's rules allow in an ``evaluation`` record -- the validation of
    the previous round comes back with this round's update, one message per center per round."""
    from common.learn.engine import predict, train_model

    rt = site_runtime(context.run_config, context.node_config)
    if rt.role == "external":
        return _refuse(msg, f"center {rt.center_id} is the external validation center and never trains")
    cfg = rt.cfg
    conf = msg.content["config"]
    if conf.get("newton"):
        return newton_reply(msg, rt)
    rnd = int(conf.get("server-round", 0))
    k = int(conf.get("cv-folds", 0) or 0)     # federated k-fold CV of the rounds (client/cross_validation.py)
    if k and (k < 2 or CV_ARRAYS not in msg.content or len(msg.content[CV_ARRAYS]) != k):
        return _refuse(msg, f"center {rt.center_id}: malformed cross-validation request")
    epochs = int(conf.get("local-epochs", cfg.federation.local_epochs))
    train_cfg = cfg.train
    if conf.get("l2") is not None:   # a capacity candidate's ridge (the policy mod checked the site allows it)
        from omegaconf import OmegaConf

        train_cfg = OmegaConf.merge(cfg.train, {"l2": float(conf["l2"])})
    data = cv_data(rt, k) if k else None   # every patient of the center and its fold
    model = rt.model_with(msg.content["arrays"])
    timing.mark("model_ready")   # MONAI's blocks are imported when the model is first built
    content: dict = {}
    if conf.get("evaluate"):
        try:
            terms = evaluate_terms(msg, context)
        except PermissionError as exc:
            return _refuse(msg, f"policy of {rt.center_id}: {exc}")
        notices = list(terms.notices)
        if k:
            pred, n_skipped = out_of_fold_predictions(rt, msg.content[CV_ARRAYS], data,
                                                      int(cfg.train.eval_batch_size)), 0
        else:
            ds = rt.split(str(conf["evaluate"]))
            pred, n_skipped = predict(model, ds, int(cfg.train.eval_batch_size)), len(ds.skipped)
        released = release_metrics(pred, terms, load_policy(rt.site_dir), cfg, notices)
        released["n-skipped"] = n_skipped
        content["evaluation"] = MetricRecord(released)
        if notices:
            content["info"] = ConfigRecord({"notice": "; ".join(notices)})
    train_ds, val_ds = rt.train, rt.val
    if k:   # the fold models first (they share the runtime's model object), then the global one on every patient
        content[CV_ARRAYS] = train_folds(rt, msg.content[CV_ARRAYS], data, epochs, train_cfg,
                                         lambda f: round_seed(int(cfg.seed), f"{rt.center_id}/cv{f}", rnd),
                                         float(conf.get("proximal-mu", 0.0)), bool(conf.get("fp16", False)))
        train_ds, val_ds = data[0], None
        model = rt.model_with(msg.content["arrays"])
    local_norm = bool(conf.get("local-norm", False))
    if local_norm:    # FedBN-style: this center trains with its own normalisation layers, kept between rounds
        restore_local_norm(model, context)
    res = train_model(model, train_ds, val_ds, train_cfg, cfg.model.loss,
                      seed=round_seed(int(cfg.seed), rt.center_id, rnd),
                      epochs=epochs, select_best=False, early_stopping=False,
                      proximal_mu=float(conf.get("proximal-mu", 0.0)))
    if local_norm:
        keep_local_norm(res.state_dict, model, context)
    metrics = {"num-examples": res.n_train, "train-loss": float(res.train_loss),
               "train-seconds": float(res.seconds), "samples-per-s": float(res.samples_per_s),
               "n-skipped": len(rt.train.skipped), "rss-mb": psutil.Process().memory_info().rss / 2**20}
    return Message(RecordDict({"arrays": to_arrays(res.state_dict, bool(conf.get("fp16", False))),
                               "metrics": MetricRecord(metrics), **content}), reply_to=msg)


def newton_reply(msg: Message, rt) -> Message:
    """A Newton round of the federated Cox model (``model=cox``): the derivatives of this center's Efron
    partial log-likelihood at every coefficient vector the server sends (common/learn/cox.py), always over
    all its training and validation patients with DFS: sums over at least the site's DFS floor of patients,
    never over fewer patients than coefficients (a Hessian of fewer would nearly hold the rows themselves)."""
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from common.learn.cox import design, site_derivatives

    if str(getattr(rt.cfg.model, "kind", "network")) != "cox":
        return _refuse(msg, f"center {rt.center_id}: a Newton round needs model=cox")
    X, t, e, _ = design(rt.fit_patients())
    betas = np.asarray(msg.content["arrays"]["betas"].numpy(), float)
    if betas.ndim != 2 or betas.shape[1] != X.shape[1] or not np.all(np.isfinite(betas)):
        return _refuse(msg, f"center {rt.center_id}: malformed Newton request")
    policy = load_policy(rt.site_dir)
    n, n_events = len(t), int((e > 0).sum())
    if n < max(int(policy.min_patients["dfs"]), X.shape[1] + 1) or n_events < int(policy.min_cell_count):
        return _refuse(msg, f"policy of {rt.center_id}: a Newton round would rest on {n} patients and {n_events} "
                            "events (needs at least max(min_patients.dfs, coefficients + 1) patients and "
                            "min_cell_count events)")
    ll, grad, hess = site_derivatives(X, t, e, betas)
    arrays = ArrayRecord({"loglik": Array(ll), "gradient": Array(grad), "hessian": Array(hess)})
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(
        {"num-examples": int(n), "n-events": int(n_events)})}), reply_to=msg)


LOCAL_NORM = "local-norm"


def restore_local_norm(model, context: Context) -> None:
    """Load the normalisation parameters this center kept after its last round (Flower keeps
    ``context.state`` per run at the node), over the received global ones; nothing on the first round.
    The received model was already scored as it came (validation selects the global model)."""
    kept = context.state.array_records.get(LOCAL_NORM)
    if kept is not None:
        model.load_state_dict(kept.to_torch_state_dict(), strict=False)
        log.info("local_norm: %d normalisation tensors of this center's last round restored", len(kept))


def keep_local_norm(state_dict: dict, model, context: Context) -> None:
    """Keep this center's trained normalisation parameters for its next round. The full update is still
    sent: the server averages the normalisation layers too, so the model an unseen center gets is one
    global model."""
    from flwr.app import ArrayRecord

    from common.learn.model import norm_parameter_names

    context.state[LOCAL_NORM] = ArrayRecord({k: state_dict[k] for k in norm_parameter_names(model)})


def _with_notices(metrics: dict, notices: list[str]) -> RecordDict:
    content = {"metrics": MetricRecord(metrics)}
    if notices:
        content["info"] = ConfigRecord({"notice": "; ".join(notices)})
    return RecordDict(content)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the received model on a split; reply with what the site's disclosure rules release.

    config (requests; the site decides, client/disclosure.py): ``split`` (val | test | train),
    ``threshold`` (from internal validation), ``bins`` (score histogram bins),
    ``full-report`` (metrics with CIs), ``baseline-hazard`` (the hazard cells of the model
    on this split), ``bh-times`` / ``bh-cumhaz`` / ``risk-cuts`` (the model's baseline hazard and
    risk-group cut points, for the full report's calibration of predicted DFS).  Floors come from the site
    policy, never the run.
    """
    from common.learn.engine import predict

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
    notices = list(terms.notices)
    model = rt.model_with(msg.content["arrays"])
    timing.mark("model_ready")   # MONAI's blocks are imported when the model is first built
    k = int(conf.get("cv-folds", 0) or 0)
    if k and split == "val" and CV_ARRAYS in msg.content and len(msg.content[CV_ARRAYS]) == k:
        pred = out_of_fold_predictions(rt, msg.content[CV_ARRAYS], cv_data(rt, k), int(cfg.train.eval_batch_size))
    else:
        pred = predict(model, ds, int(cfg.train.eval_batch_size))
    out = release_metrics(pred, terms, policy, cfg, notices,
                          hazard=bool(conf.get("baseline-hazard", False)),
                          baseline=(list(conf.get("bh-times", [])), list(conf.get("bh-cumhaz", [])),
                                    list(conf.get("risk-cuts", [])) or None))
    out["n-skipped"] = len(ds.skipped)
    return Message(_with_notices(out, notices), reply_to=msg)
