"""``newadj run``: submit the app to the federation's SuperLink and follow the run to its end.

Uses the `flwr` CLI configuration that ``newadj server start`` wrote into the
coordinator kit's state folder (TLS, the federation's CA). The outcome is read
from ``flwr ls --format json`` and the run directory, and a failed run exits
non-zero (``flwr run --stream`` itself exits 0 either way).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from rich.console import Console

from common.config import join_overrides, load_config, save_config
from server.ops.processes import build_bundle, flwr_env
from server.ops.deploy import CONNECTION, load_kit
from server.ops.simulation import (RESULT_FILE, RUN_SPEC, RunFailed, follow_run, raise_unless_finished, read_run_spec,
                                   run_budget)


def resume_spec(run_dir: Path) -> list[str]:
    """The overrides a run was submitted with (``newadj run --resume RUN_DIR``)."""
    return list(read_run_spec(run_dir, "run")["overrides"])


def submit_run(kit_dir: Path, run_dir: Path, overrides: list[str], console: Console | None = None,
               stream: bool = True, resume: bool = False, mode: str = "run", verbose: bool = False) -> dict:
    """Submit the federation; with ``resume`` the ServerApp continues from the run's last checkpoint;
    ``mode="schema"``: the schema step (``server/schema.py``)."""
    console = console or Console()
    kit = load_kit(kit_dir, "coordinator")   # KitError: bad input, reported by the CLI (exit 2)
    home = kit.dir / kit.data.get("files", {}).get("state_dir", "state") / "flwr-home"
    if not (home / "config.toml").exists():
        raise RunFailed(f"{home}: no `flwr` configuration; start the SuperLink first with "
                        f"`newadj server start --kit {kit.dir}`")
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(load_config(overrides), run_dir)
    result = run_dir / RESULT_FILE[mode]
    if mode == "run":
        (run_dir / RUN_SPEC).write_text(json.dumps({"kit": str(kit.dir), "overrides": list(overrides)}, indent=1))
    if not resume and result.exists():
        result.unlink()
    env = flwr_env(home)
    digest = hashlib.sha256(build_bundle()).hexdigest()
    console.print(f"submitting the app bundle sha256 {digest} (each site takes part only if it approved it: "
                  "`newadj bundle`, `newadj site approve`)", soft_wrap=True)
    run_config = {"run-dir": str(run_dir), "overrides": join_overrides(overrides),
                  "expected-nodes": len(kit.centers), "resume": bool(resume), "mode": mode}
    t0 = time.perf_counter()
    run_id, status = follow_run(CONNECTION, env, run_config, run_dir, run_dir / "logs" / "flwr-run.log",
                                run_budget(load_config(overrides)), console, stream and mode == "run", verbose)
    (run_dir / "flwr-status.json").write_text(json.dumps(status, indent=1))
    raise_unless_finished(run_id, status, run_dir, result, f"see {run_dir}")
    metrics = json.loads(result.read_text())
    metrics["wall_seconds"] = time.perf_counter() - t0
    metrics["flwr_run_id"] = run_id
    result.write_text(json.dumps(metrics, indent=1))
    return metrics
