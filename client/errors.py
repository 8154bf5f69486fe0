"""What an error reply of a site says outside the site: a fixed code and a short category.

Exception text can hold anything the failing code held: a cell of ``clinical.csv``, a patient id,
a path, a secret resolved from the site's environment.  So a reply never carries it.  ``errors_mod``
(inside the audit mod of the ClientApp) answers a handler that raised with ``Error(500, "internal
error at the site (<category>); see the site's log, message <id>")`` and logs the full traceback in
the site's own log under that message id.  The codes and categories are the wire schema's
(``common/federation/reply_schema.py``); a policy refusal (403) adds the rule or run keys it refused,
texts the site's code writes.
"""
from __future__ import annotations

import logging

from common.federation.reply_schema import (
    ERR_DATA_CHANGED,
    ERR_INTERNAL,
    ERROR_CATEGORIES,
    INTERNAL_CATEGORIES,
)

log = logging.getLogger("newadj.site")


class SiteDataChanged(RuntimeError):
    """The site's files changed after a run loaded them (the run is refused from then on)."""


def error_reason(code: int, detail: str | None = None, message_id: str | None = None) -> str:
    """The one text an error reply of this site carries."""
    text = ERROR_CATEGORIES.get(int(code), ERROR_CATEGORIES[ERR_INTERNAL])
    if detail:
        text += f" ({detail})"
    if message_id:
        text += f"; see the site's log, message {message_id}"
    return text


def internal_category(exc: BaseException) -> str:
    """The category of a failure the coordinator may read (the exception's kind, never its text)."""
    if isinstance(exc, MemoryError):
        return INTERNAL_CATEGORIES[2]
    if isinstance(exc, OSError):
        return INTERNAL_CATEGORIES[1]
    if isinstance(exc, (ValueError, KeyError, IndexError, TypeError, LookupError)):
        return INTERNAL_CATEGORIES[0]
    if isinstance(exc, (RuntimeError, ArithmeticError)):
        return INTERNAL_CATEGORIES[3]
    return INTERNAL_CATEGORIES[4]


def error_reply(msg, exc: BaseException):
    """The reply to ``msg`` whose handler raised ``exc``; the full text goes to the site's log only."""
    from flwr.app import Error, Message

    mid = msg.metadata.message_id
    if isinstance(exc, SiteDataChanged):
        log.error("message %s refused: %s", mid, exc)
        return Message(Error(code=ERR_DATA_CHANGED, reason=error_reason(ERR_DATA_CHANGED, message_id=mid)),
                       reply_to=msg)
    log.error("message %s (%s) failed", mid, msg.metadata.message_type, exc_info=exc)
    return Message(Error(code=ERR_INTERNAL, reason=error_reason(ERR_INTERNAL, internal_category(exc), mid)),
                   reply_to=msg)


def errors_mod(msg, context, call_next):
    """Flower mod: a handler that raises is answered with a code and a category, never with its text."""
    try:
        return call_next(msg, context)
    except Exception as exc:   # noqa: BLE001 - every failure becomes a category on the wire
        return error_reply(msg, exc)
