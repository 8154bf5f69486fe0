"""``newadj screen``: decision support for the trial's inclusion criterion 8, run at the site.

For one patient (or every patient of a site) it reports

* the predicted probability of benefit from neoadjuvant therapy with an
  uncertainty interval from Monte-Carlo dropout (dropout layers kept in train
  mode, everything else -- normalisation, modality dropout -- in eval mode;
  ``passes`` forward passes with a fixed seed; 2.5-97.5 percentiles),
* criterion 8 at the checkpoint's threshold (``meets`` / ``does not meet``, and
  ``uncertain`` when the interval straddles the threshold),
* which modalities the prediction used,
* the protocol's structured checks where the clinical row has the fields:
  age 18-75, Child-Pugh score <= 7, ECOG 0-1, BCLC stage B, no prior treatment
  -> ``eligible`` / ``not eligible`` / ``incomplete`` with reasons.

``screen_all`` writes one CSV row per patient of the site; the file stays at the
site (default ``<site>/.newadj-screening.csv``).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.reports.evaluate import EvaluationError, item_modalities, load_checkpoint, open_site

DEFAULT_CSV = ".newadj-screening.csv"

# (field, criterion text, predicate on the value)
CRITERIA = [
    ("age", "age 18-75 years", lambda v: 18 <= v <= 75),
    ("child_pugh", "Child-Pugh score <= 7", lambda v: v <= 7),
    ("ecog", "ECOG performance status 0-1", lambda v: v in (0, 1)),
    ("bclc_b", "BCLC stage B", lambda v: v == 1),
    ("prior_treatment", "no prior treatment for HCC", lambda v: v == 0),
]


class ScreeningError(EvaluationError):
    """Bad input (unknown patient, unusable checkpoint): exit code 2."""


def _missing(v: Any) -> bool:
    if v is None:
        return True
    try:
        return math.isnan(float(v))
    except (TypeError, ValueError):
        return True


def check_eligibility(clinical: dict | None) -> dict:
    """Structured protocol checks on one clinical row.

    ``not eligible`` as soon as one available field fails (whatever is missing);
    ``incomplete`` when nothing fails but a field is missing; ``eligible`` when
    every check passes.  ``checks`` lists each criterion with its value and result.
    """
    clinical = clinical or {}
    checks, reasons, missing = [], [], []
    for fld, text, ok in CRITERIA:
        v = clinical.get(fld)
        if _missing(v):
            checks.append({"criterion": text, "field": fld, "value": None, "result": "missing"})
            missing.append(f"{fld} missing (needed for: {text})")
            continue
        v = float(v)
        passed = bool(ok(v))
        checks.append({"criterion": text, "field": fld, "value": v, "result": "pass" if passed else "fail"})
        if not passed:
            shown = int(v) if v.is_integer() else v
            reasons.append(f"{text}: {fld} = {shown}")
    if reasons:
        status = "not eligible"
    elif missing:
        status = "incomplete"
    else:
        status = "eligible"
    return {"status": status, "reasons": reasons + (missing if status != "eligible" else []), "checks": checks}


def _dropout_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    kinds = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout,
             torch.nn.FeatureAlphaDropout)
    return [m for m in model.modules() if isinstance(m, kinds)]


@torch.no_grad()
def mc_dropout_outputs(model: torch.nn.Module, dataset, passes: int = 50, seed: int = 0,
                       batch_size: int = 64, output: str = "prob") -> tuple[np.ndarray, np.ndarray]:
    """(eval-mode values [n], MC-dropout values [passes, n]) of ``output``: ``prob`` (benefit) or ``risk`` (DFS)."""
    from torch.utils.data import DataLoader

    from common.learn.dataset import make_collate

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                        collate_fn=make_collate(dataset.mri_shape, dataset.path_dim))
    batches = list(loader)

    def value(b):
        out = model(b)
        return torch.sigmoid(out["logit"].float()) if output == "prob" else out["risk"].float()

    model.eval()
    point = torch.cat([value(b) for b in batches]).numpy()
    drops = _dropout_modules(model)
    gen_state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        for m in drops:
            m.train()
        samples = np.stack([torch.cat([value(b) for b in batches]).numpy() for _ in range(int(passes))])
    finally:
        model.eval()
        torch.set_rng_state(gen_state)
    return point, samples


def mc_dropout_probs(model: torch.nn.Module, dataset, passes: int = 50, seed: int = 0,
                     batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(eval-mode probabilities [n], MC-dropout probabilities [passes, n])."""
    return mc_dropout_outputs(model, dataset, passes, seed, batch_size, "prob")


