"""What an evaluate reply may release: the site policy's disclosure rules, applied at the site.

The coordinator asks (``bins``, ``threshold``, ``full-report``); the site decides, by
its own ``policy.toml`` (``common/site_policy.py``):

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
CELL_KEYS = ("tp", "fp", "tn", "fn")


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
    before it.  Needs ``sum(neg) >= min_count`` and ``sum(pos) >= min_count``.
    """
    neg, pos = np.asarray(neg, dtype=np.int64), np.asarray(pos, dtype=np.int64)
    k = int(min_count)

    def ok(a, b) -> bool:
        return (a == 0 or a >= k) and (b == 0 or b >= k)

    if not (neg.sum() >= k and pos.sum() >= k):
        raise ValueError("each label needs at least min_count patients")
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

    def confusion(self, threshold: float) -> tuple[float, dict]:
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
    with ledger_entry(ledger_path, run_id) as entry:
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
                 notices=notices), None


# --------------------------------------------------------------------------- the check on every reply


def check_released(policy, metrics: dict, bins: int | None) -> str | None:
    """Why an evaluate reply's metrics break the site's disclosure rules, or None."""
    k = int(policy.min_cell_count)
    problems = []
    neg, pos, edges = metrics.get("hist-neg"), metrics.get("hist-pos"), metrics.get("hist-edges")
    if neg is not None or pos is not None:
        if neg is None or pos is None or edges is None or not (len(neg) == len(pos) == len(edges) - 1):
            problems.append("histogram without matching hist-neg / hist-pos / hist-edges")
        else:
            if bins is not None and len(neg) > bins:
                problems.append(f"histogram has {len(neg)} cells, more than the run's grid of {bins}")
            if bins is not None:
                grid = grid_edges(bins)
                off = [e for e in edges if not np.isclose(grid, e, atol=1e-12).any()]
                if off:
                    problems.append(f"histogram edges {off[:3]} are not on the run's {bins}-bin grid")
            small = [int(c) for c in list(neg) + list(pos) if 0 < int(c) < k]
            if small:
                problems.append(f"histogram cells with {sorted(set(small))} patients (< min_cell_count {k})")
    if "n-pos" in metrics and "num-examples" in metrics:
        n, n_pos = int(metrics["num-examples"]), int(metrics["n-pos"])
        if min(n_pos, n - n_pos) < k:
            problems.append(f"label counts {n_pos} / {n - n_pos} below min_cell_count {k}")
    small = {c: int(metrics[c]) for c in CELL_KEYS if c in metrics and 0 < int(metrics[c]) < k}
    if small:
        problems.append(f"confusion cells {small} below min_cell_count {k}")
    return "; ".join(problems) or None
