"""The evaluator's page (``newadj evaluate`` -> ``report.html``): self-contained HTML of the metrics that
``common.reports.evaluate.compute_metrics`` computed at the site, figures embedded."""
from __future__ import annotations

from common.reports.evaluate import CAL_KEYS, CLS_KEYS, RECAL_KEYS, SEED_STUDY


_LABELS = {"auc": "AUC (DeLong 95% CI)", "accuracy": "accuracy", "sensitivity": "sensitivity",
           "specificity": "specificity", "ppv": "PPV", "npv": "NPV", "brier": "Brier score",
           "ece": "expected calibration error (ECE)", "c_index": "Harrell's C-index",
           "brier_calibrated": "Brier score, recalibrated", "ece_calibrated": "ECE, recalibrated",
           "cal_intercept": "calibration intercept (0 if calibrated; Wald 95% CI)",
           "cal_slope": "calibration slope (1 if calibrated; Wald 95% CI)"}


def _subgroup_rows(rows: list[dict], first: str):
    from common.reports.html import esc, metric_cell

    return [[esc(r["subgroup"]), str(r["n_patients"]), str(r["n"]), str(r["n_pos"]), metric_cell(r["auc"])]
            for r in rows]


def render_html(m: dict, figs: dict[str, str]) -> str:
    from common.reports.html import esc, fmt_num, metric_cell, not_computable, table

    card = m["model_card"]
    site = m["site"]
    body = []
    body.append(table(["", ""], [
        ["site", esc(f"{site['center_id']} ({site['dir']}), role {site['role']}, splits: {site['splits']}")],
        ["patients", esc(f"{m['n_patients']} ({m['n_labelled']} with benefit label, {m['n_pos']} benefit; "
                         f"{m['n_with_dfs']} with DFS)")],
        ["checkpoint", esc(f"{card['file']}")],
        ["checkpoint SHA-256", f"<code>{esc(card['sha256'])}</code>"],
        ["decision threshold", esc(f"{m['threshold']:.4f} (from the checkpoint: chosen on internal validation, "
                                   "not re-tuned on these data)")],
        ["created", esc(m["created"])],
    ], raw=True))

    if "benefit" not in m.get("endpoints", ("benefit",)):
        body.append("<h2>Benefit from neoadjuvant therapy</h2>")
        body.append(not_computable("benefit discrimination and calibration",
                                   "the model was trained for disease-free survival only (no benefit labels at "
                                   "the training centers); the DFS head is evaluated below"))
        return _render_rest(m, figs, body)
    body.append("<h2>Comparison with the seed study</h2>")
    body.append(table(["metric", "this model on this site", "seed study (external cohort)"],
                      [[esc(r["metric"]), metric_cell(r["this_model"]), esc(fmt_num(r["seed_study"], 2))]
                       for r in m["comparison"]], raw=True))
    body.append(f'<p class="note">Reference: {esc(SEED_STUDY["reference"])}.</p>')

    d = m["discrimination"]
    body.append("<h2>Discrimination</h2>")
    parts = [table(["metric", "value (95% CI)"],
                   [[esc(_LABELS[k]), metric_cell(d[k])] for k in ("auc",) + CLS_KEYS], raw=True),
             f'<p class="note">Classification metrics at threshold {m["threshold"]:.4f}; CIs: percentile bootstrap '
             "over patients (stratified by label), AUC: DeLong.</p>"]
    body.append(_figure_row(figs, "roc", "ROC curve with the checkpoint's operating point", "ROC curve",
                            d["auc"].get("not_computable", ""), parts))

    c = m["calibration"]
    body.append("<h2>Calibration</h2>")
    parts = [table(["metric", "value (95% CI)"], [[esc(_LABELS[k]), metric_cell(c[k])]
                                                  for k in CAL_KEYS + RECAL_KEYS if k in c], raw=True)]
    if c.get("recalibration"):
        r = c["recalibration"]
        parts.append(f"<p>Recalibration carried by the model: Platt scaling, q = sigmoid({r['a']:.3f} &middot; "
                     f"logit(p) + {r['b']:.3f}), fitted on internal validation (never on this center). It changes "
                     f"the probabilities, not their order nor the decision at the threshold.</p>")
    body.append(_figure_row(figs, "reliability", "Reliability curve (10 equal-width bins) and bin counts",
                            "reliability curve", c["reliability"].get("not_computable", ""), parts))

    return _render_rest(m, figs, body)


def _figure_row(figs: dict, key: str, caption: str, what: str, why: str, parts: list[str]) -> str:
    """A row of the page: the figure ``key`` (or why it is not drawn) beside its tables."""
    from common.reports.html import figure, not_computable

    first = figure(figs[key], caption, fig_id=key) if key in figs else not_computable(what, why)
    return '<div class="figs">' + "".join(f"<div>{p}</div>" for p in [first, *parts]) + "</div>"


def _h(key: str) -> str:
    return key.replace("_", " ")


