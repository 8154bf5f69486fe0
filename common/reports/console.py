"""What the CLI prints: the project's own lines, tables that fit 80 columns, clean one-line errors.

* ``console`` / ``err_console``: never wrap a message or a path in the middle (``soft_wrap``);
  tables are laid out to the terminal's width without cutting a number.
* ``follow_events``: prints a run's ``events.jsonl`` (``server/progress.py``) as it grows, one
  line per event -- the run's start, its centers and endpoints, one fixed-width line per round,
  warnings, the selection -- while Flower's and Ray's own lines go to ``RUN_DIR/logs/``.
* ``render_*``: the federation's tables (rounds, per-center validation, external center).
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from common.federation.roles import SEALED, trains

# lines wrap at spaces; a line holding a path or a hash is printed with soft_wrap=True (never broken);
# errors never wrap (the terminal shows them whole, a copy-paste gets them whole)
console = Console(highlight=False)
err_console = Console(stderr=True, soft_wrap=True, highlight=False)


def shown(path) -> str:
    """A path as the user would type it: relative to the working directory when it lies below it."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(p)


# --------------------------------------------------------------------------- numbers


def fnum(v, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and v != v) else f"{v:.{digits}f}"


def frange(v, lo, hi, brackets: str = "()") -> str:
    """``0.712 (0.65-0.77)``; ``0.248 (-0.42 to 0.92)`` when a bound is negative (a calibration intercept or
    slope); ``-`` when undefined."""
    if v is None or v != v:
        return "-"
    if lo is None or hi is None:
        return f"{v:.3f}"
    sep = " to " if min(lo, hi) < 0 else "-"
    return f"{v:.3f} {brackets[0]}{lo:.2f}{sep}{hi:.2f}{brackets[1]}"


def compact_table(title: str, columns: list[tuple[str, str]]) -> Table:
    """A table without vertical rules that fits 80 columns; right-aligned (numeric) columns never wrap."""
    t = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, title_justify="left",
              show_edge=False)
    for name, justify in columns:
        t.add_column(name, justify=justify, no_wrap=justify == "right", overflow="fold")
    return t


# --------------------------------------------------------------------------- live events

ROUND_HEADER = f"{'round':>6}  {'loss':>6}  {'val AUC [bounds]':>18}  {'val C (95% CI)':>18}  {'centers':>7}  " \
               f"{'MB':>5}  {'s':>4}"
ROUND_NOTE = "val: pooled internal validation; centers: released / failed / abstained"


class EventPrinter:
    """One line per event of ``events.jsonl``."""

    def __init__(self, out: Console):
        self.out = out
        self.header_done = self.note_done = False

    def __call__(self, ev: dict) -> None:
        kind = ev.get("event")
        if kind == "start":
            what = "resuming" if ev.get("resume") else "federation"
            self.out.print(f"{what}: run {ev.get('run_id')}, {ev.get('strategy')}, {ev.get('rounds')} rounds",
                           soft_wrap=True)
            # a path on a line of its own: an 80-column terminal never breaks it in the middle
            self.out.print(f"  run directory: {shown(ev.get('run_dir'))}", soft_wrap=True)
        elif kind == "roles":
            roles = ev.get("centers") or {}
            train = sorted(c for c, r in roles.items() if trains(r))
            ext = sorted(c for c, r in roles.items() if r == "external")
            sealed = sorted(c for c, r in roles.items() if r == SEALED)
            e = ev.get("endpoints") or {}
            self.out.print(f"centers: {len(train)} training ({', '.join(train)}); external: {', '.join(ext) or 'none'}"
                           + (f"; sealed: {', '.join(sealed)}" if sealed else ""))
            self.out.print(f"endpoints: {e.get('benefit', 0)} patients with a benefit label, {e.get('dfs', 0)} with "
                           f"DFS; rounds selected on {ev.get('select_metric')} (internal validation)")
        elif kind == "round":
            if not self.header_done:
                if not self.note_done:
                    self.out.print(ROUND_NOTE, markup=False)
                    self.note_done = True
                self.out.print(ROUND_HEADER, markup=False)
                self.header_done = True
            v = ev.get("val") or {}
            failed = len(ev.get("failures") or {})
            abst = int(ev.get("abstained", 0))
            centers = f"{int(ev.get('answered', 0)) - abst}/{failed}/{abst}"
            rnd = f"{ev.get('round')}/{ev.get('of')}"
            self.out.print(f"{rnd:>6}  {fnum(ev.get('train_loss')):>6}  "
                           f"{frange(v.get('auc'), v.get('auc_lower'), v.get('auc_upper'), '[]'):>18}  "
                           f"{frange(v.get('c_index'), v.get('c_index_lo'), v.get('c_index_hi')):>18}  "
                           f"{centers:>7}  {(ev.get('bytes_sent') or 0) / 1e6:>5.1f}  {(ev.get('seconds') or 0):>4.0f}",
                           markup=False)
        elif kind == "note":
            self.out.print(f"note: {ev.get('text')}", markup=False)
        elif kind == "log":
            self.header_done = False      # a warning breaks the table: repeat its header after it
            self.out.print(f"[yellow]{ev.get('level', 'warning')}:[/yellow] {ev.get('text')}", markup=True)
        elif kind == "selected":
            # the selection key is "higher is better": for val_loss it is minus the loss; print the loss
            value = ("unranked" if ev.get("value") is None else
                     f"{-ev['value']:.3f}" if ev.get("metric") == "val_loss" else f"{ev['value']:.3f}")
            self.out.print(f"selected: round {ev.get('round')}, {ev.get('metric')} {value} on {ev.get('centers')} "
                           f"centers / {ev.get('patients')} patients")
            self.out.print(f"decision threshold {fnum(ev.get('threshold'))} ({ev.get('threshold_source', '')})",
                           markup=False)
        elif kind == "failed":
            self.out.print(f"[red]server failed:[/red] {ev.get('text')}", markup=True)


