"""A hostile coordinator and a hostile fellow site against real SuperLink / SuperNode processes, TLS and the door.

The federation runs as it would in production: `newadj provision` kits, the SuperLink on the coordinator's
loopback behind nginx (only the Fleet API passes, ``server/ops/door.py``), three sites each running
``flower-supernode --isolation process`` and its own warm runtime of the installed ClientApp
(``client/executor.py``), each having approved one bundle.  Then:

* **Bundles the sites did not approve.**  The coordinator submits (a) a bundle whose ``client/disclosure.py``
  sends every patient's DFS time in a whitelisted key and whose reply check passes anything, (b) a bundle
  whose ``conf/policy/default.yaml`` lowers every floor, (c) the approved code under another version.  Its
  ServerApp asks every site for a 1,000-bin full report.  Every site refuses every message (412), writes the
  refusal to its audit log, and the replay of every reply of those runs shows nothing of its data left it.
* **The Control API from a center's kit.**  While a run is in flight, ``flwr ls``, ``flwr supernode register``
  and ``flwr run`` with a center kit's address and CA are refused (403 from the door); the coordinator's
  operator, on the coordinator's loopback, lists the run.
* **An error inside a handler.**  A train message whose weights fit no model makes the handler raise: the
  coordinator reads the category only; the same warm runtime then answers a well-formed evaluation.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import threading
import tomllib
from pathlib import Path

import pytest
import yaml

from client.audit import AUDIT_FILE, read_audit
from client.bundles import approve
from client.disclosure import LEDGER_FILE
from client.keys import keygen
from common.config import join_overrides
from common.federation.reply_schema import ERR_BUNDLE, ERR_INTERNAL, ERROR_CATEGORIES
from server.ops.deploy import CONNECTION, start_secure_superlink, start_secure_supernode
from server.ops.processes import (ProcessGroup, bin_path, flwr_env, flwr_run, flwr_status, free_port,
                                  write_bundle, write_flwr_config)
from server.ops.provision import COORDINATOR, provision
from tests.conftest import TEST_OVERRIDES, write_site_policy
from tests.test_hostile_server import _hostile_app

pytestmark = [pytest.mark.deployment, pytest.mark.slow]   # about 4 min on 2 cores

EVIL_DISCLOSURE = '''

# --- added by a hostile coordinator: every patient's DFS time rides in a whitelisted key, and the check
# that would refuse the reply passes anything
_release_metrics = release_metrics


def release_metrics(pred, *args, **kwargs):
    out = _release_metrics(pred, *args, **kwargs)
    out["hist-edges"] = [float(x) for x in pred["dfs_time"]]
    return out


def check_released(*args, **kwargs):
    return None
'''
LOW_FLOORS = {"min_patients": {"benefit": 1, "dfs": 1}, "min_cell_count": 1, "max_histogram_bins": 100000,
              "max_thresholds": 100000, "release_round_metrics": True}


def _evil_apps(tmp: Path) -> dict[str, Path]:
    """(a) raw rows, (b) lowered floors, (c) another version: copies of the hostile-server app (the collector)."""
    out = {}
    for name in ("raw-rows", "low-floors", "other-version"):
        app = tmp / f"evil-{name}"
        shutil.copytree(_hostile_app(tmp / f"base-{name}"), app)
        if name == "raw-rows":
            with open(app / "client" / "disclosure.py", "a") as f:
                f.write(EVIL_DISCLOSURE)
        elif name == "low-floors":
            pol = yaml.safe_load((app / "conf" / "policy" / "default.yaml").read_text())
            pol.update(LOW_FLOORS)
            (app / "conf" / "policy" / "default.yaml").write_text(yaml.safe_dump(pol))
        else:
            toml = (app / "pyproject.toml").read_text()
            (app / "pyproject.toml").write_text(toml.replace('version = "0.1.0"', 'version = "0.1.1"', 1))
        out[name] = app
    return out


def _federation(tmp: Path, sites: list[Path]) -> Path:
    fed = {"federation": "hostile-test",
           "superlink": {"address": "127.0.0.1", "port": free_port(), "control_port": free_port(),
                         "bind_host": "127.0.0.1", "dns_names": ["localhost"], "ip_addresses": ["127.0.0.1"]},
           "centers": [{"center_id": s.name, "role": "external" if s.name == "external" else "train"} for s in sites]}
    (tmp / "federation.yaml").write_text(yaml.safe_dump(fed))
    pubs = tmp / "received"
    pubs.mkdir()
    for s in sites:
        _priv, pub = keygen(tmp / "site-keys" / s.name, s.name)
        shutil.copy(pub, pubs / pub.name)
    provision(tmp / "federation.yaml", tmp / "kits", public_keys=pubs)
    return tmp / "kits"


def _center_tries(kit: Path, home: Path, app: Path) -> dict[str, subprocess.CompletedProcess]:
    """What a center can do with its own kit (its address, its CA) against the coordinator's door."""
    address = tomllib.loads((kit / "kit.toml").read_text())["superlink"]["address"]
    write_flwr_config(home, "fed", address, insecure=False, root_certificates=kit / "ca.pem")
    env = flwr_env(home)
    keygen(home / "rogue", "rogue")
    run = lambda *a: subprocess.run([bin_path("flwr"), *a], env=env, capture_output=True, text=True,  # noqa: E731
                                    cwd=home, timeout=120)
    return {"ls": run("ls", "fed", "--format", "json"),
            "register": run("supernode", "register", str(home / "rogue" / "rogue.pub"), "fed", "--format", "json"),
            "run": run("run", str(app), "fed", "--format", "json")}


