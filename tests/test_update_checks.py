"""The server's screen of each center's update (server/update_checks.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from client.fault_injection import parse_faults
from server.update_checks import screen_updates

REF = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32), "steps": np.zeros(1, np.int64)}


def _upd(scale=0.1, seed=0, **replace):
    rng = np.random.default_rng(seed)
    sd = {k: (rng.normal(0, scale, v.shape).astype(v.dtype) if v.dtype.kind == "f" else v.copy())
          for k, v in REF.items()}
    sd.update(replace)
    return ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()})


def test_well_formed_updates_pass_with_their_norms():
    rejected, norms = screen_updates({f"c{i}": _upd(seed=i) for i in range(5)}, REF, False, 10.0)
    assert rejected == {} and set(norms) == {f"c{i}" for i in range(5)} and all(n > 0 for n in norms.values())


@pytest.mark.parametrize("bad, needle", [
    (dict(w=np.full((4, 3), np.nan, np.float32)), "12 NaN/Inf"),
    (dict(b=np.array([0, np.inf, 0], np.float32)), "1 NaN/Inf"),
    (dict(w=np.zeros((3, 4), np.float32)), "shape (3, 4) != global (4, 3)"),
    (dict(w=np.zeros((4, 3), np.float64)), "dtype float64"),
    (dict(w=np.zeros((4, 3), np.float16)), "dtype float16"),          # fp16 only when fp16_weights
    (dict(steps=np.zeros(1, np.int32)), "dtype int32 != global int64"),
    (dict(extra=np.zeros(2, np.float32)), "unexpected: extra"),
])
def test_malformed_update_is_rejected_with_the_reason(bad, needle):
    ups = {f"c{i}": _upd(seed=i) for i in range(4)}
    ups["center_x"] = _upd(**bad)
    rejected, norms = screen_updates(ups, REF, False, 10.0)
    assert set(rejected) == {"center_x"} and needle in rejected["center_x"] and "center_x" not in norms


def test_fp16_allowed_when_the_run_sends_fp16():
    ups = {"c": _upd(w=np.zeros((4, 3), np.float16))}
    assert screen_updates(ups, REF, True, None)[0] == {}


def test_norm_outlier_is_rejected_only_with_enough_peers_and_the_check_on():
    ups = {f"c{i}": _upd(seed=i) for i in range(5)}
    ups["boosted"] = _upd(scale=5.0, seed=9)
    rejected, _ = screen_updates(ups, REF, False, 10.0)
    assert list(rejected) == ["boosted"] and "x the round's median" in rejected["boosted"]
    assert screen_updates(ups, REF, False, None)[0] == {}                       # check off
    two = {"c0": ups["c0"], "boosted": ups["boosted"]}
    assert screen_updates(two, REF, False, 10.0, min_for_norm=3)[0] == {}       # no median from 2


def test_fault_spec_parsing():
    f = parse_faults("center_c:delay=40@1,3; center_e:nan")
    assert (f[0].center, f[0].kind, f[0].value, f[0].rounds) == ("center_c", "delay", 40.0, frozenset({1, 3}))
    assert (f[1].kind, f[1].value, f[1].rounds) == ("nan", None, None)
    with pytest.raises(ValueError, match="unknown kind"):
        parse_faults("center_a:explode")