def _render_rest(m: dict, figs: dict[str, str], body: list[str]) -> str:
    """The DFS, subgroup and model-card sections of the evaluation page."""
    from common.reports.html import esc, fmt_num, metric_cell, not_computable, page, table

    card = m["model_card"]
    site = m["site"]
    s = m["survival"]
    body.append("<h2>Disease-free survival</h2>")
    lr = s["logrank"]
    hr = s["hazard_ratio"]
    rows = [[esc(_LABELS["c_index"]), metric_cell(s["c_index"])]]
    td = s.get("td_auc") or {}
    if isinstance(td, dict) and not td.get("not_computable"):
        rows += [[esc(f"time-dependent AUC at {h} months (IPCW, 95% CI)"), metric_cell(v)] for h, v in td.items()]
    rows.append([esc("integrated Brier score of predicted DFS (lower is better)"), metric_cell(s.get("ibs") or {})])
    rows.append([esc(f"log-rank p ({s.get('grouping', 'predicted groups')})"),
                 metric_cell(lr) if lr.get("not_computable") else esc(f"{lr['p_value']:.4g} (chi2 {lr['statistic']:.2f})")])
    if hr.get("not_computable") or "value" in hr:
        rows.append([esc(f"hazard ratio, {_h(s['group_names'][1])} vs {_h(s['group_names'][0])} (Cox, 95% CI)"),
                     metric_cell(hr, 2)])
    else:
        rows += [[esc(f"hazard ratio, {_h(g)} vs {_h(s['group_names'][0])} (Cox, 95% CI)"), metric_cell(v, 2)]
                 for g, v in hr.items()]
    rows.append(["patients with DFS / events", esc(f"{s['n']} / {s['n_events']}")])
    parts = [table(["", ""], rows, raw=True)]
    at = list(next(iter(s["groups"].values()))["at_risk"]) if s["groups"] else []
    parts.append(table(["group", "patients", "events"] + [f"at risk {a} mo" for a in at],
                       [[_h(g), v["n"], v["events"], *v["at_risk"].values()] for g, v in s["groups"].items()]))
    cal = s.get("dfs_calibration") or {}
    if isinstance(cal, dict) and not cal.get("not_computable"):
        crow = []
        for h, grp in cal.items():
            for r in grp:
                crow.append([f"{h} months", r["group"], r["n"], fmt_num(r["predicted"], 3),
                             metric_cell({"value": r["observed"], "lo": r["lo"], "hi": r["hi"]})
                             if r["observed"] is not None else "n/a"])
        parts.append(table(["horizon", "group (predicted-risk tertile)", "patients", "predicted DFS",
                            "observed DFS (Kaplan-Meier, 95% CI)"], crow, raw=True))
    else:
        parts.append(not_computable("calibration of predicted DFS", cal.get("not_computable", "")))
    body.append(_figure_row(figs, "km", "Kaplan-Meier DFS by predicted group, number at risk below",
                            "Kaplan-Meier curves", s["km"].get("not_computable", ""), parts))

    sg = m["subgroups"]
    body.append("<h2>Subgroups</h2><h3>By modality availability</h3>")
    body.append(table(["subgroup", "patients", "labelled", "benefit", "AUC (95% CI)"],
                      _subgroup_rows(sg["modality_availability"], "subgroup"), raw=True))
    mc = m["modality_counts"]
    body.append(f'<p class="note">Patients with MRI {mc["mri"]}, pathology {mc["pathology"]}, genomics '
                f'{mc["genomics"]}. AUC abstains below min_patients labelled patients or with one class.</p>')
    body.append("<h3>By clinical strata</h3>")
    if sg["clinical"]:
        body.append(table(["subgroup", "patients", "labelled", "benefit", "AUC (95% CI)"],
                          _subgroup_rows(sg["clinical"], "subgroup"), raw=True))
    else:
        body.append(not_computable("clinical subgroups", "clinical.csv has none of the stratification fields"))

    body.append("<h2>Model card</h2>")
    priv = card.get("privacy") or {}
    dp = priv.get("differential_privacy") if isinstance(priv, dict) else None
    rows = [["model", esc(f"{card['model']} ({', '.join(card['modalities'])})")],
            ["trained for", esc(", ".join(card.get("endpoints") or []) or "n/a")],
            ["strategy", esc(card.get("strategy") or "n/a")],
            ["rounds (selected round)", esc(f"{fmt_num(card.get('rounds'))} ({fmt_num(card.get('selected_round'))})")],
            ["local epochs per round", esc(fmt_num(card.get("local_epochs")))],
            ["model selection", esc(card.get("selection") or "n/a")],
            ["secure aggregation", esc(priv.get("secure_aggregation", "n/a") if isinstance(priv, dict) else priv)],
            ["differential privacy", esc("none" if not dp else (f"epsilon={dp.get('epsilon')}" if isinstance(dp, dict)
                                                                  and "epsilon" in dp else dp))],
            ["config hash", f"<code>{esc(card['config_hash'])}</code>"],
            ["checkpoint SHA-256", f"<code>{esc(card['sha256'])}</code>"],
            ["seed", esc(fmt_num(card.get("seed")))]]
    body.append(table(["", ""], rows, raw=True))
    if card["training_centers"]:
        body.append(table(["training center", "train patients", "validation patients"],
                          [[c, v.get("n_train"), v.get("n_val")] for c, v in card["training_centers"].items()]))
    elif card.get("n_train") is not None:
        body.append(f'<p class="note">Trained on {card["n_train"]} patients, validated on {card.get("n_val")}.</p>')
    body.append('<p class="note">All numbers on this page are aggregates computed at the site; no per-patient '
                "prediction is written to metrics.json.</p>")
    return page(f"External validation: {site['center_id']}", body,
                subtitle="newadj evaluate: benefit from neoadjuvant therapy and DFS, BCLC-B HCC")
