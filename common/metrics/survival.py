"""Survival: Harrell's C (per cohort and pooled from pair counts), time-dependent AUC, the baseline hazard
from aggregate cells, predicted DFS, integrated Brier score, calibration of predicted DFS."""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from common.metrics._base import _NAN, _abstain, _as_float, _ci_entry, _jsonify, finite_rows  # noqa: F401
from common.metrics.bootstrap import _bootstrap_values, _percentiles, bootstrap_ci


# --------------------------------------------------------------------------- #
# survival
# --------------------------------------------------------------------------- #
def c_index(time: Any, event: Any, risk: Any) -> float:
    """Harrell's C-index via :func:`lifelines.utils.concordance_index`.

    ``risk`` is "higher = shorter survival", so ``-risk`` is passed to
    lifelines.  Entries with non-finite time/event/risk are dropped.  Returns
    NaN when there is no comparable pair (e.g. no events).
    """
    from lifelines.utils import concordance_index

    t, e, r = finite_rows("time, event and risk", time, event, risk)
    e = e != 0
    if t.size < 2 or not e.any():
        return _NAN
    try:
        return float(concordance_index(t, -r, e))
    except ZeroDivisionError:  # lifelines: "No admissable pairs in the dataset."
        return _NAN


def _c_index_entry(y_prob, time, event, risk, n_boot, seed, min_patients, alpha) -> dict:
    if time is None or event is None:
        return _abstain("no survival data")
    try:
        t, e, r = finite_rows("time, event and risk", time, event, y_prob if risk is None else risk)
        e = (e != 0).astype(int)
        if t.size < min_patients:
            return _abstain(f"only {t.size} patients with survival data (< min_patients={min_patients})")
        if not e.any():
            return _abstain("no events observed")
        value = c_index(t, e, r)
        if not math.isfinite(value):
            return _abstain("no comparable pairs")
        lo, hi = bootstrap_ci(c_index, t, e, r, n_boot=n_boot, alpha=alpha, seed=seed, stratify=e)
        return {"value": value, "lo": lo, "hi": hi, "method": "bootstrap"}
    except Exception as exc:
        return _abstain(f"error: {exc}")


# --------------------------------------------------------------------------- #
# survival from aggregate statistics (federated, no per-patient risk leaves a site)
# --------------------------------------------------------------------------- #
PAIR_KEYS = ("concordant", "discordant", "tied_risk", "comparable", "var_n", "cov_nd", "var_d")


def concordance_pairs(time: Any, event: Any, risk: Any, block: int = 1024) -> dict:
    """Harrell's pair counts on one cohort, with the jackknife components of their variance.

    A pair ``(i, j)`` is *comparable* when ``event_i`` and ``time_i < time_j``, or the times
    are equal and ``j`` was censored (the definition of
    :func:`sksurv.metrics.concordance_index_censored`; two events at the same time are not
    comparable); it is *concordant* when ``risk_i > risk_j``, *tied* when the risks
    are equal, *discordant* otherwise.  Harrell's C is ``(concordant + tied_risk / 2) /
    comparable``.  With ``N = concordant + tied_risk / 2`` and ``D = comparable``, patient
    ``i`` takes part in ``n_i`` of ``N`` and ``d_i`` of ``D``; leaving it out gives the
    jackknife estimates ``var_n``, ``cov_nd``, ``var_d`` of (N, D)'s covariance, so that
    centers' counts can be summed into a pooled C with a confidence interval
    (:func:`pooled_c_index`).  Rows with a non-finite value are dropped.
    """
    t, e, r = finite_rows("time, event and risk", time, event, risk)
    e = e != 0
    n = t.size
    n_i, d_i = np.zeros(n), np.zeros(n)
    conc = disc = tied = 0.0
    for a in range(0, n, block):
        ti, ei, ri = t[a:a + block, None], e[a:a + block, None], r[a:a + block, None]
        # i (row) had the event first; an event and a censoring at the same time: the event came first
        comp = ei & ((ti < t[None, :]) | ((ti == t[None, :]) & ~e[None, :]))
        c = comp & (ri > r[None, :])
        ti_ = comp & np.isclose(ri, r[None, :], rtol=0.0, atol=1e-8)
        c &= ~ti_
        dsc = comp & ~c & ~ti_
        conc += float(c.sum())
        tied += float(ti_.sum())
        disc += float(dsc.sum())
        half = c + 0.5 * ti_
        n_i[a:a + block] += half.sum(axis=1)
        n_i += half.sum(axis=0)
        d_i[a:a + block] += comp.sum(axis=1)
        d_i += comp.sum(axis=0)
    if n > 1:
        f = (n - 1) / n
        dn, dd = n_i - n_i.mean(), d_i - d_i.mean()
        var_n, cov_nd, var_d = f * float(dn @ dn), f * float(dn @ dd), f * float(dd @ dd)
    else:
        var_n = cov_nd = var_d = 0.0
    return {"concordant": conc, "discordant": disc, "tied_risk": tied, "comparable": conc + disc + tied,
            "var_n": var_n, "cov_nd": cov_nd, "var_d": var_d}


