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
import threading
import time
from pathlib import Path

from rich.console import Console

from common.data.cohort import discover_sites
from common.preprocess.cache import ensure_caches
from common.config import join_overrides, load_config, save_config
from server.ops.processes import ProcessGroup, flwr_run, flwr_status, start_superlink, write_flwr_config
from server.progress import server_failure


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


def raise_unless_finished(run_id: int, status: dict, run_dir: Path, result: Path, where: str) -> None:
    """RunFailed unless ``flwr ls`` says the run completed and it left ``result``; the message carries the
    ServerApp's own reason (its ``failed`` event) and ``where`` to look next."""
    sub = str(status.get("status", ""))
    if "finished:completed" in sub.replace(" ", "") and result.exists():
        return
    said = server_failure(run_dir)
    raise RunFailed(f"run {run_id} ended with status {sub!r}" + (f"; the server said: {said}" if said else "")
                    + f"; {where}")


def follow_run(superlink: str, env: dict, run_config: dict, run_dir: Path, log_path: Path, budget: float,
               console: Console, stream: bool, verbose: bool, federation_config: dict | None = None) -> tuple[int, dict]:
    """``flwr run`` the app and wait for its end: (run id, ``flwr ls`` status).

    Flower's and Ray's own output goes to ``log_path`` (and to the terminal with ``verbose``);
    with ``stream`` the project's own lines are printed as the ServerApp writes them
    (``RUN_DIR/events.jsonl``, ``common/reports/console.py``).
    """
    from common.reports.console import EventPrinter, follow_events
    from server.progress import EVENTS_FILE

    stop = threading.Event()
    follower = follow_events(Path(run_dir) / EVENTS_FILE, EventPrinter(console), stop) if stream else None
    try:
        echo = (lambda line: console.print(line, markup=False, highlight=False)) if verbose else None
        run_id = flwr_run(superlink, env, run_config, log_path, federation_config, echo=echo)
        if run_id is None:
            raise RunFailed(f"`flwr run` did not start a run; see {log_path}")
        status = final_status(superlink, env, run_id, budget)
    finally:
        stop.set()
        if follower is not None:
            follower.join(timeout=5)
    return run_id, status


def run_simulation(cohort_dir: Path, run_dir: Path, overrides: list[str], console: Console | None = None,
                   stream: bool = True, resume: bool = False, workers: int | None = None, mode: str = "run",
                   verbose: bool = False) -> dict:
    """The federation on ``cohort_dir`` as a Flower simulation; ``overrides`` reach the server and every
    site (which accepts only its allowed keys); ``workers``: preprocessing processes before the run.
    ``mode="schema"``: the schema step (``server/schema.py``), nothing preprocessed or trained.
    ``stream``: print the run's own lines as it goes; ``verbose``: Flower's and Ray's too."""
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
        if stream:
            console.print(f"preprocessing {len(sites)} sites of {cohort_dir} (cached where current)")
        ensure_caches(sites, cfg, console=console if stream else None, progress=stream, workers=workers)
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
        run_id, status = follow_run(superlink, env, run_config, run_dir, run_dir / "logs" / "flwr-run.log",
                                    run_budget(cfg), console, stream and mode == "run", verbose, fed_cfg)
    finally:
        group.stop()
    wall = time.perf_counter() - t0
    (run_dir / "flwr-status.json").write_text(json.dumps(status, indent=1))
    raise_unless_finished(run_id, status, run_dir, result, f"logs in {run_dir / 'logs'}")
    metrics = json.loads(result.read_text())
    metrics["wall_seconds"] = wall
    metrics["flwr_run_id"] = run_id
    result.write_text(json.dumps(metrics, indent=1))
    return metrics


def run_loco(cohort_dir: Path, out: Path, overrides: list[str], console: Console | None = None,
             stream: bool = True, verbose: bool = False, on_failure=None) -> dict:
    """Leave-one-center-out CV of the federation: one simulation per training center, that center held out
    (``federation.holdout_center``: it never trains and is scored at the end with the full report, as the
    external center would be); the external center is sealed in every fold.  ``out/<center>/`` holds each
    fold's run; the folds, their mean and SD are returned and written to ``out/loco.json``.  A fold that
    fails is recorded under ``failed`` (and passed to ``on_failure(center, exc)``); the others still run.
    Raises :class:`RunFailed` before any fold when the cohort has fewer than 3 training centers."""
    from common.hashing import json_safe
    from common.learn.baseline import LOCO_KEYS, _num, fold_oracle, loco_summary

    console = console or Console()
    out = Path(out)
    centers = [s.name for s in discover_sites(cohort_dir) if s.role != "external"]
    if len(centers) < 3:
        raise RunFailed(f"--loco needs at least 3 training centers in {cohort_dir} (found {len(centers)})")
    out.mkdir(parents=True, exist_ok=True)
    folds, failed = {}, {}
    t0 = time.perf_counter()
    for c in centers:
        console.print(f"[bold]loco fold: {c} held out[/bold]")
        try:
            m = run_simulation(cohort_dir, out / c, [*overrides, f"federation.holdout_center={c}"], console=console,
                               stream=stream, verbose=verbose)
        except RunFailed as exc:
            failed[c] = str(exc)
            if on_failure:
                on_failure(c, exc)
            continue
        rep = ((m.get("external") or {}).get("centers") or {}).get(c) or {}
        folds[c] = {"n_held_out": rep.get("n"), "selected_round": m.get("selected_round"),
                    **{k: {"value": rep.get(k)} for k in LOCO_KEYS}, **fold_oracle(cohort_dir, c, rep.get("auc"))}
        console.print(f"  held-out {c}: AUC {_num(rep.get('auc'))}, ECE {_num(rep.get('ece'))}, "
                      f"C {_num(rep.get('c_index'))}")
    loco = {"folds": folds, "failed": failed, "summary": loco_summary(folds), "seconds": time.perf_counter() - t0,
            "overrides": list(overrides),
            "basis": "federated leave-one-center-out over the training centers; the external center sealed"}
    (out / "loco.json").write_text(json.dumps(json_safe(loco), indent=1, allow_nan=False))
    return loco


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
