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

from flwr.app import Message
from flwr.common.constant import ErrorCode

NO_REPLY = "no reply before the round timeout"
EXPIRED = (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE)


def send_and_collect(grid, msgs: list[Message], timeout: float | None) -> dict[int, Message | None]:
    """{destination node id: its reply, or None when none came before ``timeout``}."""
    if timeout is not None:
        for m in msgs:
            m.metadata.ttl = float(timeout)
    replies = list(grid.send_and_receive(msgs, timeout=timeout)) if msgs else []
    dst_of = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}
    out: dict[int, Message | None] = {m.metadata.dst_node_id: None for m in msgs}
    for r in replies:
        dst = dst_of.get(r.metadata.reply_to_message_id, r.metadata.src_node_id)
        out[dst] = None if r.has_error() and r.error.code in EXPIRED else r
    return out
