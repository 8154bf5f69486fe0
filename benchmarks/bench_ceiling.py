"""What the data of a synthetic cohort allow: the AUC ceiling under the oracle (issue 17).

The "oracle" of the quality tables is the generator's true probability, computed from the latent factors
themselves.  No model sees those: a site's files hold noisy gene readouts (and none for a patient without a
genomics row or a center whose panel lacks a gene), an AFP value, and images that may be missing.  This
script scores, per center, the best any model could do with a site's files *if it read every image
perfectly*: the posterior expectation of the true probability,

    P(benefit | files) = E[ sigmoid(b0 + offset + a_mri z_mri + a_path z_path + a_gen z_gen + a_clin z_clin) | files ]

with z_mri known exactly when the patient has an MRI folder (prior N(0, 1) otherwise), z_path exactly when
there is a slide, z_gen from its posterior given the genes the site's genomics.csv holds, z_clin from its
posterior given AFP (Monte Carlo over the unknown ones).  Images are never read perfectly, so this is an
upper bound on any model's AUC; its ratio to the oracle bounds "AUC as a fraction of the oracle".  The same
with one modality only gives the unimodal ceilings.

    python benchmarks/bench_ceiling.py --cohort runs/full [--json benchmarks/results/ceiling_default.json]

The generator's parameters are read from conf/synth/default.yaml with the shift and signal the cohort's
_cohort.json records; a cohort made with other latent or gene parameters is refused (by comparing the
recorded oracle AUC with the one recomputed here).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.synth._config import _sigmoid  # noqa: E402  (the generator's own link function)

GRID = np.linspace(-5.0, 5.0, 401)
PRIOR = np.exp(-GRID ** 2 / 2)
MODALITIES = ("mri", "pathology", "genomics", "clinical")


def _gene_posterior(row: pd.Series | None, informative: dict) -> np.ndarray:
    """Posterior weights of z_gen on GRID given one patient's observed informative genes."""
    w = PRIOR.copy()
    if row is not None:
        for gene, spec in informative.items():
            v = row.get(gene)
            if v is None or pd.isna(v):
                continue  # untested here: written empty, absent from the panel, or no row
            coef = float(spec.get("coef", 0.0))
            if gene.endswith("_mut"):
                p = _sigmoid(float(spec["logit0"]) + coef * GRID)
                w = w * (p if float(v) > 0.5 else 1 - p)
            elif "noise_sd" in spec:
                sd = float(spec["noise_sd"])
                w = w * np.exp(-(float(v) - coef * GRID) ** 2 / (2 * sd * sd))
            # a CNV carries z_gen under cnv noise and focal amplifications: its likelihood is a mixture;
            # skipping it only lowers the ceiling for signal.genomics=alternate (said in the output)
    return w / w.sum()


def _afp_posterior(afp: float, clin: dict) -> np.ndarray:
    la = np.log10(max(float(afp), 1e-3))
    sd = float(clin["log10_afp_noise_sd"])
    w = PRIOR * np.exp(-(la - float(clin["log10_afp_mean"]) - float(clin["log10_afp_clin_coef"]) * GRID) ** 2
                       / (2 * sd * sd))
    return w / w.sum()


