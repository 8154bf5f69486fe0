"""Model quality over several training seeds (issue 17): the baseline arms (pooled, unimodal, local-only,
optionally leave-one-center-out CV), optionally the federated arm (``newadj simulate``) and the federation's
own leave-one-center-out CV (``newadj simulate --loco``: the basis for choosing federation settings), each seed a
full run on the same cohort; the table gives mean +- SD over seeds and the issue's targets as ratios.

    python benchmarks/bench_quality.py --cohort runs/full --seeds 0,1,2,3,4 \
        --out runs/quality-default --json benchmarks/results/quality_default.json \
        [--features runs/full-schema/features.yaml] [--fed] [--loco] [--fed-loco] [KEY=VALUE ...]

``--arms loco-local`` adds the local-only models scored on the other training centers, so that each LOCO fold
(pooled with ``--loco``, federated with ``--fed-loco``) is compared with the best local-only model on the same
held-out patients: the issue's "above every local-only model" without the external center.

The seed changes model initialisation, data order, dropout and augmentation; the cohort, its splits and
its external center stay the same (a new cohort per seed would also resample the patients: see
BENCHMARKS.md for what that costs).  Nothing here selects anything: the external center is scored, never
used to choose.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.metrics import WEAK_CAL_KEYS  # noqa: E402  (the calibration intercept and slope)


def _v(report: dict | None, key: str):
    x = (report or {}).get(key)
    if isinstance(x, dict):
        x = x.get("value")
    return None if x is None or not np.isfinite(x) else float(x)


def seed_row(baseline: dict | None, fed: dict | None, fed_loco: dict | None = None) -> dict:
    """The issue's quantities for one seed (``baseline`` None: no baseline arm ran)."""
    row = baseline_row(baseline) if baseline else {}
    if fed:
        row = fed_row(fed, row)
    summary = (fed_loco or {}).get("summary")
    if summary:   # the federation's leave-one-center-out CV (the external center sealed)
        for k, name in (("auc", "auc"), ("ece", "ece"), ("c_index", "c"), ("auc_over_oracle", "auc_over_oracle"),
                        *((k, k) for k in WEAK_CAL_KEYS)):
            if (summary.get(k) or {}).get("mean") is not None:
                row[f"fed_loco_{name}"] = summary[k]["mean"]
        row["fed_loco_failed_folds"] = float(len(fed_loco.get("failed") or {}))
    local = (baseline or {}).get("loco_local")
    if local:   # the local-only models on the other training centers: LOCO's "above every local-only model"
        for k in ("best_local_auc", "mean_local_auc"):
            if local["summary"][k]["mean"] is not None:
                row[f"loco_{k}"] = local["summary"][k]["mean"]
        for prefix, folds in (("loco", (baseline.get("loco") or {}).get("folds")),
                              ("fed_loco", (fed_loco or {}).get("folds"))):
            gaps = fold_gaps(folds, local["folds"])
            if gaps:
                row[f"{prefix}_minus_best_local"] = float(np.mean(gaps))
                row[f"{prefix}_above_best_local_share"] = float(np.mean([g > 0 for g in gaps]))
    return row


def fold_gaps(folds: dict | None, local_folds: dict) -> list[float]:
    """Per held-out center that both scored: the LOCO fold's AUC minus the best other center's local-only AUC
    on the same patients (a failed or abstaining fold is left out, so the mean of these gaps need not equal the
    difference of the two means over their own folds)."""
    gaps = []
    for c, f in (folds or {}).items():
        auc, best = _v(f, "auc"), _v(local_folds.get(c), "best_local_auc")
        if auc is not None and best is not None:
            gaps.append(auc - best)
    return gaps


