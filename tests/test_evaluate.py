"""newadj evaluate / report: metrics against known values, bad checkpoints, sites missing labels."""
from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import LOCAL_OVERRIDES, TEST_OVERRIDES

CARD = {"training_centers": {"center_a": {"role": "train", "n_train": 7, "n_val": 2},
                             "center_b": {"role": "train", "n_train": 6, "n_val": 2}},
        "strategy": "fedavg", "rounds": 2, "selected_round": 2, "local_epochs": 1, "seed": 42,
        "privacy": {"secure_aggregation": False, "differential_privacy": None}}


def make_package(path: Path, cfg=None, threshold: float = 0.5, seed: int = 0, state_from=None) -> Path:
    """A model package built directly from the test config (untrained weights)."""
    import torch

    from common.config import config_hash, load_config
    from common.federation.model_io import save_model_package
    from common.learn.task import model_from_config

    cfg = cfg if cfg is not None else load_config(TEST_OVERRIDES)
    torch.manual_seed(seed)
    model = model_from_config(state_from if state_from is not None else cfg)
    save_model_package(path, model.state_dict(), cfg, threshold, {**CARD, "config_hash": config_hash(cfg)})
    return Path(path)


def median_threshold_package(path: Path, site_dir: Path, seed: int = 0) -> Path:
    """A package whose threshold splits the site's patients in two groups (so every plot is drawable)."""
    from common.config import load_config
    from common.learn.dataset import SiteDataset
    from common.learn.engine import predict
    from common.federation.model_io import load_model_package
    from common.preprocess.cache import resolve_cache_dir

    make_package(path, seed=seed)
    model, _ = load_model_package(path)
    cfg = load_config(TEST_OVERRIDES)
    prob = predict(model, SiteDataset(resolve_cache_dir(site_dir, cfg)), 64)["prob"]
    return make_package(path, threshold=float(np.median(prob)), seed=seed)


def cli(argv: list[str]) -> int:
    from common.cli.evaluator import register

    ap = argparse.ArgumentParser(prog="newadj")
    register(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(argv)
    return args.func(args)


def copy_site(src: Path, dst: Path, blank: tuple[str, ...] = ()) -> Path:
    """Copy a site folder (with its cache) and blank some clinical.csv columns."""
    shutil.copytree(src, dst)
    f = dst / "clinical.csv"
    with f.open() as fh:
        rows = list(csv.DictReader(fh))
    with f.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if k in blank else v) for k, v in r.items()})
    return dst


@pytest.fixture(scope="module")
def package(tmp_path_factory, tiny_cohort) -> Path:
    return median_threshold_package(tmp_path_factory.mktemp("pkg") / "model.pt", tiny_cohort / "external")


