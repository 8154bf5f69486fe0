"""What crosses the network: model weights as Flower ArrayRecords, nothing else.

A weight record holds one array, ``weights``: every tensor of the model's state dict, flattened and
concatenated in the state dict's order.  Both ends build the same model from the same configuration,
so each knows the names and shapes (``from_arrays`` takes the model's state dict as its layout and
refuses a record of another length).  One array, not one per tensor: Flower moves a message as one
object per array (and per chunk), each a request of its own on every hop (ServerApp -> SuperLink ->
SuperNode -> site runtime and back), so a record of 49 tensors cost 77 requests per hop and one array
costs five.  Averaging, clipping and screening act element-wise, the same on either form.

``to_arrays`` optionally sends the weights as fp16 (halves the bytes); ``from_arrays`` always returns
fp32 tensors so that aggregation and training never run in half precision.
"""
from __future__ import annotations

import hashlib

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord


WEIGHTS = "weights"   # the one array of a weight record
# a cross-validated run (federation.cv_folds): the fold models travel in a record of their own, one flat weight
# array per fold, next to the model's weight record (client/cross_validation.py)
CV_ARRAYS = "cv-arrays"


def fold_key(f: int) -> str:
    return f"cv-{int(f)}"


def to_arrays(state_dict: dict, fp16: bool = False) -> ArrayRecord:
    """The weight record of a state dict of float tensors: one flat array (fp32, or fp16 with ``fp16``)."""
    import torch

    bad = [k for k, v in state_dict.items() if not v.is_floating_point()]
    if bad:
        raise ValueError(f"weight records carry float tensors only, got {', '.join(bad)}")
    flat = torch.cat([v.detach().cpu().reshape(-1).float() for v in state_dict.values()])
    return ArrayRecord({WEIGHTS: flat.half() if fp16 else flat})


def from_arrays(arrays: ArrayRecord, layout: dict) -> dict:
    """The state dict a weight record holds, named and shaped as ``layout`` (the model's state dict), in fp32."""
    import torch

    if list(arrays.keys()) != [WEIGHTS]:
        raise ValueError(f"a weight record holds one array `{WEIGHTS}`, got {len(arrays)} arrays")
    flat = torch.from_numpy(np.asarray(arrays[WEIGHTS].numpy(), dtype=np.float32).reshape(-1))
    n = sum(int(v.numel()) for v in layout.values())
    if flat.numel() != n:
        raise ValueError(f"a weight record of {flat.numel()} values for a model of {n}")
    out, at = {}, 0
    for k, v in layout.items():
        out[k] = flat[at:at + v.numel()].reshape(v.shape).clone()
        at += v.numel()
    return out


def upcast(arrays: ArrayRecord) -> ArrayRecord:
    """fp16 arrays as fp32 (server side, before aggregation)."""
    import torch

    nd = arrays.to_numpy_ndarrays()
    if not any(a.dtype == np.float16 for a in nd):
        return arrays
    return ArrayRecord({k: torch.from_numpy(np.asarray(a, np.float32) if a.dtype == np.float16 else a)
                        for k, a in zip(arrays.keys(), nd)})


def state_dict_bytes(state_dict: dict) -> int:
    return int(sum(v.numel() * v.element_size() for v in state_dict.values()))


def weights_sha256(state_dict: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def record_bytes(rec) -> int:
    """Payload bytes of one Flower record (what ``count_bytes`` measures)."""
    try:
        return int(rec.count_bytes())
    except IndexError:  # flwr 1.41: ConfigRecord.count_bytes fails on an empty list (SecAgg+ sends some)
        return int(ConfigRecord({k: v for k, v in rec.items() if not (isinstance(v, list) and not v)}).count_bytes())


def content_bytes(content) -> int:
    """Payload bytes of a message's RecordDict."""
    return sum(record_bytes(rec) for rec in content.values())


PARAM_KEYS = "param-keys-json"   # SecAgg+ fit config: the state-dict names in order (legacy Parameters are a bare list)

