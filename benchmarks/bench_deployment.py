"""Where a deployment round's time goes: a loopback SuperLink and seven SuperNodes, one phase at a time.

Runs the tiny test cohort (7 sites, 8-12 patients each) through real ``flower-superlink`` and
``flower-supernode`` processes with ``NEWADJ_TIMING_LOG`` set in their environment, so that
every ClientApp process logs when its message was created at the server, when the process
started, when its imports and its site's data were done, and when its work was done; the
ServerApp logs when each reply arrived (``client/timing.py``, ``server/messaging.py``).
Per message and center:

* **wait+spawn**: created at the server -> the ClientApp process started (the SuperNode's pull
  interval, SuperExec's task poll, the process start);
* **flower start**: process start -> our module's import begins (Flower's own start-up);
* **imports**: our module's imports, then the handler's (torch, ...; imported lazily since the
  ClientApp's module stopped importing them);
* **site load**: the site's configuration, cache check and datasets;
* **model build**: the model from the run's config and the received weights (building it imports
  MONAI, whose package imports all its sub-packages: ~2.7 s of CPU);
* **compute**: the handler's work (evaluate, train);
* **return**: work done -> the reply arrived at the ServerApp (push, the server's pull interval).

Round wall time divided by the slowest center's compute in that round is the overhead ratio.

    python benchmarks/bench_deployment.py --rounds 3 --label after --out benchmarks/results/deployment_after.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ("wait+spawn", "flower start", "imports", "site load", "model build", "compute", "return")


def build_cohort(work: Path) -> Path:
    from common.config import load_config, to_plain
    from common.data.cohort import discover_sites
    from common.preprocess.cache import ensure_caches
    from common.synth import generate_cohort
    from tests.conftest import LOCAL_OVERRIDES, write_site_policy

    cohort = work / "cohort"
    if not (cohort / "_cohort.json").exists():
        cfg = load_config(LOCAL_OVERRIDES)
        generate_cohort(cohort, seed=3, scale=0.06, cfg=to_plain(cfg.synth), progress=False, workers=2)
        for s in discover_sites(cohort):
            write_site_policy(s.path)
        ensure_caches(discover_sites(cohort), cfg, progress=False)
    for s in discover_sites(cohort):      # each site approves the bundle of the code being measured
        write_site_policy(s.path)
    return cohort


def run(work: Path, rounds: int, extra: list[str]) -> dict:
    import os

    from common.config import join_overrides
    from common.data.cohort import discover_sites
    from server.ops.processes import ProcessGroup, flwr_run, flwr_status, start_superlink, start_supernode, \
        write_flwr_config
    from tests.conftest import TEST_OVERRIDES

    cohort = build_cohort(work)
    sites = discover_sites(cohort)
    timing = work / f"timing-{int(time.time())}"
    os.environ["NEWADJ_TIMING_LOG"] = str(timing)          # inherited by the SuperLink, SuperNodes, apps
    run_dir, home, logs = timing / "run", timing / "flwr-home", timing / "logs"
    group = ProcessGroup()
    t0 = time.time()
    try:
        addrs, env = start_superlink(group, home, logs)
        for s in sites:
            start_supernode(group, env, addrs.fleet, {"data-dir": str(s.path), "role": s.role, "center-id": s.name},
                            logs / f"supernode-{s.name}.log")
        write_flwr_config(home, "loopback", addrs.control)
        overrides = TEST_OVERRIDES + [f"federation.num_rounds={rounds}", *extra]
        run_id = flwr_run("loopback", env, {"run-dir": str(run_dir), "overrides": join_overrides(overrides),
                                            "expected-nodes": len(sites)}, logs / "flwr-run.log", timeout=1800)
        status = flwr_status("loopback", env, run_id)
    finally:
        group.stop()
        os.environ.pop("NEWADJ_TIMING_LOG", None)
    if "finished:completed" not in str(status.get("status", "")).replace(" ", ""):
        raise SystemExit(f"run failed: {status}; logs in {logs}")
    return analyse(timing, run_dir, time.time() - t0)


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


def analyse(timing: Path, run_dir: Path, wall: float) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    server = [json.loads(ln) for ln in (timing / "server.jsonl").read_text().splitlines()]
    arrived = {(round(s["created"], 6)): s["arrived"] for s in server}
    rows = []
    for f in sorted(timing.glob("*.jsonl")):
        if f.name == "server.jsonl":
            continue
        for ln in f.read_text().splitlines():
            e = json.loads(ln)
            a = arrived.get(round(e["created"], 6))
            # imports: our module's and then the handler's (torch...: marked since the lazy imports)
            imports_done = e.get("handler_imports_done", e.get("imports_done"))
            site_loaded = e.get("site_loaded", imports_done)
            marks = [e["created"], e["process_start"], e.get("app_import_start"), imports_done,
                     site_loaded, e.get("model_ready", site_loaded), e["done"], a]
            if a is None:
                continue
            for i in range(1, len(marks)):      # a warm runtime passes a mark once (imports, the site's load)
                if marks[i] is None or marks[i] < marks[i - 1]:
                    marks[i] = marks[i - 1]
            rows.append({"center": e["center"], "type": e["type"], "round": e.get("round", 0), "created": e["created"],
                         **{p: marks[i + 1] - marks[i] for i, p in enumerate(PHASES)}})
    _assign_secagg_stages(rows)
    per_round = []
    for h in metrics["history"]:
        r = h["round"]
        mine = [x for x in rows if x["round"] == r]
        compute = {}
        for x in mine:
            compute[x["center"]] = compute.get(x["center"], 0.0) + x["compute"]
        slowest = max(compute.values()) if compute else float("nan")
        per_round.append({"round": r, "wall": h["seconds"], "slowest_compute": slowest,
                          "ratio": h["seconds"] / slowest if slowest else None, "messages": len(mine),
                          "bytes_sent": h["bytes_sent"], "bytes_received": h["bytes_received"]})
    n_train = sum(1 for c in metrics["centers"].values() if c["role"] != "external")
    model = metrics["communication"]["model_bytes_fp32"]
    return {"wall_seconds": wall, "rounds": per_round,
            "phase_median_seconds": {t: {p: statistics.median([x[p] for x in rows if x["type"] == t])
                                         for p in PHASES} for t in sorted({x["type"] for x in rows})},
            "messages_per_round_per_center": statistics.median(
                [sum(1 for x in rows if x["round"] == r["round"] and x["center"] == c)
                 for r in per_round for c in {x["center"] for x in rows}]),
            "bytes_per_round_over_weights": statistics.median(
                [r["bytes_sent"] / (model * n_train) for r in per_round]),
            "bytes_back_per_round_over_weights": statistics.median(
                [r["bytes_received"] / (model * n_train) for r in per_round]),
            "median_ratio": statistics.median([r["ratio"] for r in per_round if r["ratio"]]),
            "messages": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default="runs/bench-deployment")
    ap.add_argument("--label", default="now")
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*", help="extra run overrides, e.g. federation.secure_aggregation.enabled=true")
    ap.add_argument("--analyse", type=Path, default=None, help="re-analyse the timing folder of an earlier run")
    args = ap.parse_args(argv)
    if args.analyse:
        res = analyse(args.analyse, args.analyse / "run", float("nan"))
    else:
        res = run(Path(args.work), args.rounds, args.overrides)
    res["label"] = args.label
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"{args.label}: median round / slowest center's compute = {res['median_ratio']:.1f}x; "
          f"messages per center per round {res['messages_per_round_per_center']}; bytes out per round "
          f"{res['bytes_per_round_over_weights']:.2f}x and back {res['bytes_back_per_round_over_weights']:.2f}x "
          f"the weights per center")
    for r in res["rounds"]:
        print(f"  round {r['round']}: {r['wall']:.1f} s wall, slowest compute {r['slowest_compute']:.2f} s")
    print(f"  {'message':<10}" + "".join(f"{p:>14}" for p in PHASES))
    for t, ph in res["phase_median_seconds"].items():
        print(f"  {t:<10}" + "".join(f"{ph[p]:>13.2f}s" for p in PHASES))
    print("  (train: the validation of the previous round's model, then local training)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
