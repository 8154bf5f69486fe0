"""Where a ClientApp's time goes, for ``benchmarks/bench_deployment.py``: off unless the site's own
environment sets ``NEWADJ_TIMING_LOG`` (a folder), never anything the server sends.

One JSON line per message, ``<folder>/<center>.jsonl``: when the message was created at the
server, when this ClientApp process started (the site's warm runtime: when it claimed the message's
task), when its imports were done, when the site's data was loaded, when the handler's work was done
(all epoch seconds).  A mark a message did not pass (a warm runtime imports and loads once) is absent.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

ENV = "NEWADJ_TIMING_LOG"
MARKS: dict[str, float] = {}


def begin_message() -> None:
    """A warm runtime starts a message: forget the previous message's marks, note when its task was claimed."""
    MARKS.clear()
    if os.environ.get(ENV):
        MARKS["task_claimed"] = time.time()


def mark(name: str) -> None:
    """Remember when ``name`` happened in this process (imports, site loaded...)."""
    if os.environ.get(ENV):
        MARKS[name] = time.time()


def record(msg, center: str, **extra) -> None:
    """Append this message's timeline to the center's timing log (no-op without NEWADJ_TIMING_LOG)."""
    folder = os.environ.get(ENV)
    if not folder:
        return
    import psutil

    line = {"center": center, "type": str(msg.metadata.message_type), "created": float(msg.metadata.created_at),
            "process_start": MARKS.get("task_claimed", psutil.Process().create_time()), **MARKS,
            "done": time.time(), "pid": os.getpid(), **extra}
    Path(folder).mkdir(parents=True, exist_ok=True)
    with open(Path(folder) / f"{center}.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


def timing_mod(msg, context, call_next):
    """Flower mod (outermost): the message's timeline into the timing log, when one is asked for."""
    reply = call_next(msg, context)
    if os.environ.get(ENV):
        from client.policy import site_identity

        conf = msg.content.config_records.get("config", {}) if msg.has_content() else {}
        record(msg, site_identity(context.run_config, context.node_config)[1],
               round=int(conf.get("server-round", 0) or 0))
    return reply