def pooled_c_index(pairs: Sequence[dict], alpha: float = 0.05) -> tuple[float, float, float]:
    """Center-stratified Harrell's C from the centers' :func:`concordance_pairs`, with a CI.

    Pairs are only ever formed within a center, so the sums are exactly Harrell's C
    computed within centers on the pooled predictions.  The interval is Wald's, with the
    delta-method variance ``sum_k (var_n - 2 C cov_nd + C^2 var_d)_k / D^2`` (centers
    independent), clipped to [0, 1].  ``(nan, nan, nan)`` when no pair is comparable.
    """
    from scipy import stats

    num = sum(p["concordant"] + 0.5 * p["tied_risk"] for p in pairs)
    den = sum(p["comparable"] for p in pairs)
    if den <= 0:
        return (_NAN, _NAN, _NAN)
    c = num / den
    var = sum(p["var_n"] - 2.0 * c * p["cov_nd"] + c * c * p["var_d"] for p in pairs) / den ** 2
    half = float(stats.norm.ppf(1 - alpha / 2)) * math.sqrt(max(var, 0.0))
    return (float(c), max(0.0, c - half), min(1.0, c + half))


def td_auc_labels(time: Any, event: Any, horizon: float) -> np.ndarray:
    """Case (1) / control (0) / not used (NaN) of each patient for the AUC at ``horizon``.

    Cumulative/dynamic definition: cases had the event by ``horizon``, controls were
    still event-free after it; patients censored before ``horizon`` are not used (no
    inverse-probability-of-censoring weights, so that centers can release plain counts
    and the pooled AUC keeps the exact bounds of :func:`auc_from_cells`).
    """
    t, e = _as_float(time), _as_float(event)
    out = np.full(t.shape, np.nan)
    ok = np.isfinite(t) & np.isfinite(e)
    out[ok & (e != 0) & (t <= horizon)] = 1.0
    out[ok & (t > horizon)] = 0.0
    return out


def hazard_cells(time: Any, event: Any, risk: Any, edges: Sequence[float]) -> dict:
    """Per interval of ``edges``: events, exposure ``sum_j exp(risk_j) * (time j spent at risk in it)``,
    and the number of patients at risk at its start (what a site needs to release the cells)."""
    t, e, r = finite_rows("time, event and risk", time, event, risk)
    e, w = e != 0, np.exp(r)
    a, b = np.asarray(edges[:-1], float), np.asarray(edges[1:], float)
    inside = np.clip(np.minimum(t[:, None], b[None, :]) - a[None, :], 0.0, None)        # (patients, intervals)
    ev = e[:, None] & (t[:, None] >= a[None, :]) & (t[:, None] < b[None, :])
    return {"events": ev.sum(axis=0).astype(float), "exposure": (w[:, None] * inside).sum(axis=0),
            "at_risk": (t[:, None] >= a[None, :]).sum(axis=0)}