def test_metrics_match_known_values(tiny_cohort, tmp_path, monkeypatch):
    """Predictions constructed so that every metric is known; the checkpoint's threshold (0.8) is used as is."""
    import common.reports.evaluate as ev

    pkg = make_package(tmp_path / "m.pt", threshold=0.8)

    def fake_predict(model, ds, batch_size=64, *a, **k):
        y = ds.labels
        t = np.array([it["dfs_time"] for it in ds.items], float)
        e = np.array([it["dfs_event"] for it in ds.items], float)
        prob = np.where(y == 1, 0.9, 0.1)
        prob[np.flatnonzero(y == 1)[0]] = 0.3   # one positive ranked low
        prob[np.flatnonzero(y == 0)[0]] = 0.7   # one negative ranked high
        return {"prob": prob, "logit": np.log(prob / (1 - prob)), "risk": -t, "benefit": y, "dfs_time": t,
                "dfs_event": e}

    monkeypatch.setattr(ev, "predict", fake_predict)
    out = tmp_path / "report"
    m = ev.evaluate_site(pkg, tiny_cohort / "external", out)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert (out / "report.html").exists()

    y = np.array([float(r["benefit"]) for r in csv.DictReader((tiny_cohort / "external" / "clinical.csv").open())])
    P, N = int((y == 1).sum()), int((y == 0).sum())
    n = P + N
    assert P >= 2 and N >= 2
    d = on_disk["discrimination"]
    assert on_disk["threshold"] == pytest.approx(0.8)  # never re-tuned on the external data
    assert d["auc"]["value"] == pytest.approx(1 - 1 / (P * N))
    assert d["auc"]["method"] == "delong" and d["auc"]["lo"] <= d["auc"]["value"] <= d["auc"]["hi"]
    # at 0.8: the low positive (0.3) is a false negative, the high negative (0.7) a true negative
    assert d["accuracy"]["value"] == pytest.approx((n - 1) / n)
    assert d["sensitivity"]["value"] == pytest.approx((P - 1) / P)
    assert d["specificity"]["value"] == pytest.approx(1.0)
    assert d["ppv"]["value"] == pytest.approx(1.0)
    assert d["npv"]["value"] == pytest.approx(N / (N + 1))
    for k in ("accuracy", "sensitivity", "specificity", "npv"):
        assert d[k]["lo"] <= d[k]["value"] + 1e-9 and d[k]["hi"] >= d[k]["value"] - 1e-9
    brier = ((P - 1) * 0.01 + 0.49 + (N - 1) * 0.01 + 0.49) / n
    assert on_disk["calibration"]["brier"]["value"] == pytest.approx(brier)
    assert 0 <= on_disk["calibration"]["ece"]["value"] <= 1
    assert sum(on_disk["calibration"]["reliability"]["counts"]) == n
    s = on_disk["survival"]
    assert s["c_index"]["value"] == pytest.approx(1.0)  # risk = -time orders every comparable pair
    assert s["groups"]["predicted_benefit"]["n"] == P - 1
    assert 0 < s["logrank"]["p_value"] <= 1
    assert s["hazard_ratio"].get("not_computable") or s["hazard_ratio"]["value"] > 0
    # seed study beside this model's numbers, model card with hash and centers
    comp = {r["metric"]: r for r in on_disk["comparison"]}
    assert comp["external AUC"]["seed_study"] == 0.89 and comp["accuracy"]["seed_study"] == 0.86
    card = on_disk["model_card"]
    assert card["training_centers"]["center_a"]["n_train"] == 7 and len(card["sha256"]) == 64
    assert card["config_hash"] and card["strategy"] == "fedavg"
    assert m["figures"] == ["km", "reliability", "roc"]
    # subgroups: every patient has all three modalities or fewer; counts add up
    mods = on_disk["subgroups"]["modality_availability"]
    assert sum(r["n_patients"] for r in mods) == n
    assert {r["field"] for r in on_disk["subgroups"]["clinical"]} >= {"tumor_count", "afp_ng_ml", "child_pugh"}
    html = (out / "report.html").read_text()
    assert "0.89" in html and "0.86" in html and card["sha256"] in html
    # aggregates only: no patient id in metrics.json
    assert "EX0001" not in (out / "metrics.json").read_text()


