"""Send a batch of messages with a deadline and match every reply to the node it was meant for.

* Each message gets ``ttl = timeout``: a message nobody pulled in time expires at the
  SuperLink instead of waiting in the queue of a slow or restarted center, which would
  otherwise work through stale rounds and never catch up.
* Replies are matched by ``reply_to_message_id``, not by ``src_node_id``: an error the
  SuperLink produces itself (for example "Node Unavailable" for a center that stopped
  sending heartbeats) does not come from the center's node id.
* A "Message Unavailable" error from the SuperLink (the message or its reply expired with
  its ttl) counts as no reply: whether the SuperLink's expiry or our own deadline comes
  first is a race, and both mean the center did not answer within the round timeout.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from flwr.app import Message
from flwr.common.constant import ErrorCode

NO_REPLY = "no reply before the round timeout"
EXPIRED = (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE)


POLL_SECONDS = 0.1   # between pulls of the replies (Flower's own Grid.send_and_receive waits 3 s)


def send_and_collect(grid, msgs: list[Message], timeout: float | None,
                     poll: float | None = None) -> dict[int, Message | None]:
    """{destination node id: its reply, or None when none came before ``timeout``}.

    Pushes the messages and pulls their replies every ``poll`` seconds until all came or the
    timeout passed (Flower's ``send_and_receive`` sleeps 3 s between pulls, a fixed cost on
    every round trip).  With ``NEWADJ_TIMING_LOG`` set, when each reply arrived is logged
    (``benchmarks/bench_deployment.py``).
    """
    if not msgs:
        return {}
    poll = POLL_SECONDS if poll is None else poll   # read now: the ServerApp sets it from the run's config
    if timeout is not None:
        for m in msgs:
            m.metadata.ttl = float(timeout)
    ids = list(grid.push_messages(msgs))
    dst_of = {mid: m.metadata.dst_node_id for mid, m in zip(ids, msgs)}
    out: dict[int, Message | None] = {m.metadata.dst_node_id: None for m in msgs}
    arrived: dict[int, float] = {}
    pending = set(ids)
    end = None if timeout is None else time.monotonic() + float(timeout)
    while pending:
        for r in grid.pull_messages(list(pending)):
            rid = r.metadata.reply_to_message_id
            pending.discard(rid)
            dst = dst_of.get(rid, r.metadata.src_node_id)
            out[dst] = None if r.has_error() and r.error.code in EXPIRED else r
            arrived[dst] = time.time()
        if not pending or (end is not None and time.monotonic() >= end):
            break
        time.sleep(poll)
    if os.environ.get("NEWADJ_TIMING_LOG"):
        _log_arrivals(msgs, arrived)
    return out


def _log_arrivals(msgs: list[Message], arrived: dict[int, float]) -> None:
    folder = Path(os.environ["NEWADJ_TIMING_LOG"])
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "server.jsonl", "a") as f:
        for m in msgs:
            f.write(json.dumps({"type": str(m.metadata.message_type), "node": int(m.metadata.dst_node_id),
                                "created": float(m.metadata.created_at),
                                "arrived": arrived.get(m.metadata.dst_node_id)}) + "\n")
