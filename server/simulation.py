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
import shlex
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from common.cohort import discover_sites, ensure_caches
from common.config import load_config, save_config
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


def run_simulation(cohort_dir: Path, run_dir: Path, overrides: list[str], console: Console | None = None,
                   stream: bool = True, resume: bool = False, workers: int | None = None) -> dict:
    """The federation on ``cohort_dir`` as a Flower simulation; ``overrides`` reach the server and every
    site (which accepts only its allowed keys); ``workers``: preprocessing processes before the run."""
    console = console or Console()
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = load_config(overrides)
    save_config(cfg, run_dir)
    (run_dir / RUN_SPEC).write_text(json.dumps({"cohort": str(Path(cohort_dir).resolve()),
                                                  "overrides": list(overrides)}, indent=1))
    sites = discover_sites(cohort_dir)
    console.print(f"[bold]Preprocessing[/bold] {len(sites)} sites of {cohort_dir} (cached where current)")
    ensure_caches(sites, cfg, progress=True, workers=workers)
    if not resume and (run_dir / "metrics.json").exists():
        (run_dir / "metrics.json").unlink()

    flwr_home = run_dir / "flwr-home"
    group = ProcessGroup()
    t0 = time.perf_counter()
    try:
        superlink, env = start_simulation_superlink(flwr_home, group, run_dir / "logs")
        run_config = {"cohort-dir": str(Path(cohort_dir).resolve()), "run-dir": str(run_dir),
                      "overrides": " ".join(shlex.quote(o) for o in overrides), "resume": bool(resume),
                      "expected-nodes": len(sites)}
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
    metrics_path = run_dir / "metrics.json"
    if "finished:completed" not in sub.replace(" ", "") or not metrics_path.exists():
        raise RunFailed(f"run {run_id} ended with status {sub!r}; logs in {run_dir / 'logs'}")
    metrics = json.loads(metrics_path.read_text())
    metrics["wall_seconds"] = wall
    metrics["flwr_run_id"] = run_id
    metrics_path.write_text(json.dumps(metrics, indent=1))
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
    """Longest a run may take before we stop waiting: every round's timeout, plus the role query and the end."""
    fed = cfg.federation
    return float(fed.wait_nodes_timeout) + float(fed.query_timeout) + float(fed.round_timeout) * (2 * int(fed.num_rounds) + 1)


def _f(v, digits=3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def render_rounds(metrics: dict) -> Table:
    hist = metrics.get("history", [])
    centers = sorted({c for h in hist for c in h.get("val_centers", {})})
    t = Table(title=f"Federation ({metrics.get('strategy')}, {metrics.get('rounds')} rounds)")
    for c in ["round", "train loss", "val AUC pooled", *[f"AUC {c}" for c in centers], "s", "MB sent", "failures"]:
        t.add_column(c, justify="right")
    for h in hist:
        sel = "*" if h["round"] == metrics.get("selected_round") else ""
        t.add_row(f"{h['round']}{sel}", _f(h.get("train_loss")), _f(h.get("val", {}).get("auc")),
                  *[_f(h.get("val_centers", {}).get(c, {}).get("auc"), 2) for c in centers],
                  f"{h.get('seconds', 0):.0f}", f"{h.get('bytes_sent', 0) / 1e6:.2f}",
                  str(len(h.get("failures") or {})))
    return t


def render_external(metrics: dict) -> Table:
    ext = metrics.get("external") or {}
    t = Table(title=f"External center (selected round {metrics.get('selected_round')}, threshold "
                    f"{_f(metrics.get('threshold'))} chosen on internal validation)")
    for c in ("center", "n", "AUC (95% CI, DeLong)", "accuracy", "sensitivity", "specificity", "C-index"):
        t.add_column(c)
    for name, e in (ext.get("centers") or {}).items():
        if e.get("abstained"):
            t.add_row(name, str(e.get("n")), "abstained (too few patients)", "", "", "", "")
            continue
        ci = lambda k: (f"{e[k]:.3f} ({e.get(k + '_lo', float('nan')):.2f}-{e.get(k + '_hi', float('nan')):.2f})"  # noqa: E731
                        if e.get(k) is not None else "-")
        used = e.get("threshold_used")   # the site scores at its released cell edge nearest the threshold
        label = name if used is None or abs(used - float(metrics.get("threshold") or 0.5)) < 1e-9 else f"{name} @{used:g}"
        t.add_row(label, str(e.get("n")), ci("auc"), ci("accuracy"), ci("sensitivity"), ci("specificity"),
                  ci("c_index"))
    return t
