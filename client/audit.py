"""Append-only audit log of everything a site receives and sends.

``audit_mod`` is the outermost mod of the ClientApp, so refusals by the policy
mod are logged too.  It writes one JSON line per message received (``"in"``,
before any work) and one per reply sent (``"out"``), to
``<audit dir>/.newadj-audit.jsonl`` where the audit dir is the node config key
``audit-dir``, else the policy's ``audit_dir`` (relative: to the site folder),
else the site folder.  The file is opened with ``O_APPEND`` and each line is a
single ``write``; earlier lines are never rewritten.

Each line: ``time`` (UTC, ISO 8601), ``direction``, ``center``, ``run_id``,
``node_id``, ``message_id`` / ``reply_to``, ``message_type``, ``group_id``,
``records`` (per record: ``kind`` array | metric | config, ``bytes``
(``count_bytes()``), ``keys``; arrays: ``dtype``, ``shape`` and ``sha256`` of
each array's serialised bytes (``Array.data``); metric / config records: their
``values``), ``bytes`` (total), and on replies ``decision`` (accepted |
refused | error), ``error_code`` and ``reason``.  If the log cannot be written
the site refuses to answer (fail closed): no reply leaves it unlogged.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord

from client.policy import PolicyError, load_policy, site_identity
from common.federation.reply_schema import ERR_REFUSED
from common.federation.wire import record_bytes

log = logging.getLogger(__name__)

AUDIT_FILE = ".newadj-audit.jsonl"


def audit_path(site_dir: Path, node_config) -> Path:
    if node_config.get("audit-dir"):
        return Path(str(node_config["audit-dir"])) / AUDIT_FILE
    try:
        pol_dir = load_policy(site_dir).audit_dir
    except PolicyError:
        pol_dir = None  # the policy mod refuses; the refusal still goes to the default log
    if pol_dir:
        d = Path(pol_dir)
        return (d if d.is_absolute() else Path(site_dir) / d) / AUDIT_FILE
    return Path(site_dir) / AUDIT_FILE


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)  # 'nan', 'inf', '-inf': strict JSON
    if isinstance(v, bytes):
        return {"bytes": len(v), "sha256": hashlib.sha256(v).hexdigest()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def describe_records(msg: Message) -> tuple[dict, int]:
    """Per-record summary of a message's content and its total size in bytes."""
    if not msg.has_content():
        return {}, 0
    out, total = {}, 0
    for name, rec in msg.content.items():
        n = record_bytes(rec)
        total += n
        entry: dict = {"bytes": n, "keys": list(rec.keys())}
        if isinstance(rec, ArrayRecord):
            entry["kind"] = "array"
            entry["arrays"] = {k: {"dtype": str(a.dtype), "shape": list(a.shape),
                                   "sha256": hashlib.sha256(a.data).hexdigest()} for k, a in rec.items()}
        elif isinstance(rec, MetricRecord):
            entry["kind"] = "metric"
            entry["values"] = {k: _jsonable(v) for k, v in rec.items()}
        elif isinstance(rec, ConfigRecord):
            entry["kind"] = "config"
            entry["values"] = {k: _jsonable(v) for k, v in rec.items()}
        else:  # pragma: no cover - Flower has no other record kind today
            entry["kind"] = type(rec).__name__
        out[name] = entry
    return out, total


def audit_record(direction: str, msg: Message, context: Context, center: str, **extra) -> dict:
    md = msg.metadata
    records, total = describe_records(msg)
    rec = {"time": datetime.now(timezone.utc).isoformat(timespec="microseconds"), "direction": direction,
           "center": center, "run_id": int(context.run_id), "node_id": int(context.node_id),
           "message_id": md.message_id, "reply_to": md.reply_to_message_id, "message_type": md.message_type,
           "group_id": md.group_id, "records": records, "bytes": total}
    rec.update(extra)
    return rec


def append_line(path: Path, record: dict) -> None:
    """One JSON line, appended with a single write to a file opened O_APPEND."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        n = os.write(fd, data)
        if n != len(data):
            raise OSError(f"short write to {path} ({n} of {len(data)} bytes)")
    finally:
        os.close(fd)


def read_audit(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _outcome(reply: Message) -> dict:
    if not reply.has_error():
        return {"decision": "accepted"}
    code = int(reply.error.code)
    return {"decision": "refused" if code == ERR_REFUSED else "error", "error_code": code,
            "reason": reply.error.reason}


def audit_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower mod: log the message received and the reply sent (or the failure)."""
    site_dir, center = site_identity(context.run_config, context.node_config)
    path = audit_path(site_dir, context.node_config)
    try:
        append_line(path, audit_record("in", msg, context, center))
    except (OSError, ValueError) as exc:
        log.error("audit log %s not writable: %s", path, exc)
        return Message(Error(code=ERR_REFUSED, reason=f"policy of {center}: audit log not writable; "
                                                        "refusing to answer unlogged"), reply_to=msg)
    t0 = time.perf_counter()
    try:
        reply = call_next(msg, context)
    except Exception as exc:
        append_line(path, audit_record("out", msg, context, center, records={}, bytes=0, decision="error",
                                       reason=f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - t0,
                                       reply_to=msg.metadata.message_id, message_id=""))
        raise
    try:
        append_line(path, audit_record("out", reply, context, center, seconds=time.perf_counter() - t0,
                                       **_outcome(reply)))
    except (OSError, ValueError) as exc:
        log.error("audit log %s not writable: %s", path, exc)
        return Message(Error(code=ERR_REFUSED, reason=f"policy of {center}: audit log not writable; "
                                                        "refusing to answer unlogged"), reply_to=msg)
    return reply
