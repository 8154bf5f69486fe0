"""Faults with the real processes on loopback: one flower-superlink, seven flower-supernode processes.

One 3-round run carries four faults at once (each is asserted on its own):

* center_b's SuperNode (and its ClientApp) is SIGKILLed while it trains in round 1, and
  restarted once round 1 is over: the round completes with the others, the death is
  logged, and center_b trains again in a later round;
* center_c is slow in round 1 (it sleeps longer than the round timeout): the round does
  not wait past ``federation.round_timeout``;
* center_d has a corrupt cached MRI array: the sample's MRI is skipped and counted, the
  center reports the count, the run goes on;
* center_e sends a NaN update in round 2: the server rejects it with a log line naming it.

A second run kills the server (the SuperLink and its ServerApp) after round 1 and resumes it.
"""
from __future__ import annotations

import json
import shutil
import signal
import threading
import time

import psutil
import pytest

from client.audit import AUDIT_FILE, read_audit
from client.fault_injection import ENV as FAULTS_ENV
from common.data.cohort import discover_sites
from server.messaging import NO_REPLY
from server.ops.processes import (ProcessGroup, flwr_run, flwr_status, free_port, start_superlink, start_supernode,
                                 write_flwr_config)
from server.ops.simulation import run_simulation
from tests.conftest import TEST_OVERRIDES, max_abs_diff, round_weights
from tests.test_policy_audit import _copy_cohort

pytestmark = [pytest.mark.deployment, pytest.mark.slow]

# a phase of 6 ClientApp processes (each imports torch and MONAI, loads its site, trains) took up to ~60 s
# on a loaded 2-core CI machine and lost replies at a 60 s timeout: 150 s bounds a phase with room to spare
ROUND_TIMEOUT = 150
SLOW_SECONDS = 200   # > ROUND_TIMEOUT
OVERRIDES = TEST_OVERRIDES + ["federation.num_rounds=3", f"federation.round_timeout={ROUND_TIMEOUT}",
                              "federation.query_timeout=60"]
