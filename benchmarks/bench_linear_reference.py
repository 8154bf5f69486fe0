"""A linear reference for the network (issue 17): leave-one-center-out CV of an L2 logistic regression
(scikit-learn) on the same cached inputs the model reads, over the training centers only.

Features per patient: the MRI ROI's central box (the fraction ``model.mri.center_frac`` of each side, as the
MRI branch computes it) mean and SD per phase; the mean over the slide's tiles of the cached tile features;
the gene panel and the clinical covariates (AFP as log10).  A missing value is the center's mean
(0 after standardisation); has-MRI / has-slide indicators are features.  ``--site-zscore`` standardises the
image features (``image``; ``mri`` or ``path`` for one modality's) within each center before the fit (label-free,
as ``train.path_norm: site`` does for tiles).

    python benchmarks/bench_linear_reference.py --cohort runs/full [--C 0.03 | --C nested] [--site-zscore image] \
        [--modalities mri] [--fit-on train]

``--C nested`` picks the L2 strength inside each fold, by leave-one-center-out CV over that fold's other training
centers only (scikit-learn's ``LogisticRegressionCV``, AUC, the grid ``NESTED_GRID``), so the held-out center
never chooses its own C; a fixed C read off the folds' own results would flatter the reference.

Reads each site's latest cache through ``SiteDataset`` (``newadj preprocess`` first).  The external center is never read.
A diagnostic: it chose nothing by itself (BENCHMARKS.md, "Late fusion").
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


def patient_features(dataset, center_frac: float, afp_index: int | None) -> pd.DataFrame:
    """One row per labelled patient of a site's ``SiteDataset`` (the project's one reader of cached site data)."""
    import torch

    from common.learn.model import center_box_stats

    rows = []
    for it in dataset.items:
        if np.isnan(it["benefit"]):
            continue
        f = {"patient_id": it["patient_id"], "benefit": int(it["benefit"]), "split": it["split"],
             "has_mri": float(it["mri"] is not None), "has_slide": float(it["path"] is not None)}
        if it["mri"] is not None:
            stats = center_box_stats(torch.from_numpy(it["mri"])[None], center_frac)[0].numpy()
            n = len(stats) // 2
            for k in range(n):
                f[f"img_mri_mean{k}"], f[f"img_mri_sd{k}"] = float(stats[k]), float(stats[n + k])
        if it["path"] is not None:
            for k, v in enumerate(it["path"].mean(0)):
                f[f"img_path{k}"] = float(v)
        if it["genomics_mask"].any():
            for k, (v, seen) in enumerate(zip(it["genomics"], it["genomics_mask"])):
                f[f"gene{k}"] = float(v) if seen else np.nan
        for k, (v, seen) in enumerate(zip(it["clinical"], it["clinical_mask"])):
            f[f"clin{k}"] = (np.log10(max(float(v), 0.1)) if k == afp_index else float(v)) if seen else np.nan
        rows.append(f)
    return pd.DataFrame(rows)


NESTED_GRID = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)


def _strength(text: str):
    if text == "nested":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--C: a number or 'nested', not {text!r}") from None


def main(argv=None) -> int:
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import LeaveOneGroupOut
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from common.config import load_config
    from common.data.cohort import discover_sites
    from common.learn.dataset import SiteDataset
    from common.preprocess.cache import resolve_cache_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cohort", required=True, type=Path)
    ap.add_argument("--C", type=_strength, default=0.03,
                    help="inverse L2 strength (scikit-learn), or 'nested': chosen in each fold by leave-one-center-out "
                         "CV over that fold's other centers")
    ap.add_argument("--site-zscore", choices=("image", "mri", "path", "all", "none"), default="image")
    ap.add_argument("--modalities", default="mri,pathology,genomics,clinical",
                    help="comma-separated subset of mri, pathology, genomics, clinical (a unimodal reference)")
    ap.add_argument("--fit-on", choices=("all", "train"), default="all",
                    help="fit on every patient of the other centers (all) or on their train splits only, as the "
                         "network (which selects on the validation splits)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    prefixes = {"mri": ("img_mri", "has_mri"), "pathology": ("img_path", "has_slide"), "genomics": ("gene",),
                "clinical": ("clin",)}
    chosen = [m.strip() for m in a.modalities.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(prefixes))
    if unknown or not chosen:
        ap.error(f"--modalities: {', '.join(unknown) or 'empty'}; choose from {', '.join(prefixes)}")
    cfg = load_config([])
    frac = float(cfg.model.mri.center_frac) or 0.25
    frames = []
    for site in discover_sites(a.cohort):
        if site.role == "external":
            continue  # sealed
        try:  # raw tile features (path_norm none): --site-zscore decides the standardisation
            ds = SiteDataset(resolve_cache_dir(site.path, cfg), path_norm="none")
        except FileNotFoundError as e:
            print(f"bench_linear_reference: {e}", file=sys.stderr)
            return 2
        clin = list(ds.manifest.get("clinical_features") or [])
        df = patient_features(ds, frac, clin.index("afp_ng_ml") if "afp_ng_ml" in clin else None)
        frames.append(df.assign(center=site.name))
    data = pd.concat(frames, ignore_index=True)
    keep = tuple(p for m in chosen for p in prefixes[m])
    feats = [c for c in data.columns if c not in ("patient_id", "benefit", "center", "split") and c.startswith(keep)]
    X = data[feats].astype(float)
    zcols = {"image": [c for c in feats if c.startswith("img_")],
             "mri": [c for c in feats if c.startswith("img_mri")],
             "path": [c for c in feats if c.startswith("img_path")], "all": [c for c in feats if not c.startswith("has_")],
             "none": []}[a.site_zscore]
    for _, idx in data.groupby("center").groups.items():
        block = X.loc[idx, zcols]
        X.loc[idx, zcols] = (block - block.mean()) / block.std().replace(0, 1).fillna(1)
    X = X.fillna(X.mean()).fillna(0.0)
    y = data["benefit"].to_numpy()
    folds, chosen_c = {}, {}
    for center in sorted(data["center"].unique()):
        held = (data["center"] == center).to_numpy()
        fit = ~held & ((data["split"] == "train").to_numpy() if a.fit_on == "train" else True)
        if a.C == "nested":   # the other centers choose C among themselves; the held-out one is not seen
            groups = data["center"].to_numpy()[fit]
            inner = LogisticRegressionCV(Cs=list(NESTED_GRID), cv=list(LeaveOneGroupOut().split(X[fit], y[fit], groups)),
                                         scoring="roc_auc", max_iter=5000)
            model = make_pipeline(StandardScaler(), inner).fit(X[fit], y[fit])
            chosen_c[center] = float(inner.C_[0])
        else:
            model = make_pipeline(StandardScaler(), LogisticRegression(C=a.C, max_iter=5000)).fit(X[fit], y[fit])
        folds[center] = float(roc_auc_score(y[held], model.predict_proba(X[held])[:, 1]))
    aucs = np.array(list(folds.values()))
    print(f"linear reference, LOCO over {len(folds)} training centers ({len(feats)} features, C={a.C}, fit on {a.fit_on}, "
          f"site z-score: {a.site_zscore}; {', '.join(chosen)}):")
    for c, v in folds.items():
        print(f"  {c:10s} AUC {v:.3f}" + (f"  (C {chosen_c[c]:g}, chosen on the other centers)" if c in chosen_c else ""))
    print(f"  mean       AUC {aucs.mean():.3f} +- {aucs.std(ddof=1):.3f}")
    if a.json:
        a.json.write_text(json.dumps({"C": a.C, "fit_on": a.fit_on, "site_zscore": a.site_zscore, "modalities": chosen, "n_features": len(feats),
                                      "folds": folds, "mean": float(aucs.mean()),
                                      **({"nested_grid": list(NESTED_GRID), "chosen_C": chosen_c} if chosen_c else {})}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
