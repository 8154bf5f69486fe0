"""Ask every node its role (QUERY) and keep train and external nodes apart."""
from __future__ import annotations

import logging
import time

from flwr.app import Message, MessageType, RecordDict

from common.federation.roles import SEALED, trains
from server.messaging import send_and_collect

log = logging.getLogger(__name__)


class NodeView:
    """A Grid seen through a fixed subset of nodes: strategies sample only from it.

    Everything but ``get_node_ids`` is delegated to the real Grid, so a strategy
    given the train view can never address an external node.
    """

    def __init__(self, grid, node_ids):
        self._grid = grid
        self._ids = set(int(n) for n in node_ids)

    def get_node_ids(self):
        return [n for n in self._grid.get_node_ids() if n in self._ids]

    def __getattr__(self, name):
        return getattr(self._grid, name)


def wait_for_nodes(grid, expected: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        ids = list(grid.get_node_ids())
        if len(ids) >= expected:
            return ids
        if time.monotonic() > deadline:
            log.warning("only %d of %d expected nodes connected after %.0fs; going on", len(ids), expected, timeout)
            return ids
        time.sleep(1.0)


def query_roles(grid, node_ids, timeout: float) -> tuple[dict[int, dict], dict[int, str]]:
    """Returns ({node_id: info}, {node_id: error reason}) from a QUERY to each node."""
    msgs = [Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in node_ids]
    infos, errors = {}, {}
    for nid, reply in send_and_collect(grid, msgs, timeout).items():
        if reply is None:
            errors[nid] = "no reply before the query timeout"
        elif reply.has_error():
            errors[nid] = reply.error.reason
            log.error("node %s did not answer the role query: %s", nid, reply.error.reason)
        else:
            infos[nid] = dict(reply.content["info"])
    return infos, errors


def admit_new_nodes(grid, roles: dict[int, dict], timeout: float, unanswered: set[int]) -> list[str]:
    """Query the role of nodes that connected since the last look; add them to ``roles`` in place.

    A center that comes back after a crash appears as a node id not seen before
    (without SuperNode authentication every start gets a new id): its old id is
    forgotten so that the round does not wait for a node that is gone.  Returns
    a log line per change.  Nodes that did not answer are added to
    ``unanswered`` and not asked again.
    """
    new = [n for n in grid.get_node_ids() if n not in roles and n not in unanswered]
    if not new:
        return []
    infos, errors = query_roles(grid, new, timeout)
    events = []
    for nid, info in infos.items():
        center = info.get("center-id", str(nid))
        stale = [old for old, i in roles.items() if i.get("center-id") == center]
        for old in stale:
            del roles[old]
        roles[nid] = info
        events.append(f"center {center} ({info.get('role')}) {'rejoined as' if stale else 'joined as'} node {nid}")
    for nid, why in errors.items():
        unanswered.add(nid)
        events.append(f"node {nid} connected but did not answer the role query: {why}")
    return events




def apply_holdout(roles: dict[int, dict], holdout: str | None) -> list[str]:
    """Leave-one-center-out development (``federation.holdout_center``): in place, the held-out training
    center plays the external one (it never trains; it is scored at the end) and the real external center is
    sealed (sent nothing).  Returns a log line per change; raises ``RuntimeError`` if ``holdout`` names no
    training center that answered."""
    if not holdout:
        return []
    lines = []
    for info in roles.values():
        if info.get("center-id") == holdout and info.get("role") != "external" and not info.get("held-out"):
            info.update({"role": "external", "held-out": True})
            lines.append(f"center {holdout} is held out: it does not train and is scored at the end")
        elif info.get("role") == "external" and not info.get("held-out"):
            info["role"] = SEALED
            lines.append(f"external center {info.get('center-id')} is sealed for this leave-one-center-out run")
    if not any(i.get("held-out") for i in roles.values()):
        known = sorted(i.get("center-id", "?") for i in roles.values() if trains(i.get("role")))
        raise RuntimeError(f"federation.holdout_center: no training center {holdout!r} answered "
                           f"(training centers: {', '.join(known) or 'none'})")
    return lines
