"""Figures for the evaluation and run reports, rendered with matplotlib's Agg backend.

Every function returns a ``data:image/png;base64,...`` URI so that an HTML page
embeds the figure itself (no external file, no network).  Inputs are plain
numpy arrays / dicts; a figure that cannot be drawn is the caller's business
(it shows "not computable" instead of calling us).
"""
from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["fig_to_data_uri", "roc_figure", "reliability_figure", "km_figure", "round_curves",
           "matrix_figure"]


def fig_to_data_uri(fig, dpi: int = 100) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def roc_figure(y: np.ndarray, p: np.ndarray, auc: dict | None, threshold: float | None = None) -> str:
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(y.astype(int), p)
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    label = "model"
    if auc and auc.get("value") is not None:
        label = f"AUC {auc['value']:.3f} (95% CI {auc['lo']:.3f}-{auc['hi']:.3f}, DeLong)"
    ax.plot(fpr, tpr, lw=2, color="#1f77b4", label=label)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    if threshold is not None:
        pred = p >= threshold
        pos = y == 1
        sens = (pred & pos).sum() / max(pos.sum(), 1)
        fp = (pred & ~pos).sum() / max((~pos).sum(), 1)
        ax.plot([fp], [sens], "o", color="#d62728", label=f"checkpoint threshold {threshold:.3f}")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_title("ROC curve (benefit)")
    ax.legend(loc="lower right", fontsize=7)
    return fig_to_data_uri(fig)


