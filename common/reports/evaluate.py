"""``newadj evaluate``: external validation of one model package on one site, run where the data is.

``evaluate_site(model_path, site_dir, out_dir)`` preprocesses the site with the
*model's* configuration (so input dimensions match), predicts every patient and
writes two files to ``out_dir``:

* ``metrics.json`` -- aggregates only (no per-patient row): discrimination (AUC
  with DeLong CI; accuracy, sensitivity, specificity, PPV, NPV at the
  checkpoint's threshold -- never re-tuned on these data -- with bootstrap CIs),
  calibration (Brier, ECE, reliability bins), DFS (Harrell's C-index with CI,
  log-rank test and Cox hazard ratio of predicted-benefit vs predicted-no-benefit
  groups), subgroups (modality availability, clinical strata) and the model card
  beside the seed study's reference numbers;
* ``report.html`` -- the same, self-contained (figures embedded as base64 PNG).

A metric that the site's data cannot support (no benefit labels, no DFS, too few
patients, one class) is ``{"value": null, "not_computable": "<reason>"}`` and
everything else is still computed.  A file that is not a usable model package
raises :class:`EvaluationError` naming the file (the CLI exits with code 2).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from common.hashing import json_safe
from common.learn.engine import predict
from common.metrics import WEAK_CAL_KEYS, apply_platt, delong_auc_ci, evaluate_predictions, reliability_curve

SEED_STUDY = {"external_auc": 0.89, "accuracy": 0.86,
              "reference": "New-adj-Net seed study, external validation cohort (reported AUC 0.89, accuracy 0.86)"}
CLS_KEYS = ("accuracy", "sensitivity", "specificity", "ppv", "npv")
CAL_KEYS = ("brier", "ece", *WEAK_CAL_KEYS)
RECAL_KEYS = ("brier_calibrated", "ece_calibrated")
MODALITY_NAMES = ("mri", "pathology", "genomics")

# clinical strata: (field, subgroup label, predicate); a patient without the field is in none of them
CLINICAL_STRATA = [
    ("tumor_count", "tumor count = 1", lambda v: v <= 1),
    ("tumor_count", "tumor count > 1", lambda v: v > 1),
    ("afp_ng_ml", "AFP < 400 ng/mL", lambda v: v < 400),
    ("afp_ng_ml", "AFP >= 400 ng/mL", lambda v: v >= 400),
    ("child_pugh", "Child-Pugh 5-6", lambda v: v <= 6),
    ("child_pugh", "Child-Pugh >= 7", lambda v: v >= 7),
    ("max_diameter_cm", "max diameter <= 5 cm", lambda v: v <= 5),
    ("max_diameter_cm", "max diameter > 5 cm", lambda v: v > 5),
    ("age", "age < 65", lambda v: v < 65),
    ("age", "age >= 65", lambda v: v >= 65),
    ("ecog", "ECOG 0", lambda v: v < 0.5),
    ("ecog", "ECOG >= 1", lambda v: v >= 0.5),
]


class EvaluationError(Exception):
    """Bad input (not a model package, wrong configuration, unreadable site): exit code 2."""

    exit_code = 2


# --------------------------------------------------------------------------- inputs

def load_checkpoint(model_path: Path, expected_sha256: str | None = None, site_dir: Path | None = None):
    """(model, package) or :class:`EvaluationError` naming the file (``expected_sha256``: see model_io).

    ``package["config"]`` is the configuration ``site_dir`` scores it with (its own, with the package's
    architecture and schema; the installed defaults without a site)."""
    from common.data.policy import PolicyError
    from common.federation.model_io import ModelPackageError, load_model_package, package_site_config

    model_path = Path(model_path)
    try:
        model, pkg = load_model_package(model_path, expected_sha256)      # its errors name the file
    except ModelPackageError as exc:
        raise EvaluationError(str(exc)) from exc
    try:
        pkg["config"] = package_site_config(pkg, site_dir)
    except ModelPackageError as exc:
        raise EvaluationError(f"{model_path}: {exc}") from exc
    except PolicyError as exc:
        raise EvaluationError(str(exc)) from exc
    return model, pkg


def open_site(site_dir: Path, cfg, model_path: Path | None = None, splits=None):
    """The site's dataset and its clinical rows by patient id; ``cfg``: the site's configuration for the model
    (``load_checkpoint(..., site_dir)``: the package's architecture and schema, everything else the site's)."""
    from common.learn.dataset import site_dataset
    from common.preprocess.cache import preprocess_site
    from common.data.site import SiteData, SiteDataError
    from common.learn.task import check_dataset_matches, input_dims

    site_dir = Path(site_dir)
    if not site_dir.is_dir():
        raise EvaluationError(f"{site_dir}: no such site folder")
    try:
        res = preprocess_site(site_dir, cfg, progress=False)
    except SiteDataError as exc:
        raise EvaluationError(f"{site_dir}: site data has errors; run `newadj validate-site {site_dir}`\n{exc}") from exc
    ds = site_dataset(res.manifest, splits, cfg)   # the run's loading options: tile norm, feature scaling
    try:
        check_dataset_matches(ds, input_dims(cfg))
    except ValueError as exc:
        raise EvaluationError(f"checkpoint {model_path}: {exc}") from exc
    site = SiteData.open(site_dir, phases=tuple(cfg.data.phases), val_fraction=float(cfg.data.val_fraction),
                         strict=False, cache_dir=str(cfg.data.cache_dir))
    clinical = {p.patient_id: dict(p.clinical) for p in site.patients}
    return ds, clinical, site


def item_modalities(item: dict) -> list[str]:
    have = []
    if item.get("mri") is not None:
        have.append("mri")
    if item.get("path") is not None:
        have.append("pathology")
    gm = item.get("genomics_mask")
    if gm is not None and bool(np.asarray(gm).any()):
        have.append("genomics")
    return have


# --------------------------------------------------------------------------- metrics

def _nc(reason: str) -> dict:
    return {"value": None, "not_computable": reason}


def _convert(entry: dict | None, reason_override: str | None = None) -> dict:
    if not entry:
        return _nc(reason_override or "not computed")
    if entry.get("abstained") or entry.get("value") is None:
        return _nc(reason_override or entry.get("reason") or "undefined")
    return entry


def _auc_entry(y: np.ndarray, p: np.ndarray, min_patients: int) -> dict:
    lab = np.isfinite(y) & np.isfinite(p)
    y, p = y[lab], p[lab]
    n, n_pos = int(y.size), int(y.sum()) if y.size else 0
    out = {"n": n, "n_pos": n_pos}
    if len(lab) == 0:
        return {**out, "auc": _nc("no patients in this subgroup")}
    if n == 0:
        return {**out, "auc": _nc("no patient with a benefit label")}
    if n < min_patients:
        return {**out, "auc": _nc(f"only {n} labelled patients (< min_patients={min_patients})")}
    if n_pos in (0, n):
        return {**out, "auc": _nc(f"only one class present (n_pos={n_pos}, n={n})")}
    auc, lo, hi, _ = delong_auc_ci(y, p)
    return {**out, "auc": {"value": auc, "lo": lo, "hi": hi, "method": "delong"}}


def risk_groups(risk: np.ndarray, hazard: dict | None) -> tuple[np.ndarray, list[str], str]:
    """Tertile group (0 low, 1 middle, 2 high) of each patient's predicted risk.

    The cut points come with the model (tertiles of its training patients' risk, pooled
    from the training centers' released risk cells) so that a patient's group does not
    depend on who else is at the site; a package without them falls back to this site's
    own tertiles of predicted risk (label-free), and says so.
    """
    cuts = ((hazard or {}).get("risk_groups") or {}).get("cuts")
    basis = ((hazard or {}).get("risk_groups") or {}).get("basis", "")
    if not cuts or not all(np.isfinite(c) for c in cuts):
        ok = np.isfinite(risk)
        cuts = list(np.quantile(risk[ok], [1 / 3, 2 / 3])) if ok.any() else [0.0, 0.0]
        basis = "tertiles of this site's predicted risk (the model carries no cut points)"
    return np.searchsorted(np.asarray(cuts, float), risk, side="right"), RISK_GROUP_NAMES, basis


def predicted_groups(pred: dict, threshold: float, endpoints, hazard: dict | None) -> tuple[np.ndarray, list[str], str]:
    """The Kaplan-Meier groups of a model: predicted benefit at its threshold when it has a trained benefit
    head, else tertiles of predicted DFS risk (:func:`risk_groups`)."""
    if "benefit" in endpoints:
        return ((np.asarray(pred["prob"], float) >= threshold).astype(int), BENEFIT_GROUP_NAMES,
                f"predicted benefit at the checkpoint's threshold {threshold:.3f}")
    return risk_groups(np.asarray(pred["risk"], float), hazard)


def package_endpoints(pkg: dict) -> list[str]:
    """The endpoints a model package was trained for (packages from before DFS-only models: both)."""
    return list((pkg.get("card") or {}).get("endpoints") or ("benefit", "dfs"))


# group keys (shown with spaces for underscores)
RISK_GROUP_NAMES = ["low_predicted_risk", "middle_predicted_risk", "high_predicted_risk"]
BENEFIT_GROUP_NAMES = ["predicted_no_benefit", "predicted_benefit"]
AT_RISK_MONTHS = (0, 12, 24, 36, 48, 60)


def survival_analysis(time: np.ndarray, event: np.ndarray, group: np.ndarray, min_patients: int,
                      names: list[str] | None = None) -> dict:
    """Kaplan-Meier groups: log-rank test, Cox hazard ratio of each group against the first, number at risk.

    ``group`` holds 0..k-1 (``names[g]`` labels group g); aggregates only.
    """
    names = names or BENEFIT_GROUP_NAMES
    keep = np.isfinite(time) & np.isfinite(event)
    t, e, g = time[keep], event[keep].astype(int), group[keep].astype(int)
    n = int(t.size)
    out: dict[str, Any] = {"n": n, "n_events": int(e.sum()), "group_names": list(names),
                           "groups": {names[k]: {"n": int((g == k).sum()), "events": int(e[g == k].sum()),
                                                 "at_risk": {str(m): int(((g == k) & (t >= m)).sum())
                                                             for m in AT_RISK_MONTHS}}
                                      for k in range(len(names))}}
    reason = None
    present = [k for k in range(len(names)) if (g == k).any()]
    if n == 0:
        reason = "no patient with DFS time and event"
    elif n < min_patients:
        reason = f"only {n} patients with DFS data (< min_patients={min_patients})"
    elif not e.any():
        reason = "no DFS events observed"
    elif len(present) < 2:
        reason = "all patients fall in one predicted group"
    if reason:
        out.update({"km": _nc(reason), "logrank": _nc(reason), "hazard_ratio": _nc(reason)})
        return out
    out["km"] = {"value": True}
    try:
        from lifelines.statistics import multivariate_logrank_test

        lr = multivariate_logrank_test(t, g, e)
        out["logrank"] = {"p_value": float(lr.p_value), "statistic": float(lr.test_statistic),
                          "value": float(lr.p_value), "groups": len(present)}
    except Exception as exc:  # pragma: no cover - lifelines edge cases
        out["logrank"] = _nc(f"log-rank test failed: {exc}")
    ref = present[0]
    out["hazard_ratio"] = {}
    for k in present[1:]:
        out["hazard_ratio"][names[k]] = _cox_hr(t, e, (g == k).astype(int), np.isin(g, [ref, k]),
                                                f"Cox PH, {names[k]} vs {names[ref]}")
    if len(names) == 2:          # one comparison: the entry itself
        out["hazard_ratio"] = next(iter(out["hazard_ratio"].values()), _nc("one group only"))
    return out


def _cox_hr(t, e, x, rows, method: str) -> dict:
    try:
        import warnings

        import pandas as pd
        from lifelines import CoxPHFitter

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cph = CoxPHFitter()
            cph.fit(pd.DataFrame({"T": t[rows], "E": e[rows], "x": x[rows]}), duration_col="T", event_col="E")
        s = cph.summary.loc["x"]
        hr, lo, hi = float(s["exp(coef)"]), float(s["exp(coef) lower 95%"]), float(s["exp(coef) upper 95%"])
        if not all(math.isfinite(v) for v in (hr, lo, hi)) or hi > 1e6 or lo < 1e-6:
            return _nc("Cox model did not converge (e.g. no events in one group)")
        return {"value": hr, "lo": lo, "hi": hi, "p_value": float(s["p"]), "method": method}
    except Exception as exc:
        return _nc(f"Cox model failed: {type(exc).__name__}: {exc}")


def subgroup_analysis(y: np.ndarray, p: np.ndarray, modalities: list[list[str]], clinical: list[dict],
                      min_patients: int) -> dict:
    counts = np.array([len(m) for m in modalities])
    by_mod = []
    for k, label in ((3, "all three modalities"), (2, "two modalities"), (1, "one modality"), (0, "no modality")):
        m = counts == k
        if k == 0 and not m.any():
            continue
        by_mod.append({"subgroup": label, "n_patients": int(m.sum()), **_auc_entry(y[m], p[m], min_patients)})
    by_clin = []
    for fld, label, pred in CLINICAL_STRATA:
        vals = np.array([(c or {}).get(fld) if (c or {}).get(fld) is not None else np.nan for c in clinical], float)
        if not np.isfinite(vals).any():
            continue
        m = np.isfinite(vals) & np.array([bool(pred(v)) if np.isfinite(v) else False for v in vals])
        by_clin.append({"field": fld, "subgroup": label, "n_patients": int(m.sum()),
                        "n_missing_field": int((~np.isfinite(vals)).sum()), **_auc_entry(y[m], p[m], min_patients)})
    return {"modality_availability": by_mod, "clinical": by_clin}


def compute_metrics(pred: dict, threshold: float, modalities: list[list[str]], clinical: list[dict], *,
                    n_boot: int = 500, seed: int = 0, min_patients: int = 10, min_patients_dfs: int | None = None,
                    ece_bins: int = 10, endpoints=("benefit", "dfs"), hazard: dict | None = None,
                    horizons=(12, 24, 36), calibration: dict | None = None) -> dict:
    """Every aggregate of the report from per-patient predictions (which never leave this function).

    ``endpoints``: the heads the model was trained for; a head it was not trained for is
    reported as not computable.  Patients are grouped for Kaplan-Meier by predicted
    benefit at the threshold (benefit models) or by predicted-risk tertile (DFS models).
    ``calibration``: the model's Platt scaling (fitted on internal validation, in its package):
    calibration is reported before and after it (``brier_calibrated``, ``ece_calibrated`` and a
    second reliability curve); discrimination and the decision at the threshold do not change.
    """
    from common.metrics import dfs_report

    min_dfs = min_patients if min_patients_dfs is None else int(min_patients_dfs)
    y = np.asarray(pred["benefit"], float)
    p = np.asarray(pred["prob"], float)
    t = np.asarray(pred["dfs_time"], float)
    e = np.asarray(pred["dfs_event"], float)
    r = np.asarray(pred["risk"], float)
    benefit_head = "benefit" in endpoints
    rep = evaluate_predictions(y, p, threshold, n_boot=n_boot, seed=seed, min_patients=min_patients,
                               ece_bins=ece_bins, calibration=calibration)
    n_lab = int(np.isfinite(y).sum())
    n_surv = int((np.isfinite(t) & np.isfinite(e)).sum())
    no_labels = ("the model has no trained benefit head (it was trained for DFS only)" if not benefit_head else
                 "no patient at this site has a benefit label" if n_lab == 0 else None)
    no_dfs = ("the model has no trained DFS head" if "dfs" not in endpoints else
              "no patient at this site has DFS time and event" if n_surv == 0 else None)
    out: dict[str, Any] = {
        "n_patients": int(y.size), "n_labelled": n_lab, "n_pos": int(np.nansum(y)) if n_lab else 0,
        "n_with_dfs": n_surv, "endpoints": list(endpoints), "threshold": float(threshold),
        "threshold_source": "checkpoint (internal validation)",
        "predicted_benefit": int((p >= threshold).sum()) if benefit_head else None,
    }
    out["discrimination"] = {"auc": _convert(rep.get("auc"), no_labels),
                             **{k: _convert(rep.get(k), no_labels) for k in CLS_KEYS}}
    lab = np.isfinite(y) & np.isfinite(p)
    cal = {k: _convert(rep.get(k), no_labels) for k in CAL_KEYS + (RECAL_KEYS if calibration else ())}
    if calibration:
        cal["recalibration"] = rep.get("calibration")
    if benefit_head and lab.sum() >= min_patients:
        def curve(prob):
            rc = reliability_curve(y[lab], prob, n_bins=ece_bins)
            out_ = {k: [None if not np.isfinite(v) else float(v) for v in np.asarray(rc[k], float)]
                    for k in ("prob_pred", "prob_true", "bin_edges")}
            return {**out_, "counts": [int(c) for c in rc["counts"]]}
        cal["reliability"] = curve(p[lab])
        if calibration:
            cal["reliability_calibrated"] = curve(apply_platt(p[lab], calibration))
    else:
        cal["reliability"] = _nc(no_labels or f"only {int(lab.sum())} labelled patients (< min_patients={min_patients})")
    out["calibration"] = cal
    group, names, basis = predicted_groups(pred, threshold, endpoints, hazard)
    surv = survival_analysis(t, e, group, min_dfs, names)
    surv["grouping"] = basis
    if no_dfs:
        surv.update({k: _nc(no_dfs) for k in ("c_index", "td_auc", "ibs", "dfs_calibration")})
    else:
        cuts = ((hazard or {}).get("risk_groups") or {}).get("cuts")
        dr = dfs_report(t, e, r, horizons, (hazard or {}).get("times"), (hazard or {}).get("cumhaz"),
                        n_boot=n_boot, seed=seed, min_patients=min_dfs, risk_cuts=cuts)
        surv["c_index"] = _convert(dr["c_index"])
        surv["td_auc"] = {h: _convert(v) for h, v in dr["td_auc"].items()}
        surv["ibs"] = _convert(dr["ibs"])
        surv["dfs_calibration"] = (_convert(dr["calibration"]) if dr["calibration"].get("abstained")
                                   else dr["calibration"])
    out["survival"] = surv
    out["subgroups"] = subgroup_analysis(y, p, modalities, clinical, min_patients)
    out["modality_counts"] = {m: int(sum(m in ms for ms in modalities)) for m in MODALITY_NAMES}
    return out


# --------------------------------------------------------------------------- model card

def model_card(pkg: dict, model_path: Path) -> dict:
    from common.config import config_hash

    card = dict(pkg.get("card") or {})
    cfg = pkg["config"]
    centers = card.get("training_centers") or {}
    return {
        "file": str(model_path), "sha256": pkg.get("sha256"), "threshold": float(pkg.get("threshold", 0.5)),
        "config_hash": card.get("config_hash") or config_hash(cfg),
        "model": str(cfg.model.get("name", "?")), "modalities": list(cfg.model.modalities),
        "strategy": card.get("strategy") or (f"baseline arm {card['arm']}" if card.get("arm") else None),
        "rounds": card.get("rounds"), "selected_round": card.get("selected_round"),
        "local_epochs": card.get("local_epochs"), "selection": card.get("selection"),
        "training_centers": {c: {"n_train": (v or {}).get("n_train"), "n_val": (v or {}).get("n_val")}
                             for c, v in centers.items()},
        "n_train": card.get("n_train"), "n_val": card.get("n_val"),
        "privacy": card.get("privacy"), "seed": card.get("seed"), "endpoints": package_endpoints(pkg),
        "seed_study": SEED_STUDY,
    }


# --------------------------------------------------------------------------- entry point

def evaluate_site(model_path: Path, site_dir: Path, out_dir: Path, *, splits=None, n_boot: int | None = None,
                  seed: int = 0, expected_sha256: str | None = None) -> dict:
    """Evaluate the package at ``model_path`` on the site at ``site_dir``; write report.html and metrics.json."""
    from common.reports.evaluation_page import render_html
    from common.reports.plots import km_figure, reliability_figure, roc_figure

    model_path, site_dir, out_dir = Path(model_path), Path(site_dir), Path(out_dir)
    model, pkg = load_checkpoint(model_path, expected_sha256, site_dir)
    cfg = pkg["config"]
    ds, clinical_by_id, site = open_site(site_dir, cfg, model_path, splits)
    if len(ds) == 0:
        raise EvaluationError(f"{site_dir}: no patients to evaluate" + (f" in split(s) {splits}" if splits else ""))
    tc = cfg.train
    n_boot = int(tc.get("n_boot", 500) if n_boot is None else n_boot)
    from common.data.policy import load_policy

    floors = load_policy(site_dir).min_patients     # the site's floors, not the package's
    threshold = float(pkg.get("threshold", 0.5))
    endpoints = package_endpoints(pkg)
    hazard = (pkg.get("card") or {}).get("baseline_hazard")
    pred = predict(model, ds, int(tc.get("eval_batch_size", 64)))
    modalities = [item_modalities(it) for it in ds.items]
    clinical = [clinical_by_id.get(it["patient_id"], {}) for it in ds.items]
    metrics = compute_metrics(pred, threshold, modalities, clinical, n_boot=n_boot, seed=seed,
                              min_patients=int(floors["benefit"]), min_patients_dfs=int(floors["dfs"]),
                              endpoints=endpoints, hazard=hazard, horizons=list(tc.get("dfs_horizons", (12, 24, 36))),
                              calibration=(pkg.get("card") or {}).get("calibration"))
    card = model_card(pkg, model_path)
    metrics = {"site": {"dir": str(site_dir), "center_id": ds.center_id, "role": ds.role,
                        "splits": list(splits) if splits else "all",
                        "skipped_files": len(ds.skipped), "data_problems": len(site.problems)},
               "created": _dt.datetime.now().isoformat(timespec="seconds"), **metrics, "model_card": card}
    metrics["comparison"] = _comparison(metrics)

    figs: dict[str, str] = {}
    y, p = np.asarray(pred["benefit"], float), np.asarray(pred["prob"], float)
    lab = np.isfinite(y) & np.isfinite(p)
    auc = metrics["discrimination"]["auc"]
    if auc.get("value") is not None:
        figs["roc"] = roc_figure(y[lab], p[lab], auc, threshold)
    rel = metrics["calibration"]["reliability"]
    if not rel.get("not_computable"):
        cal = metrics["calibration"]
        figs["reliability"] = reliability_figure(rel, cal["brier"].get("value"), cal["ece"].get("value"),
                                                 cal.get("reliability_calibrated"),
                                                 (cal.get("ece_calibrated") or {}).get("value"))
    surv = metrics["survival"]
    if not surv["km"].get("not_computable"):
        t, e = np.asarray(pred["dfs_time"], float), np.asarray(pred["dfs_event"], float)
        k = np.isfinite(t) & np.isfinite(e)
        group, names, basis = predicted_groups(pred, threshold, endpoints, hazard)
        hr = surv["hazard_ratio"] if len(names) == 2 else None
        figs["km"] = km_figure(t[k], e[k].astype(int), group[k], f"DFS by {basis}",
                               (surv["logrank"] or {}).get("p_value"), hr, names)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=1))
    (out_dir / "report.html").write_text(render_html(metrics, figs))
    metrics["figures"] = sorted(figs)
    return metrics


def _comparison(m: dict) -> list[dict]:
    d = m["discrimination"]
    return [{"metric": "external AUC", "this_model": d["auc"], "seed_study": SEED_STUDY["external_auc"]},
            {"metric": "accuracy", "this_model": d["accuracy"], "seed_study": SEED_STUDY["accuracy"]}]