def baseline_row(baseline: dict) -> dict:
    """The baseline arms' quantities for one seed."""
    arms = baseline["arms"]
    oracle = baseline.get("oracle_external_auc")
    row: dict = {"oracle": oracle}
    oracle_cal = baseline.get("oracle_external_ece")
    if oracle_cal:   # the generator's own (calibrated) probabilities: what sampling alone gives on these patients
        row["oracle_ece"], row["oracle_ece_floor"] = oracle_cal["observed"], oracle_cal["floor"]
    pooled = arms.get("pooled")
    if pooled:
        row["pooled_auc"] = _v(pooled["external"], "auc")
        row["pooled_ece"] = _v(pooled["external"], "ece")
        row["pooled_ece_floor"] = _v(pooled["external"], "ece_floor")
        if row["pooled_ece"] is not None and row["pooled_ece_floor"] is not None:
            # what is left above the sampling floor: the part of the ECE a model could still remove
            row["pooled_ece_minus_floor"] = row["pooled_ece"] - row["pooled_ece_floor"]
        row["pooled_ece_loco_calibrated"] = _v(pooled["external"], "ece_loco_calibrated")
        for k in WEAK_CAL_KEYS:   # 0 and 1 when calibrated (Wald CIs in the run's summary)
            row[f"pooled_{k}"] = _v(pooled["external"], k)
        row["pooled_c"] = _v(pooled["external"], "c_index")
        if oracle and row["pooled_auc"] is not None:
            row["pooled_over_oracle"] = row["pooled_auc"] / oracle
    uni = {k.split(":", 1)[1]: _v(a["external"], "auc") for k, a in arms.items() if k.startswith("unimodal:")}
    uni = {k: v for k, v in uni.items() if v is not None}
    if uni:
        row.update({f"unimodal_{k}_auc": v for k, v in uni.items()})
        row["best_unimodal_auc"] = max(uni.values())
        if row.get("pooled_auc") is not None:
            row["multimodal_minus_best_unimodal"] = row["pooled_auc"] - row["best_unimodal_auc"]
    loc = {k.split(":", 1)[1]: _v(a["external"], "auc") for k, a in arms.items() if k.startswith("local:")}
    loc = {k: v for k, v in loc.items() if v is not None}
    if loc:
        row["best_local_auc"] = max(loc.values())
        row["best_local_center"] = max(loc, key=loc.get)
    loco = (baseline.get("loco") or {}).get("summary")
    if loco:
        row["loco_auc"] = loco["auc"]["mean"]
        row["loco_ece"] = loco["ece"]["mean"]
        for k in ("ece_floor", "ece_loco_calibrated", "oracle_auc", "auc_over_oracle", *WEAK_CAL_KEYS):
            if (loco.get(k) or {}).get("mean") is not None:
                row[f"loco_{k}"] = loco[k]["mean"]
        row["loco_c"] = loco["c_index"]["mean"]
    return row


def fed_row(fed: dict, row: dict) -> dict:
    """``row`` (the baseline's quantities for one seed) with the federated arm's added, as a new dict."""
    row = dict(row)
    # the external center's full report (flat keys: auc, ece, c_index, ...)
    ext = next(iter(((fed.get("external") or {}).get("centers") or {}).values()), None) or {}
    row["fed_auc"] = _v(ext, "auc")
    row["fed_ece"] = _v(ext, "ece")
    row["fed_c"] = _v(ext, "c_index")
    for k in WEAK_CAL_KEYS:
        row[f"fed_{k}"] = _v(ext, k)
    if fed.get("selected_round") is not None:
        row["fed_selected_round"] = float(fed["selected_round"])
    if row["fed_auc"] is not None and row.get("pooled_auc"):
        row["fed_over_pooled"] = row["fed_auc"] / row["pooled_auc"]
    if row["fed_auc"] is not None and row.get("best_local_auc") is not None:
        row["fed_minus_best_local"] = row["fed_auc"] - row["best_local_auc"]
    # issue 16: a simulated round's wall time over its slowest center's training time, and over the
    # centers' training time per core (six centers share the machine's cores in simulation); medians
    rounds = [(h["seconds"], list(h["client_train_seconds"].values())) for h in fed.get("history") or []
              if h.get("seconds") and h.get("client_train_seconds")]
    if rounds:
        cores = os.cpu_count() or 1
        row["fed_round_over_slowest_train"] = float(np.median([s / max(t) for s, t in rounds]))
        row["fed_round_over_train_per_core"] = float(np.median([s / (sum(t) / min(cores, len(t)))
                                                                 for s, t in rounds]))
        row["fed_round_s"] = float(np.median([h["seconds"] for h in fed["history"] if h.get("seconds")]))
    return row


TARGETS = {  # key: (comparison, bound, wording)
    "pooled_over_oracle": (">=", 0.92, "pooled >= 0.92 x oracle"),
    "fed_over_pooled": (">=", 0.97, "federated >= 0.97 x pooled"),
    "fed_minus_best_local": (">", 0.0, "federated above every local-only model"),
    "loco_minus_best_local": (">", 0.0, "pooled LOCO above the best other center's local-only model, mean over folds"),
    "fed_loco_minus_best_local": (">", 0.0, "federated LOCO above the best other center's local-only model, mean over folds"),
    "multimodal_minus_best_unimodal": (">=", 0.03, "multimodal >= best unimodal + 0.03"),
    "pooled_ece": ("<=", 0.05, "pooled ECE <= 0.05 at the external center"),
    "pooled_ece_loco_calibrated": ("<=", 0.05, "pooled ECE <= 0.05 at the external center, LOCO-fitted map"),
    "fed_ece": ("<=", 0.05, "federated ECE <= 0.05 at the external center"),
}


def summarise(rows: list[dict]) -> dict:
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, float)})
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if isinstance(r.get(k), float)]
        out[k] = {"mean": float(np.mean(vals)), "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
                  "n": len(vals), "min": float(np.min(vals)), "max": float(np.max(vals))}
    verdicts = {}
    for k, (op, bound, words) in TARGETS.items():
        if k not in out:
            continue
        m = out[k]["mean"]
        ok = m >= bound if op == ">=" else m > bound if op == ">" else m <= bound
        verdicts[k] = {"target": words, "mean": m, "met": bool(ok)}
    return {"metrics": out, "targets": verdicts}


