"""Fault injection for reliability tests: a ClientApp mod that is inert unless asked.

It acts only when the environment of the center's process sets
``NEWADJ_FAULTS`` -- the site's own environment, never anything the server
sends -- and then logs a WARNING on every message it touches.  Format: faults
separated by ``;``, each ``CENTER:KIND[=VALUE][@ROUNDS]`` with ROUNDS a
comma-separated list of server rounds (default: every round)::

    NEWADJ_FAULTS="center_c:delay=40@1;center_e:scale=50"

Kinds (train replies only):

``delay=S``   sleep S seconds before training (a slow center)
``scale=F``   send ``global + F x (update - global)`` (a scaled, "boosted" update)
``random=S``  send weights drawn from N(0, S^2) (a random update)
``nan``       put a NaN into the first float array
``shape``     drop the last element of the first float array (a wrong shape)
``dtype``     send float64 arrays
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MessageType

ENV = "NEWADJ_FAULTS"
KINDS = ("delay", "scale", "random", "nan", "shape", "dtype")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fault:
    center: str
    kind: str
    value: float | None
    rounds: frozenset[int] | None


def parse_faults(text: str) -> list[Fault]:
    faults = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        try:
            center, spec = part.split(":", 1)
            rounds = None
            if "@" in spec:
                spec, r = spec.split("@", 1)
                rounds = frozenset(int(x) for x in r.split(","))
            kind, _, val = spec.partition("=")
            if kind not in KINDS:
                raise ValueError(f"unknown kind {kind!r} (known: {', '.join(KINDS)})")
            faults.append(Fault(center.strip(), kind, float(val) if val else None, rounds))
        except ValueError as exc:
            raise ValueError(f"{ENV}: cannot parse {part!r}: {exc}") from exc
    return faults


def _center(context: Context) -> str:
    from client.policy import site_identity

    return site_identity(context.run_config, context.node_config)[1]


def _corrupt(kind: str, value: float | None, sent: ArrayRecord, reply: ArrayRecord) -> ArrayRecord:
    out = {}
    first_float = next(k for k in reply.keys() if np.issubdtype(reply[k].numpy().dtype, np.floating))
    rng = np.random.default_rng(0)
    for k in reply.keys():
        a = np.array(reply[k].numpy())
        if np.issubdtype(a.dtype, np.floating):
            if kind == "scale":
                g = np.asarray(sent[k].numpy(), a.dtype)
                a = (g + float(value) * (a - g)).astype(a.dtype)
            elif kind == "random":
                a = rng.normal(0.0, value or 1.0, a.shape).astype(a.dtype)
            elif kind == "nan" and k == first_float:
                a.ravel()[0] = np.nan
            elif kind == "shape" and k == first_float:
                a = a.ravel()[:-1]
            elif kind == "dtype":
                a = a.astype(np.float64)
        out[k] = np.ascontiguousarray(a)
    return ArrayRecord({k: _tensor(v) for k, v in out.items()})


def _tensor(a: np.ndarray):
    import torch   # only when a fault is injected (tests)

    return torch.from_numpy(a)


def fault_injection_mod(msg: Message, context: Context, call_next) -> Message:
    text = os.environ.get(ENV, "")
    if not text or msg.metadata.message_type != MessageType.TRAIN or "arrays" not in msg.content.array_records:
        return call_next(msg, context)
    center = _center(context)
    rnd = int(msg.content["config"].get("server-round", 0)) if "config" in msg.content.config_records else 0
    mine = [f for f in parse_faults(text) if f.center == center and (f.rounds is None or rnd in f.rounds)]
    if not mine:
        return call_next(msg, context)
    sent = msg.content["arrays"]
    for f in mine:
        if f.kind == "delay":
            log.warning("FAULT INJECTION (%s): %s sleeps %.0f s in round %d", ENV, center, f.value or 0, rnd)
            time.sleep(float(f.value or 0))
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    for f in mine:
        if f.kind != "delay":
            log.warning("FAULT INJECTION (%s): %s sends a %s update in round %d", ENV, center, f.kind, rnd)
            reply.content["arrays"] = _corrupt(f.kind, f.value, sent, reply.content["arrays"])
    return reply