def ceilings(cohort: Path, draws: int = 4000, seed: int = 0) -> dict:
    from sklearn.metrics import roc_auc_score

    from common.synth._config import load_config
    from common.synth.shift import apply_shift_and_signal

    meta = json.loads((cohort / "_cohort.json").read_text())
    cfg = apply_shift_and_signal(load_config({"shift": meta.get("shift") or {}, "signal": meta.get("signal") or {}}))
    lat, clin = cfg["latent"], cfg["clinical"]
    informative = cfg["genomics"]["informative"]
    truth = pd.read_csv(cohort / "_truth.csv")
    offsets = {s["name"]: float(s.get("b0_offset", 0.0)) for s in cfg["sites"]}
    rng = np.random.default_rng(seed)
    uses = {"all": set(MODALITIES), **{m: {m} for m in MODALITIES}}
    out: dict = {"cohort": str(cohort), "signal": meta.get("signal"), "shift": meta.get("shift"), "centers": {}}
    for site, t in truth.groupby("site", sort=True):
        sdir = cohort / site
        clinical = pd.read_csv(sdir / "clinical.csv").set_index("patient_id")
        gpath = sdir / "genomics.csv"
        genomics = pd.read_csv(gpath).set_index("patient_id") if gpath.exists() else pd.DataFrame()
        probs = {k: [] for k in uses}
        for r in t.itertuples():
            has_mri = (sdir / "mri" / r.patient_id).is_dir()
            has_slide = (sdir / "pathology" / f"{r.patient_id}.tiff").exists()
            wg = _gene_posterior(genomics.loc[r.patient_id] if r.patient_id in genomics.index else None, informative)
            wc = _afp_posterior(clinical.loc[r.patient_id, "afp_ng_ml"], clin)
            zg, zc = rng.choice(GRID, size=draws, p=wg), rng.choice(GRID, size=draws, p=wc)
            zm_prior, zp_prior = rng.standard_normal(draws), rng.standard_normal(draws)
            zg_prior, zc_prior = rng.standard_normal(draws), rng.standard_normal(draws)
            for k, use in uses.items():
                zm = np.full(draws, r.z_mri) if ("mri" in use and has_mri) else zm_prior
                zp = np.full(draws, r.z_path) if ("pathology" in use and has_slide) else zp_prior
                logit = (float(lat["b0"]) + offsets.get(site, 0.0) + float(lat["a_mri"]) * zm
                         + float(lat["a_path"]) * zp
                         + float(lat["a_gen"]) * (zg if "genomics" in use else zg_prior)
                         + float(lat["a_clin"]) * (zc if "clinical" in use else zc_prior))
                probs[k].append(float(_sigmoid(logit).mean()))
        y = t["benefit"].to_numpy()
        if len(np.unique(y)) < 2:
            continue
        oracle = float(roc_auc_score(y, t["true_prob"]))
        row = {"role": str(t["role"].iloc[0]), "n": int(len(t)), "oracle_auc": oracle}
        for k in uses:
            auc = float(roc_auc_score(y, probs[k]))
            row[f"ceiling_{k}_auc"] = auc
            row[f"ceiling_{k}_over_oracle"] = auc / oracle
        out["centers"][site] = row
    recorded = meta.get("oracle_auc_external")
    ext = [r for r in out["centers"].values() if r["role"] == "external"]
    if recorded is not None and ext and abs(ext[0]["oracle_auc"] - recorded) > 1e-6:
        raise SystemExit(f"{cohort}: _truth.csv does not match _cohort.json's oracle AUC")
    train = [r for r in out["centers"].values() if r["role"] != "external"]
    out["training_centers_mean"] = {k: float(np.mean([r[k] for r in train])) for k in train[0]
                                    if k.startswith(("ceiling", "oracle"))} if train else {}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cohort", required=True, type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--draws", type=int, default=4000)
    a = ap.parse_args(argv)
    for f in ("_truth.csv", "_cohort.json"):
        if not (a.cohort / f).exists():
            print(f"bench_ceiling: {a.cohort / f}: not found (a cohort written by `newadj synth`)", file=sys.stderr)
            return 2
    res = ceilings(a.cohort, draws=a.draws)
    print(f"{'center':10s} {'n':>4s} {'oracle':>7s} {'ceiling':>8s} {'x oracle':>9s}   unimodal ceilings "
          "(MRI / pathology / genomics / clinical)")
    rows = list(res["centers"].items()) + [("LOCO mean", res["training_centers_mean"])]
    for name, r in rows:
        if not r:
            continue
        uni = " / ".join(f"{r[f'ceiling_{m}_auc']:.3f}" for m in MODALITIES)
        print(f"{name:10s} {r.get('n', ''):>4} {r['oracle_auc']:7.3f} {r['ceiling_all_auc']:8.3f} "
              f"{r['ceiling_all_over_oracle']:9.3f}   {uni}")
    if (res.get("signal") or {}).get("genomics") == "alternate":
        print("note: CNV genes are left out of the gene posterior, so this ceiling is low for signal.genomics=alternate")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
