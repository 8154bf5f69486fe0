"""One federated round, message by message: train (plain or SecAgg+), screen the updates, evaluate.

``plain_round`` / ``secure_round`` send the round's train messages and return the usable
updates with what failed and why; ``evaluate_centers`` sends an evaluate request and pools
what the centers released (``server/evaluation.py``).  Replies are matched to centers by
``reply_to`` (``server/messaging.py``); every failure is logged with the center's name.
"""
from __future__ import annotations

import logging

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from common.federation.wire import CV_ARRAYS, content_bytes, upcast
from server.evaluation import (center_entry, pool)
from server.messaging import NO_REPLY, send_and_collect
from server.secure_aggregation import average_as_reply, secure_train_round
from server.update_checks import screen_updates
from common.federation.roles import trains

log = logging.getLogger("newadj.server")
_LAST_NOTICE: dict[str, str] = {}


def send_to(grid, node_ids, arrays: ArrayRecord, config: dict, timeout: float, mtype=MessageType.EVALUATE,
            extra: dict | None = None):
    extra = extra or {}
    msgs = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord(config), **extra}), message_type=mtype,
                    dst_node_id=n) for n in node_ids]
    size = arrays.count_bytes() + sum(r.count_bytes() for r in extra.values())
    return send_and_collect(grid, msgs, timeout), size * len(msgs)


def evaluate_centers(grid, node_ids, roles, arrays, config, timeout, extra: dict | None = None) -> tuple[dict, int, int]:
    """Per-center aggregate metrics and the pooled metrics from what the centers released (``extra``: more
    records of the request, e.g. the fold models of a cross-validated run)."""
    replies, sent = send_to(grid, node_ids, arrays, config, timeout, extra=extra)
    received, released, failures = 0, {}, {}
    for nid, r in replies.items():
        center = center_name(roles, nid)
        if r is None:
            failures[center] = NO_REPLY
            continue
        if r.has_error():
            failures[center] = r.error.reason
            log.error("center %s failed evaluation: %s", center, r.error.reason)
            continue
        received += content_bytes(r.content)
        released[center] = r
    return pooled_evaluation(released, "metrics", failures), sent, received


def pooled_evaluation(replies: dict, record: str, failures: dict | None = None) -> dict:
    """{centers, pooled, failures, notices} from the ``record`` of each center's reply (``metrics`` of an
    evaluate reply, ``evaluation`` of a train reply); a notice is logged as a warning when it is news."""
    per_center, released, notices = {}, {}, {}
    # by center name, not reply arrival: pool()'s floating-point sums (pooled loss, AUC cells, Platt fit,
    # baseline hazard) are then the same for the same replies, run after run
    for center, r in sorted(replies.items()):
        if record not in r.content:
            continue
        if "info" in r.content and r.content["info"].get("notice"):
            notices[center] = str(r.content["info"]["notice"])
            # abstaining under a site's floors is counted in the round's line; a clamp or a moved threshold
            # is worth a warning, once per center and text
            parts = [n for n in notices[center].split("; ") if " withheld" not in n and " moved to " not in n]
            level = logging.INFO if not parts or _LAST_NOTICE.get(center) == notices[center] else logging.WARNING
            _LAST_NOTICE[center] = notices[center]
            log.log(level, "center %s: %s", center, "; ".join(parts) if level == logging.WARNING else notices[center])
        per_center[center], released[center] = center_entry(dict(r.content[record]))
    return {"centers": per_center, "pooled": pool(per_center, released), "failures": dict(failures or {}),
            "notices": notices}


def centers_of(roles) -> dict:
    return {i["center-id"]: {"role": i["role"], "n_train": i.get("n-train"), "n_val": i.get("n-val"),
                             "n_test": i.get("n-test")} for i in roles.values()}


def merge_failures(train: dict, evaluate: dict) -> dict:
    """{center: reason} of a round; a center that failed both phases keeps both reasons, once if they are
    the same (a policy refusal answers the train message that carried the evaluation with one reason)."""
    out = dict(train)
    for c, why in evaluate.items():
        if out.get(c) == why:
            continue
        out[c] = f"{out[c]}; evaluate: {why}" if c in out else f"evaluate: {why}"
    return out


def membership(grid, roles) -> tuple[list[int], list[int]]:
    """(training, external) node ids among the nodes the SuperLink lists as connected now."""
    online = set(grid.get_node_ids())
    train = sorted(n for n, i in roles.items() if trains(i.get("role")) and n in online)
    return train, sorted(n for n, i in roles.items() if i.get("role") == "external" and n in online)


def center_name(roles, nid) -> str:
    return roles.get(nid, {}).get("center-id", str(nid))


