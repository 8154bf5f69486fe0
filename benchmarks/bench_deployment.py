"""Where a deployment round's time goes, run as the hospitals run it: one phase at a time.

Seven sites (six training centers and the external one) each run ``flower-supernode --isolation process``
and the site's warm runtime of the installed ClientApp (``client/executor.py``).  By default the
federation is the production one: kits from ``newadj provision`` (each site's own key), the SuperLink
on the coordinator's loopback with TLS and SuperNode authentication, nginx in front passing only the
Fleet API (``server/ops/door.py``); ``--insecure`` runs a plaintext loopback SuperLink instead.  Every
message's timeline is logged (``NEWADJ_TIMING_LOG``: ``client/timing.py``, ``server/messaging.py``):

* **wait**: created at the server -> its task claimed by the site's runtime (the SuperNode's pull,
  the runtime's poll; before the warm runtime: Flower's start of a fresh ClientApp process);
* **pull**: claimed -> the message is in the runtime (its objects pulled from the SuperNode);
* **imports**, **site load**: the first message of a run only (torch, MONAI, the site's datasets);
* **prepare**: the policy's checks, the received weights loaded into the run's model;
* **compute**: the handler's work (validation, training);
* **return**: work done -> the reply arrived at the ServerApp.

Figures: the round wall time over the slowest center's compute in that round (median over rounds,
the first round, which imports and loads, left out as the "after the first message" figures are);
the per-message overhead (arrival - creation - compute) of every message after a center's first of
the run that neither imports nor loads the site (a warm runtime does both once per run); the runtime's resident memory (``rss-mb`` of every train reply) at round 2 and at the last.

Workloads: ``--workload tiny`` (default) is the test suite's cohort (7 sites of 8-12 patients) with its
overrides (``model=small``, 1 local epoch): Flower's fixed costs against very little compute;
``--workload cohort --cohort DIR`` is a cohort written by ``newadj synth`` and preprocessed, run with the
project's defaults (``model=linear``, 30 rounds x 5 local epochs unless overridden).

    python benchmarks/bench_deployment.py --rounds 5 --label tiny --out benchmarks/results/deployment_tiny.json
    python benchmarks/bench_deployment.py --workload cohort --cohort runs/full --label default \\
        --out benchmarks/results/deployment_default.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ("wait", "pull", "imports", "site load", "prepare", "compute", "return")


def build_tiny_cohort(work: Path) -> Path:
    from common.config import load_config, to_plain
    from common.data.cohort import discover_sites
    from common.preprocess.cache import ensure_caches
    from common.synth import generate_cohort
    from tests.conftest import LOCAL_OVERRIDES, write_site_policy

    cohort, cfg = work / "cohort", load_config(LOCAL_OVERRIDES)
    new = not (cohort / "_cohort.json").exists()
    if new:
        generate_cohort(cohort, seed=3, scale=0.06, cfg=to_plain(cfg.synth), progress=False, workers=2)
    for s in discover_sites(cohort):      # the test sites' policy, approving the bundle of the code being measured
        write_site_policy(s.path)
    if new:
        ensure_caches(discover_sites(cohort), cfg, progress=False)
    return cohort


def approve_everywhere(cohort: Path) -> None:
    """Each site of ``cohort`` approves the bundle of the code being measured (as its IT would)."""
    from client.bundles import approve
    from common.data.cohort import discover_sites
    from tests.conftest import project_bundle

    for s in discover_sites(cohort):
        approve(s.path, project_bundle()[0])


def start_federation(group, sites, work: Path, insecure: bool):
    """(the `flwr` connection name, its environment): a SuperLink and every site's processes."""
    import yaml

    from client.keys import keygen
    from server.ops.deploy import CONNECTION, start_secure_superlink, start_secure_supernode
    from server.ops.processes import free_port, start_superlink, start_supernode, write_flwr_config
    from server.ops.provision import COORDINATOR, provision

    logs, home = work / "logs", work / "flwr-home"
    work.mkdir(parents=True, exist_ok=True)
    if insecure:
        addrs, env = start_superlink(group, home, logs)
        for s in sites:
            start_supernode(group, env, addrs.fleet, {"data-dir": str(s.path), "role": s.role, "center-id": s.name},
                            logs / f"site-{s.name}.log")
        write_flwr_config(home, "loopback", addrs.control)
        return "loopback", env
    fed = {"federation": "bench", "superlink": {"address": "127.0.0.1", "port": free_port(), "control_port": free_port(),
                                                "bind_host": "127.0.0.1", "dns_names": ["localhost"],
                                                "ip_addresses": ["127.0.0.1"]},
           "centers": [{"center_id": s.name, "role": s.role} for s in sites]}
    (work / "federation.yaml").write_text(yaml.safe_dump(fed))
    pubs = work / "public-keys"
    pubs.mkdir(exist_ok=True)
    for s in sites:
        _priv, pub = keygen(work / "site-keys" / s.name, s.name, force=True)
        shutil.copy(pub, pubs / pub.name)
    provision(work / "federation.yaml", work / "kits", public_keys=pubs)
    _addrs, env = start_secure_superlink(group, work / "kits" / COORDINATOR, home, logs)
    for s in sites:
        start_secure_supernode(group, env, work / "kits" / s.name, s.path, logs / f"site-{s.name}.log",
                               key=work / "site-keys" / s.name / "supernode.key")
    return CONNECTION, env


