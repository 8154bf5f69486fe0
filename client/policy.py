"""Site policy enforcement: what a center agrees to answer, as a ClientApp mod.

The policy itself (``<site>/policy.toml``, defaults in ``conf/policy/default.yaml``) is
read by ``common/data/policy.py``.  ``policy_mod`` runs around every handler of the
ClientApp and

* before the handler: refuses a run whose overrides set a key outside the site's
  ``allowed_run_keys`` (the key is named), message types the site does not answer,
  a ``local-epochs`` above ``max_local_epochs``, a ``server-round`` above
  ``max_server_round``, training / evaluating on a split with fewer than
  ``min_cohort_size`` patients, and an evaluate message asking for one threshold
  more than ``max_thresholds`` (``client/disclosure.py`` keeps the run's ledger);
* after the handler: refuses a reply holding a record other than the whitelisted
  ones (``arrays``, ``metrics``, ``info``), a metric / info key outside the
  whitelist, or an evaluate reply whose cells break the disclosure rules --
  refused as a whole, never silently trimmed.

A refusal is the reply ``Error(code=403, reason="policy of <center>: ...")``,
which the ServerApp logs with the center's name.  The policy file is re-read
on every message; a malformed one makes the site refuse everything.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord

from client import disclosure
from common.federation.reply_schema import ERR_REFUSED
from common.data.policy import (DEFAULT_POLICY_YAML, MESSAGE_TYPES, POLICY_FILE, Policy, PolicyError,  # noqa: F401
                                key_listed, load_policy, override_refusals)

log = logging.getLogger(__name__)

_RECORD_KINDS = {"array": ArrayRecord, "metric": MetricRecord, "config": ConfigRecord}
# terms the policy mod agreed for an evaluate message, by message id (read by the handler in the same process)
_TERMS: dict[str, disclosure.Terms] = {}


# --------------------------------------------------------------------------- decisions
def message_category(msg: Message) -> str:
    return str(msg.metadata.message_type).split(".", 1)[0]


def _config(msg: Message):
    if msg.has_content() and "config" in msg.content.config_records:
        return msg.content.config_records["config"]
    return {}


def _int_value(conf, key: str) -> tuple[int | None, str | None]:
    v = conf.get(key)
    if v is None:
        return None, None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
        return None, f"`{key}` must be an integer, got {v!r}"
    return int(v), None


def check_request(policy: Policy, msg: Message, default_epochs: Callable[[], int] | None = None) -> str | None:
    """Why the incoming message is refused (before any work), or None."""
    cat = message_category(msg)
    if cat not in policy.message_types:
        return f"does not answer `{cat}` messages (answers: {', '.join(policy.message_types) or 'none'})"
    conf = _config(msg)
    rnd, err = _int_value(conf, "server-round")
    if err:
        return err
    if rnd is not None and rnd > policy.max_server_round:
        return f"server-round {rnd} exceeds max_server_round {policy.max_server_round}"
    if cat == "train":
        epochs, err = _int_value(conf, "local-epochs")
        if err:
            return err
        if epochs is None and default_epochs is not None:
            epochs = int(default_epochs())
        if epochs is not None and epochs > policy.max_local_epochs:
            return f"local-epochs {epochs} exceeds max_local_epochs {policy.max_local_epochs}"
        folds, err = _int_value(conf, "cv-folds")
        if err:
            return err
        if folds and folds > policy.max_cv_folds:
            return (f"cv-folds {folds} exceeds max_cv_folds {policy.max_cv_folds}" if policy.max_cv_folds else
                    "this site takes part in no cross-validated run (max_cv_folds 0)")
        if conf.get("newton") and not policy.newton_rounds:
            return "this site answers no Newton rounds of a Cox model (newton_rounds false)"
        if conf.get("l2") is not None:   # a capacity candidate's ridge (federation.capacity): a run setting
            l2 = conf.get("l2")
            if not key_listed("train.l2", policy.allowed_run_keys):
                return "a train message may set `l2` only where train.l2 is an allowed run key"
            if isinstance(l2, bool) or not isinstance(l2, (int, float)) or not 0 <= float(l2) < float("inf"):
                return "`l2` must be a finite number >= 0"
    return None


def asks_evaluation(msg: Message) -> bool:
    """An evaluate message, or a train message that asks the center to score the received model first
    (``evaluate`` = the split; one message per center per round)."""
    cat = message_category(msg)
    return cat == "evaluate" or (cat == "train" and bool(_config(msg).get("evaluate")))


def requested_split(msg: Message) -> str | None:
    """The split a train / evaluate message works on (as client_app.py picks it)."""
    cat = message_category(msg)
    if cat == "train":
        return "train"
    if cat == "evaluate":
        return str(_config(msg).get("split", "val"))
    return None


def check_cohort(policy: Policy, split: str, n_patients: int | None) -> str | None:
    """Why training / evaluating on a split of ``n_patients`` is refused, or None (None n: no such split)."""
    if n_patients is not None and n_patients < policy.min_cohort_size:
        return (f"the `{split}` split has {n_patients} patients, fewer than min_cohort_size "
                f"{policy.min_cohort_size}")
    return None


def check_reply(policy: Policy, reply: Message) -> str | None:
    """Why the outgoing reply is refused (records / keys outside the whitelist), or None."""
    if reply.has_error():
        return None
    problems = []
    for name, rec in reply.content.items():
        kind = policy.reply_records.get(name)
        if kind is None:
            problems.append(f"record `{name}` is not allowed (allowed: {', '.join(sorted(policy.reply_records))})")
            continue
        if not isinstance(rec, _RECORD_KINDS[kind]):
            problems.append(f"record `{name}` must be a {kind} record, got {type(rec).__name__}")
            continue
        if isinstance(rec, MetricRecord):
            extra = sorted(k for k in rec.keys() if not key_listed(k, policy.metric_keys))
            if extra:
                problems.append(f"metric key(s) {', '.join(extra)} in `{name}` are not in the metric_keys whitelist")
        elif isinstance(rec, ConfigRecord):
            extra = sorted(k for k in rec.keys() if not key_listed(k, policy.info_keys))
            if extra:
                problems.append(f"key(s) {', '.join(extra)} in `{name}` are not in the info_keys whitelist")
    return "; ".join(problems) or None


def refuse(msg: Message, center: str, reason: str) -> Message:
    full = f"policy of {center}: {reason}"
    log.warning("refused %s: %s", msg.metadata.message_type, full)
    return Message(Error(code=ERR_REFUSED, reason=full), reply_to=msg)


# --------------------------------------------------------------------------- the site
_IDENTITY: dict[tuple, tuple[Path, str]] = {}


def _key(run_config, node_config) -> tuple:
    return (tuple(sorted((k, str(v)) for k, v in run_config.items())),
            tuple(sorted((k, str(v)) for k, v in node_config.items())))


def site_identity(run_config, node_config) -> tuple[Path, str]:
    """(site folder, center id) without loading any data (cheap; as client.site_runtime resolves them)."""
    key = _key(run_config, node_config)
    if key not in _IDENTITY:
        from client.site_runtime import _resolve_site

        site_dir, _role, center = _resolve_site(run_config, node_config)
        if not center:
            from common.data.identity import site_identity as read

            center = read(site_dir).center_id
        _IDENTITY[key] = (Path(site_dir), str(center))
    return _IDENTITY[key]


def _split_size(context: Context, split: str) -> int | None:
    """Patients in one split of this site (None: the site has no such split); from its cache's manifest."""
    from client.site_runtime import site_manifest

    _center, role, _dir, manifest = site_manifest(context.run_config, context.node_config)
    if split == "test":
        return len(manifest["patients"])        # every patient: what the external center scores
    if role == "external":
        return None
    return sum(1 for p in manifest["patients"] if p["split"] == split)