def markdown(summary: dict, seeds: list[int]) -> str:
    m = summary["metrics"]

    def cell(k):
        if k not in m:
            return "-"
        e = m[k]
        return f"{e['mean']:.3f} +- {e['sd']:.3f}" if e["sd"] is not None else f"{e['mean']:.3f}"
    lines = [f"| quantity ({len(seeds)} seeds: {', '.join(map(str, seeds))}) | mean +- SD |", "| --- | --- |"]
    for k in m:
        lines.append(f"| {k} | {cell(k)} |")
    lines += ["", "| target | mean | verdict |", "| --- | --- | --- |"]
    for v in summary["targets"].values():
        lines.append(f"| {v['target']} | {v['mean']:.3f} | {'met' if v['met'] else 'missed'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cohort", required=True)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--out", required=True, help="a run folder per seed and arm goes here")
    ap.add_argument("--json", help="write the summary here (e.g. benchmarks/results/quality_default.json)")
    ap.add_argument("--arms", default="pooled,unimodal,local",
                    help="baseline arms (newadj baseline --arms); loco-local: local-only models on the other "
                         "training centers, compared fold by fold with --loco and --fed-loco")
    ap.add_argument("--loco", action="store_true", help="also leave-one-center-out CV (6 more trainings a seed)")
    ap.add_argument("--fed", action="store_true", help="also the federation (newadj simulate) per seed")
    ap.add_argument("--fed-loco", action="store_true",
                    help="also the federation's leave-one-center-out CV (newadj simulate --loco) per seed; "
                         "with --arms '' and no --loco, only that")
    ap.add_argument("--features", help="the schema step's features.yaml (newadj schema), as --features of baseline")
    ap.add_argument("--from-runs", action="store_true",
                    help="train nothing: summarise the metrics.json files an earlier run left under --out")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    from rich.console import Console

    from common.config import load_config
    from common.learn.baseline import run_baseline

    console = Console()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.features:
        from common.config import feature_overrides

        args.overrides = list(args.overrides) + feature_overrides(args.features)
    arms = tuple(a for a in args.arms.split(",") if a) + (("loco",) if args.loco else ())
    out = Path(args.out)
    rows, timings = [], []
    t_all = time.perf_counter()
    for s in seeds:
        overrides = [*args.overrides, f"seed={s}"]
        base = fed = fed_loco = None
        t_base = t_fed = t_fed_loco = None
        if args.from_runs:
            base_file = out / f"seed{s}" / "baseline" / "metrics.json"
            base = json.loads(base_file.read_text()) if arms else None
            fed_file = out / f"seed{s}" / "fedavg" / "metrics.json"
            fed = json.loads(fed_file.read_text()) if args.fed and fed_file.exists() else None
            loco_file = out / f"seed{s}" / "fed-loco" / "loco.json"
            fed_loco = json.loads(loco_file.read_text()) if args.fed_loco and loco_file.exists() else None
            t_base = (base or {}).get("seconds")
            t_fed = sum(h.get("seconds", 0) for h in (fed or {}).get("history", [])) or None
            t_fed_loco = (fed_loco or {}).get("seconds")
        else:
            if arms:
                t0 = time.perf_counter()
                base = run_baseline(Path(args.cohort), out / f"seed{s}" / "baseline", load_config(overrides),
                                    arms=arms, console=console)
                t_base = time.perf_counter() - t0
            if args.fed:
                from server.ops.simulation import run_simulation

                t1 = time.perf_counter()
                fed = run_simulation(Path(args.cohort), out / f"seed{s}" / "fedavg", overrides, console=console,
                                     stream=False)
                t_fed = time.perf_counter() - t1
            if args.fed_loco:
                from server.ops.simulation import run_loco

                t2 = time.perf_counter()
                fed_loco = run_loco(Path(args.cohort), out / f"seed{s}" / "fed-loco", overrides, console=console,
                                    stream=False, on_failure=lambda c, exc: console.print(f"fold {c} failed: {exc}"))
                t_fed_loco = time.perf_counter() - t2
        row = {**seed_row(base, fed, fed_loco), "seed": s}
        rows.append(row)
        timings.append({"seed": s, "baseline_s": t_base, "fed_s": t_fed, "fed_loco_s": t_fed_loco})
        if not args.from_runs:
            console.print(f"seed {s}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)))
    summary = summarise(rows)
    result = {"cohort": str(args.cohort), "features": args.features, "seeds": seeds, "arms": list(arms), "fed": bool(args.fed),
              "fed_loco": bool(args.fed_loco),
              "overrides": list(args.overrides), "rows": rows, "timings": timings,
              "wall_s": time.perf_counter() - t_all, **summary}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, allow_nan=False))
    print(markdown(summary, seeds))
    print(f"wall {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    from common.cli.errors import describe_error, expected_error

    try:
        raise SystemExit(main())
    except Exception as exc:   # a run that failed (a site refused it, a bad override): one line, not a traceback
        if not expected_error(exc):
            raise
        print(f"bench_quality: {describe_error(exc)}", file=sys.stderr)
        raise SystemExit(2)
