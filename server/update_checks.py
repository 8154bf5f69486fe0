"""Server-side checks of each center's model update before aggregation.

A reply is rejected -- logged with the center's name, recorded in the round's
history, and left out of the aggregate -- when its arrays

* do not carry exactly the global model's parameter names,
* have another shape, or a dtype other than the wire dtypes (float32, or
  float16 when ``federation.fp16_weights``; integer buffers keep their dtype),
* hold NaN or +-Inf,
* or move the model much further than the others: the L2 norm of
  ``update - global`` above ``max_norm_ratio`` x the median norm of the valid
  updates of the round (needs at least ``min_for_norm`` valid updates; off when
  ``max_norm_ratio`` is null).

Robust strategies (FedMedian, FedTrimmedAvg) bound what a subtler attacker can
do; these checks catch the gross cases whatever the strategy.
"""
from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord

WIRE_FLOATS = {np.dtype(np.float32), np.dtype(np.float16)}


def array_problem(arrays: ArrayRecord, reference: dict[str, np.ndarray], fp16: bool) -> str | None:
    """Why this update is malformed (names, shapes, dtypes, non-finite values), or None."""
    keys = list(arrays.keys())
    missing = [k for k in reference if k not in arrays]
    extra = [k for k in keys if k not in reference]
    if missing or extra:
        return (f"parameter names differ from the global model (missing: {', '.join(missing[:3]) or '-'}; "
                f"unexpected: {', '.join(extra[:3]) or '-'})")
    allowed = WIRE_FLOATS if fp16 else {np.dtype(np.float32)}
    for k in keys:
        try:
            a = np.asarray(arrays[k].numpy())
        except Exception as exc:  # noqa: BLE001 - an undecodable array is a bad update, whatever the cause
            return f"`{k}`: cannot be decoded ({exc})"
        ref = reference[k]
        if a.shape != ref.shape:
            return f"`{k}`: shape {a.shape} != global {ref.shape}"
        if np.issubdtype(ref.dtype, np.floating):
            if a.dtype not in allowed:
                return f"`{k}`: dtype {a.dtype} (expected {' or '.join(sorted(str(d) for d in allowed))})"
            bad = int((~np.isfinite(a)).sum())
            if bad:
                return f"`{k}`: {bad} NaN/Inf value(s)"
        elif a.dtype != ref.dtype:
            return f"`{k}`: dtype {a.dtype} != global {ref.dtype}"
    return None


def update_norm(arrays: ArrayRecord, reference: dict[str, np.ndarray]) -> float:
    total = 0.0
    for k, ref in reference.items():
        if np.issubdtype(ref.dtype, np.floating):
            d = np.asarray(arrays[k].numpy(), np.float64) - ref
            total += float(np.dot(d.ravel(), d.ravel()))
    return float(np.sqrt(total))


def screen_updates(updates: dict[str, ArrayRecord], reference: dict[str, np.ndarray], fp16: bool,
                   max_norm_ratio: float | None, min_for_norm: int = 3) -> tuple[dict[str, str], dict[str, float]]:
    """(rejected center -> reason, accepted center -> update norm) for one round's replies."""
    rejected, norms = {}, {}
    for center, arrays in updates.items():
        why = array_problem(arrays, reference, fp16)
        if why is None:
            norms[center] = update_norm(arrays, reference)
        else:
            rejected[center] = why
    if max_norm_ratio is not None and len(norms) >= min_for_norm:
        med = float(np.median(list(norms.values())))
        for center, n in list(norms.items()):
            if med > 0 and n > float(max_norm_ratio) * med:
                rejected[center] = (f"update norm {n:.3g} is {n / med:.1f}x the round's median {med:.3g} "
                                    f"(limit {float(max_norm_ratio):g}x)")
                del norms[center]
    return rejected, norms
