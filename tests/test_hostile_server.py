"""A hostile coordinator against real SuperNodes: every attack on site sovereignty is refused or clamped.

A ServerApp written to extract patient-level data (tests/hostile_server_app.py) is shipped with the
project's own ClientApp to a real flower-superlink and three real flower-supernode processes.  It
tries: run overrides of site-owned keys (the floor `train.min_patients=1`, `data.cache_dir`, an
encoder path), 10,000 histogram bins, another bin count for the same model, a threshold sweep, and
a full report.  Then the sites' audit logs are replayed: no released cell holds fewer patients than
the site's minimum, and no combination of the replies is finer than one of them.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from client.audit import AUDIT_FILE, read_audit
from client.disclosure import LEDGER_FILE
from server.ops.processes import PROJECT_ROOT, ProcessGroup, flwr_run, flwr_status, start_superlink, start_supernode, \
    write_flwr_config
from tests.test_policy_audit import check_disclosure

pytestmark = [pytest.mark.deployment, pytest.mark.slow]   # about 4-5 min on 2 cores

# the sites' own rules for this test (stricter than the tiny cohort's: most cells must be merged)
HOSTILE_SITE_POLICY = """min_patients = { benefit = 4, dfs = 4 }
min_cell_count = 3
max_histogram_bins = 10
max_thresholds = 3

