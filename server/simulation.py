"""``newadj simulate`` and ``newadj demo``: the federation as a Flower simulation.

Each training center and the external center is one simulated SuperNode
(partition id = index of its site folder).  The run goes through the real
``flwr run`` against a private simulation SuperLink (own FLWR_HOME, free ports,
runtime dependency installation off), and the outcome is read back from
``flwr ls --format json`` and the run directory -- never from ``flwr run``'s
exit code, which is 0 even when the run failed.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich import box
from rich.table import Table

from common.cohort import discover_sites, ensure_caches
from common.config import join_overrides, load_config, save_config
from server.flwr_process import ProcessGroup, flwr_run, flwr_status, start_superlink, write_flwr_config


class RunFailed(RuntimeError):
    pass


RUN_SPEC = "run.json"  # what a run was started with (its cohort or kit, its overrides): what --resume reuses


def read_run_spec(run_dir: Path, command: str) -> dict:
    """RUN_DIR's run spec, for ``newadj COMMAND --resume``."""
    spec = Path(run_dir) / RUN_SPEC
    if not spec.exists():
        raise RunFailed(f"{spec}: not a run directory of `newadj {command}` (no {RUN_SPEC})")
    return json.loads(spec.read_text())


def start_simulation_superlink(flwr_home: Path, group: ProcessGroup, log_dir: Path) -> tuple[str, dict]:
    addrs, env = start_superlink(group, flwr_home, log_dir, simulation=True)
    write_flwr_config(flwr_home, "sim", addrs.control)
    return "sim", env


RESULT_FILE = {"run": "metrics.json", "schema": "schema.json"}   # what a finished run of each mode leaves


def run_simulation(cohort_dir: Path, run_dir: Path, overrides: list[str], console: Console | None = None,
                   stream: bool = True, resume: bool = False, workers: int | None = None, mode: str = "run") -> dict:
    """The federation on ``cohort_dir`` as a Flower simulation; ``overrides`` reach the server and every
    site (which accepts only its allowed keys); ``workers``: preprocessing processes before the run.
    ``mode="schema"``: the schema step (``server/schema.py``), nothing preprocessed or trained."""
    console = console or Console()
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = load_config(overrides)
    save_config(cfg, run_dir)
    sites = discover_sites(cohort_dir)
    result = run_dir / RESULT_FILE[mode]
    if mode == "run":
        (run_dir / RUN_SPEC).write_text(json.dumps({"cohort": str(Path(cohort_dir).resolve()),
                                                      "overrides": list(overrides)}, indent=1))
        console.print(f"[bold]Preprocessing[/bold] {len(sites)} sites of {cohort_dir} (cached where current)")
        ensure_caches(sites, cfg, progress=True, workers=workers)
    if not resume and result.exists():
        result.unlink()

    flwr_home = run_dir / "flwr-home"
    group = ProcessGroup()
    t0 = time.perf_counter()
    try:
        superlink, env = start_simulation_superlink(flwr_home, group, run_dir / "logs")
        run_config = {"cohort-dir": str(Path(cohort_dir).resolve()), "run-dir": str(run_dir),
                      "overrides": join_overrides(overrides), "resume": bool(resume),
                      "expected-nodes": len(sites), "mode": mode}
        fed_cfg = {"num-supernodes": len(sites), "client-resources-num-cpus": 1}
        echo = (lambda line: console.print(line, markup=False, highlight=False)) if stream else None
        run_id = flwr_run(superlink, env, run_config, run_dir / "logs" / "flwr-run.log", fed_cfg, echo=echo)
        if run_id is None:
            raise RunFailed(f"`flwr run` did not start a run; see {run_dir / 'logs' / 'flwr-run.log'}")
        status = final_status(superlink, env, run_id, run_budget(cfg))
    finally:
        group.stop()
    wall = time.perf_counter() - t0
    (run_dir / "flwr-status.json").write_text(json.dumps(status, indent=1))
    sub = str(status.get("status", ""))
    if "finished:completed" not in sub.replace(" ", "") or not result.exists():
        raise RunFailed(f"run {run_id} ended with status {sub!r}; logs in {run_dir / 'logs'}")
    metrics = json.loads(result.read_text())
    metrics["wall_seconds"] = wall
    metrics["flwr_run_id"] = run_id
    result.write_text(json.dumps(metrics, indent=1))
    return metrics


def final_status(superlink: str, env: dict, run_id: int, timeout: float | None = None) -> dict:
    """Poll ``flwr ls`` until the run is finished (``flwr run --stream`` may return earlier)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        st = flwr_status(superlink, env, run_id)
        if str(st.get("status", "")).startswith("finished") or (deadline and time.monotonic() > deadline):
            return st
        time.sleep(2.0)


def run_budget(cfg) -> float:
    """Longest a run may take before we stop waiting: every round's timeout, plus the role query and the end
    (the baseline-hazard request and the external center's report)."""
    fed = cfg.federation
    return float(fed.wait_nodes_timeout) + float(fed.query_timeout) + float(fed.round_timeout) * (2 * int(fed.num_rounds) + 2)


def _f(v, digits=3) -> str:
    return "-" if v is None or (isinstance(v, float) and v != v) else f"{v:.{digits}f}"


def _range(v, lo, hi) -> str:
    """``0.712 (0.65-0.77)``; ``-`` when undefined."""
    if v is None or v != v:
        return "-"
    return f"{v:.3f}" + ("" if lo is None or hi is None else f" ({lo:.2f}-{hi:.2f})")


def _table(title: str, columns: list[tuple[str, str]]) -> Table:
    """A compact table (no vertical rules) that fits 80 columns; numbers right-aligned, never cut."""
    t = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), title_justify="left", show_edge=False)
    for name, justify in columns:
        t.add_column(name, justify=justify, no_wrap=justify == "right", overflow="fold")
    return t