RESUME_OVERRIDES = TEST_OVERRIDES + ["federation.num_rounds=3", "federation.round_timeout=300"]
# one torch thread in both runs: a simulation worker and a SuperNode otherwise differ in threads (and last digits)


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and everything it started (a machine that dies takes its ClientApp with it)."""
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def _trains_started(site) -> int:
    f = site / AUDIT_FILE
    return sum(1 for ln in read_audit(f) if ln["direction"] == "in" and ln["message_type"] == "train") \
        if f.exists() else 0


def test_dead_slow_corrupt_and_hostile_centers_do_not_stop_the_run(tiny_cohort, tmp_path):
    cohort = _copy_cohort(tiny_cohort, tmp_path / "cohort")
    sites = {s.name: s for s in discover_sites(cohort)}
    assert len(sites) == 7
    # center_d: one cached MRI array of a training patient is garbage
    manifest = json.loads((sites["center_d"].path / ".newadj-cache" / "manifest.json").read_text())
    victim = next(p for p in manifest["patients"] if p["split"] == "train" and p["mri"])
    (sites["center_d"].path / ".newadj-cache" / victim["mri"]).write_bytes(b"\x00garbage" * 64)

    run_dir, logs, home = tmp_path / "run", tmp_path / "logs", tmp_path / "flwr-home"
    group = ProcessGroup()
    result: dict = {}
    try:
        addrs, env = start_superlink(group, home, logs)
        node_env = {**env, FAULTS_ENV: f"center_c:delay={SLOW_SECONDS}@1;center_e:nan@2"}

        def node(s, tag=""):
            return start_supernode(group, node_env, addrs.fleet,
                                   {"data-dir": str(s.path), "role": s.role, "center-id": s.name},
                                   logs / f"supernode-{s.name}{tag}.log")

        nodes = {name: node(s) for name, s in sites.items()}
        write_flwr_config(home, "loopback", addrs.control)
        runner = threading.Thread(target=lambda: result.update(run_id=flwr_run(
            "loopback", env, {"run-dir": str(run_dir), "overrides": " ".join(OVERRIDES),
                              "expected-nodes": len(sites)}, logs / "flwr-run.log", timeout=1200)))
        runner.start()
        # center_b dies while it trains in round 1 ...
        _wait(lambda: _trains_started(sites["center_b"].path) >= 1, 300, "center_b to start training")
        time.sleep(1.0)
        _kill_tree(nodes["center_b"].pid)
        killed_at = time.monotonic()
        # ... and comes back once round 1 is over
        _wait(lambda: (run_dir / "checkpoints" / "round_001.json").exists(), 600, "round 1 to end")
        round1_wall = time.monotonic() - killed_at
        node(sites["center_b"], "-restarted")
        runner.join(timeout=1500)
        assert not runner.is_alive(), "the run did not finish"
        assert result.get("run_id") is not None, (logs / "flwr-run.log").read_text()[-3000:]
        status = flwr_status("loopback", env, result["run_id"])
        assert all(p.poll() is None for name, p in nodes.items() if name != "center_b")
    finally:
        group.stop()
    assert group.alive() == []
    assert "finished:completed" in str(status.get("status", "")).replace(" ", ""), status
    m = json.loads((run_dir / "metrics.json").read_text())
    h1, h2, h3 = m["history"]
    server_log = (logs / "flwr-run.log").read_text()

    # dead center: round 1 completes without it, the death is logged, it trains again later
    assert "center_b" in h1["failures"] and "center_b" not in h1["client_train_seconds"]
    assert h1["n_train_replies"] >= int(m["config"]["federation"]["min_train_nodes"])
    assert "round 1: center center_b sent no reply" in server_log or "round 1: center center_b failed" in server_log
    assert "center_b" in h3["client_train_seconds"], "center_b did not rejoin after its restart"
    assert "center center_b (train) rejoined as node" in server_log

    # slow center: the training phase of round 1 ends at the timeout, not when center_c wakes up
    assert h1["failures"].get("center_c", "").startswith(NO_REPLY)
    assert h1["train_phase_seconds"] < ROUND_TIMEOUT + 15 < SLOW_SECONDS
    assert round1_wall < 2 * ROUND_TIMEOUT + 60          # train + validation phases, each bounded
    # its stale messages expire (ttl = round timeout) instead of queueing: it is back within two rounds
    assert "center_c" in h2["client_train_seconds"] or "center_c" in h3["client_train_seconds"]

    # corrupt file: skipped, counted and reported by center_d every round it trained
    trained = [h for h in (h1, h2, h3) if "center_d" in h["client_train_seconds"]]
    assert trained and all(h["n_skipped_train"].get("center_d") == 1 for h in trained)

    # hostile update: rejected, named, and left out of the aggregate
    assert h2["rejected_updates"].get("center_e", "").endswith("NaN/Inf value(s)")
    assert h2["failures"]["center_e"].startswith("update rejected:")
    assert "round 2: rejected the update of center center_e" in server_log
    assert "center_e" not in h2["update_norms"]
    assert m["status"] == "finished" and (run_dir / "best_model.pt").exists()


def _node_errors(logs) -> str:
    """The ERROR lines of every SuperNode log (why a reply was lost: a failed push, a dead ClientApp)."""
    out = []
    for f in sorted(logs.glob("supernode-*.log")):
        bad = [ln for ln in f.read_text(errors="replace").splitlines() if "ERROR" in ln or "Traceback" in ln]
        out += [f"{f.name}: {ln}" for ln in bad[-5:]]
    return "\n".join(out) or "(no ERROR line in any SuperNode log)"


RESUME_SITES = ("center_a", "center_b", "center_c", "external")   # 4 SuperNodes: a restart, not a load test


def test_server_killed_mid_run_resumes_to_the_uninterrupted_result(tiny_cohort, tmp_path):
    """The SuperLink (and the ServerApp it runs) is SIGKILLed after round 1; restarted on the same port
    and state database, ``resume`` finishes the run; the SuperNodes are never restarted.  The final
    weights match an uninterrupted run with the same seed (a simulation) to 1e-6: the final ones, or those
    of the last round up to which every center trained in both runs.

    Three training centers and the external one: the SQLite-backed SuperLink (the state a restart
    needs) lost pushes with "database is locked" when seven SuperNodes' ClientApps loaded a 2-core CI
    machine; what is tested here is the restart and the resume, which four nodes show as well."""
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    for name in RESUME_SITES:
        shutil.copytree(tiny_cohort / name, cohort / name, ignore=shutil.ignore_patterns(AUDIT_FILE))
    n_train = len(RESUME_SITES) - 1
    ref = run_simulation(cohort, tmp_path / "ref", RESUME_OVERRIDES, stream=False)

    sites = discover_sites(cohort)
    run_dir, logs, home = tmp_path / "run", tmp_path / "logs", tmp_path / "flwr-home"
    port, db = free_port(), tmp_path / "superlink-state.db"
    group = ProcessGroup()
    run_config = {"run-dir": str(run_dir), "overrides": " ".join(RESUME_OVERRIDES), "expected-nodes": len(sites)}
    try:
        addrs, env = start_superlink(group, home, logs, database=str(db), port=port)
        server = group.procs[-1]
        nodes = [start_supernode(group, env, addrs.fleet, {"data-dir": str(s.path), "role": s.role,
                                                           "center-id": s.name}, logs / f"supernode-{s.name}.log")
                 for s in sites]
        write_flwr_config(home, "loopback", addrs.control)
        first = threading.Thread(target=flwr_run, daemon=True,
                                 args=("loopback", env, run_config, logs / "flwr-run-1.log"), kwargs={"timeout": 900})
        first.start()
        _wait(lambda: (run_dir / "checkpoints" / "round_001.json").exists(), 600, "round 1 to end")
        _kill_tree(server.pid)                                   # the server machine dies
        first.join(timeout=120)
        assert not (run_dir / "metrics.json").exists()
        assert not (run_dir / "checkpoints" / "round_003.pt").exists(), "the run was not interrupted"
        assert all(p.poll() is None for p in nodes), "a SuperNode died with the server"

        start_superlink(group, home, logs, database=str(db), port=port)   # the operator restarts it
        run_id = flwr_run("loopback", env, {**run_config, "resume": True}, logs / "flwr-run-2.log", timeout=900)
        assert run_id is not None, (logs / "flwr-run-2.log").read_text()[-3000:]
        status = flwr_status("loopback", env, run_id)
        assert all(p.poll() is None for p in nodes), "a SuperNode died during the resumed run"
    finally:
        group.stop()
    assert group.alive() == []
    assert "finished:completed" in str(status.get("status", "")).replace(" ", ""), status
    assert "resuming" in (logs / "flwr-run-2.log").read_text()
    m = json.loads((run_dir / "metrics.json").read_text())
    assert [h["round"] for h in m["history"]] == [1, 2, 3]
    assert all(h["n_train_replies"] == n_train and not h["failures"] for h in ref["history"])
    # Weights are compared up to the last round before which every center trained in every round:
    # a reply lost later (seen: Flower's SQLite state answered a push with "database is locked")
    # is a center failure the run survives -- it is recorded -- but the two runs then differ by design.
    full = 0
    for h in m["history"]:
        if h["n_train_replies"] != n_train or h["failures"]:
            break
        full = h["round"]
    assert full >= 2, (f"no resumed round with every center to compare: {[h['failures'] for h in m['history']]}\n"
                       f"{_node_errors(logs)}")
    diff = max_abs_diff(round_weights(tmp_path / "ref", full), round_weights(run_dir, full))
    assert diff <= 1e-6, f"round {full}: resumed deployment differs from the uninterrupted run by {diff}"
    if full == 3:
        assert m["selected_round"] == ref["selected_round"]
        ea, eb = ref["external"]["centers"]["external"], m["external"]["centers"]["external"]
        assert eb.get("auc") == pytest.approx(ea.get("auc"), abs=1e-6)
