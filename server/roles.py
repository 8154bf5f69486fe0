"""Ask every node its role (QUERY) and keep train and external nodes apart."""
from __future__ import annotations

import logging
import time

from flwr.app import Message, MessageType, RecordDict

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
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        nid = reply.metadata.src_node_id
        if reply.has_error():
            errors[nid] = reply.error.reason
            log.error("node %s did not answer the role query: %s", nid, reply.error.reason)
        else:
            infos[nid] = dict(reply.content["info"])
    for n in node_ids:
        if n not in infos and n not in errors:
            errors[n] = "no reply before the query timeout"
    return infos, errors