def follow_events(path: Path, printer, stop: threading.Event, poll: float = 0.5) -> threading.Thread:
    """A thread that prints every line appended to ``path`` (created or not yet) until ``stop`` is set."""

    def run():
        pos = 0
        while True:
            done = stop.is_set()
            if path.exists():
                with path.open() as f:
                    f.seek(pos)
                    while line := f.readline():
                        if not line.endswith("\n"):
                            break
                        pos += len(line.encode())
                        try:
                            printer(json.loads(line))
                        except ValueError:
                            continue
            if done:
                return
            time.sleep(poll)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


# --------------------------------------------------------------------------- tables


def render_rounds(metrics: dict) -> Table:
    """One line per round: loss, pooled validation metrics with their bounds / CI, centers, bytes, seconds."""
    hist = metrics.get("history", [])
    has_auc = any("auc" in (h.get("val") or {}) for h in hist)
    has_c = any("c_index" in (h.get("val") or {}) for h in hist)
    cols = [("round", "right"), ("loss", "right")]
    cols += [("val AUC (bounds)", "right")] if has_auc else []
    cols += [("val C (95% CI)", "right")] if has_c else []
    cols += [("centers", "right"), ("MB", "right"), ("s", "right")]
    t = compact_table(f"Federation ({metrics.get('strategy')}, {metrics.get('rounds')} rounds; * selected on "
                      f"{metrics.get('selection_metric')})", cols)
    t.caption, t.caption_justify = "centers: released / failed / abstained", "left"
    for h in hist:
        v = h.get("val") or {}
        vc = h.get("val_centers") or {}
        failed = len(h.get("failures") or {})
        abst = sum(1 for e in vc.values() if e.get("abstained", True) and e.get("dfs_abstained", True))
        row = [f"{h['round']}{'*' if h['round'] == metrics.get('selected_round') else ''}", fnum(h.get("train_loss"))]
        if has_auc:
            row.append(frange(v.get("auc"), v.get("auc_lower"), v.get("auc_upper")))
        if has_c:
            row.append(frange(v.get("c_index"), v.get("c_index_lo"), v.get("c_index_hi")))
        row += [f"{len(vc) - abst}/{failed}/{abst}", f"{h.get('bytes_sent', 0) / 1e6:.1f}", f"{h.get('seconds', 0):.0f}"]
        t.add_row(*row)
    return t


def render_round_centers(metrics: dict) -> Table | None:
    """Per-center validation of the selected round (AUC from its cells, C-index, patients)."""
    hist = {h["round"]: h for h in metrics.get("history", [])}
    h = hist.get(metrics.get("selected_round"))
    if not h or not h.get("val_centers"):
        return None
    t = compact_table(f"Validation per center, round {h['round']}",
                      [("center", "left"), ("n", "right"), ("AUC", "right"), ("n DFS", "right"), ("C-index", "right")])
    for c, e in sorted(h["val_centers"].items()):
        t.add_row(c, str(e.get("n", 0)), fnum(None if e.get("abstained", True) else e.get("auc")),
                  str(e.get("n_dfs") or "-"), fnum(None if e.get("dfs_abstained", True) else e.get("c_index")))
    return t