def screen_reference(record: ArrayRecord) -> dict:
    """The global weight record as the update screen compares replies with it (fp32 arrays by name)."""
    return {k: v.float().numpy() for k, v in record.to_torch_state_dict().items()}


def plain_round(grid, roles, rnd, msgs, global_arrays: ArrayRecord, fed, fp16: bool) -> dict:
    """Send the train messages, screen every reply (server/update_checks), keep the good ones in center order."""
    sent = sum(r.count_bytes() for m in msgs for r in m.content.array_records.values())
    replies = send_and_collect(grid, msgs, float(fed.round_timeout))
    received, failures, ok = 0, {}, {}
    for nid, r in replies.items():
        center = center_name(roles, nid)
        if r is None:
            failures[center] = NO_REPLY
            log.error("round %d: center %s sent no reply within %ss (dead, disconnected or too slow)",
                      rnd, center, fed.round_timeout)
            continue
        if r.has_error():
            failures[center] = r.error.reason
            log.error("round %d: center %s failed: %s", rnd, center, r.error.reason)
            continue
        received += content_bytes(r.content)
        ok[center] = r
    reference = screen_reference(global_arrays)
    checks = fed.update_checks
    rejected, norms = screen_updates({c: r.content["arrays"] for c, r in ok.items()}, reference, fp16,
                                     None if checks.max_norm_ratio in (None, "") else float(checks.max_norm_ratio),
                                     int(checks.min_for_norm))
    for center, why in rejected.items():
        log.error("round %d: rejected the update of center %s: %s", rnd, center, why)
        failures[center] = f"update rejected: {why}"
    evaluation = pooled_evaluation(ok, "evaluation", {c: f for c, f in failures.items() if c not in ok})
    folds = {}
    for c, r in ok.items():        # Flower's strategies aggregate replies with one record of each kind
        if "evaluation" in r.content:
            del r.content["evaluation"]
        if CV_ARRAYS in r.content:
            folds[c] = upcast(r.content.pop(CV_ARRAYS))
    # a fixed order (by center) makes the floating-point sum, hence the run, reproducible
    good = [ok[c] for c in sorted(ok) if c not in rejected]
    for r in good:
        r.content["arrays"] = upcast(r.content["arrays"])
    return {"good": good, "n_good": len(good), "sent": sent, "received": received, "failures": failures,
            "rejected": rejected, "norms": norms,
            # the fold models of a cross-validated run, per usable center, with its weight
            "folds": {c: (folds[c], int(ok[c].content["metrics"]["num-examples"])) for c in sorted(folds)
                      if c not in rejected},
            # the centers' scores of the model they received (asked with `evaluate` in the train config)
            "evaluation": evaluation,
            "client_seconds": {c: float(ok[c].content["metrics"]["train-seconds"]) for c in sorted(ok)},
            "client_rss": {c: float(ok[c].content["metrics"]["rss-mb"]) for c in sorted(ok)
                           if "rss-mb" in ok[c].content["metrics"]},
            "n_skipped": {c: n for c in sorted(ok) if (n := int(ok[c].content["metrics"].get("n-skipped", 0)))}}


def secure_round(grid, context, train_ids, roles, rnd, send_arrays, msgs, fed) -> dict:
    """SecAgg+: the server gets the weighted average of the updates, never one center's."""
    config = msgs[0].content["config"] if msgs else ConfigRecord({})
    sr = secure_train_round(grid, context, train_ids, rnd, send_arrays, config, fed.secure_aggregation,
                            float(fed.round_timeout))
    failures = {}
    for nid, why in sr.failures.items():
        failures[center_name(roles, nid)] = why
        log.error("round %d: center %s failed in secure aggregation: %s", rnd, center_name(roles, nid), why)
    good = []
    if sr.average is not None:
        reference = screen_reference(send_arrays)
        rejected, _ = screen_updates({"(secure sum)": sr.average}, reference, False, None)
        problem = rejected.get("(secure sum)")
        if problem:
            log.error("round %d: the securely aggregated update is unusable: %s", rnd, problem)
            failures["(secure aggregate)"] = problem
        else:
            good = [average_as_reply(sr.average, sr.num_examples, sr.train_loss)]
    else:
        log.error("round %d: secure aggregation halted (too few centers to unmask); global model unchanged", rnd)
    return {"good": good, "n_good": sr.n_results if good else 0, "sent": sr.bytes_sent,
            "received": sr.bytes_received, "failures": failures,
            "client_seconds": {"slowest (secure)": sr.slowest_client_seconds} if sr.slowest_client_seconds else {}}
