"""The real thing on loopback: one flower-superlink, seven flower-supernode processes.

First the schema step (``mode = "schema"``): every SuperNode answers with its columns (names and
counts); the proposal, edited as a coordinator would, goes into the run as overrides holding lists
and quotes -- which must reach the ServerApp and every ClientApp intact through ``flwr run``.
"""
from __future__ import annotations

import json

import pytest
import yaml

from common.federation import reply_schema as W
from common.data.cohort import discover_sites
from common.config import feature_overrides, join_overrides
from server.ops.processes import ProcessGroup, flwr_run, flwr_status, start_superlink, start_supernode, write_flwr_config
from tests.conftest import TEST_OVERRIDES
from tests.test_policy_audit import _copy_cohort

pytestmark = [pytest.mark.deployment]


def test_loopback_deployment_runs_to_completion(tiny_cohort, tmp_path):
    cohort = _copy_cohort(tiny_cohort, tmp_path / "cohort")   # the run's feature list rewrites site manifests
    sites = discover_sites(cohort)
    assert len(sites) == 7 and sum(s.role == "external" for s in sites) == 1
    run_dir, schema_dir = tmp_path / "run", tmp_path / "schema"
    home = tmp_path / "flwr-home"
    group = ProcessGroup()
    try:
        addrs, env = start_superlink(group, home, tmp_path / "logs")
        nodes = [start_supernode(group, env, addrs.fleet,
                                 {"data-dir": str(s.path), "role": s.role, "center-id": s.name},
                                 tmp_path / "logs" / f"supernode-{s.name}.log") for s in sites]
        write_flwr_config(home, "loopback", addrs.control)
        schema_id = flwr_run("loopback", env, {"run-dir": str(schema_dir), "overrides": join_overrides(TEST_OVERRIDES),
                                               "expected-nodes": len(sites), "mode": "schema"},
                             tmp_path / "logs" / "flwr-schema.log", timeout=300)
        assert schema_id is not None, (tmp_path / "logs" / "flwr-schema.log").read_text()[-3000:]
        schema_status = flwr_status("loopback", env, schema_id)
        proposal = yaml.safe_load((schema_dir / "features.yaml").read_text())
        # the coordinator reviews the proposal: one gene fewer, two protocol covariates
        proposal["genomic_features"] = proposal["genomic_features"][1:]
        proposal["clinical_features"] = ["afp_ng_ml", "max_diameter_cm"]
        (schema_dir / "features.yaml").write_text(yaml.safe_dump(proposal))
        overrides = TEST_OVERRIDES + feature_overrides(schema_dir / "features.yaml")
        assert any('"' in o and "[" in o for o in overrides)          # lists of quoted names
        run_id = flwr_run("loopback", env, {"run-dir": str(run_dir), "overrides": join_overrides(overrides),
                                            "expected-nodes": len(sites)}, tmp_path / "logs" / "flwr-run.log",
                          timeout=600)
        assert run_id is not None, (tmp_path / "logs" / "flwr-run.log").read_text()[-3000:]
        status = flwr_status("loopback", env, run_id)
        assert all(p.poll() is None for p in nodes), "a SuperNode died during the run"
    finally:
        group.stop()
    assert group.alive() == []  # every process we started (and its children) is gone
    assert "finished:completed" in str(schema_status.get("status", "")).replace(" ", ""), schema_status
    answers = json.loads((schema_dir / "schema.json").read_text())["answers"]
    server_scaling = json.loads((run_dir / "metrics.json").read_text())["config"]["data"]["scaling"]
    assert set(answers) == {s.name for s in sites}
    for a in answers.values():           # names, counts and summed moments per column, never a patient's value
        assert set(a) == set(W.QUERY_INFO[:2]) | set(W.SCHEMA_INFO)
        assert all(isinstance(n, int) for n in a["genomic-counts"] + a["clinical-counts"])
        assert len(a["clinical-sum"]) == len(a["clinical-columns"]) == len(a["clinical-counts"])
    assert {"age", "afp_ng_ml"} <= {f["name"] for f in server_scaling}             # the pooled standardisation
    assert "afp_ng_ml" in answers["center_a"]["clinical-columns"]

    assert "finished:completed" in str(status.get("status", "")).replace(" ", ""), status
    metrics = json.loads((run_dir / "metrics.json").read_text())
    server_cfg = metrics["config"]
    assert {f["name"] for f in server_cfg["data"]["scaling"]} >= {"afp_ng_ml", "max_diameter_cm"}
    assert server_cfg["data"]["genomic_features"] == proposal["genomic_features"]      # the ServerApp's config
    assert server_cfg["data"]["clinical_features"] == ["afp_ng_ml", "max_diameter_cm"]
    assert metrics["rounds"] == 2 and len(metrics["history"]) == 2
    roles = {c: v["role"] for c, v in metrics["centers"].items()}
    assert roles["external"] == "external" and sum(r == "train" for r in roles.values()) == 6
    for h in metrics["history"]:
        assert "external" not in h["client_train_seconds"]          # never trained
        assert set(h["val_centers"]) == {s.name for s in sites if s.role == "train"}
        assert not h["failures"]                                    # every ClientApp built the same model
    for s in sites:                                                 # and its cache holds the run's features
        manifest = json.loads((s.path / ".newadj-cache" / "manifest.json").read_text())
        assert manifest["genomic_features"] == proposal["genomic_features"]
        assert manifest["clinical_features"] == ["afp_ng_ml", "max_diameter_cm"]
    assert set(metrics["external"]["centers"]) == {"external"}
    assert metrics["external"]["centers"]["external"]["n"] > 0
    assert (run_dir / "checkpoints" / "round_002.pt").exists()
