"""A seed ensemble of leave-one-center-out models (issue 17, a diagnostic): is the network's gap variance?

Each run directory holds ``loco_predictions.csv`` (``newadj baseline --arms loco`` writes it; bench_quality's
``--out DIR`` keeps one per seed under ``DIR/seed<k>/baseline``). For every K from 1 to the number of runs and
every K-subset of the runs, the patients' probabilities are averaged over the subset's runs and each held-out
center's AUC and ECE are computed; the table gives, per K, the LOCO AUC and ECE (means over folds) averaged
over the subsets.
K = 1 is the mean of the single runs.

    python benchmarks/bench_ensemble.py runs/ens-default-loco/seed{0,1,2,3,4}/baseline [--json F]

Only training centers are in these files (the external center is never read by LOCO CV).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_runs(dirs: list[Path]) -> pd.DataFrame:
    """One column of probabilities per run, indexed by (center, patient_id); the label column ``benefit``."""
    frames = []
    for i, d in enumerate(dirs):
        f = Path(d) / "loco_predictions.csv"
        if not f.exists():
            raise SystemExit(f"bench_ensemble: {f}: no such file (run `newadj baseline --arms loco` there first)")
        df = pd.read_csv(f, dtype={"patient_id": str, "center": str}).set_index(["center", "patient_id"])
        frames.append(df.rename(columns={"prob": f"run{i}", "benefit": f"benefit{i}"}))
    data = pd.concat(frames, axis=1, join="outer")
    labels = data[[f"benefit{i}" for i in range(len(dirs))]]
    if data.isna().any(axis=None) or not labels.apply(lambda r: r.nunique(dropna=False) == 1, axis=1).all():
        raise SystemExit("bench_ensemble: the runs do not hold the same patients with the same labels")
    return pd.DataFrame({"benefit": labels.iloc[:, 0], **{f"run{i}": data[f"run{i}"] for i in range(len(dirs))}})


def loco_scores(data: pd.DataFrame, runs: tuple[str, ...]) -> tuple[float, float]:
    """Mean over held-out centers of the AUC and of the ECE of the runs' mean probability."""
    from common.metrics import delong_auc_ci, expected_calibration_error

    p = data[list(runs)].mean(axis=1)
    centers = data.index.unique("center")
    aucs = [delong_auc_ci(data.loc[c, "benefit"], p.loc[c])[0] for c in centers]
    eces = [expected_calibration_error(data.loc[c, "benefit"], p.loc[c]) for c in centers]
    return float(np.nanmean(aucs)), float(np.nanmean(eces))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="directories that hold loco_predictions.csv")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    data = load_runs(a.runs)
    names = [c for c in data.columns if c.startswith("run")]
    table = {}
    for k in range(1, len(names) + 1):
        scores = np.array([loco_scores(data, sub) for sub in itertools.combinations(names, k)])
        vals = scores[:, 0]
        table[k] = {"mean": float(np.mean(vals)), "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
                    "ece": float(np.mean(scores[:, 1])), "subsets": len(vals)}
        sd = f" +- {table[k]['sd']:.3f}" if table[k]["sd"] is not None else ""
        print(f"K={k}: LOCO AUC {table[k]['mean']:.3f}{sd}, ECE {table[k]['ece']:.3f} over {len(vals)} subset(s)")
    print(f"ensemble of all {len(names)} minus the mean single run: {table[len(names)]['mean'] - table[1]['mean']:+.3f}")
    if a.json:
        a.json.write_text(json.dumps({"runs": [str(r) for r in a.runs], "n_patients": len(data),
                                      "by_k": table}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