def test_sites_run_only_approved_bundles_and_the_control_api_is_closed_to_centers(tiny_cohort, tmp_path):
    sites = []
    for name in ("center_a", "center_b", "external"):
        site = tmp_path / "cohort" / name
        shutil.copytree(tiny_cohort / name, site, ignore=shutil.ignore_patterns(AUDIT_FILE, LEDGER_FILE))
        sites.append(site)
    approved = _hostile_app(tmp_path / "approved")          # project code + a collector ServerApp, reviewed
    approved_fab, approved_sha = write_bundle(tmp_path / "approved.fab", approved)
    for site in sites:
        write_site_policy(site)                                # approves the project's own bundle
        approve(site, approved_fab)
    evil = _evil_apps(tmp_path)
    kits = _federation(tmp_path, sites)
    logs, home = tmp_path / "logs", tmp_path / "flwr-home"
    overrides = join_overrides(TEST_OVERRIDES)
    group = ProcessGroup()
    runs, statuses = {}, {}
    try:
        _addrs, env = start_secure_superlink(group, kits / COORDINATOR, home, logs)
        for s in sites:
            start_secure_supernode(group, env, kits / s.name, s, logs / f"site-{s.name}.log",
                                   key=tmp_path / "site-keys" / s.name / "supernode.key")

        def submit(name: str, app: Path, attack: str) -> None:
            runs[name] = flwr_run(CONNECTION, env, {"run-dir": str(tmp_path / f"run-{name}"), "overrides": overrides,
                                                    "attack": attack, "expected-nodes": len(sites)},
                                  logs / f"flwr-run-{name}.log", timeout=600, app=app)
            statuses[name] = flwr_status(CONNECTION, env, runs[name])

        # the approved bundle, while a center tries the Control API with its own kit
        inflight = threading.Thread(target=submit, args=("errors", approved, "errors"))
        inflight.start()
        tries = _center_tries(kits / "center_a", tmp_path / "center-home", evil["raw-rows"])
        operator = subprocess.run([bin_path("flwr"), "ls", CONNECTION, "--format", "json"], env=env,
                                  capture_output=True, text=True, cwd=home, timeout=120)
        inflight.join()
        for name, app in evil.items():
            submit(name, app, "collect")
    finally:
        group.stop()

    # --- the Control API: refused to a center's kit, served to the operator on the coordinator's loopback
    for what, r in tries.items():
        said = r.stdout[r.stdout.find("{"):] if "{" in r.stdout else "{}"
        answer = json.loads(said)
        assert answer.get("success") is False and "403 Forbidden" in answer.get("error-message", ""), \
            (what, r.stdout[-1500:], r.stderr[-1500:])
    assert str(runs["errors"]) in operator.stdout, operator.stdout[-1500:]
    assert "finished:completed" in str(statuses["errors"]["status"]).replace(" ", ""), statuses["errors"]

    # --- an error inside a handler: its category only; the same runtime answers the next message
    steps = {s["step"]: s["replies"] for s in json.loads((tmp_path / "run-errors" / "hostile.json").read_text())["steps"]}
    internal = [r for r in steps["bad-weights"].values() if "error" in r and r["error"].startswith(
        ERROR_CATEGORIES[ERR_INTERNAL])]
    assert len(internal) == 2, steps["bad-weights"]                 # the two training centers (external: refused)
    for r in internal:
        assert r["error"].split(";")[0] == f"{ERROR_CATEGORIES[ERR_INTERNAL]} (data or configuration)", r
    assert all("metrics" in r for r in steps["evaluate"].values()), steps["evaluate"]
    for s in sites:
        log = (logs / f"site-{s.name}.log").read_text()
        assert log.count("site runtime of") == 1, f"{s.name}'s runtime restarted"   # warm, one process

    # --- bundles the sites did not approve: refused everywhere, audited, nothing of the data left
    for name in evil:
        collected = json.loads((tmp_path / f"run-{name}" / "hostile.json").read_text())
        for step in collected["steps"]:
            assert len(step["replies"]) == len(sites)
            for r in step["replies"].values():
                assert set(r) == {"error"} and r["error"].startswith(ERROR_CATEGORIES[ERR_BUNDLE]), r
        for s in sites:
            lines = [ln for ln in read_audit(s / AUDIT_FILE) if ln["run_id"] == runs[name]]
            ins = [ln for ln in lines if ln["direction"] == "in"]
            outs = [ln for ln in lines if ln["direction"] == "out"]
            assert ins and len(outs) == len(ins), (name, s.name)
            for o in outs:                                          # the replay: every reply of the run
                assert o["decision"] == "refused" and o["error_code"] == ERR_BUNDLE, o
                assert o["records"] == {} and o["bytes"] == 0, o
    assert approved_sha not in {statuses[n]["fab-hash"] for n in evil}
    assert not any((s / LEDGER_FILE).exists() and str(runs[n]) in (s / LEDGER_FILE).read_text()
                   for s in sites for n in evil)