def baseline_hazard_from_cells(cells: Sequence[tuple]) -> tuple[list, list]:
    """Pooled piecewise-constant baseline hazard from the centers' ``(edges, events, exposure)`` cells.

    With the model's risk score fixed, the hazard's maximum-likelihood value on an interval
    is events / exposure (summed over centers).  Centers merge intervals differently, so
    the pooled cells are the coarsest partition that every center's cells refine: there
    the sums are exact.  Returns (times, cumulative hazard at each time), ``times`` the
    right edges of the pooled cells.
    """
    if not cells:
        return [], []
    common = set(np.round(np.asarray(cells[0][0], float), 9))
    for edges, _, _ in cells[1:]:
        common &= set(np.round(np.asarray(edges, float), 9))
    grid = np.array(sorted(common))
    ev, ex = np.zeros(len(grid) - 1), np.zeros(len(grid) - 1)
    for edges, events, exposure in cells:
        e = np.asarray(edges, float)
        if len(e) != len(events) + 1 or len(events) != len(exposure):
            raise ValueError("each center needs len(edges) - 1 events and exposures")
        idx = np.searchsorted(grid, np.round(e[:-1], 9), side="right") - 1
        np.add.at(ev, idx, np.asarray(events, float))
        np.add.at(ex, idx, np.asarray(exposure, float))
    rate = np.divide(ev, ex, out=np.zeros_like(ev), where=ex > 0)
    return [float(v) for v in grid[1:]], [float(v) for v in np.cumsum(rate * np.diff(grid))]


def survival_at(risk: Any, bh_times: Sequence[float], bh_cumhaz: Sequence[float], times: Sequence[float]) -> np.ndarray:
    """Predicted DFS probabilities ``S(t | x) = exp(-H0(t) exp(risk))``, shape (patients, times).

    ``H0`` is the baseline cumulative hazard at ``bh_times`` (from
    :func:`baseline_hazard_from_cells`), 0 at time 0 and linear in between (a constant hazard
    within each interval); beyond the last time it stays at its last value.
    """
    r = _as_float(risk)
    h = np.interp(np.asarray(times, float), np.concatenate([[0.0], np.asarray(bh_times, float)]),
                  np.concatenate([[0.0], np.asarray(bh_cumhaz, float)]))
    return np.exp(-np.outer(np.exp(r), h))


def _structured(event: np.ndarray, time: np.ndarray):
    from sksurv.util import Surv

    return Surv.from_arrays(event=event.astype(bool), time=time.astype(float))


def _td_auc_vector(t: np.ndarray, e: np.ndarray, r: np.ndarray, horizons: np.ndarray) -> np.ndarray:
    from sksurv.metrics import cumulative_dynamic_auc

    y = _structured(e, t)
    out = np.full(len(horizons), np.nan)
    ok = (horizons >= t.min()) & (horizons < t.max())
    if ok.any():
        out[ok] = cumulative_dynamic_auc(y, y, r, horizons[ok])[0]
    return out


def _ibs(t: np.ndarray, e: np.ndarray, surv: np.ndarray, grid: np.ndarray) -> float:
    from sksurv.metrics import integrated_brier_score

    y = _structured(e, t)
    keep = (grid >= t.min()) & (grid < t.max())
    if keep.sum() < 2:
        return _NAN
    return float(integrated_brier_score(y, y, surv[:, keep], grid[keep]))


def km_at(time: Any, event: Any, horizon: float, alpha: float = 0.05) -> tuple[float, float, float]:
    """Kaplan-Meier DFS probability at ``horizon`` with its (log-log) confidence interval."""
    from sksurv.nonparametric import kaplan_meier_estimator

    t, e = _as_float(time), _as_float(event)
    ok = np.isfinite(t) & np.isfinite(e)
    if ok.sum() == 0 or horizon > t[ok].max():
        return (_NAN, _NAN, _NAN)
    x, s, ci = kaplan_meier_estimator(e[ok] != 0, t[ok], conf_level=1 - alpha, conf_type="log-log")
    j = np.searchsorted(x, horizon, side="right") - 1
    if j < 0:
        return (1.0, 1.0, 1.0)
    return (float(s[j]), float(ci[0][j]), float(ci[1][j]))


