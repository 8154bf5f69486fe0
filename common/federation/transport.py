"""Flower's object transport, with a first retry that fits a warm federation.

Flower moves a message as objects (the message, its records, each array chunk).  A receiver that
lists a message before all of its objects have arrived retries each missing one after 1 s, then 2, 4
... (``pull_objects`` in ``flwr/supercore/inflatable/inflatable_utils.py``, ``PULL_INITIAL_BACKOFF``:
not a setting).  With the sender a few milliseconds behind, that first second is most of a message's
trip.  :func:`shorten_object_pull_backoff` makes the first retry come after ``BACKOFF`` seconds (the
back-off still doubles, up to ``cap``), for the exact Flower release pinned in ``pyproject.toml``; the
SuperNode's launcher (``client/supernode.py``) and the ServerApp apply it in their own processes.
"""
from __future__ import annotations

import logging

PINNED_FLOWER = "1.42.0"
BACKOFF = 0.05
log = logging.getLogger(__name__)


def shorten_object_pull_backoff(cap: float = 0.5) -> bool:
    """First object-pull retry after ``BACKOFF`` s, at most ``cap`` s; False (unchanged) on another Flower."""
    import flwr
    from flwr.supercore.inflatable import inflatable_utils

    if flwr.__version__ != PINNED_FLOWER:
        log.warning("Flower %s is not %s: its object pull back-off is kept", flwr.__version__, PINNED_FLOWER)
        return False
    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        fn.__kwdefaults__["initial_backoff"] = BACKOFF
        fn.__kwdefaults__["backoff_cap"] = max(BACKOFF, cap)
    return True