def _prediction_rows(model, pkg, ds, passes: int, seed: int) -> list[dict]:
    """Criterion 8 per patient from the model's benefit head, or -- for a model trained for DFS only --
    its DFS head (predicted DFS probability and risk group), saying which head it used."""
    from common.reports.evaluate import RISK_GROUP_NAMES, package_endpoints, risk_groups
    from common.metrics import survival_at

    threshold = float(pkg.get("threshold", 0.5))
    used_by_model = list(pkg["config"].model.modalities)
    batch = int(pkg["config"].train.get("eval_batch_size", 64))
    head = "benefit" if "benefit" in package_endpoints(pkg) else "dfs"
    rows = []
    if head == "benefit":
        point, samples = mc_dropout_outputs(model, ds, passes, seed, batch, "prob")
        recal = (pkg.get("card") or {}).get("calibration")
        if recal:   # the model's Platt scaling (internal validation): probabilities and threshold alike
            from common.metrics import apply_platt

            point, samples = apply_platt(point, recal), apply_platt(samples, recal)
            threshold = float(apply_platt(np.array([threshold]), recal)[0])
    else:
        risk, samples = mc_dropout_outputs(model, ds, passes, seed, batch, "risk")
        hazard = (pkg.get("card") or {}).get("baseline_hazard") or {}
        horizon = float(pkg["config"].train.get("screen_dfs_months", 24))
        group, _, basis = risk_groups(risk, hazard)
        if hazard.get("times"):
            point = survival_at(risk, hazard["times"], hazard["cumhaz"], [horizon])[:, 0]
            samples = np.stack([survival_at(s_, hazard["times"], hazard["cumhaz"], [horizon])[:, 0] for s_ in samples])
    for i, it in enumerate(ds.items):
        have = item_modalities(it)
        row = {"patient_id": it["patient_id"], "head": head, "threshold": threshold,
               "modalities_used": [m for m in used_by_model if m in have],
               "modalities_missing": [m for m in used_by_model if m not in have]}
        if head == "benefit":
            lo, hi = (float(v) for v in np.percentile(samples[:, i], [2.5, 97.5]))
            prob = float(point[i])
            if lo >= threshold:
                c8 = "meets"
            elif hi < threshold:
                c8 = "does not meet"
            else:
                c8 = "uncertain (interval contains the threshold)"
            row.update({"prob": prob, "prob_lo": lo, "prob_hi": hi, "mc_mean": float(samples[:, i].mean()),
                        "predicted_benefit": prob >= threshold, "criterion_8": c8})
        else:
            g = RISK_GROUP_NAMES[int(group[i])].replace("_", " ")
            row.update({"risk": float(risk[i]), "risk_group": g, "risk_group_basis": basis,
                        "criterion_8": f"not assessed: the model was trained for DFS only (DFS head used); {g}"})
            if hazard.get("times"):
                lo, hi = (float(v) for v in np.percentile(samples[:, i], [2.5, 97.5]))
                row.update({"dfs_horizon": horizon, "dfs_prob": float(point[i]), "dfs_prob_lo": lo, "dfs_prob_hi": hi})
        rows.append(row)
    return rows