EXTERNAL_ROWS = (("auc", "AUC (DeLong)"), ("accuracy", "accuracy"), ("sensitivity", "sensitivity"),
                 ("specificity", "specificity"), ("ppv", "PPV"), ("npv", "NPV"), ("brier", "Brier score"),
                 ("ece", "calibration error (ECE)"), ("ece_floor", "ECE if calibrated (floor)"),
                 ("brier_calibrated", "Brier, recalibrated"), ("ece_calibrated", "ECE, recalibrated"),
                 ("ece_calibrated_floor", "ECE floor, recalibrated"),
                 ("cal_intercept", "calibration intercept (0 if calibrated)"),
                 ("cal_slope", "calibration slope (1 if calibrated)"), ("c_index", "DFS C-index"),
                 ("ibs", "integrated Brier (DFS)"))


def render_external(metrics: dict) -> list[Table]:
    """One table per external center: each metric with its 95% CI, DFS calibration at each horizon."""
    out = []
    thr = metrics.get("threshold")
    for name, e in ((metrics.get("external") or {}).get("centers") or {}).items():
        used = e.get("threshold_used")
        at = f"threshold {fnum(thr)}" + ("" if used is None or thr is None or abs(used - thr) < 1e-9
                                         else f", scored at its cell edge {used:g}")
        t = compact_table(f"External center {name}: selected round {metrics.get('selected_round')}, {at}",
                          [("metric", "left"), ("value (95% CI)", "right"), ("patients", "right")])
        n_b = f"{e.get('n', 0)}" + (f" ({e.get('n_pos')} pos)" if e.get("n_pos") else "")
        for key, label in EXTERNAL_ROWS:
            if e.get(key) is not None:
                t.add_row(label, frange(e[key], e.get(f"{key}_lo"), e.get(f"{key}_hi")),
                          str(e.get("n_dfs", "")) if key in ("c_index", "ibs") else n_b)
        for key in sorted((k for k in e if k.startswith("td_auc_") and k.count("_") == 2),
                          key=lambda k: float(k.rsplit("_", 1)[1])):
            t.add_row(f"DFS AUC at {key.rsplit('_', 1)[1]} mo", frange(e[key], e.get(f"{key}_lo"), e.get(f"{key}_hi")),
                      str(e.get("n_dfs", "")))
        for key in sorted((k for k in e if k.startswith("dfs_cal_") and k.endswith("_all_pred")),
                          key=lambda k: float(k.split("_")[2])):
            h = key.split("_")[2]
            t.add_row(f"DFS at {h} mo: predicted", fnum(e[key]), "")
            t.add_row(f"DFS at {h} mo: observed (KM)", frange(e.get(f"dfs_cal_{h}_all_obs"),
                                                              e.get(f"dfs_cal_{h}_all_obs_lo"),
                                                              e.get(f"dfs_cal_{h}_all_obs_hi")), "")
        if e.get("abstained", True) and e.get("dfs_abstained", True):
            t.add_row("every endpoint", "abstained (site floors)", str(e.get("n", 0)))
        out.append(t)
    if not out:
        t = compact_table("External center", [("", "left")])
        t.add_row("no external center answered")
        out.append(t)
    return out


def render_cox(metrics: dict) -> Table | None:
    """The federated Cox model's coefficients (``model=cox``): hazard ratios per SD of the scaled input, with
    their Wald intervals, and how the penalizer was chosen."""
    cox = metrics.get("cox")
    if not cox:
        return None
    how = (f"penalizer {cox['penalizer']:g} chosen by federated leave-one-center-out CV" if cox.get("cv_basis")
           else f"penalizer {cox['penalizer']:g} (fixed)")
    t = compact_table(f"Cox model, stratified by center: {cox['patients']} patients, {len(cox.get('centers', {}))} "
                      f"centers, {cox['rounds']} Newton rounds; {how}",
                      [("covariate", "left"), ("coef", "right"), ("HR (95% CI)", "right"), ("p", "right")])
    for r in cox["coefficients"]:
        t.add_row(r["covariate"], f"{r['coef']:+.3f}", frange(r["hr"], r["hr_lo"], r["hr_hi"]),
                  "<0.001" if r["p"] < 1e-3 else f"{r['p']:.3f}")
    return t


def render_capacity(metrics: dict) -> Table | None:
    """The capacity candidates of a run (``federation.capacity``) and the one its out-of-fold validation chose."""
    cap = metrics.get("capacity")
    if not cap:
        return None
    t = compact_table(f"Capacity chosen on the out-of-fold {cap['metric']}: {cap['chosen']}",
                      [("candidate", "left"), ("selected round", "right"), ("validation loss", "right"),
                       ("C-index", "right")])
    for c in cap["candidates"]:
        t.add_row(("* " if c["candidate"] == cap["chosen"] else "  ") + c["candidate"], str(c["selected_round"]),
                  fnum(c.get("val_loss")), fnum(c.get("c_index")))
    return t
