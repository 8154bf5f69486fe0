"""``newadj report RUN_DIR``: one self-contained page about a finished federation run.

* per-round curves (train loss, pooled and per-center validation AUC, bytes, time),
* federated vs pooled vs local-only table when a baseline run directory is given,
* a cross-site matrix (as in NVIDIA FLARE's cross-site validation): the global
  model and each center's local-only model scored on every training center's
  validation split and on the external center.  Each cell comes from
  :func:`site_scores`, which returns aggregates only ({auc, n}); in a real
  deployment it runs at the site, in simulation it is called per site folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from common.reports.evaluate import EvaluationError, load_checkpoint, open_site
from common.federation.roles import trains


def site_scores(models: dict[str, Any], site_dir: Path, splits: list[str] | None = None) -> dict[str, dict]:
    """Score every model on one site; returns ``{model_name: {auc, auc_lo, auc_hi, n, n_pos}}`` only.

    ``models`` maps a name to a model package path (or a loaded ``(model, pkg)``).
    Splits: ``splits`` if given, else the validation split of a training site and
    every patient of an external site.
    """
    from common.learn.engine import predict
    from common.reports.evaluate import _auc_entry
    from common.data.policy import load_policy
    from common.federation.model_io import package_site_config

    out: dict[str, dict] = {}
    for name, spec in models.items():
        model, pkg = load_checkpoint(spec) if isinstance(spec, (str, Path)) else spec
        cfg = package_site_config(pkg, site_dir)        # the site's own preprocessing, the model's schema
        ds, _, _ = open_site(site_dir, cfg, spec if isinstance(spec, (str, Path)) else name)
        use = splits if splits is not None else (None if ds.role == "external" else ["val"])
        if use is not None:
            ds, _, _ = open_site(site_dir, cfg, spec if isinstance(spec, (str, Path)) else name, use)
        if len(ds) == 0:
            out[name] = {"auc": None, "n": 0, "n_pos": 0, "split": "+".join(use or ["all"]),
                         "not_computable": "no patients in the split"}
            continue
        pred = predict(model, ds, int(cfg.train.get("eval_batch_size", 64)))
        e = _auc_entry(np.asarray(pred["benefit"], float), np.asarray(pred["prob"], float),
                       int(load_policy(site_dir).min_patients["benefit"]))   # the site's floor
        a = e["auc"]
        out[name] = {"auc": a.get("value"), "auc_lo": a.get("lo"), "auc_hi": a.get("hi"), "n": e["n"],
                     "n_pos": e["n_pos"], "split": "+".join(use or ["all"])}
        if a.get("not_computable"):
            out[name]["not_computable"] = a["not_computable"]
    return out


def cross_site_matrix(run_dir: Path, baseline_dir: Path | None, cohort_dir: Path) -> dict:
    """{"models": [...], "sites": [...], "cells": {model: {site: scores}}} over a simulation cohort."""
    from common.data.cohort import discover_sites

    models: dict[str, Any] = {"global (federated)": load_checkpoint(Path(run_dir) / "best_model.pt")}
    if baseline_dir is not None:
        for p in sorted((Path(baseline_dir) / "models").glob("local_*.pt")):
            models[f"local-only {p.stem[len('local_'):]}"] = load_checkpoint(p)
    sites = discover_sites(cohort_dir)
    sites = [s for s in sites if s.role != "external"] + [s for s in sites if s.role == "external"]
    cells: dict[str, dict] = {m: {} for m in models}
    names = []
    for s in sites:
        label = f"{s.name} (external)" if s.role == "external" else f"{s.name} (val)"
        names.append(label)
        scores = site_scores(models, s.path)  # runs "at the site": only aggregates come back
        for m, v in scores.items():
            cells[m][label] = v
    return {"models": list(models), "sites": names, "cells": cells}


def _fmt_ci(e: dict | None) -> str:
    from common.reports.html import metric_cell

    if not e:
        return '<span class="nc">n/a</span>'
    if e.get("abstained"):
        return metric_cell({"not_computable": e.get("reason")})
    return metric_cell(e)


def comparison_rows(metrics: dict, baseline: dict | None) -> list[list[str]]:
    """federated vs pooled vs local-only on the external center."""
    from common.reports.html import esc, metric_cell

    rows = []
    ext = (metrics.get("external") or {}).get("centers") or {}
    for c, e in ext.items():
        auc = {"value": e.get("auc"), "lo": e.get("auc_lo"), "hi": e.get("auc_hi")}
        if e.get("auc") is None:
            auc = {"not_computable": e.get("reason") or e.get("abstained") or "undefined"}
        acc = e.get("accuracy")
        acc = acc if isinstance(acc, dict) else {"value": acc, "lo": e.get("accuracy_lo"), "hi": e.get("accuracy_hi")}
        ci = e.get("c_index")
        ci = ci if isinstance(ci, dict) else {"value": ci}
        n_train = sum(int((v or {}).get("n_train") or 0) for v in (metrics.get("centers") or {}).values()
                      if trains((v or {}).get("role")))
        rows.append([esc(f"federated ({metrics.get('strategy')}, {metrics.get('rounds')} rounds)"), esc(c),
                     esc(n_train or "n/a"), metric_cell(auc), _fmt_ci(acc), _fmt_ci(ci)])
    for name, arm in ((baseline or {}).get("arms") or {}).items():
        e = arm.get("external") or {}
        rows.append([esc(name), esc((baseline or {}).get("external_site", "external")), esc(arm.get("n_train")),
                     _fmt_ci(e.get("auc")), _fmt_ci(e.get("accuracy")), _fmt_ci(e.get("c_index"))])
    return rows


def run_report(run_dir: Path, baseline_dir: Path | None = None, cohort_dir: Path | None = None) -> Path:
    from common.reports.html import esc, figure, fmt_num, not_computable, page, table
    from common.reports.plots import matrix_figure, round_curves

    run_dir = Path(run_dir)
    mpath = run_dir / "metrics.json"
    if not mpath.exists():
        raise EvaluationError(f"{mpath}: not found; is {run_dir} a finished run directory of `newadj simulate`?")
    metrics = json.loads(mpath.read_text())
    history = metrics.get("history") or []
    baseline = None
    if baseline_dir is not None:
        bpath = Path(baseline_dir) / "metrics.json"
        if not bpath.exists():
            raise EvaluationError(f"{bpath}: not found; is {baseline_dir} a `newadj baseline --out` directory?")
        baseline = json.loads(bpath.read_text())
    if cohort_dir is None and (run_dir / "run.json").exists():
        c = json.loads((run_dir / "run.json").read_text()).get("cohort")
        cohort_dir = Path(c) if c and Path(c).is_dir() else None

    body = []
    comm = metrics.get("communication") or {}
    body.append(table(["", ""], [
        ["run directory", esc(str(run_dir.resolve()))],
        ["strategy / rounds", esc(f"{metrics.get('strategy')} / {metrics.get('rounds')}")],
        ["selected round (internal validation)", esc(fmt_num(metrics.get("selected_round")))],
        ["decision threshold", esc(fmt_num(metrics.get("threshold"), 4))],
        ["communication", esc(f"sent {fmt_num((comm.get('bytes_sent') or 0) / 1e6, 1)} MB, received "
                              f"{fmt_num((comm.get('bytes_received') or 0) / 1e6, 1)} MB")],
        ["config hash", f"<code>{esc(metrics.get('config_hash', 'n/a'))}</code>"],
    ], raw=True))
    centers = metrics.get("centers") or {}
    if centers:
        body.append(table(["center", "role", "train patients", "validation patients"],
                          [[c, (v or {}).get("role"), (v or {}).get("n_train"), (v or {}).get("n_val")]
                           for c, v in centers.items()]))

    cox = metrics.get("cox")
    if cox:
        how = (f"penalizer {cox['penalizer']:g}, chosen by federated leave-one-center-out cross-validation "
               f"(cross-validated partial likelihood per candidate below)" if cox.get("cv_basis")
               else f"penalizer {cox['penalizer']:g} (fixed)")
        body.append("<h2>Cox model (stratified by center)</h2>")
        note = (f"{cox['patients']} patients; {cox['rounds']} Newton rounds; {how}. Hazard ratios are per unit of "
                "the scaled input (one pooled SD, after log1p where the feature file says so).")
        body.append(f'<p class="note">{esc(note)}</p>')
        body.append(table(["covariate", "coefficient", "SE", "hazard ratio (95% CI)", "p"],
                          [[esc(r["covariate"]), f"{r['coef']:+.4f}", f"{r['se']:.4f}",
                            f"{r['hr']:.3f} ({r['hr_lo']:.3f}-{r['hr_hi']:.3f})", f"{r['p']:.3g}"]
                           for r in cox["coefficients"]], raw=True))
        if cox.get("cv_basis"):
            body.append(table(["penalizer", "CV partial log-likelihood", "converged"],
                              [[f"{r['penalizer']:g}", fmt_num(r["cv_partial_loglik"], 3), str(r["converged"])]
                               for r in cox["cv"]]))
    cap = metrics.get("capacity")
    if cap:
        body.append("<h2>Capacity chosen by federated cross-validation</h2>")
        body.append(table(["candidate", "selected round", f"out-of-fold {cap['metric']} key", "validation loss",
                           "C-index"],
                          [[esc(("chosen: " if c["candidate"] == cap["chosen"] else "") + c["candidate"]),
                            fmt_num(c["selected_round"]), fmt_num(c["key"], 4), fmt_num(c.get("val_loss"), 4),
                            fmt_num(c.get("c_index"), 3)] for c in cap["candidates"]], raw=True))

    body.append("<h2>Per-round curves</h2>")
    if history:
        figs = round_curves(history)
        caps = {"loss": "Training and validation loss", "auc": "Pooled and per-center validation AUC",
                "c_index": "Pooled and per-center validation C-index (DFS)",
                "bytes": "Bytes sent and received by the server", "time": "Round time and client training time"}
        has = {k: any((h.get("val") or {}).get(k) is not None for h in history) for k in ("auc", "c_index")}
        caps = {k: v for k, v in caps.items() if has.get(k, True)}
        body.append('<div class="figs">' + "".join(figure(figs[k], caps[k], fig_id=f"round-{k}") for k in caps)
                    + "</div>")
    else:
        body.append(not_computable("per-round curves", "metrics.json has no history"))

    body.append("<h2>Federated vs pooled vs local-only (external center)</h2>")
    rows = comparison_rows(metrics, baseline)
    if rows:
        body.append(table(["model", "evaluated on", "train patients", "AUC (95% CI)", "accuracy", "C-index"],
                          rows, raw=True))
    if baseline is None:
        body.append('<p class="note">No baseline directory given (--baseline): pooled and local-only arms not shown.'
                    "</p>")

    body.append("<h2>Cross-site validation matrix</h2>")
    matrix = None
    if cohort_dir is None:
        body.append(not_computable("cross-site matrix", "no cohort folder (--cohort) to score the models on"))
    else:
        matrix = cross_site_matrix(run_dir, Path(baseline_dir) if baseline_dir else None, Path(cohort_dir))
        body.append(figure(matrix_figure(matrix["cells"], matrix["sites"], "AUC of each model on each site"),
                           "Rows: models; columns: validation split of each training center and the external "
                           "center (n/c = not computable)", fig_id="cross-site"))
        rows = []
        for m in matrix["models"]:
            cells = []
            for s in matrix["sites"]:
                v = matrix["cells"][m].get(s) or {}
                if v.get("auc") is None:
                    cells.append(f'<span class="nc">n/c ({esc(v.get("not_computable", ""))}), n={v.get("n")}</span>')
                else:
                    cells.append(f"{v['auc']:.3f} (n={v['n']})")
            rows.append([esc(m)] + cells)
        body.append(table(["model"] + matrix["sites"], rows, raw=True))
        body.append('<p class="note">Each column is computed by <code>site_scores</code> at that site; only the '
                    "AUC and patient counts leave it.</p>")
        (run_dir / "cross_site.json").write_text(json.dumps(matrix, indent=1))

    out = run_dir / "report.html"
    out.write_text(page(f"Federation run report: {run_dir.name}", body,
                        subtitle="newadj report: federated New-adj-Net, BCLC-B HCC"))
    return out