def render_rounds(metrics: dict) -> Table:
    """One line per round: loss, pooled validation metrics with their bounds / CI, centers, bytes, seconds."""
    hist = metrics.get("history", [])
    has_auc = any("auc" in (h.get("val") or {}) for h in hist)
    has_c = any("c_index" in (h.get("val") or {}) for h in hist)
    cols = [("round", "right"), ("loss", "right")]
    cols += [("val AUC (bounds)", "right")] if has_auc else []
    cols += [("val C (95% CI)", "right")] if has_c else []
    cols += [("ok/fail/abst", "right"), ("MB", "right"), ("s", "right")]
    t = _table(f"Federation ({metrics.get('strategy')}, {metrics.get('rounds')} rounds; * selected on "
               f"{metrics.get('selection_metric')})", cols)
    for h in hist:
        v = h.get("val") or {}
        vc = h.get("val_centers") or {}
        failed = len(h.get("failures") or {})
        abst = sum(1 for e in vc.values() if e.get("abstained", True) and e.get("dfs_abstained", True))
        row = [f"{h['round']}{'*' if h['round'] == metrics.get('selected_round') else ''}", _f(h.get("train_loss"))]
        if has_auc:
            row.append(_range(v.get("auc"), v.get("auc_lower"), v.get("auc_upper")))
        if has_c:
            row.append(_range(v.get("c_index"), v.get("c_index_lo"), v.get("c_index_hi")))
        row += [f"{len(vc) - abst}/{failed}/{abst}", f"{h.get('bytes_sent', 0) / 1e6:.1f}", f"{h.get('seconds', 0):.0f}"]
        t.add_row(*row)
    return t


def render_round_centers(metrics: dict) -> Table | None:
    """Per-center validation of the selected round (AUC from its cells, C-index, patients)."""
    hist = {h["round"]: h for h in metrics.get("history", [])}
    h = hist.get(metrics.get("selected_round"))
    if not h or not h.get("val_centers"):
        return None
    t = _table(f"Validation per center, round {h['round']}", [("center", "left"), ("n", "right"), ("AUC", "right"),
                                                              ("n DFS", "right"), ("C-index", "right")])
    for c, e in sorted(h["val_centers"].items()):
        t.add_row(c, str(e.get("n", 0)), _f(None if e.get("abstained", True) else e.get("auc")),
                  str(e.get("n_dfs") or "-"), _f(None if e.get("dfs_abstained", True) else e.get("c_index")))
    return t


EXTERNAL_ROWS = (("auc", "AUC (DeLong)"), ("accuracy", "accuracy"), ("sensitivity", "sensitivity"),
                 ("specificity", "specificity"), ("ppv", "PPV"), ("npv", "NPV"), ("brier", "Brier score"),
                 ("ece", "calibration error (ECE)"), ("c_index", "DFS C-index"), ("ibs", "integrated Brier (DFS)"))


def render_external(metrics: dict) -> list[Table]:
    """One table per external center: each metric with its 95% CI, DFS calibration at each horizon."""
    out = []
    thr = metrics.get("threshold")
    for name, e in ((metrics.get("external") or {}).get("centers") or {}).items():
        used = e.get("threshold_used")
        at = f"threshold {_f(thr)}" + ("" if used is None or thr is None or abs(used - thr) < 1e-9
                                       else f", scored at its cell edge {used:g}")
        t = _table(f"External center {name}: selected round {metrics.get('selected_round')}, {at}",
                   [("metric", "left"), ("value (95% CI)", "right"), ("patients", "right")])
        n_b = f"{e.get('n', 0)}" + (f" ({e.get('n_pos')} pos)" if e.get("n_pos") else "")
        for key, label in EXTERNAL_ROWS:
            if e.get(key) is not None:
                t.add_row(label, _range(e[key], e.get(f"{key}_lo"), e.get(f"{key}_hi")),
                          str(e.get("n_dfs", "")) if key in ("c_index", "ibs") else n_b)
        for key in sorted((k for k in e if k.startswith("td_auc_") and k.count("_") == 2),
                          key=lambda k: float(k.rsplit("_", 1)[1])):
            t.add_row(f"DFS AUC at {key.rsplit('_', 1)[1]} mo", _range(e[key], e.get(f"{key}_lo"), e.get(f"{key}_hi")),
                      str(e.get("n_dfs", "")))
        for key in sorted((k for k in e if k.startswith("dfs_cal_") and k.endswith("_all_pred")),
                          key=lambda k: float(k.split("_")[2])):
            h = key.split("_")[2]
            obs = e.get(f"dfs_cal_{h}_all_obs")
            t.add_row(f"DFS at {h} mo: predicted", _f(e[key]), "")
            t.add_row(f"DFS at {h} mo: observed (KM)", _range(obs, e.get(f"dfs_cal_{h}_all_obs_lo"),
                                                              e.get(f"dfs_cal_{h}_all_obs_hi")), "")
        if e.get("abstained", True) and e.get("dfs_abstained", True):
            t.add_row("every endpoint", "abstained (site floors)", str(e.get("n", 0)))
        out.append(t)
    if not out:
        t = _table("External center", [("", "left")])
        t.add_row("no external center answered")
        out.append(t)
    return out
