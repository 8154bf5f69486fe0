"""``newadj baseline``: the non-federated reference arms, all on one training engine.

Arms (same cohort, same budget, same engine, evaluated on the external center):
- ``pooled``: every training center's data together (upper bound of federation;
  possible only in simulation);
- ``local:<center>``: one model per training center on its own data;
- ``unimodal:<modality>``: pooled data, one modality only (ablations).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from common.cohort import discover_sites, ensure_caches
from common.config import config_hash, save_config
from common.dataset import ConcatSites, site_dataset
from common.engine import evaluate_model, train_model
from common.model import build_model
from common.model_io import save_model_package

MODALITIES = ("mri", "pathology", "genomics")


def model_for(cfg, ds, modalities=None):
    mcfg = OmegaConf.to_container(cfg.model, resolve=True)
    if modalities is not None:
        mcfg["modalities"] = list(modalities)
    return build_model(mcfg, in_channels=ds.mri_shape[0], path_dim=ds.path_dim, n_genes=ds.n_genes,
                       n_clinical=ds.n_clinical)


def run_arm(name, cfg, train_ds, val_ds, test_ds, modalities=None, seed=0, model_path: Path | None = None) -> dict:
    model = model_for(cfg, train_ds, modalities)
    res = train_model(model, train_ds, val_ds, cfg.train, cfg.model.loss, seed=seed)
    ext = evaluate_model(model, test_ds, res.threshold, cfg.train, seed=seed)
    if model_path is not None:
        arm_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        if modalities is not None:
            arm_cfg.model.modalities = list(modalities)
        save_model_package(model_path, res.state_dict, arm_cfg, res.threshold,
                           {"arm": name, "n_train": res.n_train, "n_val": res.n_val, "best_epoch": res.best_epoch})
    return {"arm": name, "modalities": list(modalities or cfg.model.modalities), "external": ext,
            "val": res.val, "threshold": res.threshold, "best_epoch": res.best_epoch, "epochs_run": res.epochs_run,
            "n_train": res.n_train, "n_val": res.n_val, "seconds": res.seconds,
            "train_samples_per_s": res.samples_per_s}


def oracle_auc(cohort_dir: Path, external: str) -> float | None:
    truth = Path(cohort_dir) / "_truth.csv"
    if not truth.exists():
        return None
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    df = pd.read_csv(truth)
    df = df[df["site"] == external] if "site" in df else df
    if df["benefit"].nunique() < 2:
        return None
    return float(roc_auc_score(df["benefit"], df["true_prob"]))


def run_baseline(cohort_dir: Path, out_dir: Path, cfg, arms=("pooled", "local", "unimodal"),
                 console: Console | None = None) -> dict:
    console = console or Console()
    out_dir = Path(out_dir)
    save_config(cfg, out_dir)
    sites = discover_sites(cohort_dir)
    ext = [s for s in sites if s.role == "external"]
    train_sites = [s for s in sites if s.role != "external"]
    if len(ext) != 1 or not train_sites:
        raise SystemExit(f"{cohort_dir}: a baseline needs exactly one external site and at least one training site "
                         f"(found external={[s.name for s in ext]}, train={[s.name for s in train_sites]})")
    caches = ensure_caches(sites, cfg, progress=True)
    tr = {s.name: site_dataset(caches[s.name], ["train"], cfg) for s in train_sites}
    va = {s.name: site_dataset(caches[s.name], ["val"], cfg) for s in train_sites}
    test = site_dataset(caches[ext[0].name], None, cfg)
    seed = int(cfg.seed)
    results: dict[str, dict] = {}
    plan = []
    if "pooled" in arms:
        plan.append(("pooled", ConcatSites(list(tr.values())), ConcatSites(list(va.values())), None))
    if "unimodal" in arms:
        for m in MODALITIES:
            plan.append((f"unimodal:{m}", ConcatSites(list(tr.values())), ConcatSites(list(va.values())), [m]))
    if "local" in arms:
        for s in train_sites:
            plan.append((f"local:{s.name}", tr[s.name], va[s.name], None))
    t0 = time.perf_counter()
    for name, trd, vad, mods in plan:
        console.print(f"[bold]{name}[/bold]: {len(trd)} train / {len(vad)} val patients")
        results[name] = run_arm(name, cfg, trd, vad, test, mods, seed,
                                model_path=out_dir / "models" / f"{name.replace(':', '_')}.pt")
        a = results[name]["external"].get("auc") or {}
        console.print(f"  external AUC {a.get('value')}  ({results[name]['seconds']:.0f}s, "
                      f"{results[name]['train_samples_per_s']:.0f} samples/s)")
    summary = {
        "cohort": str(cohort_dir), "external_site": ext[0].name, "n_external": len(test),
        "oracle_external_auc": oracle_auc(cohort_dir, ext[0].name),
        "config_hash": config_hash(cfg), "seconds": time.perf_counter() - t0, "arms": results,
    }
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=1, default=_json_default))
    console.print(render_table(summary))
    return summary


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o))


def _fmt(m: dict | None, key: str) -> str:
    v = (m or {}).get(key)
    if isinstance(v, dict):
        if v.get("value") is None:
            return "n/a"
        lo, hi = v.get("lo"), v.get("hi")
        return f"{v['value']:.3f}" + (f" ({lo:.2f}-{hi:.2f})" if lo is not None and hi is not None else "")
    return "n/a" if v is None else f"{v:.3f}"


def render_table(summary: dict) -> Table:
    oracle = summary.get("oracle_external_auc")
    title = f"External center {summary['external_site']} (n={summary['n_external']})"
    if oracle:
        title += f" -- oracle AUC {oracle:.3f}"
    t = Table(title=title)
    for c in ("arm", "modalities", "n train", "val AUC", "ext AUC (95% CI)", "accuracy", "C-index", "epochs", "s"):
        t.add_column(c)
    for name, r in summary["arms"].items():
        e = r["external"]
        va = r["val"].get("val_auc")
        t.add_row(name, ",".join(r["modalities"]), str(r["n_train"]), "n/a" if va is None else f"{va:.3f}",
                  _fmt(e, "auc"), _fmt(e, "accuracy"), _fmt(e, "c_index"), str(r["best_epoch"]), f"{r['seconds']:.0f}")
    return t
