"""The loopback federation driven as its operators would: only `newadj` commands, in the order of deploy/OPERATOR.md.

Each site makes its key (`newadj site keygen`), the coordinating center provisions the kits (`newadj provision`),
writes the app bundle (`newadj bundle`) and starts the SuperLink and its door (`newadj server start`); each site
approves the bundle (`newadj site approve`) and starts (`newadj site start`); the coordinator runs the federation
(`newadj run`).  Every command is a subprocess of the installed `newadj`; the script only waits for the long-lived
ones and stops them at the end.  The tiny test cohort (7 sites) and the test suite's overrides.

    python benchmarks/bench_operator_flow.py --work /tmp/operator --out benchmarks/results/operator_flow.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def newadj(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """One `newadj` command, as an operator types it."""
    exe = Path(sys.executable).parent / "newadj"
    r = subprocess.run([str(exe), *args], capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise SystemExit(f"newadj {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def background(log: Path, *args: str) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "newadj"
    return subprocess.Popen([str(exe), *args], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for(path: Path, text: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text():
            return
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args} exited ({proc.returncode}):\n{path.read_text()[-3000:]}")
        time.sleep(0.5)
    raise SystemExit(f"{path}: no `{text}` after {timeout:.0f}s:\n{path.read_text()[-3000:]}")


def operator_flow(work: Path, overrides: list[str]) -> dict:
    from benchmarks.bench_deployment import build_tiny_cohort
    from common.data.cohort import discover_sites
    from server.ops.processes import free_port

    shutil.rmtree(work / "flow", ignore_errors=True)
    flow = work / "flow"
    flow.mkdir(parents=True)
    sites = discover_sites(build_tiny_cohort(work))
    for s in sites:                                   # the sites' folders as the hospitals keep them
        shutil.copytree(s.path, flow / "sites" / s.name)
    t0 = time.monotonic()
    steps: dict[str, float] = {}
    # 0. each site: its own key
    for s in sites:
        newadj("site", "keygen", "--center", s.name, "--out", str(flow / "site-keys" / s.name))
        (flow / "received").mkdir(exist_ok=True)
        shutil.copy(flow / "site-keys" / s.name / f"{s.name}.pub", flow / "received" / f"{s.name}.pub")
    # 1. the coordinating center: the federation file, the kits, the bundle
    fed = {"federation": "operator-flow",
           "superlink": {"address": "127.0.0.1", "port": free_port(), "control_port": free_port(),
                         "bind_host": "127.0.0.1", "dns_names": ["localhost"], "ip_addresses": ["127.0.0.1"]},
           "centers": [{"center_id": s.name, "role": s.role} for s in sites]}
    (flow / "federation.yaml").write_text(yaml.safe_dump(fed))
    newadj("provision", str(flow / "federation.yaml"), "--out", str(flow / "kits"), "--public-keys",
           str(flow / "received"))
    newadj("bundle", "--out", str(flow / "newadj.fab"))
    steps["keys, kits and bundle"] = time.monotonic() - t0
    procs: list[subprocess.Popen] = []
    try:
        # 2. the coordinating center: the SuperLink and its door
        server = background(flow / "server.log", "server", "start", "--kit", str(flow / "kits" / "coordinator"),
                            "--database", ":flwr-in-memory:")
        procs.append(server)
        wait_for(flow / "server.log", "center(s) authorized", 120, server)
        # 3. each site: approve the bundle, start
        for s in sites:
            newadj("site", "approve", "--site", str(flow / "sites" / s.name), str(flow / "newadj.fab"))
            procs.append(background(flow / f"site-{s.name}.log", "site", "start", "--kit", str(flow / "kits" / s.name),
                                    "--key", str(flow / "site-keys" / s.name / "supernode.key"),
                                    "--data", str(flow / "sites" / s.name), "--runtime-port", str(free_port())))
        steps["servers and sites started"] = time.monotonic() - t0
        # 4. the coordinating center: the run
        t_run = time.monotonic()
        run = newadj("run", "--kit", str(flow / "kits" / "coordinator"), "--out", str(flow / "run"), "--quiet",
                     *overrides, check=False, timeout=1800)
        steps["newadj run"] = time.monotonic() - t_run
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    if run.returncode != 0:
        raise SystemExit(f"newadj run failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    metrics = json.loads((flow / "run" / "metrics.json").read_text())
    return {"steps_seconds": steps, "rounds": [{"round": h["round"], "seconds": h["seconds"]} for h in metrics["history"]],
            "external_auc": (metrics["external"].get("pooled") or {}).get("auc"), "sites": len(sites),
            "submitted": next((ln for ln in run.stdout.splitlines() if "submitting the app bundle" in ln), None)}


def main(argv=None) -> int:
    from tests.conftest import TEST_OVERRIDES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/bench-operator")
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*", help="run overrides (default: the test suite's)")
    args = ap.parse_args(argv)
    res = operator_flow(Path(args.work).resolve(), args.overrides or list(TEST_OVERRIDES))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