def screen_patient(model_path: Path, site_dir: Path, patient_id: str, passes: int = 50, seed: int = 0,
                   expected_sha256: str | None = None) -> dict:
    model, pkg = load_checkpoint(model_path, expected_sha256, site_dir)
    ds, clinical, _ = open_site(site_dir, pkg["config"], model_path)
    idx = [i for i, it in enumerate(ds.items) if it["patient_id"] == patient_id]
    if not idx:
        raise ScreeningError(f"patient '{patient_id}' not found at site {site_dir} "
                             f"({len(ds.items)} patients in its clinical.csv/cache); check the patient_id")
    from common.learn.dataset import SiteDataset  # noqa: F401  (type of ds)

    one = _Subset(ds, idx)
    row = _prediction_rows(model, pkg, one, passes, seed)[0]
    row["eligibility"] = check_eligibility(clinical.get(patient_id))
    row["passes"] = int(passes)
    row["seed"] = int(seed)
    row["model_sha256"] = pkg.get("sha256")
    return row


def screen_all(model_path: Path, site_dir: Path, out: Path | None = None, passes: int = 50, seed: int = 0,
               expected_sha256: str | None = None) -> Path:
    model, pkg = load_checkpoint(model_path, expected_sha256, site_dir)
    ds, clinical, _ = open_site(site_dir, pkg["config"], model_path)
    rows = _prediction_rows(model, pkg, ds, passes, seed)
    out = Path(out) if out else Path(site_dir) / DEFAULT_CSV
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = ["patient_id", "head", "prob", "prob_lo", "prob_hi", "threshold", "dfs_horizon", "dfs_prob",
              "dfs_prob_lo", "dfs_prob_hi", "risk_group", "criterion_8", "modalities_used", "eligibility", "reasons"]
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            el = check_eligibility(clinical.get(r["patient_id"]))
            num = {k: f"{r[k]:.4f}" for k in ("prob", "prob_lo", "prob_hi", "threshold", "dfs_prob", "dfs_prob_lo",
                                               "dfs_prob_hi") if r.get(k) is not None}
            w.writerow({"patient_id": r["patient_id"], "head": r["head"], **num, "dfs_horizon": r.get("dfs_horizon", ""),
                        "risk_group": r.get("risk_group", ""), "criterion_8": r["criterion_8"],
                        "modalities_used": "+".join(r["modalities_used"]),
                        "eligibility": el["status"], "reasons": "; ".join(el["reasons"])})
    return out


class _Subset(torch.utils.data.Dataset):
    def __init__(self, ds, idx):
        self.items = [ds.items[i] for i in idx]
        self.mri_shape, self.path_dim = ds.mri_shape, ds.path_dim

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def format_screening(r: dict) -> str:
    el = r["eligibility"]
    lines = [f"patient {r['patient_id']}"]
    if r["head"] == "benefit":
        lines += [f"  predicted benefit probability: {r['prob']:.3f} (95% MC-dropout interval {r['prob_lo']:.3f}-"
                  f"{r['prob_hi']:.3f}, {r['passes']} passes, seed {r['seed']})",
                  f"  criterion 8 (benefit head, predicted benefit at threshold {r['threshold']:.3f}): "
                  f"{r['criterion_8']}"]
    else:
        if r.get("dfs_prob") is not None:
            lines.append(f"  predicted {r['dfs_horizon']:g}-month DFS probability: {r['dfs_prob']:.3f} (95% MC-dropout "
                         f"interval {r['dfs_prob_lo']:.3f}-{r['dfs_prob_hi']:.3f}, {r['passes']} passes, seed {r['seed']})")
        lines += [f"  risk group: {r['risk_group']} ({r['risk_group_basis']})",
                  f"  criterion 8: {r['criterion_8']}"]
    lines += [f"  modalities used: {', '.join(r['modalities_used']) or 'none'}"
              + (f" (missing: {', '.join(r['modalities_missing'])})" if r["modalities_missing"] else ""),
              f"  structured protocol checks: {el['status'].upper()}"]
    for c in el["checks"]:
        v = "missing" if c["value"] is None else (int(c["value"]) if float(c["value"]).is_integer() else c["value"])
        lines.append(f"    [{c['result']:>7}] {c['criterion']} ({c['field']} = {v})")
    for reason in el["reasons"]:
        lines.append(f"    reason: {reason}")
    return "\n".join(lines)