def reliability_figure(rc: dict, brier: float | None, ece: float | None, rc_cal: dict | None = None,
                       ece_cal: float | None = None) -> str:
    """Reliability curve of the model's probabilities (and, when the model carries a recalibration, of the
    recalibrated ones), with the number of patients per bin."""
    fig, (ax, axh) = plt.subplots(2, 1, figsize=(4.6, 5.0), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    pp = np.asarray(rc["prob_pred"], float)
    pt = np.asarray(rc["prob_true"], float)
    counts = np.asarray(rc["counts"], int)
    edges = np.asarray(rc["bin_edges"], float)
    ok = counts > 0
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    txt = []
    if brier is not None:
        txt.append(f"Brier {brier:.3f}")
    if ece is not None:
        txt.append(f"ECE {ece:.3f}")
    ax.plot(pp[ok], pt[ok], "o-", color="#2ca02c", label="model" + (f" ({', '.join(txt)})" if txt else ""))
    if rc_cal is not None:
        cp, ct = np.asarray(rc_cal["prob_pred"], float), np.asarray(rc_cal["prob_true"], float)
        ok_c = np.asarray(rc_cal["counts"], int) > 0
        ax.plot(cp[ok_c], ct[ok_c], "s-", color="#1f77b4",
                label="recalibrated" + (f" (ECE {ece_cal:.3f})" if ece_cal is not None else ""))
    ax.set_ylabel("observed benefit rate")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Reliability curve")
    ax.legend(loc="upper left", fontsize=7)
    centers = (edges[:-1] + edges[1:]) / 2
    axh.bar(centers, counts, width=np.diff(edges) * 0.9, color="#7f7f7f")
    axh.set_xlabel("predicted probability")
    axh.set_ylabel("patients")
    axh.set_xlim(0, 1)
    return fig_to_data_uri(fig)


KM_COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd")


def km_figure(time: np.ndarray, event: np.ndarray, group: np.ndarray, title: str, p_value: float | None = None,
              hr: dict | None = None, names: list[str] | None = None) -> str:
    """Kaplan-Meier curves of each predicted group (``names[g]`` for group ``g``; default predicted
    no benefit / benefit), with lifelines' number-at-risk table under the axes."""
    from lifelines import KaplanMeierFitter
    from lifelines.plotting import add_at_risk_counts

    names = [n.replace("_", " ") for n in (names or ["predicted no benefit", "predicted benefit"])]
    fig, ax = plt.subplots(figsize=(6.4, 4.6 + 0.25 * max(0, len(names) - 2)))
    fitters = []
    order = [1, 0] if len(names) == 2 else list(range(len(names)))
    for g, name, color in ((g, names[g], KM_COLORS[g % len(KM_COLORS)]) for g in order):
        m = group == g
        if not m.any():
            continue
        kmf = KaplanMeierFitter(label=f"{name} (n={int(m.sum())})")
        kmf.fit(time[m], event_observed=event[m])
        kmf.plot_survival_function(ax=ax, ci_show=True, color=color, show_censors=True)
        fitters.append(kmf)
    ax.set_xlabel("months")
    ax.set_ylabel("disease-free survival")
    ax.set_ylim(0, 1.05)
    sub = []
    if p_value is not None:
        sub.append(f"log-rank p = {p_value:.3g}")
    if hr and hr.get("value") is not None:
        sub.append(f"HR {hr['value']:.2f} ({hr['lo']:.2f}-{hr['hi']:.2f})")
    ax.set_title(title + ("\n" + ", ".join(sub) if sub else ""), fontsize=10)
    if fitters:
        add_at_risk_counts(*fitters, ax=ax, rows_to_show=["At risk"])
    fig.tight_layout()
    return fig_to_data_uri(fig)


def round_curves(history: list[dict]) -> dict[str, str]:
    """Per-round curves of a federation run: loss, validation AUC, bytes, time."""
    rounds = [h.get("round", i + 1) for i, h in enumerate(history)]

    def _f(v):
        return np.nan if v is None else float(v)

    out = {}
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    ax.plot(rounds, [_f(h.get("train_loss")) for h in history], "o-", label="train loss (weighted)")
    ax.plot(rounds, [_f((h.get("val") or {}).get("loss")) for h in history], "s--", label="validation loss")
    ax.set_xlabel("round")
    ax.set_ylabel("loss")
    ax.set_title("Loss per round")
    ax.legend(fontsize=7)
    out["loss"] = fig_to_data_uri(fig)

    for key, lo_key, hi_key, name, band in (("auc", "auc_lower", "auc_upper", "AUC", "pooled AUC bounds"),
                                            ("c_index", "c_index_lo", "c_index_hi", "C-index", "pooled C 95% CI")):
        fig, ax = plt.subplots(figsize=(5.2, 3.6))
        ax.plot(rounds, [_f((h.get("val") or {}).get(key)) for h in history], "o-", lw=2.5, color="black",
                label="pooled validation")
        lo = [_f((h.get("val") or {}).get(lo_key)) for h in history]
        hi = [_f((h.get("val") or {}).get(hi_key)) for h in history]
        if not all(np.isnan(lo)):
            ax.fill_between(rounds, lo, hi, color="grey", alpha=0.25, label=band)
        centers = sorted({c for h in history for c in (h.get("val_centers") or {})})
        for c in centers:
            ax.plot(rounds, [_f(((h.get("val_centers") or {}).get(c) or {}).get(key)) for h in history], ".-",
                    alpha=0.8, label=c)
        ax.set_xlabel("round")
        ax.set_ylabel(f"validation {name}")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"Validation {name} per round")
        ax.legend(fontsize=6, ncol=2)
        out[key] = fig_to_data_uri(fig)

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    ax.plot(rounds, [_f(h.get("bytes_sent")) / 1e6 for h in history], "o-", label="sent by server")
    ax.plot(rounds, [_f(h.get("bytes_received")) / 1e6 for h in history], "s-", label="received by server")
    ax.set_xlabel("round")
    ax.set_ylabel("MB")
    ax.set_title("Communication per round")
    ax.legend(fontsize=7)
    out["bytes"] = fig_to_data_uri(fig)

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    ax.plot(rounds, [_f(h.get("seconds")) for h in history], "o-", lw=2.5, color="black", label="round wall time")
    for c in sorted({c for h in history for c in (h.get("client_train_seconds") or {})}):
        ax.plot(rounds, [_f((h.get("client_train_seconds") or {}).get(c)) for h in history], ".--", alpha=0.8,
                label=f"{c} training")
    ax.set_xlabel("round")
    ax.set_ylabel("seconds")
    ax.set_title("Time per round")
    ax.legend(fontsize=6, ncol=2)
    out["time"] = fig_to_data_uri(fig)
    return out


def matrix_figure(matrix: dict[str, dict[str, dict]], sites: list[str], title: str) -> str:
    """Heat map of AUC (rows: models, columns: sites); blank where not computable."""
    models = list(matrix)
    vals = np.full((len(models), len(sites)), np.nan)
    for i, m in enumerate(models):
        for j, s in enumerate(sites):
            v = (matrix[m].get(s) or {}).get("auc")
            if v is not None:
                vals[i, j] = v
    fig, ax = plt.subplots(figsize=(1.2 + 1.0 * len(sites), 0.9 + 0.5 * len(models)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    im = ax.imshow(np.ma.masked_invalid(vals), vmin=0.0, vmax=1.0, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(sites)), sites, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(models)), models, fontsize=8)
    for i in range(len(models)):
        for j in range(len(sites)):
            n = (matrix[models[i]].get(sites[j]) or {}).get("n")
            txt = "n/c" if np.isnan(vals[i, j]) else f"{vals[i, j]:.2f}"
            ax.text(j, i, f"{txt}\nn={n}" if n is not None else txt, ha="center", va="center", fontsize=7,
                    color="white" if not np.isnan(vals[i, j]) and vals[i, j] < 0.6 else "black")
    fig.colorbar(im, ax=ax, label="AUC", fraction=0.04)
    ax.set_title(title, fontsize=10)
    return fig_to_data_uri(fig)
