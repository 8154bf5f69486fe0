"""The coordinating process dies mid-run; `newadj simulate --resume` finishes it with the same result."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest

from server.ops.simulation import run_simulation
from tests.conftest import TEST_OVERRIDES, max_abs_diff, round_weights

pytestmark = [pytest.mark.slow]
# select_metric auto (not the default val_loss): its decision travels in the checkpoint, so a resumed run must
# select on the metric and round the uninterrupted one did (the one end-to-end test of auto with benefit labels)
OVERRIDES = TEST_OVERRIDES + ["federation.num_rounds=3", "federation.select_metric=auto"]


def test_resume_after_kill_matches_uninterrupted_run(tiny_cohort, tmp_path):
    a = run_simulation(tiny_cohort, tmp_path / "a", OVERRIDES, stream=False)

    b = tmp_path / "b"
    cmd = [sys.executable, "-m", "common.cli", "simulate", "--data", str(tiny_cohort), "--out", str(b), "--quiet",
           *OVERRIDES]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 400
    while not (b / "checkpoints" / "round_001.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "run ended or stalled before round 1"
        time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) != 0
    assert not (b / "metrics.json").exists()
    done = sorted(p.name for p in (b / "checkpoints").glob("round_*.pt"))
    assert "round_003.pt" not in done, "the run was not interrupted"
    time.sleep(1)
    left = [p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"]) if str(b) in " ".join(p.info["cmdline"] or [])]
    assert left == [], f"processes of the killed run still alive: {left}"

    res = subprocess.run([sys.executable, "-m", "common.cli", "simulate", "--resume", str(b), "--quiet"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    mb = json.loads((b / "metrics.json").read_text())
    assert [h["round"] for h in mb["history"]] == [1, 2, 3]
    assert mb["selected_round"] == a["selected_round"]
    assert mb["selection_metric"] == a["selection_metric"] != "auto"
    # replies are aggregated in a fixed order and local training is seeded per (center, round)
    assert max_abs_diff(round_weights(tmp_path / "a", 3), round_weights(b, 3)) <= 1e-6
    ea, eb = a["external"]["centers"]["external"], mb["external"]["centers"]["external"]
    assert ea.get("auc") == pytest.approx(eb.get("auc"), abs=1e-6)