def run(work: Path, workload: str, cohort: Path | None, rounds: int | None, extra: list[str], insecure: bool,
        n_sites: int | None = None) -> dict:
    import os

    from common.config import join_overrides
    from common.data.cohort import discover_sites
    from server.ops.processes import ProcessGroup, flwr_run, flwr_status
    from tests.conftest import TEST_OVERRIDES

    if workload == "tiny":
        cohort, overrides = build_tiny_cohort(work), list(TEST_OVERRIDES)
    else:
        approve_everywhere(cohort)
        overrides = []
    if rounds:
        overrides.append(f"federation.num_rounds={rounds}")
    overrides += extra
    sites = discover_sites(cohort)
    if n_sites:     # the first n-1 training centers and the external one (less contention for the same cores)
        sites = [s for s in sites if s.role != "external"][:n_sites - 1] + [s for s in sites if s.role == "external"]
    timing = work / f"timing-{int(time.time())}"
    os.environ["NEWADJ_TIMING_LOG"] = str(timing)          # inherited by the SuperLink, the sites, the apps
    run_dir = timing / "run"
    group = ProcessGroup()
    t0 = time.time()
    try:
        connection, env = start_federation(group, sites, timing, insecure)
        run_id = flwr_run(connection, env, {"run-dir": str(run_dir), "overrides": join_overrides(overrides),
                                            "expected-nodes": len(sites)}, timing / "logs" / "flwr-run.log",
                          timeout=5400)
        status = flwr_status(connection, env, run_id)
    finally:
        group.stop()
        os.environ.pop("NEWADJ_TIMING_LOG", None)
    if "finished:completed" not in str(status.get("status", "")).replace(" ", ""):
        raise SystemExit(f"run failed: {status}; logs in {timing / 'logs'}")
    res = analyse(timing, run_dir, time.time() - t0)
    res.update({"workload": workload, "cohort": str(cohort), "overrides": overrides,
                "deployment": "plaintext loopback" if insecure else "TLS + SuperNode authentication + nginx door",
                "sites": len(sites)})
    return res


