"""``flower-supernode``, Flower's own program, with its fixed waits shortened for a warm site runtime.

Flower's SuperNode (``flwr/supernode/start_client_internal.py``) sleeps a fixed 3 s whenever a pull
from the SuperLink finds no message, waits for its ClientApp's reply in fixed 0.5 s steps, and pulls
a message's objects with a 1 s initial back-off (``flwr/supercore/inflatable/inflatable_utils.py``).
None of these is a setting.  With a ClientApp process started per message they were hidden behind
its start-up; with the site's warm runtime (``client/executor.py``) they are most of a round.  This
launcher runs Flower's ``flower_supernode()`` unchanged after pointing those waits at ``poll``
seconds (``NEWADJ_SUPERNODE_POLL``, default 0.2) and the back-off at 0.05 s
(``common/federation/transport.py``):

    python -m client.supernode <flower-supernode arguments>

The tuning touches only the exact Flower release pinned in ``pyproject.toml`` and only the wait
statements it knows (checked in Flower's source at start); otherwise Flower's own waits are kept and
a warning says so.  ``tests/test_site_runtime.py`` checks that it takes effect.
"""
from __future__ import annotations

import inspect
import logging
import os
import sys
import time

from common.federation.transport import BACKOFF, PINNED_FLOWER, shorten_object_pull_backoff  # noqa: F401

ENV = "NEWADJ_SUPERNODE_POLL"
DEFAULT_POLL = 0.2
# the wait statements tuned, as Flower's source spells them
IDLE_PULL, REPLY_WAIT = "time.sleep(3)", "time.sleep(0.5)"
log = logging.getLogger("newadj.supernode")


LOCAL_WAIT = 0.02   # the waits on the SuperNode's own state (a reply, an object): no network call per wait


class _ShortWaits:
    """Stands in for the ``time`` module inside Flower's SuperNode loop: the idle pull (3 s) lasts ``poll``,
    the waits on its own state (0.5 s) ``LOCAL_WAIT``."""

    def __init__(self, poll: float):
        self._poll = float(poll)

    def sleep(self, seconds: float) -> None:
        time.sleep(self._poll if seconds >= 3 else min(float(seconds), LOCAL_WAIT))

    def __getattr__(self, name):
        return getattr(time, name)


def tune(poll: float) -> bool:
    """Shorten the SuperNode's fixed waits to ``poll`` seconds; False (nothing changed) if this Flower is not the
    release whose waits are known."""
    import flwr
    from flwr.supernode import start_client_internal as sci

    source = inspect.getsource(sci)
    if flwr.__version__ != PINNED_FLOWER or IDLE_PULL not in source or REPLY_WAIT not in source \
            or getattr(sci, "time", None) is not time:
        log.warning("Flower %s is not %s, whose SuperNode waits this launcher knows: Flower's own waits are kept",
                    flwr.__version__, PINNED_FLOWER)
        return False
    sci.time = _ShortWaits(poll)
    return shorten_object_pull_backoff(cap=max(BACKOFF, poll))


def main(argv: list[str] | None = None) -> int:
    from flwr.supernode.cli import flower_supernode

    logging.basicConfig(level=logging.INFO)
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    tune(float(os.environ.get(ENV, DEFAULT_POLL)))
    sys.argv = ["flower-supernode", *(sys.argv[1:] if argv is None else argv)]
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
