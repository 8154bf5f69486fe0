"""DFS on a real, public survival data set: pooled vs local-only vs federated C-index, several seeds.

Data: GBSG2 (German Breast Cancer Study Group 2, 686 patients, recurrence-free survival,
8 covariates), shipped with scikit-survival (``sksurv.datasets.load_gbsg2``), so it installs
offline.  Each seed writes it as a federation in the data contract's layout:

* **external center**: a seeded uniform 20 % of the patients, never trained on;
* **four training centers** A-D: every other patient goes to one of them with probabilities
  that depend on the tumour grade (grade I: 0.55/0.15/0.15/0.15, grade II: 0.25 each,
  grade III: 0.15/0.15/0.15/0.55), so the centers differ in case mix as hospitals do;
* inside each training center a seeded 20 % is its local **test** split (never trained or
  selected on); the rest is split train / validation by the contract's hash rule.

Each seed then runs the product's own steps: ``newadj schema`` (a Flower run) proposes the
features and their scaling, then ``pooled`` (every training center's train split, one model),
``local:X`` (one center's own data) and the federation (``fedavg``, ``fedadam``, ``fedyogi``;
real Flower simulations) train with the same engine and defaults -- nothing tuned on any test
set.  Every model is scored with Harrell's C on each training center's test split (the mean
over centers), on the pooled test splits (center-stratified: pairs within a center, as the
federation pools them) and on the external center.

    python benchmarks/bench_survival.py --seeds 0 1 2 3 4 --out benchmarks/results/survival_gbsg2.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GRADE_P = {"I": [0.55, 0.15, 0.15, 0.15], "II": [0.25, 0.25, 0.25, 0.25], "III": [0.15, 0.15, 0.15, 0.55]}
CENTERS = ("center_a", "center_b", "center_c", "center_d")
STRATEGIES = ("fedavg", "fedadam", "fedyogi")
POLICY = ('allowed_run_keys_extra = ["seed", "train.n_boot"]\n'   # runs set their seed (a development site)
          "min_patients = { benefit = 10, dfs = 10 }\nmin_cell_count = 5\n")


def write_cohort(out: Path, seed: int) -> None:
    """GBSG2 as five site folders (see the module docstring for the rule)."""
    import pandas as pd
    from sksurv.datasets import load_gbsg2

    X, y = load_gbsg2()
    df = pd.DataFrame({
        "dfs_months": np.round(y["time"] / 30.4375, 2), "dfs_event": y["cens"].astype(int),
        "age": X["age"], "estrec": X["estrec"], "progrec": X["progrec"], "pnodes": X["pnodes"], "tsize": X["tsize"],
        "horTh": (X["horTh"] == "yes").astype(int), "menostat": (X["menostat"] == "Post").astype(int),
        "tgrade": X["tgrade"].map({"I": 1, "II": 2, "III": 3}).astype(int),
    })
    df.insert(0, "patient_id", [f"G{i:04d}" for i in range(len(df))])
    rng = np.random.default_rng(seed)
    external = rng.random(len(df)) < 0.2
    center = np.array([rng.choice(4, p=GRADE_P[g]) for g in X["tgrade"].astype(str)])
    out.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(CENTERS + ("external",)):
        part = df[external] if name == "external" else df[~external & (center == k)]
        part = part.copy()
        part.insert(3, "split", "")
        if name != "external":
            part.loc[rng.random(len(part)) < 0.2, "split"] = "test"
        site = out / name
        site.mkdir(parents=True, exist_ok=True)
        part.to_csv(site / "clinical.csv", index=False)
        role = "external" if name == "external" else "train"
        (site / "site.toml").write_text(f'center_id = "{name}"\nrole = "{role}"\n')
        (site / "policy.toml").write_text(POLICY)


def c_counts(model, ds, batch: int = 256) -> dict:
    from common.learn.engine import predict
    from common.metrics import concordance_pairs

    pred = predict(model, ds, batch)
    return concordance_pairs(pred["dfs_time"], pred["dfs_event"], pred["risk"])


def score(model, cfg, cohort: Path) -> dict:
    """Harrell's C of one model: each center's test split, their center-stratified pool, the external."""
    from common.learn.dataset import site_dataset
    from common.metrics import pooled_c_index
    from common.preprocess.cache import resolve_cache_dir

    per = {c: c_counts(model, site_dataset(resolve_cache_dir(cohort / c, cfg), ["test"], cfg)) for c in CENTERS}
    ext = c_counts(model, site_dataset(resolve_cache_dir(cohort / "external", cfg), None, cfg))
    return {"centers": {c: pooled_c_index([p])[0] for c, p in per.items()},
            "mean_over_centers": float(np.mean([pooled_c_index([p])[0] for p in per.values()])),
            "pooled_test": pooled_c_index(list(per.values()))[0], "external": pooled_c_index([ext])[0]}


def run_seed(seed: int, work: Path, rounds: int, quiet: bool, strategies: tuple[str, ...] = STRATEGIES,
             fed_overrides: tuple[str, ...] = ()) -> dict:
    from rich.console import Console

    from common.data.cohort import discover_sites
    from common.preprocess.cache import ensure_caches
    from common.config import feature_overrides, load_config
    from common.learn.dataset import ConcatSites, site_dataset
    from common.learn.baseline import train_arm
    from common.federation.model_io import load_model_package
    from server.schema import FEATURES_YAML
    from server.ops.simulation import run_simulation

    console = Console(quiet=quiet)
    cohort = work / f"gbsg2-seed{seed}"
    write_cohort(cohort, seed)
    base = [f"seed={seed}"]
    run_simulation(cohort, work / f"schema-{seed}", base, console=console, stream=False, mode="schema")
    overrides = base + feature_overrides(work / f"schema-{seed}" / FEATURES_YAML)
    cfg = load_config(overrides)
    caches = ensure_caches(discover_sites(cohort), cfg, progress=False)
    tr = {c: site_dataset(caches[c], ["train"], cfg) for c in CENTERS}
    va = {c: site_dataset(caches[c], ["val"], cfg) for c in CENTERS}
    out = {"seed": seed, "n": {c: {"train": len(tr[c]), "val": len(va[c])} for c in CENTERS},
           "features": list(cfg.data.clinical_features), "arms": {}}
    t0 = time.perf_counter()
    for name, trd, vad in [("pooled", ConcatSites(list(tr.values())), ConcatSites(list(va.values())))] + \
                          [(f"local:{c}", tr[c], va[c]) for c in CENTERS]:
        model, _ = train_arm(cfg, trd, vad, seed=seed)   # built from the seed, not from what ran before
        out["arms"][name] = score(model, cfg, cohort)
    for strategy in strategies:
        run = work / f"{strategy}-{seed}"
        # the settings its BENCHMARKS.md figures were measured with (the federation's defaults until 2026-12-04),
        # then --fed-overrides on top
        m = run_simulation(cohort, run, overrides + [f"federation.strategy={strategy}",
                                                     f"federation.num_rounds={rounds}", "federation.local_epochs=2",
                                                     "federation.select_metric=auto", *fed_overrides],
                           console=console, stream=False)
        model, _ = load_model_package(run / "best_model.pt", m["best_model"]["sha256"])
        out["arms"][strategy] = {**score(model, cfg, cohort), "selected_round": m["selected_round"],
                                 "wall_seconds": m.get("wall_seconds")}
    out["seconds"] = time.perf_counter() - t0
    return out


def summarise(results: list[dict]) -> dict:
    arms = list(results[0]["arms"])
    table = {}
    for a in arms:
        row = {}
        for k in ("mean_over_centers", "pooled_test", "external"):
            vals = [r["arms"][a][k] for r in results]
            row[k] = {"mean": statistics.mean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                      "values": vals}
        table[a] = row
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--work", default="runs/bench-survival")
    ap.add_argument("--out", default="benchmarks/results/survival_gbsg2.json")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help="federated arms, comma-separated")
    ap.add_argument("--fed-overrides", nargs="*", default=[],
                    help="federation overrides on top of the pinned 2 local epochs and auto selection, "
                         "e.g. federation.local_epochs=5 federation.select_metric=val_loss")
    args = ap.parse_args(argv)
    work = Path(args.work)
    results = []
    for s in args.seeds:
        results.append(run_seed(s, work, args.rounds, args.quiet,
                                tuple(x for x in args.strategies.split(",") if x), tuple(args.fed_overrides)))
        print(json.dumps({"seed": s, **{a: round(v["pooled_test"], 3) for a, v in results[-1]["arms"].items()}}),
              flush=True)
    summary = summarise(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"seeds": args.seeds, "rounds": args.rounds,
                                          "fed_overrides": list(args.fed_overrides), "summary": summary,
                                          "runs": results}, indent=1))
    print(f"{'arm':<18}{'mean over centers':>22}{'pooled test':>18}{'external':>18}")
    for a, row in summary.items():
        print(f"{a:<18}" + "".join(f"{row[k]['mean']:>12.3f} ± {row[k]['sd']:.3f}"
                                   for k in ("mean_over_centers", "pooled_test", "external")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
