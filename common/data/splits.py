"""Which training-center patients validate: an exact-size, label-stratified, deterministic split.

Patients whose ``split`` cell is empty are assigned here: ``round(n * val_fraction)``
of them validate (exactly, for the site as a whole), spread over the strata -- the
benefit label where there is one, else the DFS event, else none -- in proportion to
their sizes (largest remainder), and inside each stratum the patients with the
smallest SHA-256 of their ``patient_id`` validate.  So the split depends only on the
patients and their labels, never on row order or a random state, and adding a patient
moves at most a few others.  An external center's patients are all ``test``.
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterable


def _rank(patient_id: str) -> int:
    return int.from_bytes(hashlib.sha256(patient_id.encode("utf-8")).digest()[:8], "big")


def assign_splits(patients: Iterable[tuple[str, object]], val_fraction: float) -> dict[str, str]:
    """{patient_id: "train" | "val"} for ``(patient_id, stratum)`` pairs (stratum: any hashable, e.g. a label)."""
    strata: dict[object, list[str]] = {}
    for pid, stratum in patients:
        strata.setdefault(stratum, []).append(pid)
    n = sum(len(v) for v in strata.values())
    total = int(round(n * float(val_fraction)))
    exact = {s: len(v) * float(val_fraction) for s, v in strata.items()}
    quota = {s: math.floor(x) for s, x in exact.items()}
    rest = total - sum(quota.values())
    for s in sorted(strata, key=lambda s: (-(exact[s] - quota[s]), str(s)))[:max(rest, 0)]:
        quota[s] += 1
    out: dict[str, str] = {}
    for s, pids in strata.items():
        ordered = sorted(pids, key=lambda p: (_rank(p), p))
        for i, pid in enumerate(ordered):
            out[pid] = "val" if i < quota[s] else "train"
    return out


def fold_of(patient_ids: list[str], k: int) -> "np.ndarray":
    """Each patient's cross-validation fold in 0..k-1 (``model=cox``'s penalizer, ``federation.cv_folds``):
    patients ordered by the SHA-256 of their id, dealt round-robin, so the folds differ in size by at most one
    and depend on the patients only (not on row order or a random state)."""
    import numpy as np

    order = sorted(range(len(patient_ids)),
                   key=lambda i: (hashlib.sha256(f"cv-fold:{patient_ids[i]}".encode()).digest(), patient_ids[i]))
    folds = np.empty(len(patient_ids), int)
    for rank, i in enumerate(order):
        folds[i] = rank % int(k)
    return folds
