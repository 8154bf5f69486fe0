"""The real thing on loopback: one flower-superlink, seven flower-supernode processes."""
from __future__ import annotations

import json

import pytest

from common.cohort import discover_sites
from server.flwr_process import ProcessGroup, flwr_run, flwr_status, start_superlink, start_supernode, write_flwr_config
from tests.conftest import TEST_OVERRIDES

pytestmark = [pytest.mark.deployment]


def test_loopback_deployment_runs_to_completion(tiny_cohort, tmp_path):
    sites = discover_sites(tiny_cohort)
    assert len(sites) == 7 and sum(s.role == "external" for s in sites) == 1
    run_dir = tmp_path / "run"
    home = tmp_path / "flwr-home"
    group = ProcessGroup()
    try:
        addrs, env = start_superlink(group, home, tmp_path / "logs")
        nodes = [start_supernode(group, env, addrs.fleet,
                                 {"data-dir": str(s.path), "role": s.role, "center-id": s.name},
                                 tmp_path / "logs" / f"supernode-{s.name}.log") for s in sites]
        write_flwr_config(home, "loopback", addrs.control)
        run_id = flwr_run("loopback", env, {"run-dir": str(run_dir), "overrides": " ".join(TEST_OVERRIDES),
                                            "expected-nodes": len(sites)}, tmp_path / "logs" / "flwr-run.log",
                          timeout=600)
        assert run_id is not None, (tmp_path / "logs" / "flwr-run.log").read_text()[-3000:]
        status = flwr_status("loopback", env, run_id)
        assert all(p.poll() is None for p in nodes), "a SuperNode died during the run"
    finally:
        group.stop()
    assert group.alive() == []  # every process we started (and its children) is gone
    assert "finished:completed" in str(status.get("status", "")).replace(" ", ""), status
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["rounds"] == 2 and len(metrics["history"]) == 2
    roles = {c: v["role"] for c, v in metrics["centers"].items()}
    assert roles["external"] == "external" and sum(r == "train" for r in roles.values()) == 6
    for h in metrics["history"]:
        assert "external" not in h["client_train_seconds"]          # never trained
        assert set(h["val_centers"]) == {s.name for s in sites if s.role == "train"}
        assert not h["failures"]
    assert set(metrics["external"]["centers"]) == {"external"}
    assert metrics["external"]["centers"]["external"]["n"] > 0
    assert (run_dir / "checkpoints" / "round_002.pt").exists()