def dfs_report(time: Any, event: Any, risk: Any, horizons: Sequence[float] = (12, 24, 36),
               bh_times: Sequence[float] | None = None, bh_cumhaz: Sequence[float] | None = None,
               n_boot: int = 500, seed: int = 0, min_patients: int = 10, min_events: int = 1,
               alpha: float = 0.05, risk_cuts: Sequence[float] | None = None) -> dict:
    """The DFS part of a full report: C-index, time-dependent AUC, and -- with a baseline hazard --
    the integrated Brier score and the calibration of predicted DFS at each horizon.

    * ``td_auc``: cumulative/dynamic AUC at each horizon with inverse-probability-of-
      censoring weights (:func:`sksurv.metrics.cumulative_dynamic_auc`, censoring
      estimated on the same patients), percentile-bootstrap CI;
    * ``ibs``: integrated Brier score of ``S(t | x)`` (:func:`survival_at`) over monthly
      times up to the last horizon (:func:`sksurv.metrics.integrated_brier_score`),
      bootstrap CI; lower is better, 0.25 is a coin toss;
    * ``calibration``: mean predicted DFS probability against the Kaplan-Meier estimate at
      each horizon (log-log CI), overall and by predicted-risk group: the model's own cut
      points ``risk_cuts`` (tertiles of its training patients) or, without them, this
      cohort's tertiles.

    Entries abstain (``{"abstained": True, "reason"}``) below ``min_patients`` patients with
    DFS or ``min_events`` events, or when a horizon lies beyond follow-up.
    """
    out: dict[str, Any] = {}
    t, e, r = finite_rows("time, event and risk", time, event, risk)
    e = (e != 0).astype(int)
    hz = np.asarray(horizons, float)
    out["n"], out["n_events"] = int(t.size), int(e.sum())
    out["c_index"] = _c_index_entry(None, t, e, r, n_boot, seed, min_patients, alpha)
    reason = None
    if t.size < min_patients:
        reason = f"only {t.size} patients with DFS (< min_patients={min_patients})"
    elif e.sum() < max(1, min_events):
        reason = f"only {int(e.sum())} DFS events (< {max(1, min_events)})"
    if reason:
        out["td_auc"] = {f"{h:g}": _abstain(reason) for h in hz}
        out["ibs"] = _abstain(reason)
        out["calibration"] = _abstain(reason)
        return _jsonify(out)
    point = _td_auc_vector(t, e, r, hz)
    boot = _bootstrap_values(lambda tt, ee, rr: _td_auc_vector(tt, ee, rr, hz), [t, e, r], n_boot, seed,
                             stratify=e)
    lo, hi = _percentiles(boot, alpha)
    out["td_auc"] = {f"{h:g}": _ci_entry(float(point[i]), float(lo[i]), float(hi[i]), "bootstrap (IPCW AUC)",
                                         f"horizon {h:g} beyond follow-up or without cases")
                     for i, h in enumerate(hz)}
    if bh_times is None or bh_cumhaz is None or not len(bh_times):
        why = "no baseline hazard in the model package"
        out["ibs"], out["calibration"] = _abstain(why), _abstain(why)
        return _jsonify(out)
    grid = np.arange(1.0, float(hz.max()) + 1.0)
    ibs_point = _ibs(t, e, survival_at(r, bh_times, bh_cumhaz, grid), grid)
    boot = _bootstrap_values(lambda tt, ee, rr: _ibs(tt, ee, survival_at(rr, bh_times, bh_cumhaz, grid), grid),
                             [t, e, r], n_boot, seed, stratify=e)
    lo, hi = _percentiles(boot, alpha)
    out["ibs"] = _ci_entry(ibs_point, float(lo[0]), float(hi[0]), "bootstrap", "follow-up too short")
    pred = survival_at(r, bh_times, bh_cumhaz, hz)
    cuts = np.asarray(risk_cuts, float) if risk_cuts is not None else np.quantile(r, [1 / 3, 2 / 3])
    tertile = np.searchsorted(cuts, r, side="right")
    cal = {}
    for i, h in enumerate(hz):
        rows = []
        for name, m in (("all", np.ones(t.size, bool)), ("low risk", tertile == 0), ("middle risk", tertile == 1),
                        ("high risk", tertile == 2)):
            obs, olo, ohi = km_at(t[m], e[m], h, alpha) if m.sum() >= min_patients else (_NAN, _NAN, _NAN)
            rows.append({"group": name, "n": int(m.sum()), "predicted": float(pred[m, i].mean()) if m.any() else None,
                         "observed": obs, "lo": olo, "hi": ohi})
        cal[f"{h:g}"] = rows
    out["calibration"] = cal
    return _jsonify(out)
