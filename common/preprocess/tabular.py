"""Genomics and clinical features as (values, observed-mask) pairs.

A missing or untested value is never silently filled: it is 0 in ``values`` and
``False`` in ``mask``, and the model receives both.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np


def feature_vector(source: Mapping[str, float | None] | None, features: Sequence[str]) -> tuple[list, list]:
    """One patient's values (None where missing) and observed flags, in ``features`` order."""
    values: list = []
    observed: list = []
    for name in features:
        v = None if source is None else source.get(name)
        ok = v is not None and not (isinstance(v, float) and math.isnan(v))
        values.append(float(v) if ok else None)
        observed.append(bool(ok))
    return values, observed


def stack_features(rows: Iterable[Sequence[float | None]]) -> tuple[np.ndarray, np.ndarray]:
    """Stack per-patient value lists into float32 values (0 where missing) and a bool mask."""
    rows = list(rows)
    if not rows:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), bool)
    arr = np.array([[np.nan if v is None else v for v in r] for r in rows], dtype=np.float64)
    mask = ~np.isnan(arr)
    return np.where(mask, arr, 0.0).astype(np.float32), mask
