"""One reader, one parser, one schema: the fixes that came with the layout (issue 15)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import LOCAL_OVERRIDES, TEST_OVERRIDES
from tests.test_policy_audit import _copy_cohort

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("toml", ['[site]\ncenter_id = "hospital-7"\nrole = "external"\n',
                                  'center_id = "hospital-7"\nrole = "external"\n'], ids=["table", "top-level"])
def test_site_identity_is_the_same_everywhere(tiny_cohort, tmp_path, toml):
    from client.policy import site_identity as policy_identity
    from client.site_runtime import site_settings
    from common.data.cohort import discover_sites
    from common.data.identity import site_identity
    from common.data.site import SiteData
    from common.data.validation import validate_site

    site = tmp_path / "cohort" / "center_a"
    shutil.copytree(tiny_cohort / "center_a", site)
    (site / "site.toml").write_text(toml)
    node = {"data-dir": str(site)}
    assert site_identity(site).center_id == "hospital-7" and site_identity(site).role == "external"
    assert (SiteData.open(site).center_id, SiteData.open(site).role) == ("hospital-7", "external")
    assert [s.role for s in discover_sites(tmp_path / "cohort")] == ["external"]
    assert site_settings({}, node)[1:3] == ("hospital-7", "external")
    assert policy_identity({}, node)[1] == "hospital-7"
    summary = validate_site(site, deep=False).summary
    assert (summary["center_id"], summary["role"]) == ("hospital-7", "external")


def test_pooled_baseline_runs_when_the_first_site_has_no_mri(tiny_cohort, tmp_path):
    from common.config import load_config
    from common.learn.baseline import run_baseline

    cohort = _copy_cohort(tiny_cohort, tmp_path / "cohort")
    shutil.rmtree(cohort / "center_a" / "mri")                 # alphabetically first, and no MRI at all
    cfg = load_config(LOCAL_OVERRIDES + ["train.epochs=1"])
    summary = run_baseline(cohort, tmp_path / "b", cfg, arms=("pooled",))
    pooled = summary["arms"]["pooled"]
    assert pooled["n_train"] > 0 and "mri" in summary["modalities"]
    assert pooled["external"]["auc"].get("value") is not None or pooled["external"]["auc"].get("abstained")


def test_screening_one_patient_does_not_depend_on_the_other_patients(tiny_cohort, tmp_path):
    from common.reports.screening import screen_patient
    from tests.test_evaluate import make_package

    site = tmp_path / "external"
    shutil.copytree(tiny_cohort / "external", site, ignore=shutil.ignore_patterns(".newadj-cache"))
    rows = (site / "clinical.csv").read_text().splitlines()
    genes = (site / "genomics.csv").read_text().splitlines()
    first, last = rows[1].split(",")[0], rows[-1].split(",")[0]
    late = tmp_path / "late"                                    # a patient who arrives after the first screening
    late.mkdir()
    moved = [(f, late / f.name) for sub in ("mri", "pathology") for f in (site / sub).glob(f"{last}*")]

    def arrive(arrived: bool) -> None:
        (site / "clinical.csv").write_text("\n".join(rows if arrived else rows[:-1]) + "\n")
        (site / "genomics.csv").write_text("\n".join(g for g in genes if arrived or not g.startswith(last)) + "\n")
        for there, away in moved:
            shutil.move(str(away if arrived else there), str(there if arrived else away))

    arrive(False)
    pkg = make_package(tmp_path / "model.pt")
    before = screen_patient(pkg, site, first, passes=3, expected_sha256=None)
    arrive(True)
    after = screen_patient(pkg, site, first, passes=3, expected_sha256=None)
    assert screen_patient(pkg, site, last, passes=3, expected_sha256=None)["patient_id"] == last
    assert after["prob"] == pytest.approx(before["prob"], abs=1e-7)
    assert (after["prob_lo"], after["prob_hi"]) == pytest.approx((before["prob_lo"], before["prob_hi"]), abs=1e-7)


@pytest.mark.deployment
def test_a_non_editable_install_runs_a_federation_from_another_folder(tiny_cohort, tmp_path):
    """`pip install .` (a wheel, not the checkout) then a federation from another folder: the config and
    the Flower app come with the installed packages."""
    target = tmp_path / "site-packages"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
                        "--target", str(target), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (target / "conf" / "config.yaml").exists() and (target / "conf" / "flwr_app.toml").exists()
    assert not (target / "tests").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = "import common.config as c, server.ops.processes as p; print(c.CONF_DIR); print(p.app_dir())"
    where = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                           timeout=120)
    conf_dir, app = where.stdout.split()
    assert Path(conf_dir) == target / "conf" and (Path(app) / "pyproject.toml").exists()
    cohort = _copy_cohort(tiny_cohort, tmp_path / "cohort")
    run = subprocess.run([sys.executable, "-m", "common.cli", "simulate", "--data", str(cohort), "--out", "run",
                          "--quiet", *TEST_OVERRIDES, "federation.num_rounds=1"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert (elsewhere / "run" / "metrics.json").exists() and "best model: run/best_model.pt" in run.stdout


def test_leave_one_center_out_cv_never_touches_the_external_center(tiny_cohort, tmp_path):
    from common.config import load_config
    from common.data.cohort import discover_sites
    from common.learn.baseline import run_baseline

    cfg = load_config(LOCAL_OVERRIDES + ["train.epochs=1"])
    with pytest.raises(SystemExit, match="unknown arm"):
        run_baseline(tiny_cohort, tmp_path / "x", cfg, arms=("pooled", "lcoo"))
    summary = run_baseline(tiny_cohort, tmp_path / "b", cfg, arms=("loco",))
    sites = {s.name: s for s in discover_sites(tiny_cohort)}
    train = sorted(n for n, s in sites.items() if s.role != "external")
    loco = summary["loco"]
    assert sorted(loco["folds"]) == train and summary["arms"] == {}
    assert "recalibration" in loco and all("ece_loco_calibrated" in f and "ece_floor" in f for f in loco["folds"].values())
    for name, fold in loco["folds"].items():
        n_site = len((sites[name].path / "clinical.csv").read_text().strip().splitlines()) - 1
        assert fold["n_held_out"] == n_site                     # every patient of the held-out center
        assert fold["n_train"] < sum(len((sites[o].path / "clinical.csv").read_text().strip().splitlines()) - 1
                                     for o in train if o != name)   # the others' train splits only
    for k, agg in loco["summary"].items():
        vals = [f[k]["value"] for f in loco["folds"].values() if (f.get(k) or {}).get("value") is not None]
        assert agg["folds"] == len(vals) and agg["abstained"] == len(train) - len(vals)
        if vals:
            assert agg["mean"] == pytest.approx(float(np.mean(vals)))
    saved = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert saved["complete"] and sorted(saved["loco"]["folds"]) == train
    # each held-out patient's prediction, by center (for comparing runs); none of the external center
    import pandas as pd
    from common.metrics import delong_auc_ci

    pred = pd.read_csv(tmp_path / "b" / "loco_predictions.csv", dtype={"patient_id": str})
    assert sorted(pred["center"].unique()) == train
    for name, fold in loco["folds"].items():
        rows = pred[pred["center"] == name]
        ids = pd.read_csv(sites[name].path / "clinical.csv", dtype=str)["patient_id"]
        assert sorted(rows["patient_id"]) == sorted(ids)
        if (fold.get("auc") or {}).get("value") is not None:
            assert delong_auc_ci(rows["benefit"], rows["prob"])[0] == pytest.approx(fold["auc"]["value"])


def test_local_only_models_are_scored_on_every_other_training_center(tiny_cohort, tmp_path, monkeypatch):
    """`--arms loco-local`: each training center's local-only model (the very model of its `local:` arm) scored on
    every patient of each other training center; per held-out center the best and the mean of those AUCs."""
    from common.config import load_config
    from common.data.cohort import discover_sites
    from common.federation.model_io import load_model_package
    from common.learn.baseline import run_baseline
    from common.learn.dataset import site_dataset
    from common.learn.engine import predict
    from common.metrics import delong_auc_ci
    from common.preprocess.cache import ensure_caches
    import torch

    cfg = load_config(LOCAL_OVERRIDES + ["train.epochs=2"])
    summary = run_baseline(tiny_cohort, tmp_path / "b", cfg, arms=("local", "loco-local"))
    sites = {s.name: s for s in discover_sites(tiny_cohort)}
    # without the local arms: the same models (the same scores), and the external center is never read
    import common.learn.baseline as bl

    ext = next(s for s in sites.values() if s.role == "external")
    ext_cache = ensure_caches([ext], cfg, progress=False)[ext.name]
    real_dataset, real_oracle = bl.site_dataset, bl.oracle_auc

    def sealed(cache_dir, *a, **k):
        assert Path(cache_dir) != Path(ext_cache), "the external center was read"
        return real_dataset(cache_dir, *a, **k)

    def oracle(cohort, center):
        assert center != ext.name, "the external oracle was read"
        return real_oracle(cohort, center)
    monkeypatch.setattr(bl, "site_dataset", sealed)
    monkeypatch.setattr(bl, "oracle_auc", oracle)
    real_ensure = bl.ensure_caches

    def ensure(site_refs, *a, **k):
        assert ext.name not in {x.name for x in site_refs}, "the external center was preprocessed"
        return real_ensure(site_refs, *a, **k)
    monkeypatch.setattr(bl, "ensure_caches", ensure)
    alone = run_baseline(tiny_cohort, tmp_path / "c", cfg, arms=("loco", "loco-local"))
    assert alone["arms"] == {} and alone["n_external"] is None and alone["oracle_external_auc"] is None
    assert alone["loco_local"]["folds"] == summary["loco_local"]["folds"]
    train = sorted(n for n, s in sites.items() if s.role != "external")
    folds = summary["loco_local"]["folds"]
    assert sorted(folds) == train
    caches = ensure_caches(list(sites.values()), cfg, progress=False)
    checked = 0
    for held, f in folds.items():
        assert set(f["local_auc"]) <= set(train) - {held}
        if not f["local_auc"]:
            continue
        assert f["best_local_auc"]["value"] == max(f["local_auc"].values())
        assert f["local_auc"][f["best_local_center"]] == f["best_local_auc"]["value"]
        assert f["mean_local_auc"]["value"] == pytest.approx(np.mean(list(f["local_auc"].values())))
        # the score is that of the local: arm's saved model on every patient of the held-out center
        center, auc = next(iter(f["local_auc"].items()))
        model = load_model_package(tmp_path / "b" / "models" / f"local_{center}.pt")[0]
        pred = predict(model, site_dataset(caches[held], None, cfg), 64, torch.device("cpu"), "off")
        assert delong_auc_ci(pred["benefit"], pred["prob"])[0] == pytest.approx(auc, abs=1e-6)
        checked += 1
    assert checked >= 3
    s = summary["loco_local"]["summary"]["best_local_auc"]
    assert s["mean"] == pytest.approx(np.mean([f["best_local_auc"]["value"] for f in folds.values()
                                               if f["best_local_auc"]["value"] is not None]))
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["loco_local"]["folds"].keys() == folds.keys()


def test_a_tile_cnn_learns_from_thumbnails_from_the_cli_to_a_saved_model(tiny_cohort, tmp_path):
    """`preprocess.pathology.encoder.name=thumbnail` end to end: the overrides after the folders reach
    `newadj preprocess`, the pooled model gets the tile CNN (tile_net auto), and the saved model reloads."""
    from common.cli import main
    from common.federation.model_io import load_model_package

    cohort = _copy_cohort(tiny_cohort, tmp_path / "cohort")
    thumb = ["preprocess.pathology.encoder.name=thumbnail", "preprocess.pathology.encoder.thumbnail.side=16"]
    assert main(["preprocess", "--no-progress", str(cohort / "center_a"), *thumb]) == 0
    manifest = json.loads(next((cohort / "center_a").rglob("manifest.json")).read_text())
    assert manifest["path_dim"] == 3 * 16 * 16 and manifest["encoder"].startswith("thumbnail-v1-")
    assert main(["baseline", "--data", str(cohort), "--out", str(tmp_path / "b"), "--arms", "pooled",
                 *LOCAL_OVERRIDES, "train.epochs=1", *thumb]) == 0
    summary = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert summary["arms"]["pooled"]["n_train"] > 0
    pkg = next((tmp_path / "b").rglob("pooled*.pt"))
    model = load_model_package(pkg)[0]
    assert model.branches["pathology"].cnn and any("tile_proj.features" in k for k in model.state_dict())


def test_a_baseline_arm_is_the_same_model_whatever_the_process_random_state(tiny_cohort, tmp_path):
    """The seed fixes the initial weights too: torch seeds every new process at random, and the arm's model
    was built before the engine seeded, so the same run twice trained different models."""
    import torch

    from common.config import load_config
    from common.learn.baseline import run_baseline

    cfg = load_config(LOCAL_OVERRIDES + ["train.epochs=1"])
    runs = []
    for i, state in enumerate((1, 2)):
        torch.manual_seed(state)     # what a new process would have
        runs.append(run_baseline(tiny_cohort, tmp_path / f"r{i}", cfg, arms=("pooled",)))
    a, b = (r["arms"]["pooled"] for r in runs)
    assert a["val"] == b["val"] and a["threshold"] == b["threshold"]
    from common.federation.model_io import load_model_package

    sa, sb = (load_model_package(tmp_path / f"r{i}" / "models" / "pooled.pt")[0].state_dict() for i in range(2))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