def test_checkpoint_from_other_config_is_refused(tiny_cohort, tmp_path, capsys):
    from common.config import load_config

    # weights of the small model inside a package that claims the full New-adj-Net config
    other = make_package(tmp_path / "other.pt", cfg=load_config(["train.n_boot=20"]),
                         state_from=load_config(TEST_OVERRIDES))
    rc = cli(["evaluate", "--no-verify", "--model", str(other), "--site", str(tiny_cohort / "external"), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(other) in err and "do not fit" in err
    assert not (tmp_path / "r" / "report.html").exists()

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    rc = cli(["evaluate", "--no-verify", "--model", str(junk), "--site", str(tiny_cohort / "external"), "--out", str(tmp_path / "r")])
    assert rc == 2 and str(junk) in capsys.readouterr().err


def _scripted_encoder(path: Path, marker: str) -> Path:
    """A TorchScript tile encoder whose forward announces that it ran (TorchScript can print)."""
    import torch

    class Loud(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.marker = marker

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            print(self.marker)
            return x.float().mean(dim=(2, 3))

    torch.jit.script(Loud()).save(str(path))
    return path


def _rewrite(package: Path, dst: Path, edit) -> Path:
    import torch

    pkg = torch.load(package, weights_only=True)
    edit(pkg)
    torch.save(pkg, dst)
    return dst


@pytest.mark.parametrize("what", ["old-format config", "encoder key", "path as architecture", "interpolation"])
def test_a_package_that_names_code_or_a_file_is_refused_by_evaluate_and_screen_and_nothing_runs(
        tiny_cohort, tmp_path, package, what):
    """A package is weights and numbers: one that names a TorchScript encoder (as a whole configuration could, in
    packages of earlier versions), carries a key of its own or a path in its architecture is refused naming the
    key, before any model is built and before the scripted module could run."""
    import subprocess
    import sys

    from server.ops.processes import PROJECT_ROOT

    marker = "SCRIPTED-FORWARD-RAN"
    evil = _scripted_encoder(tmp_path / "evil.pt", marker)
    encoder = {"name": "torchscript", "path": str(evil), "dim": 0}
    edits = {
        "old-format config": lambda p: p.update(config={"model": p["model"],
                                                        "preprocess": {"pathology": {"encoder": encoder}}}),
        "encoder key": lambda p: p.update(encoder=encoder),
        "path as architecture": lambda p: p["model"]["mri"].update(arch=str(evil)),
        "interpolation": lambda p: p["schema"].update(genomic_features=["${oc.env:HOME}"]),
    }
    named = {"old-format config": "config (", "encoder key": "encoder (not part of a model package)",
             "path as architecture": "model.mri.arch (not a word or a number)",
             "interpolation": "schema.genomic_features (not a list of column names)"}[what]
    bad = _rewrite(package, tmp_path / "bad.pt", edits[what])
    site = tiny_cohort / "external"
    # the control: built as an encoder, the module does run and say so (the marker is observable)
    ctl = subprocess.run([sys.executable, "-c", "from common.preprocess.encoders import build_encoder; "
                          f"build_encoder({encoder!r})"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert marker in ctl.stdout, ctl.stderr[-2000:]
    for argv in (["evaluate", "--no-verify", "--model", str(bad), "--site", str(site), "--out", str(tmp_path / "r")],
                 ["screen", "--no-verify", "--model", str(bad), "--site", str(site), "--all",
                  "--out", str(tmp_path / "s.csv")]):
        r = subprocess.run([sys.executable, "-m", "common.cli", *argv], cwd=PROJECT_ROOT, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
        assert named in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert marker not in r.stdout + r.stderr
    assert not (tmp_path / "r" / "report.html").exists() and not (tmp_path / "s.csv").exists()


def test_site_without_benefit_labels(tiny_cohort, tmp_path, package):
    from common.reports.evaluate import evaluate_site

    site = copy_site(tiny_cohort / "external", tmp_path / "site", blank=("benefit",))
    m = evaluate_site(package, site, tmp_path / "r")
    for k in ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv"):
        assert m["discrimination"][k]["value"] is None
        assert "benefit label" in m["discrimination"][k]["not_computable"]
    assert m["calibration"]["brier"]["not_computable"]
    assert m["survival"]["c_index"]["value"] is not None  # DFS is still evaluated
    assert "km" in m["figures"] and "roc" not in m["figures"]
    html = (tmp_path / "r" / "report.html").read_text()
    assert "not computable: no patient at this site has a benefit label" in html


def test_site_without_dfs(tiny_cohort, tmp_path, package):
    from common.reports.evaluate import evaluate_site

    site = copy_site(tiny_cohort / "external", tmp_path / "site", blank=("dfs_months", "dfs_event"))
    m = evaluate_site(package, site, tmp_path / "r")
    assert m["discrimination"]["auc"]["value"] is not None
    assert m["discrimination"]["accuracy"]["value"] is not None
    for k in ("c_index", "logrank", "hazard_ratio", "km"):
        assert "DFS" in m["survival"][k]["not_computable"]
    assert m["figures"] == ["reliability", "roc"]
    assert "not computable: no patient at this site has DFS" in (tmp_path / "r" / "report.html").read_text()


def fake_run(tmp_path: Path, package: Path, local_centers=("center_a",)) -> tuple[Path, Path]:
    """A finished-run directory and a baseline directory holding real model packages."""
    run = tmp_path / "run"
    run.mkdir()
    for suf in (".pt", ".json"):
        shutil.copy(package.with_suffix(suf), run / f"best_model{suf}")
    hist = [{"round": r, "train_loss": 1.0 / r, "val": {"auc": 0.5 + 0.1 * r, "auc_lower": 0.4, "auc_upper": 0.8,
                                                         "weighted_auc": 0.6, "loss": 0.7, "n": 12},
             "val_centers": {"center_a": {"auc": 0.6, "n": 2, "loss": 0.6}, "center_b": {"auc": None, "n": 1}},
             "bytes_sent": 1e6 * r, "bytes_received": 5e5 * r, "seconds": 10.0 + r,
             "client_train_seconds": {"center_a": 3.0, "center_b": 4.0}} for r in (1, 2)]
    (run / "metrics.json").write_text(json.dumps({
        "history": hist, "selected_round": 2, "threshold": 0.5, "strategy": "fedavg", "rounds": 2,
        "external": {"centers": {"external": {"n": 9, "auc": 0.7, "auc_lo": 0.5, "auc_hi": 0.9, "accuracy": 0.6}}},
        "communication": {"bytes_sent": 3e6, "bytes_received": 1.5e6},
        "centers": {"center_a": {"role": "train", "n_train": 7, "n_val": 2}, "external": {"role": "external"}}}))
    base = tmp_path / "base"
    (base / "models").mkdir(parents=True)
    for c in local_centers:
        for suf in (".pt", ".json"):
            shutil.copy(package.with_suffix(suf), base / "models" / f"local_{c}{suf}")
    (base / "metrics.json").write_text(json.dumps({"external_site": "external", "arms": {
        "pooled": {"external": {"auc": {"value": 0.72, "lo": 0.5, "hi": 0.9}, "accuracy": {"value": 0.6, "lo": 0.4,
                                                                                          "hi": 0.8},
                                "c_index": {"abstained": True, "reason": "no events observed"}}, "n_train": 40},
        "local:center_a": {"external": {"auc": {"value": 0.61, "lo": 0.3, "hi": 0.9}}, "n_train": 7}}}))
    return run, base


def test_site_scores_returns_aggregates_only(tiny_cohort, package):
    from common.reports.run_report import site_scores

    s = site_scores({"global": package}, tiny_cohort / "external")
    assert set(s) == {"global"}
    assert set(s["global"]) <= {"auc", "auc_lo", "auc_hi", "n", "n_pos", "split", "not_computable"}
    assert s["global"]["n"] == 9 and s["global"]["split"] == "all"
    v = site_scores({"global": package}, tiny_cohort / "center_a")
    assert v["global"]["split"] == "val" and v["global"]["n"] < 9


def test_run_report_with_baseline_and_matrix(tiny_cohort, tmp_path, package):
    run, base = fake_run(tmp_path, package)
    assert cli(["report", str(run), "--baseline", str(base), "--cohort", str(tiny_cohort)]) == 0
    html = (run / "report.html").read_text()
    for k in ("round-loss", "round-auc", "round-bytes", "round-time", "cross-site"):
        assert f'id="{k}"' in html
    assert "pooled" in html and "local:center_a" in html and "federated (fedavg, 2 rounds)" in html
    matrix = json.loads((run / "cross_site.json").read_text())
    assert matrix["models"] == ["global (federated)", "local-only center_a"]
    assert matrix["sites"][-1] == "external (external)" and len(matrix["sites"]) == 7
    # same weights -> same scores for the global and the local model on every site
    for s in matrix["sites"]:
        assert matrix["cells"]["global (federated)"][s] == matrix["cells"]["local-only center_a"][s]


def test_report_on_missing_run_dir(tmp_path, capsys):
    assert cli(["report", str(tmp_path / "nope")]) == 2
    assert "metrics.json" in capsys.readouterr().err


@pytest.mark.slow
def test_report_on_real_federation_and_baseline(tiny_cohort, tmp_path, flwr_home):
    from common.learn.baseline import run_baseline
    from common.config import load_config
    from server.ops.simulation import run_simulation

    run = tmp_path / "run"
    run_simulation(tiny_cohort, run, TEST_OVERRIDES + ["train.calibration=platt"], stream=False)
    run_baseline(tiny_cohort, tmp_path / "base", load_config(LOCAL_OVERRIDES), arms=("local",))
    assert cli(["report", str(run), "--baseline", str(tmp_path / "base")]) == 0  # cohort from run.json
    matrix = json.loads((run / "cross_site.json").read_text())
    assert len(matrix["models"]) == 7 and len(matrix["sites"]) == 7
    sha = json.loads((run / "metrics.json").read_text())["best_model"]["sha256"]   # as the coordinator announced it
    assert cli(["evaluate", "--sha256", sha, "--model", str(run / "best_model.pt"), "--site",
                str(tiny_cohort / "external"), "--out", str(tmp_path / "ev")]) == 0
    # the recalibration the selected round's pooled validation cells fitted travels with the model: the
    # external center reports calibration before and after it; the evaluator's report and screening use it
    m = json.loads((run / "metrics.json").read_text())
    platt = m["selected_val"]["platt"]
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["calibration"]["a"] == pytest.approx(platt["a"]) and m["calibration"]["a"] > 0
    ext = m["external"]["centers"]["external"]
    assert "ece_calibrated" in ext and "brier_calibrated" in ext and ext["ece_calibrated_lo"] <= ext["ece_calibrated"]
    # the ECE floors (what a calibrated model would show on this many patients) come back with the report
    assert 0 < ext["ece_floor"] < 1 and 0 < ext["ece_calibrated_floor"] < 1
    from rich.console import Console

    from common.reports.console import render_external
    con = Console(record=True, width=200)
    for t in render_external(m):
        con.print(t)
    text = con.export_text()
    assert "ECE if calibrated (floor)" in text and "ECE floor, recalibrated" in text
    assert ev["calibration"]["recalibration"]["a"] == pytest.approx(platt["a"])
    assert "ece_calibrated" in ev["calibration"] and "reliability_calibrated" in ev["calibration"]
    # the baseline (train.calibration: none, the default) carries none
    assert "ece_calibrated" not in json.loads((tmp_path / "base" / "metrics.json").read_text())[
        "arms"]["local:center_a"]["external"]