def _assign_secagg_stages(rows: list[dict]) -> None:
    """Under SecAgg+ (Flower's legacy workflow) only the stage that trains carries the round number; the
    other stages (setup and key sharing before it, unmasking after it) and the validation message that
    follows each round arrive with round 0. Give each of them its round, per center in time order:
    what precedes a round's training stage belongs to that round, and the one unmasking stage and the
    one validation right after it belong to it too. The first query and the final report stay at 0.
    Without SecAgg+ (no round-0 training message) nothing changes."""
    if not any(x["type"] == "train" and x["round"] == 0 for x in rows):
        return
    for center in {x["center"] for x in rows}:
        mine = sorted((x for x in rows if x["center"] == center), key=lambda x: x["created"])
        pending, current, after = [], 0, []   # after: what may still follow this round's training stage
        for x in mine:
            if x["round"] > 0:
                for y in pending:
                    y["round"] = x["round"]
                pending, current, after = [], x["round"], ["train", "evaluate"]   # unmasking, then validation
            elif after and x["type"] == after[0]:
                x["round"] = current
                after.pop(0)
            elif x["type"] in ("train", "evaluate"):
                pending.append(x)


def message_rows(timing: Path) -> list[dict]:
    """One row per message: its center, type, round, and seconds per phase (a mark a message did not pass,
    such as the imports of a warm runtime, counts zero)."""
    server = [json.loads(ln) for ln in (timing / "server.jsonl").read_text().splitlines()]
    arrived = {(round(s["created"], 6)): s["arrived"] for s in server}
    rows = []
    for f in sorted(timing.glob("*.jsonl")):
        if f.name == "server.jsonl":
            continue
        for ln in f.read_text().splitlines():
            e = json.loads(ln)
            a = arrived.get(round(e["created"], 6))
            if a is None:
                continue
            imports_done = e.get("handler_imports_done", e.get("imports_done"))
            marks = [e["created"], e["process_start"], e.get("app_import_start"), imports_done,
                     e.get("site_loaded"), e.get("model_ready"), e["done"], a]
            for i in range(1, len(marks)):
                if marks[i] is None or marks[i] < marks[i - 1]:
                    marks[i] = marks[i - 1]
            rows.append({"center": e["center"], "type": e["type"], "round": e.get("round", 0), "created": e["created"],
                         "pid": e.get("pid"), **{p: marks[i + 1] - marks[i] for i, p in enumerate(PHASES)}})
    _assign_secagg_stages(rows)
    return rows


