"""What the ServerApp tells the person who started the run: ``RUN_DIR/events.jsonl``.

Flower's own log stream (and Ray's) goes to ``RUN_DIR/logs/``; the project's lines reach
the terminal through this file instead, one JSON object a line, written as the run goes:
``start``, ``roles``, ``round`` (the round's compact record), ``selected``, ``finished``,
and ``log`` for every warning or error the server logs (a center that failed, an update
rejected, a round dropped, a selection that rests on too little validation).  The CLI
follows the file (``common/reports/console.py``) and prints one line per event.

The same lines (INFO and above) also go to the ServerApp's standard error, Flower's own log
stream: that is what ``flwr run --stream`` and ``flwr log`` show a deployment's operator
(the CLI's simulations send that stream to ``RUN_DIR/logs/``, never to the terminal).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from common.hashing import json_safe

EVENTS_FILE = "events.jsonl"
LOGGERS = ("newadj", "server")   # the ServerApp's loggers (newadj.server, server.roles, ...)


def server_failure(run_dir: Path) -> str | None:
    """Why the ServerApp of the run in RUN_DIR stopped, as it said in its ``failed`` event (None if it did not say)."""
    path = Path(run_dir) / EVENTS_FILE
    said = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            ev = json.loads(line)
        except ValueError:   # a line cut short by the run's end
            continue
        if ev.get("event") == "failed" and ev.get("text"):
            said.append(str(ev["text"]))
    return "; ".join(said) or None


class Events(logging.Handler):
    """Appends events to ``RUN_DIR/events.jsonl``; as a logging handler, every WARNING+ record too."""

    def __init__(self, run_dir: Path, resume: bool = False):
        super().__init__(level=logging.WARNING)
        self.path = Path(run_dir) / EVENTS_FILE
        if not resume and self.path.exists():
            self.path.unlink()
        self.stream = logging.StreamHandler(sys.stderr)
        self.stream.setLevel(logging.INFO)
        self.stream.setFormatter(logging.Formatter("%(levelname)-8s:      [newadj] %(message)s"))
        for name in LOGGERS:
            logging.getLogger(name).addHandler(self)
            logging.getLogger(name).addHandler(self.stream)
            logging.getLogger(name).setLevel(min(logging.getLogger(name).level or logging.INFO, logging.INFO))

    def __call__(self, event: str, **fields) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(json_safe({"event": event, "time": time.time(), **fields})) + "\n")

    def emit(self, record: logging.LogRecord) -> None:   # logging.Handler
        try:
            self("log", level=record.levelname.lower(), text=record.getMessage())
        except Exception:  # noqa: BLE001 - a full disk must not stop the federation
            self.handleError(record)

    def close(self) -> None:
        for name in LOGGERS:
            logging.getLogger(name).removeHandler(self)
            logging.getLogger(name).removeHandler(self.stream)
        self.stream.close()
        super().close()