def _default_epochs(context: Context) -> int:
    from client.site_runtime import site_settings

    return int(site_settings(context.run_config, context.node_config)[3].federation.local_epochs)


def run_overrides(run_config) -> list[str]:
    from client.site_runtime import overrides_of

    return overrides_of(run_config)


def check_run(policy: Policy, run_config) -> str | None:
    """Why this run is refused at this site (an override of a key the site does not accept), or None."""
    try:
        bad = override_refusals(run_overrides(run_config), policy)
    except ValueError:   # unbalanced quotes in the overrides string
        return "run overrides unreadable"
    if bad:
        return (f"run override(s) refused: {', '.join(bad)}; this site lets a run change only its "
                "allowed_run_keys, as plain key=value")
    return None


def ledger_path(site_dir: Path, node_config) -> Path:
    from client.audit import audit_path

    return audit_path(site_dir, node_config).with_name(disclosure.LEDGER_FILE)


def evaluate_terms(msg: Message, context: Context) -> disclosure.Terms:
    """The disclosure terms the policy mod agreed for this evaluate message (computed here if it did not run)."""
    terms = _TERMS.pop(msg.metadata.message_id, None)
    if terms is not None:
        return terms
    site_dir, _ = site_identity(context.run_config, context.node_config)
    terms, reason = disclosure.admit_evaluate(load_policy(site_dir), ledger_path(site_dir, context.node_config),
                                              int(context.run_id), _config(msg))
    if terms is None:
        raise PermissionError(reason)
    return terms


def policy_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower mod: enforce the site policy on the run, the request and the reply."""
    site_dir, center = site_identity(context.run_config, context.node_config)
    try:
        policy = load_policy(site_dir)
    except PolicyError:
        log.exception("policy file of %s unusable: refusing everything", center)
        return refuse(msg, center, "policy file unusable, refusing everything (the site's log says why)")
    reason = check_run(policy, context.run_config)
    if reason is None:
        reason = check_request(policy, msg, default_epochs=lambda: _default_epochs(context))
    splits = [requested_split(msg)]
    if message_category(msg) == "train" and _config(msg).get("evaluate"):
        splits.append(str(_config(msg).get("evaluate")))
    for split in (s for s in splits if s is not None):
        if reason is not None:
            break
        if split not in ("train", "val", "test"):
            reason = f"unknown split `{split}`"
        else:
            reason = check_cohort(policy, split, _split_size(context, split))
    terms = None
    if reason is None and asks_evaluation(msg):
        try:
            terms, reason = disclosure.admit_evaluate(policy, ledger_path(site_dir, context.node_config),
                                                      int(context.run_id), _config(msg))
        except OSError:
            log.exception("disclosure ledger of %s not usable", center)
            reason = "disclosure ledger not usable; refusing to release unrecorded"
    if reason is not None:
        return refuse(msg, center, reason)
    if terms is not None:
        _TERMS[msg.metadata.message_id] = terms
    try:
        reply = call_next(msg, context)
    finally:
        _TERMS.pop(msg.metadata.message_id, None)
    reason = check_reply(policy, reply)
    released = "metrics" if message_category(msg) == "evaluate" else "evaluation"
    if reason is None and not reply.has_error() and released in reply.content:
        if terms is None:    # aggregates released without the site agreeing to terms: never
            reason = f"`{released}` record in a reply to a message that asked for no evaluation"
        else:
            reason = disclosure.check_released(policy, dict(reply.content[released]), terms.bins)
    if reason is not None:
        return refuse(msg, center, f"reply refused: {reason}")
    return reply