[config]
train.num_threads = 1
"""
BAD_OVERRIDES = ["train.min_patients=1", "data.cache_dir=/tmp/elsewhere",
                 "preprocess.pathology.encoder.path=/tmp/evil-encoder.pt"]


def _hostile_app(tmp: Path) -> Path:
    """A copy of the app whose ServerApp component is the hostile one (the ClientApp stays the project's)."""
    app = tmp / "hostile-app"
    for d in ("common", "client", "server", "conf"):
        shutil.copytree(PROJECT_ROOT / d, app / d, ignore=shutil.ignore_patterns("__pycache__"))
    (app / "hostile").mkdir()
    (app / "hostile" / "__init__.py").write_text("")
    shutil.copy(PROJECT_ROOT / "tests" / "hostile_server_app.py", app / "hostile" / "server_app.py")
    toml = (PROJECT_ROOT / "conf" / "flwr_app.toml").read_text()
    toml = toml.replace('serverapp = "server.server_app:app"', 'serverapp = "hostile.server_app:app"')
    toml = toml.replace('fab-include = [', 'fab-include = ["hostile/**/*.py", ')
    toml = toml.replace("[tool.flwr.app.config]\n", '[tool.flwr.app.config]\nattack = ""\n')
    (app / "pyproject.toml").write_text(toml)
    return app


def _sites(tiny_cohort: Path, dst: Path, app: Path) -> list[Path]:
    """Three sites with the stricter policy, each having approved the app (its ClientApp is the project's, which
    the sites run installed either way; this test is about what the sites release to a hostile ServerApp)."""
    from client.bundles import approve
    from server.ops.processes import write_bundle
    from tests.conftest import write_site_policy

    fab, _ = write_bundle(dst / "hostile-app.fab", app)
    out = []
    for name in ("center_a", "center_b", "external"):
        site = dst / name
        shutil.copytree(tiny_cohort / name, site, ignore=shutil.ignore_patterns(AUDIT_FILE, LEDGER_FILE))
        write_site_policy(site, HOSTILE_SITE_POLICY)
        approve(site, fab)
        out.append(site)
    return out


def _run(env, app: Path, run_dir: Path, attack: str, overrides: list[str], logs: Path, n: int) -> int:
    run_id = flwr_run("loopback", env, {"run-dir": str(run_dir), "overrides": " ".join(overrides),
                                        "attack": attack, "expected-nodes": n},
                      logs / f"flwr-run-{attack}.log", timeout=600, app=app)
    assert run_id is not None, (logs / f"flwr-run-{attack}.log").read_text()[-3000:]
    status = flwr_status("loopback", env, run_id)
    assert "finished:completed" in str(status.get("status", "")).replace(" ", ""), status
    return run_id


def _outs(site: Path, run_id: int) -> tuple[list[dict], dict]:
    lines = [ln for ln in read_audit(site / AUDIT_FILE) if ln["run_id"] == run_id]
    return [ln for ln in lines if ln["direction"] == "out"], {ln["message_id"]: ln for ln in lines
                                                               if ln["direction"] == "in"}


def test_hostile_server_is_refused_or_clamped_and_learns_nothing_finer_than_a_cell(tiny_cohort, tmp_path):
    app = _hostile_app(tmp_path)
    sites = _sites(tiny_cohort, tmp_path / "cohort", app)
    logs, home = tmp_path / "logs", tmp_path / "flwr-home"
    group = ProcessGroup()
    try:
        addrs, env = start_superlink(group, home, logs)
        for s in sites:
            role = "external" if s.name == "external" else "train"
            start_supernode(group, env, addrs.fleet, {"data-dir": str(s), "role": role, "center-id": s.name},
                            logs / f"supernode-{s.name}.log")
        write_flwr_config(home, "loopback", addrs.control)
        rid_over = _run(env, app, tmp_path / "run-overrides", "overrides", ["model=small", *BAD_OVERRIDES], logs,
                        len(sites))
        rid_disc = _run(env, app, tmp_path / "run-disclosure", "disclosure", ["model=small"], logs, len(sites))
    finally:
        group.stop()

    # --- 1) site-owned keys in the run's overrides: every site refuses the run, naming each key
    over = json.loads((tmp_path / "run-overrides" / "hostile.json").read_text())
    replies = over["steps"][0]["replies"]
    assert len(replies) == len(sites)
    for r in replies.values():
        for key in ("train.min_patients", "data.cache_dir", "preprocess.pathology.encoder.path"):
            assert key in r["error"], r
    assert not Path("/tmp/elsewhere").exists()
    for site in sites:
        outs, _ = _outs(site, rid_over)
        assert outs and all(o["decision"] == "refused" and "data.cache_dir" in o["reason"] for o in outs)
        assert not (site / ".newadj-cache-elsewhere").exists()

    # --- 2) bins, another grid, a threshold sweep, a full report: clamped or refused, never finer than a cell
    disc = json.loads((tmp_path / "run-disclosure" / "hostile.json").read_text())
    steps = {s["step"]: s["replies"] for s in disc["steps"]}
    released = 0
    for nid, r in steps["bins=10000"].items():
        assert "bins 10000 clamped to 10 (max_histogram_bins)" in r["info"]["notice"]
        if "hist-neg" in r["metrics"]:
            released += 1
            assert len(r["metrics"]["hist-neg"]) <= 10
            assert all(c == 0 or c >= 3 for c in r["metrics"]["hist-neg"] + r["metrics"]["hist-pos"])
    assert released >= 1, "no site released a histogram: the test would prove nothing"
    for nid, r in steps["bins=7"].items():
        assert "this run's histogram grid is 10 bins" in r["info"]["notice"]
        assert r["metrics"].get("hist-edges") == steps["bins=10000"][nid]["metrics"].get("hist-edges")
    # 0.5 (already asked), 0.05 and 0.15: three distinct thresholds; the rest of the sweep is refused
    for t in (0.05, 0.15):
        assert all("error" not in r for r in steps[f"threshold={t}"].values())
    for t in (0.25, 0.35):
        for r in steps[f"threshold={t}"].values():
            assert "max_thresholds is 3" in r["error"]
    assert all("error" not in r for r in steps["full-report"].values())

    # --- 3) the replay of every reply the hostile run received, site by site, from the sites' audit logs
    for site in sites:
        outs, ins = _outs(site, rid_disc)
        refused = [o for o in outs if o["decision"] == "refused"]
        assert len(refused) == 2 and all("max_thresholds" in o["reason"] for o in refused)
        check_disclosure(site, outs, ins)
        ledger = json.loads((site / LEDGER_FILE).read_text())[str(rid_disc)]
        assert ledger["bins"] == 10 and ledger["thresholds"] == [0.5, 0.05, 0.15]
