"""``newadj baseline``: the non-federated reference arms, all on one training engine.

Arms (same cohort, same budget, same engine; the first three are evaluated on the external center):
- ``pooled``: every training center's data together (upper bound of federation;
  possible only in simulation);
- ``local:<center>``: one model per training center on its own data;
- ``unimodal:<modality>``: pooled data, one modality only (ablations);
- ``loco`` and ``loco-local``: leave-one-center-out CV over the training centers, of the pooled model and of
  the local-only models (each center's own model scored on every other training center), for development
  without the external center.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from rich.console import Console

from common.data.cohort import discover_sites
from common.preprocess.cache import ensure_caches
from common.config import config_hash, save_config
from common.learn.dataset import ConcatSites, site_dataset
from common.learn.engine import baseline_hazard, evaluate_model, seed_everything, train_model
from common.hashing import json_safe
from common.metrics import WEAK_CAL_KEYS
from common.learn.model import build_model
from common.learn.task import model_config
from common.federation.model_io import save_model_package

MODALITIES = ("mri", "pathology", "genomics")


def model_for(cfg, ds, modalities=None):
    mcfg = model_config(cfg)
    if modalities is not None:
        mcfg["modalities"] = list(modalities)
    return build_model(mcfg, in_channels=ds.mri_shape[0], path_dim=ds.path_dim, n_genes=ds.n_genes,
                       n_clinical=ds.n_clinical)


def present_modalities(ds) -> list[str]:
    """The modalities at least one patient of ``ds`` has (a branch no patient feeds learns nothing)."""
    have = {"mri": lambda it: it["mri"] is not None, "pathology": lambda it: it["path"] is not None,
            "genomics": lambda it: bool(np.asarray(it["genomics_mask"]).any())}
    return [m for m in MODALITIES if any(have[m](it) for it in ds.items)]


def train_arm(cfg, train_ds, val_ds, modalities=None, seed=0):
    """(model, TrainResult) of one arm: built and trained from the seed."""
    # the seed fixes the initial weights too (torch seeds each new process at random): the same run twice
    # gives the same model
    seed_everything(seed)
    model = model_for(cfg, train_ds, modalities)
    return model, train_model(model, train_ds, val_ds, cfg.train, cfg.model.loss, seed=seed)


def run_arm(name, cfg, train_ds, val_ds, test_ds, modalities=None, seed=0, model_path: Path | None = None,
            predictions: dict | None = None, also: dict | None = None) -> dict:
    """Train one arm and score it on ``test_ds`` (None: scored nowhere); ``also``: {name: dataset} it is
    scored on as well (the reports under ``held_out``)."""
    model, res = train_arm(cfg, train_ds, val_ds, modalities, seed)
    hazard = baseline_hazard(model, train_ds, cfg.train)
    ext = evaluate_model(model, test_ds, res.threshold, cfg.train, seed=seed, hazard=hazard,
                         calibration=res.calibration, predictions=predictions) if test_ds is not None else {}
    held_out = {h: evaluate_model(model, ds, res.threshold, cfg.train, seed=seed, hazard=hazard,
                                  calibration=res.calibration) for h, ds in (also or {}).items()}
    if model_path is not None:
        arm_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        if modalities is not None:
            arm_cfg.model.modalities = list(modalities)
        save_model_package(model_path, res.state_dict, arm_cfg, res.threshold,
                           {"arm": name, "n_train": res.n_train, "n_val": res.n_val, "best_epoch": res.best_epoch,
                            "endpoints": endpoints_of(train_ds), "baseline_hazard": hazard,
                            "calibration": res.calibration})
    return {"arm": name, "modalities": list(modalities or cfg.model.modalities), "external": ext,
            "val": res.val, "threshold": res.threshold, "calibration": res.calibration,
            "best_epoch": res.best_epoch, "epochs_run": res.epochs_run,
            "n_train": res.n_train, "n_val": res.n_val, "seconds": res.seconds,
            "train_samples_per_s": res.samples_per_s, **({"held_out": held_out} if also else {})}


def endpoints_of(ds) -> list[str]:
    """The endpoints ``ds`` has labels for: benefit and / or dfs."""
    out = []
    if any(np.isfinite(it["benefit"]) for it in ds.items):
        out.append("benefit")
    if any(np.isfinite(it["dfs_time"]) and np.isfinite(it["dfs_event"]) for it in ds.items):
        out.append("dfs")
    return out


def _oracle_truth(cohort_dir: Path, center: str):
    """One center's benefit labels and the generator's true benefit probabilities, when
    ``_truth.csv`` holds them (a synthetic cohort's extra information; any other cohort simply has none)."""
    truth = Path(cohort_dir) / "_truth.csv"
    if not truth.exists():
        return None
    import pandas as pd

    try:
        df = pd.read_csv(truth)
    except (OSError, ValueError):
        return None
    if not {"benefit", "true_prob"} <= set(df.columns):
        return None
    df = df[df["site"] == center] if "site" in df else df
    df = df[np.isfinite(pd.to_numeric(df["benefit"], errors="coerce"))]
    if df["benefit"].nunique() < 2:
        return None
    return df["benefit"].to_numpy(dtype=int), df["true_prob"].to_numpy(dtype=float)


def oracle_auc(cohort_dir: Path, center: str) -> float | None:
    """AUC of the generator's true benefit probability on ``center`` (None without ``_truth.csv``)."""
    from sklearn.metrics import roc_auc_score

    truth = _oracle_truth(cohort_dir, center)
    return None if truth is None else float(roc_auc_score(*truth))


def oracle_ece(cohort_dir: Path, center: str) -> dict | None:
    """Calibration of the generator's true benefit probability on ``center``: its observed ECE and
    the floor (:func:`common.metrics.ece_floor`). The true probability is calibrated by construction, so
    these are what sampling alone gives on this center's patients: the reference for every model's ECE."""
    from common.metrics import ece_floor, expected_calibration_error

    truth = _oracle_truth(cohort_dir, center)
    if truth is None:
        return None
    return {"observed": expected_calibration_error(*truth), "floor": ece_floor(truth[1])}


ARMS = ("pooled", "unimodal", "local", "loco", "loco-local")


def run_baseline(cohort_dir: Path, out_dir: Path, cfg, arms=("pooled", "local", "unimodal"),
                 console: Console | None = None) -> dict:
    """Train and score every arm; ``out_dir/metrics.json`` is rewritten after each arm (valid JSON throughout,
    ``complete`` false until the last arm), so an interrupted table keeps what was done."""
    console = console or Console()
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    out_dir = Path(out_dir)
    save_config(cfg, out_dir)
    sites = discover_sites(cohort_dir)
    ext = [s for s in sites if s.role == "external"]
    train_sites = [s for s in sites if s.role != "external"]
    if len(ext) != 1 or not train_sites:
        raise SystemExit(f"{cohort_dir}: a baseline needs exactly one external site and at least one training site "
                         f"(found external={[s.name for s in ext]}, train={[s.name for s in train_sites]})")
    # the external center is read (its cache, its labels, its oracle) only by the arms scored there: a run of
    # leave-one-center-out arms alone leaves it sealed
    scores_external = any(a in arms for a in ("pooled", "unimodal", "local"))
    caches = ensure_caches(sites if scores_external else train_sites, cfg, progress=True)
    tr = {s.name: site_dataset(caches[s.name], ["train"], cfg) for s in train_sites}
    va = {s.name: site_dataset(caches[s.name], ["val"], cfg) for s in train_sites}
    test = site_dataset(caches[ext[0].name], None, cfg) if scores_external else None
    seed = int(cfg.seed)
    pooled_tr, pooled_va = ConcatSites(list(tr.values())), ConcatSites(list(va.values()))
    present = present_modalities(ConcatSites([pooled_tr, pooled_va]))
    wanted = [m for m in cfg.model.modalities if m in present]
    skipped: dict[str, str] = {}
    for m in cfg.model.modalities:
        if m not in present:
            skipped[f"unimodal:{m}"] = f"no training site has {m} data"
    if skipped:
        console.print(f"[yellow]modalities no training site has:[/yellow] "
                      f"{', '.join(m for m in cfg.model.modalities if m not in present)} (their branches are left out)")
    if not wanted and not int(len(cfg.data.clinical_features)):
        raise SystemExit(f"{cohort_dir}: no training site has any of the model's modalities "
                         f"({', '.join(cfg.model.modalities)}) and no clinical feature is configured")
    plan = []
    if "pooled" in arms:
        plan.append(("pooled", pooled_tr, pooled_va, wanted))
    if "unimodal" in arms:
        for m in MODALITIES:
            if m in present and len(wanted) > 1:
                plan.append((f"unimodal:{m}", pooled_tr, pooled_va, [m]))
    if "local" in arms:
        for s in train_sites:
            plan.append((f"local:{s.name}", tr[s.name], va[s.name], wanted))
    summary = {
        "cohort": str(cohort_dir), "external_site": ext[0].name, "n_external": len(test) if test is not None else None,
        "oracle_external_auc": oracle_auc(cohort_dir, ext[0].name) if scores_external else None,
        "oracle_external_ece": oracle_ece(cohort_dir, ext[0].name) if scores_external else None,
        "endpoints": endpoints_of(pooled_tr),
        "modalities": wanted, "skipped_arms": skipped, "config_hash": config_hash(cfg), "complete": False,
        "arms": {},
    }
    t0 = time.perf_counter()
    pooled_pred: dict = {}      # the pooled arm's external labels and probabilities, for the LOCO recalibration
    # loco-local: every training center's full data, on which the other centers' local-only models are scored
    held = {s.name: site_dataset(caches[s.name], None, cfg) for s in train_sites} if "loco-local" in arms else {}
    local_scores: dict = {}     # center -> {other training center: the center's local-only model's report there}

    def others(center):
        return {h: d for h, d in held.items() if h != center} or None
    for name, trd, vad, mods in plan:
        console.print(f"[bold]{name}[/bold]: {len(trd)} train / {len(vad)} val patients")
        center = name.split(":", 1)[1] if name.startswith("local:") else None
        r = run_arm(name, cfg, trd, vad, test, mods, seed, model_path=out_dir / "models" / f"{name.replace(':', '_')}.pt",
                    predictions=pooled_pred if name == "pooled" else None, also=others(center) if center else None)
        if "held_out" in r:
            local_scores[center] = r.pop("held_out")
        summary["arms"][name] = r
        summary["seconds"] = time.perf_counter() - t0
        _write(out_dir, summary)
        a, c = (r["external"].get("auc") or {}), (r["external"].get("c_index") or {})
        console.print(f"  external AUC {_num(a.get('value'))}, C-index {_num(c.get('value'))}  "
                      f"({r['seconds']:.0f}s, {r['train_samples_per_s']:.0f} samples/s)")
    if "loco" in arms:
        summary["loco"] = leave_one_center_out(cfg, train_sites, caches, tr, va, wanted, seed, console,
                                               cohort_dir=cohort_dir, out_dir=out_dir, full=held)
        params = summary["loco"].get("recalibration")
        if params and "pooled" in summary["arms"] and pooled_pred:
            summary["arms"]["pooled"]["external"].update(
                loco_recalibrated(pooled_pred, params, summary["arms"]["pooled"]["threshold"], cfg, seed))
        summary["seconds"] = time.perf_counter() - t0
        _write(out_dir, summary)
    if "loco-local" in arms:
        for s in train_sites:   # without the local arms: the same models, scored on the other centers only
            if s.name not in local_scores:
                r = run_arm(f"local:{s.name}", cfg, tr[s.name], va[s.name], None, wanted, seed, also=others(s.name))
                local_scores[s.name] = r["held_out"]
            console.print(f"  loco-local:{s.name} ({len(tr[s.name])} train): AUC on "
                          + ", ".join(f"{h} {_num((rep.get('auc') or {}).get('value'))}"
                                      for h, rep in local_scores[s.name].items()))
        summary["loco_local"] = local_cross_center(local_scores)
        summary["seconds"] = time.perf_counter() - t0
        _write(out_dir, summary)
    summary["complete"] = True
    _write(out_dir, summary)
    for t in render_table(summary):
        console.print(t)
    return summary


LOCO_KEYS = ("auc", "accuracy", "ece", "ece_floor", "ece_calibrated", "ece_loco_calibrated", "c_index",
             "oracle_auc", "auc_over_oracle", "oracle_ece", *WEAK_CAL_KEYS)


def fold_oracle(cohort_dir, center: str, auc) -> dict:
    """A held-out center's oracle (the generator's true probability, synthetic cohorts only): its AUC, the
    fold's AUC as a fraction of it (the issue's "x oracle", measured without the external center), and the
    oracle's observed ECE (what sampling alone gives there). ``{value: None}`` entries without ``_truth.csv``."""
    o_auc = oracle_auc(cohort_dir, center) if cohort_dir is not None else None
    o_ece = oracle_ece(cohort_dir, center) if cohort_dir is not None else None
    auc = (auc or {}).get("value") if isinstance(auc, dict) else auc
    return {"oracle_auc": {"value": o_auc}, "oracle_ece": {"value": (o_ece or {}).get("observed")},
            "auc_over_oracle": {"value": auc / o_auc if o_auc and auc is not None else None}}


def leave_one_center_out(cfg, train_sites, caches, tr, va, modalities, seed, console, cohort_dir=None,
                         out_dir: Path | None = None, full: dict | None = None) -> dict:
    """Leave-one-center-out CV over the training centers, for development without the external center:
    each fold trains the pooled model on the other centers' train splits (selection, threshold and
    recalibration on their validation splits) and scores it on every patient of the held-out center,
    which plays the external one.  Per fold the same full report as the external center; over folds the
    mean and SD of each metric (folds where a metric abstains are left out of its mean, and counted).

    Recalibration for a new center (:func:`transfer_recalibration`): Platt scaling fitted on the folds'
    held-out predictions, i.e. on centers the scoring model had not seen; each fold's ``ece_loco_calibrated``
    is that of a map fitted on the other folds only, and ``recalibration`` the map fitted on all folds.
    With ``out_dir``, each held-out patient's benefit label and probability go to ``loco_predictions.csv``
    there (a pooled run on data the caller already holds: for comparing runs, e.g. ensembles of seeds).
    ``full``: each training center's whole dataset where the caller already loaded it (else read per fold)."""
    folds: dict = {}
    held_pred: dict = {}
    for s in train_sites:
        others = [o.name for o in train_sites if o.name != s.name]
        if not others:
            break
        held = (full or {}).get(s.name)
        if held is None:
            held = site_dataset(caches[s.name], None, cfg)
        trd, vad = ConcatSites([tr[o] for o in others]), ConcatSites([va[o] for o in others])
        console.print(f"[bold]loco:{s.name}[/bold]: {len(trd)} train / {len(vad)} val patients, {len(held)} held out")
        held_pred[s.name] = {}
        r = run_arm(f"loco:{s.name}", cfg, trd, vad, held, modalities, seed, predictions=held_pred[s.name])
        held_pred[s.name]["patient_id"] = [it["patient_id"] for it in held.items]
        folds[s.name] = {"n_held_out": len(held), "n_train": r["n_train"], "val": r["val"],
                         **{k: r["external"].get(k) for k in LOCO_KEYS},
                         **fold_oracle(cohort_dir, s.name, r["external"].get("auc"))}
    if out_dir is not None and held_pred:
        import pandas as pd

        pd.concat([pd.DataFrame({"center": c, "patient_id": h["patient_id"], "benefit": h["y"], "prob": h["p"]})
                   for c, h in held_pred.items()]).to_csv(Path(out_dir) / "loco_predictions.csv", index=False)
    per_fold, params = transfer_recalibration(held_pred, seed=seed)
    for name, entry in per_fold.items():
        folds[name].update(entry)
    return {"folds": folds, "summary": loco_summary(folds), "recalibration": params,
            "basis": "leave-one-center-out over the training centers; the external center is not used"}


def local_cross_center(local_scores: dict) -> dict:
    """The local-only counterpart of leave-one-center-out CV, from ``{center: {other center: report}}`` (each
    training center's own model, the ``local:<center>`` arm's, scored on every patient of each other training
    center): per held-out center, every other center's local-only AUC there, the best and the mean.  A pooled
    or federated LOCO fold is compared with the best of them ("above every local-only model", measured without
    the external center).  Over held-out centers: mean and SD, as :func:`loco_summary`."""
    folds = {}
    for name in local_scores:
        auc = {c: (by.get(name, {}).get("auc") or {}).get("value") for c, by in local_scores.items() if c != name}
        auc = {c: float(v) for c, v in auc.items() if v is not None and np.isfinite(v)}
        best = max(auc, key=auc.get) if auc else None
        folds[name] = {"local_auc": auc, "best_local_center": best,
                       "best_local_auc": {"value": auc[best] if best else None},
                       "mean_local_auc": {"value": float(np.mean(list(auc.values()))) if auc else None}}
    return {"folds": folds, "summary": loco_summary(folds, ("best_local_auc", "mean_local_auc")),
            "basis": "each training center's local-only model scored on every other training center; "
                     "the external center is not used"}


def transfer_recalibration(held_pred: dict, seed: int = 0) -> tuple[dict, dict | None]:
    """Platt scaling fitted on out-of-center predictions (``{center: {"y", "p"}}``, each scored by a model that
    did not train on that center). Per center: the map fitted on the other centers only, its slope and
    intercept, and the ECE (and its floor) of that center's recalibrated probabilities, ``ece_loco_calibrated``:
    how a map learnt on unseen centers transfers to one more. Returns that and the map fitted on all centers
    (``None`` without both labels), the one to apply to a model that will meet a new center."""
    from common.metrics import apply_platt, ece_floor, expected_calibration_error, fit_platt

    def stack(names):
        ys = [np.asarray(held_pred[n].get("y", []), dtype=float) for n in names]
        ps = [np.asarray(held_pred[n].get("p", []), dtype=float) for n in names]
        return (np.concatenate(ys), np.concatenate(ps)) if ys else (np.zeros(0), np.zeros(0))

    per_fold = {}
    for name in held_pred:
        y, p = stack([name])
        params = fit_platt(*stack([n for n in held_pred if n != name]))
        lab = np.isfinite(y) & np.isfinite(p)
        if params is None or not lab.any():
            per_fold[name] = {"ece_loco_calibrated": {"value": None}}
            continue
        q = apply_platt(p[lab], params)
        per_fold[name] = {"ece_loco_calibrated": {"value": expected_calibration_error(y[lab], q)},
                          "ece_loco_calibrated_floor": {"value": ece_floor(q, seed=seed)},
                          "loco_calibration": {"a": params["a"], "b": params["b"]}}
    params = fit_platt(*stack(list(held_pred)))
    if params is not None:
        params = {"method": "platt", "a": params["a"], "b": params["b"], "n": params["n"],
                  "fitted_on": "held-out predictions of the leave-one-center-out folds"}
    return per_fold, params


def loco_recalibrated(pred: dict, params: dict, threshold: float, cfg, seed: int) -> dict:
    """The pooled model's external calibration after the LOCO-fitted map (:func:`transfer_recalibration`):
    ``ece_loco_calibrated`` and ``brier_loco_calibrated`` with their bootstrap CIs, the map, and the floor."""
    from common.metrics import evaluate_predictions

    rep = evaluate_predictions(pred["y"], pred["p"], threshold, n_boot=int(cfg.train.n_boot), seed=seed,
                               min_patients=int(cfg.train.min_patients), calibration=params)
    return {"ece_loco_calibrated": rep.get("ece_calibrated"), "brier_loco_calibrated": rep.get("brier_calibrated"),
            "ece_loco_calibrated_floor": rep.get("ece_calibrated_floor"), "loco_calibration": params}


def loco_summary(folds: dict, keys=LOCO_KEYS) -> dict:
    """Mean and SD over folds of each of ``keys`` (``{value}`` entries); a fold where a metric abstains
    is left out of its mean and counted."""
    summary = {}
    for k in keys:
        vals = [f[k]["value"] for f in folds.values() if isinstance(f.get(k), dict) and f[k].get("value") is not None]
        summary[k] = {"mean": float(np.mean(vals)) if vals else None,
                      "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
                      "folds": len(vals), "abstained": len(folds) - len(vals)}
    return summary


def _write(out_dir: Path, summary: dict) -> None:
    """metrics.json, strict JSON (NaN -> null), replaced atomically."""
    path = Path(out_dir) / "metrics.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(json_safe(summary), indent=1, allow_nan=False))
    tmp.replace(path)


def _num(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3f}"


def _fmt(m: dict | None, key: str) -> str:
    v = (m or {}).get(key)
    if isinstance(v, dict):
        if v.get("value") is None:
            return "n/a"
        lo, hi = v.get("lo"), v.get("hi")
        return f"{v['value']:.3f}" + (f" ({lo:.2f}-{hi:.2f})" if lo is not None and hi is not None else "")
    return _num(v)


def render_table(summary: dict) -> list:
    """The external center's metrics per arm, then each arm's internal validation and cost: two tables that
    fit 80 columns."""
    from common.reports.console import compact_table

    oracle, oracle_cal = summary.get("oracle_external_auc"), summary.get("oracle_external_ece")
    title = (f"External center {summary['external_site']} (n={summary['n_external']}"
             + (f", oracle AUC {oracle:.3f}" if oracle else "")
             + (f", oracle ECE {oracle_cal['observed']:.3f} (floor {oracle_cal['floor']:.3f})" if oracle_cal else "")
             + f"); modalities {', '.join(summary['modalities'])}")
    ext = compact_table(title, [("arm", "left"), ("n train", "right"), ("AUC (95% CI)", "right"),
                                ("accuracy", "right"), ("C-index (95% CI)", "right")])
    val = compact_table("External calibration (ECE raw; the floor a perfectly calibrated model would show on "
                        "these patients; after Platt scaling fitted on internal validation; after the LOCO-fitted "
                        "map); internal validation (selection); training time",
                        [("arm", "left"), ("ECE", "right"), ("floor", "right"), ("ECE cal", "right"),
                         ("LOCO cal", "right"), ("val AUC", "right"), ("val C", "right"), ("epochs", "right"),
                         ("s", "right")])
    for name, r in summary["arms"].items():
        e = r["external"]
        ext.add_row(name, str(r["n_train"]), _fmt(e, "auc"), _num((e.get("accuracy") or {}).get("value")),
                    _fmt(e, "c_index"))
        val.add_row(name, *(_num((e.get(k) or {}).get("value"))
                            for k in ("ece", "ece_floor", "ece_calibrated", "ece_loco_calibrated")),
                    _num(r["val"].get("val_auc")), _num(r["val"].get("val_c_index")), str(r["best_epoch"]),
                    f"{r['seconds']:.0f}")
    for name, why in (summary.get("skipped_arms") or {}).items():
        ext.add_row(name, "-", "skipped", "", why)
    tables = [ext, val] if summary.get("n_external") is not None else []   # None: no arm read the external center
    if summary.get("loco"):
        tables.append(loco_table(summary["loco"]))
    if summary.get("loco_local"):
        tables.append(loco_local_table(summary["loco_local"], summary.get("loco")))
    return tables


def loco_local_table(loco_local: dict, loco: dict | None = None):
    """Per held-out training center: the best and the mean of the other centers' local-only AUCs there (and the
    pooled model's LOCO fold beside them, when it ran)."""
    from common.reports.console import compact_table

    cols = [("held out", "left"), ("best local-only", "left"), ("AUC", "right"), ("mean local", "right")]
    if loco:
        cols.append(("pooled LOCO", "right"))
    t = compact_table("Local-only models on the other training centers (the local-only counterpart of LOCO)", cols)
    for c, f in loco_local["folds"].items():
        row = [c, f["best_local_center"] or "n/a", _num(f["best_local_auc"]["value"]), _num(f["mean_local_auc"]["value"])]
        if loco:
            row.append(_num(((loco["folds"].get(c) or {}).get("auc") or {}).get("value")))
        t.add_row(*row)
    return t


def loco_table(loco: dict, title: str = "Leave-one-center-out CV (training centers only; each fold's held-out "
                                        "center plays the external one)"):
    from common.reports.console import compact_table

    heads = {"auc": "AUC", "auc_over_oracle": "x oracle", "ece": "ECE", "ece_floor": "floor", "ece_calibrated": "ECE cal",
             "ece_loco_calibrated": "LOCO cal", "c_index": "C-index"}
    # a column no fold has (a federation releases no floor and fits no LOCO map) is left out
    shown_keys = [k for k in heads if k in ("auc", "ece", "c_index")
                  or any((f.get(k) or {}).get("value") is not None for f in loco["folds"].values())]
    cv = compact_table(title, [("held out", "left"), ("n", "right"), *((heads[k], "right") for k in shown_keys)])
    for c, f in loco["folds"].items():
        cv.add_row(c, str(f.get("n_held_out") or "n/a"), *(_num((f.get(k) or {}).get("value")) for k in shown_keys))
    # mean and SD on rows of their own: "0.740+-0.07" in seven columns overflows 80 and rich then squeezes
    # the center names out of the table
    cv.add_row("mean", "", *(_num(loco["summary"][k].get("mean")) for k in shown_keys))
    cv.add_row("SD", "", *(_num(loco["summary"][k].get("sd")) for k in shown_keys))
    return cv
