"""What crosses the network: model weights as Flower ArrayRecords, nothing else.

``to_arrays`` optionally sends float tensors as fp16 (halves the bytes);
``from_arrays`` always returns fp32 tensors so that aggregation and training
never run in half precision.
"""
from __future__ import annotations

import hashlib

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord


def to_arrays(state_dict: dict, fp16: bool = False) -> ArrayRecord:
    sd = {}
    for k, v in state_dict.items():
        v = v.detach().cpu()
        sd[k] = v.half() if fp16 and v.is_floating_point() else v
    return ArrayRecord(sd)


def from_arrays(arrays: ArrayRecord) -> dict:
    sd = arrays.to_torch_state_dict()
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


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

