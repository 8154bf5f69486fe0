"""What an evaluate reply may release: the site policy's disclosure rules, applied at the site.

The coordinator asks (``bins``, ``threshold``, ``full-report``); the site decides, by
its own ``policy.toml`` (``common/data/policy.py``):

* **Floors per endpoint.**  Benefit metrics (score histograms, confusion counts, loss,
  AUC, calibration) need ``min_patients.benefit`` labelled patients and at least
  ``min_cell_count`` of each label; a C-index needs ``min_patients.dfs`` patients with
  DFS and ``min_cell_count`` events.  Below a floor the endpoint abstains: nothing of
  it is released.
* **One grid per run.**  The run's first evaluate request fixes its histogram grid:
  ``min(bins asked, max_histogram_bins)`` equal-width bins over [0, 1].  A later request
  for another bin count gets the run's grid (and a notice), so varying ``bins`` round
  by round learns nothing finer.
* **No small cell.**  Adjacent bins of that grid are merged (left to right, the same
  for both labels) until every released cell holds 0 or at least ``min_cell_count``
  patients of each label (:func:`merge_cells`).  The reply carries the cells' edges.
* **Thresholds add nothing.**  Confusion counts are computed at the released cell edge
  nearest to the threshold asked for (``threshold-used``), so they are sums of released
  cells; a run may ask for at most ``max_thresholds`` distinct thresholds (one more is
  refused).
* **Per-round release is optional.**  With ``release_round_metrics = false`` the site
  answers one full-report evaluation per run and abstains on every other request.

The per-run state (grid, thresholds asked, whether the final report went out) is kept
in the site's disclosure ledger, ``.newadj-disclosure.json`` next to the audit log,
updated under an exclusive file lock.  The policy mod checks every outgoing reply
against the same rules (:func:`check_released`) and refuses one that breaks them.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

LEDGER_FILE = ".newadj-disclosure.json"


# --------------------------------------------------------------------------- histograms


def grid_edges(bins: int) -> np.ndarray:
    """The ``bins + 1`` edges of the equal-width grid over [0, 1]."""
    return np.linspace(0.0, 1.0, int(bins) + 1)


def grid_index(p, bins: int) -> np.ndarray:
    """Bin of each score on the grid: ``p >= edges[j]`` exactly when the bin index is ``>= j``."""
    edges = grid_edges(bins)
    p = np.clip(np.asarray(p, dtype=float), 0.0, 1.0)
    return np.minimum(np.searchsorted(edges, p, side="right") - 1, int(bins) - 1)


def merge_cells(neg, pos, min_count: int) -> list[tuple[int, int]]:
    """Grid-index ranges ``[start, end)`` of merged cells, each holding 0 or >= ``min_count`` of each label.

    Greedy left to right; a remainder that is still too small is merged into the cells
    before it.  Each label needs 0 or at least ``min_count`` patients in all (``pos`` all
    zero: a histogram of one group, e.g. of every patient's risk).
    """
    neg, pos = np.asarray(neg, dtype=np.int64), np.asarray(pos, dtype=np.int64)
    k = int(min_count)

    def ok(a, b) -> bool:
        return (a == 0 or a >= k) and (b == 0 or b >= k)

    if not (ok(neg.sum(), pos.sum()) and neg.sum() + pos.sum() > 0):
        raise ValueError("each label needs 0 or at least min_count patients, and some patient")
    groups: list[list[int]] = []   # [start, end, n_neg, n_pos]
    start, a, b = 0, 0, 0
    for i in range(len(neg)):
        a, b = a + int(neg[i]), b + int(pos[i])
        if ok(a, b):
            groups.append([start, i + 1, a, b])
            start, a, b = i + 1, 0, 0
    if start < len(neg):
        if groups:
            groups[-1][1], groups[-1][2], groups[-1][3] = len(neg), groups[-1][2] + a, groups[-1][3] + b
        else:
            groups.append([0, len(neg), a, b])
    while len(groups) > 1 and not ok(groups[-1][2], groups[-1][3]):
        last = groups.pop()
        groups[-1][1], groups[-1][2], groups[-1][3] = last[1], groups[-1][2] + last[2], groups[-1][3] + last[3]
    return [(g[0], g[1]) for g in groups]


@dataclass
class Released:
    """The cells a reply releases: edges (len m + 1) and counts per label (len m each)."""
    edges: list[float]
    neg: list[int]
    pos: list[int]

    def confusion(self, threshold: float) -> tuple[float, dict]:  # keys: common.federation.reply_schema.CONFUSION
        """(edge used, tp/fp/tn/fn): cells from the edge nearest ``threshold`` up predict positive."""
        cands = self.edges[:-1]
        j = int(np.argmin([abs(e - float(threshold)) for e in cands]))
        return float(cands[j]), {"tp": int(sum(self.pos[j:])), "fp": int(sum(self.neg[j:])),
                                 "tn": int(sum(self.neg[:j])), "fn": int(sum(self.pos[:j]))}


def release_histogram(y, p, bins: int, min_count: int) -> Released:
    """Score histogram per label on the run's grid, with small cells merged away."""
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    keep = np.isfinite(y) & np.isfinite(p)
    y, idx = y[keep], grid_index(p[keep], bins)
    neg = np.bincount(idx[y == 0], minlength=bins)
    pos = np.bincount(idx[y == 1], minlength=bins)
    edges = grid_edges(bins)
    cells = merge_cells(neg, pos, min_count)
    return Released(edges=[float(edges[s]) for s, _ in cells] + [1.0],
                    neg=[int(neg[s:e].sum()) for s, e in cells], pos=[int(pos[s:e].sum()) for s, e in cells])


def merge_hazard_cells(events, at_risk, min_count: int) -> list[tuple[int, int]]:
    """Interval ranges ``[start, end)`` whose events are 0 or >= ``min_count`` and whose start has at least
    ``min_count`` patients at risk (the exposure is then a sum over that many patients).

    Greedy left to right; intervals where fewer than ``min_count`` are at risk, and a
    remainder with too few events, are merged into the cell before them.
    """
    ev, n = np.asarray(events, dtype=float), np.asarray(at_risk, dtype=float)
    k = int(min_count)
    usable = int(np.sum(n >= k))          # at-risk counts only fall: the first `usable` intervals qualify
    if usable == 0:
        return []
    groups: list[list] = []               # [start, end, events]
    start, acc = 0, 0.0
    for i in range(usable):
        acc += ev[i]
        if acc == 0 or acc >= k:
            groups.append([start, i + 1, acc])
            start, acc = i + 1, 0.0
    tail = float(ev[start:].sum())
    if start < len(ev):
        if groups:
            groups[-1][1], groups[-1][2] = len(ev), groups[-1][2] + tail
        else:
            groups.append([0, len(ev), tail])
    while len(groups) > 1 and 0 < groups[-1][2] < k:
        last = groups.pop()
        groups[-1][1], groups[-1][2] = last[1], groups[-1][2] + last[2]
    if 0 < groups[-1][2] < k:
        return []
    return [(g[0], g[1]) for g in groups]


def release_hazard(time, event, risk, edges, min_count: int) -> dict | None:
    """The baseline-hazard cells of one site (``common.metrics.hazard_cells`` merged), or None."""
    from common.metrics import hazard_cells

    edges = np.asarray(edges, dtype=float)
    h = hazard_cells(time, event, risk, edges)
    cells = merge_hazard_cells(h["events"], h["at_risk"], min_count)
    if not cells:
        return None
    return {"edges": [float(edges[s]) for s, _ in cells] + [float(edges[-1])],
            "events": [float(h["events"][s:e].sum()) for s, e in cells],
            "exposure": [float(h["exposure"][s:e].sum()) for s, e in cells]}


def dfs_score(risk) -> np.ndarray:
    """A risk score on [0, 1] (logistic), so that DFS cells share the run's histogram grid."""
    return 1.0 / (1.0 + np.exp(-np.clip(np.asarray(risk, dtype=float), -50, 50)))


def _entry_keys(out: dict, name: str, entry: dict | None) -> None:
    """A full-report entry ({value, lo, hi} or abstained) as ``name``, ``name-lo``, ``name-hi``."""
    if entry and entry.get("value") is not None:
        for key, v in zip((name, f"{name}-lo", f"{name}-hi"), (entry["value"], entry.get("lo"), entry.get("hi"))):
            out[key] = float("nan") if v is None else float(v)


def release_metrics(pred: dict, terms: "Terms", policy, cfg, notices: list[str], hazard: bool = False,
                    baseline: tuple = ((), (), None)) -> dict:
    """An evaluate reply's metrics from per-patient predictions, under the site's rules.

    Each endpoint abstains on its own: benefit metrics (score cells, confusion counts at a
    cell edge, the full report's AUC and calibration) need ``min_patients.benefit`` labelled
    patients and ``min_cell_count`` of each label; DFS metrics (Harrell's pair counts,
    time-dependent AUC cells per horizon, baseline-hazard cells, the full report's C-index,
    time-dependent AUC, integrated Brier score and calibration of predicted DFS) need
    ``min_patients.dfs`` patients with DFS and ``min_cell_count`` events.  Why an endpoint
    abstains goes into ``notices``.
    """
    from common.data.policy import key_listed
    from common.federation import reply_schema as W
    from common.learn.engine import prediction_loss
    from common.metrics import concordance_pairs, dfs_report, evaluate_predictions, td_auc_labels

    k = int(policy.min_cell_count)
    y, p = np.asarray(pred["benefit"], float), np.asarray(pred["prob"], float)
    lab = np.isfinite(y)
    n, n_pos = int(lab.sum()), int(np.nansum(y[lab]))
    out: dict = {"num-examples": n, "abstained": 1, "dfs-abstained": 1}
    if not terms.release:
        return out
    floor_b, floor_d = int(policy.min_patients["benefit"]), int(policy.min_patients["dfs"])
    t, e, r = (np.asarray(pred[key], float) for key in ("dfs_time", "dfs_event", "risk"))
    has = np.isfinite(t) & np.isfinite(e)
    n_dfs, n_ev = int(has.sum()), int((e[has] != 0).sum())
    dfs_ok = n_dfs >= floor_d and n_ev >= k
    horizons = [float(h) for h in cfg.train.dfs_horizons]
    if hazard:   # a baseline-hazard request releases the hazard cells and nothing else
        if not dfs_ok:
            notices.append(f"baseline hazard withheld: {n_dfs} patients with DFS, {n_ev} events")
            return out
        step, top = float(cfg.train.hazard_step_months), float(cfg.train.hazard_max_months)
        hz = release_hazard(t, e, r, np.arange(0.0, top + step / 2, step), k)
        if hz is None:
            notices.append("baseline hazard withheld: too few patients at risk or events per interval")
            return out
        out.update({"n-dfs": n_dfs, "n-events": n_ev, **dict(zip(W.HAZARD_CELLS, (hz["edges"], hz["events"],
                                                                                  hz["exposure"])))})
        # where the model puts these patients' risk (for risk groups that do not depend on who is screened)
        risk = release_histogram(np.zeros(int(has.sum())), dfs_score(r[has]), terms.bins, k)
        out.update({W.RISK_CELLS[0]: risk.edges, W.RISK_CELLS[1]: risk.neg})
        return out
    benefit_ok = n >= floor_b and min(n_pos, n - n_pos) >= k
    if benefit_ok:
        cells = release_histogram(y, p, terms.bins, k)
        thr_used, confusion = cells.confusion(terms.threshold)
        if abs(thr_used - terms.threshold) > 1e-12:
            notices.append(f"threshold {terms.threshold:g} moved to the nearest released cell edge {thr_used:g}")
        out.update({"n-pos": n_pos, "abstained": 0, "hist-edges": cells.edges, "hist-neg": cells.neg,
                    "hist-pos": cells.pos, "threshold-used": thr_used, **confusion})
    elif n:
        notices.append(f"benefit metrics withheld: {n} labelled patients" if n < floor_b else
                       f"benefit metrics withheld: a label has fewer than min_cell_count {k} patients")
    if dfs_ok:
        out.update({"dfs-abstained": 0, "n-dfs": n_dfs, "n-events": n_ev})
        out.update({W.PAIR_WIRE[key]: float(v) for key, v in concordance_pairs(t, e, r).items()})
        for h in horizons:
            case = td_auc_labels(t, e, h)
            if min(int(np.sum(case == 1)), int(np.sum(case == 0))) >= k:
                cells = release_histogram(case, dfs_score(r), terms.bins, k)
                ke, kn, kp = W.td_keys(h)
                out.update({ke: cells.edges, kn: cells.neg, kp: cells.pos})
    elif n_dfs:
        notices.append(f"DFS metrics withheld: {n_dfs} patients with DFS" if n_dfs < floor_d else
                       f"DFS metrics withheld: {n_ev} events (< min_cell_count {k})")
    if benefit_ok or dfs_ok:   # the loss of the released endpoints only (an abstaining one adds nothing)
        from common.config import to_plain

        loss_cfg = dict(to_plain(cfg.model.loss))
        loss_cfg["benefit_weight"] = loss_cfg.get("benefit_weight", 1.0) if benefit_ok else 0.0
        loss_cfg["dfs_weight"] = loss_cfg.get("dfs_weight", 0.5) if dfs_ok else 0.0
        out["loss"] = prediction_loss(pred, loss_cfg)
    if not terms.full_report:
        return out
    n_boot, seed = int(cfg.train.n_boot), int(cfg.seed)
    if benefit_ok:
        rep = evaluate_predictions(y, p, out["threshold-used"], n_boot=n_boot, seed=seed, min_patients=floor_b,
                                   calibration=terms.calibration)
        for name in W.FULL_REPORT:   # the benefit endpoint's (*_calibrated only with a calibration)
            if name not in W.FULL_REPORT_DFS:
                _entry_keys(out, name, rep.get(name))
        for name in W.FULL_REPORT_POINTS:   # points, no CI; newer than some sites' own metric_keys lists:
            v = (rep.get(name) or {}).get("value")   # sent only where the site's whitelist has them
            if v is not None and key_listed(name, policy.metric_keys):
                out[name] = float(v)
        for name in W.FULL_REPORT_LISTED:   # entries with a CI, likewise only where the whitelist has them
            if all(key_listed(k, policy.metric_keys) for k in W.full_report_keys(name)):
                _entry_keys(out, name, rep.get(name))
    if dfs_ok:
        bh_times, bh_cumhaz, cuts = baseline
        rep = dfs_report(t, e, r, horizons, bh_times or None, bh_cumhaz or None, n_boot=n_boot, seed=seed,
                         min_patients=floor_d, min_events=k, risk_cuts=cuts)
        for name in W.FULL_REPORT_DFS:
            _entry_keys(out, name, rep[name])
        for h, entry in rep["td_auc"].items():
            _entry_keys(out, W.td_auc_key(float(h)), entry)
        if isinstance(rep["calibration"], dict) and not rep["calibration"].get("abstained"):
            for h, rows in rep["calibration"].items():
                for group, row in zip(W.CAL_GROUPS, rows):
                    if row["n"] < floor_d or row["observed"] is None:
                        continue
                    for stat, v in (("pred", row["predicted"]), ("obs", row["observed"]), ("obs-lo", row["lo"]),
                                    ("obs-hi", row["hi"])):
                        out[W.calibration_key(float(h), group, stat)] = float("nan") if v is None else float(v)
    return out


# --------------------------------------------------------------------------- ledger


@contextlib.contextmanager
def ledger_entry(path: Path, run_id: int):
    """The disclosure ledger's entry for one run, read and written back under an exclusive lock."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    with os.fdopen(fd, "r+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        text = fh.read()
        try:
            data = json.loads(text) if text.strip() else {}
        except ValueError as exc:
            raise OSError(f"{path}: disclosure ledger unreadable ({exc})") from exc
        entry = data.setdefault(str(int(run_id)), {"bins": None, "thresholds": [], "final_released": False})
        yield entry
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(data, indent=1, sort_keys=True))
        fh.flush()
        os.fsync(fh.fileno())


# --------------------------------------------------------------------------- terms of one request


@dataclass
class Terms:
    """What the site agreed to release for one evaluate message."""
    bins: int
    threshold: float
    release: bool = True                 # False: abstain on every endpoint
    full_report: bool = False
    notices: list[str] = field(default_factory=list)
    calibration: dict | None = None      # Platt parameters for the full report's recalibrated Brier / ECE


def admit_evaluate(policy, ledger_path: Path, run_id: int, conf) -> tuple[Terms | None, str | None]:
    """(terms, None) or (None, refusal reason) for an evaluate message's config; updates the ledger."""
    notices: list[str] = []
    try:
        asked_bins = int(conf.get("bins", policy.max_histogram_bins))
        threshold = float(conf.get("threshold", 0.5))
    except (TypeError, ValueError):
        return None, f"`bins` / `threshold` must be numbers, got {conf.get('bins')!r} / {conf.get('threshold')!r}"
    if not math.isfinite(threshold) or asked_bins < 1:
        return None, f"`bins` must be >= 1 and `threshold` finite, got {asked_bins} / {threshold}"
    full = bool(conf.get("full-report", False))
    calibration = None
    if "calibration-a" in conf or "calibration-b" in conf:
        try:
            calibration = {"a": float(conf.get("calibration-a")), "b": float(conf.get("calibration-b"))}
        except (TypeError, ValueError):
            return None, "`calibration-a` / `calibration-b` must both be numbers"
        if not (math.isfinite(calibration["a"]) and math.isfinite(calibration["b"]) and calibration["a"] > 0):
            return None, f"calibration {calibration} refused: needs a finite slope > 0 and a finite intercept"
        if not full:
            return None, "a calibration is accepted only with the full report"
    with ledger_entry(ledger_path, run_id) as entry:
        if calibration is not None:   # one recalibration per run: a server cannot sweep maps over the same scores
            fixed = entry.get("calibration")
            if fixed is None:
                entry["calibration"] = [calibration["a"], calibration["b"]]
            elif [float(v) for v in fixed] != [calibration["a"], calibration["b"]]:
                return None, (f"this run already used the calibration a={fixed[0]:g}, b={fixed[1]:g}; "
                              f"a different one is refused")
        thresholds = [float(t) for t in entry["thresholds"]]
        if threshold not in thresholds:
            if len(thresholds) >= policy.max_thresholds:
                return None, (f"this run already asked for {len(thresholds)} distinct thresholds "
                              f"({', '.join(f'{t:g}' for t in thresholds)}); max_thresholds is "
                              f"{policy.max_thresholds}, so threshold {threshold:g} is refused")
            entry["thresholds"] = thresholds + [threshold]
        if entry["bins"] is None:
            bins = min(asked_bins, policy.max_histogram_bins)
            if bins < asked_bins:
                notices.append(f"bins {asked_bins} clamped to {bins} (max_histogram_bins)")
            entry["bins"] = bins
        else:
            bins = int(entry["bins"])
            if asked_bins != bins and min(asked_bins, policy.max_histogram_bins) != bins:
                notices.append(f"bins {asked_bins} ignored: this run's histogram grid is {bins} bins")
        release = True
        if not policy.release_round_metrics:
            if not full:
                release = False
                notices.append("per-round metrics are not released (release_round_metrics = false)")
            elif entry["final_released"]:
                release = False
                notices.append("this run's one full report was already released (release_round_metrics = false)")
            else:
                entry["final_released"] = True
    return Terms(bins=bins, threshold=threshold, release=release, full_report=full and release,
                 notices=notices, calibration=calibration), None


# --------------------------------------------------------------------------- the check on every reply


def _check_cells(problems: list, what: str, neg, pos, edges, bins: int | None, k: int) -> None:
    if neg is None or pos is None or edges is None or not (len(neg) == len(pos) == len(edges) - 1):
        problems.append(f"{what} without matching counts and edges")
        return
    if bins is not None and len(neg) > bins:
        problems.append(f"{what} has {len(neg)} cells, more than the run's grid of {bins}")
    if bins is not None:
        grid = grid_edges(bins)
        off = [e for e in edges if not np.isclose(grid, e, atol=1e-12).any()]
        if off:
            problems.append(f"{what} edges {off[:3]} are not on the run's {bins}-bin grid")
    small = [int(c) for c in list(neg) + list(pos) if 0 < int(c) < k]
    if small:
        problems.append(f"{what} cells with {sorted(set(small))} patients (< min_cell_count {k})")


def check_released(policy, metrics: dict, bins: int | None) -> str | None:
    """Why an evaluate reply's metrics break the site's disclosure rules, or None."""
    from common.federation import reply_schema as W

    k = int(policy.min_cell_count)
    problems: list[str] = []
    if any(key in metrics for key in W.BENEFIT_CELLS):
        _check_cells(problems, "histogram", metrics.get("hist-neg"), metrics.get("hist-pos"),
                     metrics.get("hist-edges"), bins, k)
    for key in [m for m in metrics if m.startswith("td-") and m.endswith("-edges")]:
        h = key[len("td-"):-len("-edges")]
        _check_cells(problems, f"DFS cells at {h} months", metrics.get(f"td-{h}-neg"), metrics.get(f"td-{h}-pos"),
                     metrics[key], bins, k)
    if W.RISK_CELLS[1] in metrics:
        counts = metrics[W.RISK_CELLS[1]]
        _check_cells(problems, "risk cells", counts, [0] * len(counts), metrics.get(W.RISK_CELLS[0]), bins, k)
    if "n-pos" in metrics and "num-examples" in metrics:
        n, n_pos = int(metrics["num-examples"]), int(metrics["n-pos"])
        if min(n_pos, n - n_pos) < k:
            problems.append(f"label counts {n_pos} / {n - n_pos} below min_cell_count {k}")
    small = {c: int(metrics[c]) for c in W.CONFUSION if c in metrics and 0 < int(metrics[c]) < k}
    if small:
        problems.append(f"confusion cells {small} below min_cell_count {k}")
    if W.PAIR_WIRE["comparable"] in metrics or "n-dfs" in metrics:
        n_dfs, n_ev = int(metrics.get("n-dfs", 0)), int(metrics.get("n-events", 0))
        if n_dfs < int(policy.min_patients["dfs"]) or n_ev < k:
            problems.append(f"DFS metrics on {n_dfs} patients / {n_ev} events, below the site's floors")
    if "hz-events" in metrics:
        small = [float(c) for c in metrics["hz-events"] if 0 < float(c) < k]
        if small or len(metrics["hz-events"]) != len(metrics.get("hz-edges", [])) - 1:
            problems.append(f"baseline-hazard cells with {sorted(set(small))} events (< min_cell_count {k})")
    return "; ".join(problems) or None