def analyse(timing: Path, run_dir: Path, wall: float) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rows = message_rows(timing)
    per_round = []
    for h in metrics["history"]:
        r = h["round"]
        mine = [x for x in rows if x["round"] == r]
        compute: dict[str, float] = {}
        for x in mine:
            compute[x["center"]] = compute.get(x["center"], 0.0) + x["compute"]
        slowest = max(compute.values()) if compute else float("nan")
        per_round.append({"round": r, "wall": h["seconds"], "slowest_compute": slowest,
                          "ratio": h["seconds"] / slowest if slowest else None, "messages": len(mine),
                          "bytes_sent": h["bytes_sent"], "bytes_received": h["bytes_received"],
                          "runtime_rss_mb": h.get("client_rss_mb", {})})
    first = {}
    for x in sorted(rows, key=lambda x: x["created"]):
        first.setdefault(x["center"], x["created"])
    # a warm runtime's messages: after the center's first, and neither importing nor loading the site (the run's
    # first train or evaluate message does both once; Flower's per-message ClientApp processes every time)
    later = [x for x in rows if x["created"] > first[x["center"]] and x["imports"] + x["site load"] == 0]
    overhead = [sum(x[p] for p in PHASES) - x["compute"] for x in later]
    n_train = sum(1 for c in metrics["centers"].values() if c["role"] != "external")
    model = metrics["communication"]["model_bytes_fp32"]
    after_first = [r for r in per_round if r["round"] > 1 and r["ratio"]]
    rss = [r["runtime_rss_mb"] for r in per_round if r["runtime_rss_mb"]]
    memory = None
    if len(rss) >= 2:
        second, last = rss[1], rss[-1]
        growth = {c: last[c] / second[c] - 1 for c in last if c in second}
        memory = {"round_2_mb": second, "last_round_mb": last, "last_round": per_round[-1]["round"],
                  "max_growth": max(growth.values()) if growth else None}
    return {"wall_seconds": wall, "rounds": per_round,
            "phase_median_seconds": {t: {p: statistics.median([x[p] for x in later if x["type"] == t])
                                         for p in PHASES} for t in sorted({x["type"] for x in later})},
            "per_message_overhead_seconds": {"median": statistics.median(overhead), "p90": sorted(overhead)[
                int(0.9 * (len(overhead) - 1))], "messages": len(overhead)} if overhead else None,
            "processes_per_center": {c: len({x["pid"] for x in rows if x["center"] == c}) for c in first},
            "messages_per_round_per_center": statistics.median(
                [sum(1 for x in rows if x["round"] == r["round"] and x["center"] == c)
                 for r in per_round for c in first]),
            "bytes_per_round_over_weights": statistics.median(
                [r["bytes_sent"] / (model * n_train) for r in per_round]),
            "bytes_back_per_round_over_weights": statistics.median(
                [r["bytes_received"] / (model * n_train) for r in per_round]),
            "median_ratio": statistics.median([r["ratio"] for r in after_first]) if after_first else None,
            "runtime_memory": memory, "messages": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=("tiny", "cohort"), default="tiny")
    ap.add_argument("--cohort", type=Path, default=None, help="with --workload cohort: a preprocessed cohort folder")
    ap.add_argument("--rounds", type=int, default=None, help="federation.num_rounds (default: the workload's)")
    ap.add_argument("--insecure", action="store_true", help="a plaintext loopback SuperLink, no kits, no door")
    ap.add_argument("--sites", type=int, default=None, help="only this many sites (default: all seven)")
    ap.add_argument("--work", default="runs/bench-deployment")
    ap.add_argument("--label", default="now")
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*", help="extra run overrides, e.g. federation.secure_aggregation.enabled=true")
    ap.add_argument("--analyse", type=Path, default=None, help="re-analyse the timing folder of an earlier run")
    args = ap.parse_args(argv)
    if args.workload == "cohort" and not args.cohort:
        ap.error("--workload cohort needs --cohort DIR")
    if args.analyse:
        res = analyse(args.analyse, args.analyse / "run", float("nan"))
    else:
        res = run(Path(args.work), args.workload, args.cohort, args.rounds, args.overrides, args.insecure, args.sites)
    res["label"] = args.label
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    ov = res["per_message_overhead_seconds"] or {}
    print(f"{args.label}: round wall / slowest center's compute, median after round 1 = {res['median_ratio']:.2f}x; "
          f"per-message overhead after a center's first message: median {ov.get('median', float('nan')):.2f} s, "
          f"p90 {ov.get('p90', float('nan')):.2f} s ({ov.get('messages')} messages)")
    print(f"  processes per center: {sorted(set(res['processes_per_center'].values()))}; messages per center per "
          f"round {res['messages_per_round_per_center']}; bytes out / back per round "
          f"{res['bytes_per_round_over_weights']:.2f}x / {res['bytes_back_per_round_over_weights']:.2f}x the weights "
          "per center")
    if res["runtime_memory"]:
        m = res["runtime_memory"]
        print(f"  runtime memory: largest growth from round 2 to round {m['last_round']}: {100 * m['max_growth']:+.1f} %")
    for r in res["rounds"]:
        print(f"  round {r['round']}: {r['wall']:.1f} s wall, slowest compute {r['slowest_compute']:.2f} s")
    print(f"  {'message':<10}" + "".join(f"{p:>12}" for p in PHASES))
    for t, ph in res["phase_median_seconds"].items():
        print(f"  {t:<10}" + "".join(f"{ph[p]:>11.2f}s" for p in PHASES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
