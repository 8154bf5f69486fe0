"""The roles a center answers with and which of them train: the one place that says so."""
from __future__ import annotations

EXTERNAL = "external"   # the held-out test center: never trains, scored at the end
SEALED = "sealed"       # the real external center during a leave-one-center-out run: sent nothing


def trains(role: str | None) -> bool:
    """Whether a center with this role trains and validates in the rounds."""
    return role not in (EXTERNAL, SEALED)
