"""Scale benchmarks of the federation (issue: reliability under faults, bad input and scale).

``centers``: the real federation (``newadj simulate``: Flower simulation, our
ServerApp and ClientApp) with N virtual training centers on the small model.
Virtual center i is a copy of training site ``i mod 6`` of a tiny synthetic
cohort -- data files symlinked, preprocessing cache copied, its own
``center_id`` -- so that 300 centers cost seconds to build.  Per N it reports,
from the run's own history: server RSS after each round, time spent in the
strategy's aggregation, the round's wall time.

    python benchmarks/bench_scale.py centers --n 6 60 300 --out benchmarks/results/scale_centers.json
    python benchmarks/bench_scale.py plot benchmarks/results/scale_centers*.json

``long``: R rounds of the demo federation (``conf/demo``): server RSS per
round (ServerApp process) and each center's ClientApp RSS per round (reported
in its train reply), plotted to a PNG, with the growth between the first and
the last tenth of the run.

    python benchmarks/bench_scale.py long --rounds 50 --out benchmarks/results/long_run.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMALL = ["model=small", "train.epochs=1", "train.n_boot=20", "train.min_patients=3", "federation.local_epochs=1",
         "federation.histogram_bins=20", "federation.min_available_nodes=1"]


def base_cohort(work: Path) -> Path:
    from common.data.cohort import discover_sites
    from common.preprocess.cache import ensure_caches
    from common.config import load_config, to_plain
    from common.synth import generate_cohort

    base = work / "base"
    if not (base / "external" / ".newadj-cache" / "manifest.json").exists():
        cfg = load_config(SMALL)
        generate_cohort(base, seed=3, scale=0.06, cfg=to_plain(cfg.synth), progress=False)
        ensure_caches(discover_sites(base), cfg, progress=False)
    return base


def virtual_cohort(base: Path, n: int, out: Path) -> Path:
    """n training centers (copies of the base's training sites) plus the base's external center."""
    from common.data.cohort import discover_sites

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    train = [s for s in discover_sites(base) if s.role == "train"]
    for i in range(n):
        src = train[i % len(train)].path
        dst = out / f"vc{i:04d}"
        dst.mkdir()
        for name in ("clinical.csv", "genomics.csv", "mri", "pathology"):
            if (src / name).exists():
                os.symlink(src / name, dst / name)
        shutil.copytree(src / ".newadj-cache", dst / ".newadj-cache")
        (dst / "site.toml").write_text(f'center_id = "vc{i:04d}"\ndisplay_name = "virtual center {i}"\n'
                                       f'role = "train"\n')
    shutil.copytree(base / "external", out / "zz_external", symlinks=True)
    return out


def _mb(x):
    return None if x is None else round(float(x), 1)


def bench_centers(args) -> dict:
    from server.ops.simulation import RunFailed, run_simulation

    work = Path(args.work)
    base = base_cohort(work)
    rows = []
    for n in args.n:
        cohort = virtual_cohort(base, n, work / f"vc{n}")
        over = SMALL + [f"federation.num_rounds={args.rounds}", f"federation.round_timeout={args.round_timeout}",
                        "federation.wait_nodes_timeout=600", f"federation.query_timeout={args.round_timeout}"]
        t0 = time.perf_counter()
        try:
            m = run_simulation(cohort, work / f"run{n}", over, stream=False)
            err = None
        except RunFailed as exc:
            m, err = None, str(exc)
        wall = time.perf_counter() - t0
        row = {"centers": n, "wall_seconds": round(wall, 1), "error": err}
        if m:
            h = m["history"]
            row.update({"rounds": len(h), "train_replies": [x["n_train_replies"] for x in h],
                        "server_rss_mb": [_mb(x["server_rss_mb"]) for x in h],
                        # a simulation worker process serves many virtual centers: the largest RSS it reported
                        "client_worker_rss_mb_max": [_mb(max(x.get("client_rss_mb", {}).values(), default=None))
                                                     for x in h],
                        "aggregate_seconds": [round(x["aggregate_seconds"], 4) for x in h],
                        "round_seconds": [round(x["seconds"], 1) for x in h],
                        "bytes_received_per_round_mb": [round(x["bytes_received"] / 1e6, 2) for x in h],
                        "model_mb": round(m["communication"]["model_bytes_fp32"] / 1e6, 3)})
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"kind": "centers", "overrides": SMALL, "rows": rows}


def bench_long(args) -> dict:
    from server.ops.simulation import run_simulation

    work = Path(args.work)
    from common.config import load_config, to_plain
    from common.synth import generate_cohort
    from common.data.cohort import discover_sites
    from common.preprocess.cache import ensure_caches

    cfg = load_config([])
    demo = cfg.demo
    cohort = Path(args.cohort) if args.cohort else work / "demo-cohort"
    if not (cohort / "external" / ".newadj-cache" / "manifest.json").exists():
        generate_cohort(cohort, seed=int(demo.seed), scale=float(demo.scale), cfg=to_plain(cfg.synth), progress=False)
        ensure_caches(discover_sites(cohort), load_config(list(demo.overrides)), progress=False)
    over = list(demo.overrides) + [f"federation.num_rounds={args.rounds}"]
    t0 = time.perf_counter()
    m = run_simulation(cohort, work / "long-run", over, stream=False)
    wall = time.perf_counter() - t0
    h = m["history"]
    server = [x["server_rss_mb"] for x in h]
    clients = sorted({c for x in h for c in x.get("client_rss_mb", {})})
    per_client = {c: [x.get("client_rss_mb", {}).get(c) for x in h] for c in clients}
    k = max(1, len(h) // 10)

    def growth(series):
        s = [v for v in series if v is not None]
        return round(float(np.mean(s[-k:]) - np.mean(s[:k])), 1) if len(s) >= 2 * k else None

    res = {"kind": "long", "rounds": len(h), "wall_seconds": round(wall, 1), "overrides": over,
           "server_rss_mb": [_mb(v) for v in server], "server_growth_mb_first_to_last_tenth": growth(server),
           "client_rss_mb": {c: [_mb(v) for v in s] for c, s in per_client.items()},
           "client_growth_mb_first_to_last_tenth": {c: growth(s) for c, s in per_client.items()}}
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    r = [x["round"] for x in h]
    ax.plot(r, server, "k-", lw=2, label="ServerApp")
    for c, s in per_client.items():
        ax.plot(r, [np.nan if v is None else v for v in s], "--", alpha=0.7, label=f"ClientApp {c}")
    ax.set_xlabel("round")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title(f"RSS per round, {len(h)} rounds of the demo federation (simulation)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    png = Path(args.out).with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    res["plot"] = str(png.relative_to(ROOT) if png.is_absolute() and ROOT in png.parents else png)
    return res


def plot_centers(paths: list[str], png: Path) -> dict:
    """Server RSS and aggregation time per round against the number of centers, from ``centers`` results."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted((r for p in paths for r in json.loads(Path(p).read_text())["rows"] if not r.get("error")),
                  key=lambda r: r["centers"])
    n = [r["centers"] for r in rows]
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(12, 3.8))
    a1.plot(n, [max(r["server_rss_mb"]) for r in rows], "ko-", label="ServerApp")
    if all(r.get("client_worker_rss_mb_max") for r in rows):
        a1.plot(n, [max(r["client_worker_rss_mb_max"]) for r in rows], "gs--", label="ClientApp worker (largest)")
    a1.legend(fontsize=8)
    a1.set_ylabel("RSS, max over rounds (MiB)")
    a2.plot(n, [max(r["aggregate_seconds"]) for r in rows], "bo-")
    a2.set_ylabel("aggregation per round, max (s)")
    a3.plot(n, [r["round_seconds"][-1] for r in rows], "ro-")
    a3.set_ylabel("round wall time, last round (s)")
    for a in (a1, a2, a3):
        a.set_xlabel("virtual training centers")
        a.grid(alpha=0.3)
    fig.suptitle("Flower simulation, small model, 2 CPU cores")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    return {"kind": "centers-plot", "inputs": paths, "plot": str(png)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("centers")
    c.add_argument("--n", type=int, nargs="+", default=[6, 60, 300])
    c.add_argument("--rounds", type=int, default=2)
    c.add_argument("--round-timeout", type=int, default=1800)
    c.add_argument("--work", default="/tmp/bench_scale")
    c.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale_centers.json"))
    lg = sub.add_parser("long")
    lg.add_argument("--rounds", type=int, default=50)
    lg.add_argument("--work", default="/tmp/bench_long")
    lg.add_argument("--cohort", default=None, help="an existing demo cohort (e.g. demo/cohort after `newadj demo`)")
    lg.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "long_run.json"))
    pl = sub.add_parser("plot", help="plot one or more `centers` result files")
    pl.add_argument("results", nargs="+")
    pl.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale_centers.png"))
    args = ap.parse_args()
    if args.cmd == "plot":
        print(json.dumps(plot_centers(args.results, Path(args.out))))
        return
    res = bench_centers(args) if args.cmd == "centers" else bench_long(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
