"""The CLI as a newcomer meets it: clean one-line failures, messages never broken, tables that fit 80 columns."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from common.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], columns: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": str(columns), "LINES": "24", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "common.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.mark.parametrize("columns", [40, 200])
def test_an_error_is_one_unbroken_line_at_any_terminal_width(tmp_path, columns):
    missing = tmp_path / "a-run-directory-with-a-rather-long-name" / "that-does-not-exist-anywhere"
    r = _run(["simulate", "--resume", str(missing)], columns)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"{missing / 'run.json'}: not a run directory of `newadj simulate`" in r.stderr


# one expected failure per command: (argv, exit code, text the one line names)
FAILURES = [
    (["validate-site", "{tmp}/nowhere"], 2, "nowhere: no such site folder"),
    (["synth", "--out", "{tmp}/c", "synth.bogus=1"], 2, "bad configuration override"),
    (["preprocess", "{tmp}/nowhere"], 2, "nowhere: no such folder"),
    (["baseline", "--data", "{tmp}/nowhere", "--out", "{tmp}/b"], 2, "nowhere: cohort folder not found"),
    (["baseline", "--data", "{tmp}", "--out", "{tmp}/b", "train.epochs=["], 2, "bad configuration override"),
    (["simulate", "--data", "{tmp}/nowhere", "--out", "{tmp}/r"], 2, "nowhere: cohort folder not found"),
    (["simulate", "--data", "{tmp}", "--out", "{tmp}/r", "--features", "{tmp}/bad.yaml"], 2, "bad.yaml: cannot read"),
    (["demo", "nonsense.key=1"], 2, "Could not override 'nonsense.key'"),
    (["schema", "--out", "{tmp}/s"], 2, "exactly one of --data COHORT"),
    (["provision", "{tmp}/federation.yaml", "--out", "{tmp}/kits"], 2, "federation.yaml"),
    (["site", "keygen", "--center", "a", "--out", "{tmp}/file.txt/keys"], 2, "file.txt"),
    (["site", "start", "--kit", "{tmp}/nokit", "--data", "{tmp}"], 2, "nokit/kit.toml: not found"),
    (["server", "start", "--kit", "{tmp}/nokit"], 2, "nokit/kit.toml: not found"),
    (["run", "--kit", "{tmp}/nokit", "--out", "{tmp}/r"], 2, "nokit/kit.toml: not found"),
    (["evaluate", "--model", "{tmp}/none.pt", "--site", "{tmp}", "--out", "{tmp}/e", "--sha256", "00"], 2,
     "none.pt: no such model file"),
    (["report", "{tmp}/norun"], 2, "norun/metrics.json: not found"),
    (["screen", "--model", "{tmp}/none.pt", "--site", "{tmp}", "--patient", "P1", "--sha256", "00"], 2,
     "none.pt: no such model file"),
]


@pytest.mark.parametrize("argv,code,names", FAILURES, ids=[" ".join(f[0][:2]) for f in FAILURES])
def test_every_command_fails_with_one_line_and_no_traceback(tmp_path, capsys, argv, code, names):
    (tmp_path / "bad.yaml").write_text("genomic_features: [unclosed\n")
    (tmp_path / "file.txt").write_text("not a folder")
    rc = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    out, err = capsys.readouterr()
    assert rc == code, (out, err)
    lines = [ln for ln in (out + err).splitlines() if ln.strip()]
    assert any(names in ln for ln in lines), (out, err)
    assert "Traceback" not in out + err and len([ln for ln in err.splitlines() if ln.strip()]) <= 1, err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["--debug", "baseline", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b")])
    with pytest.raises(FileNotFoundError):
        main(["validate-site", str(tmp_path / "nowhere"), "--debug"])


def _metrics_fixture() -> dict:
    """A run's metrics.json with long center names, both endpoints and every external metric."""
    ci = {"auc": 0.71234, "auc_lower": 0.55123, "auc_upper": 0.88765, "c_index": 0.66543, "c_index_lo": 0.60111,
          "c_index_hi": 0.72999, "n": 120, "n_dfs": 140}
    centers = {f"university-hospital-{k}-department-of-hepatobiliary-surgery": {
        "auc": 0.7, "n": 30, "c_index": 0.65, "n_dfs": 33, "abstained": False, "dfs_abstained": False}
        for k in range(6)}
    ext = {"n": 150, "n_pos": 71, "abstained": False, "dfs_abstained": False, "n_dfs": 149, "threshold_used": 0.45}
    for k in ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "brier", "ece", "c_index", "ibs",
              "td_auc_12", "td_auc_24", "td_auc_36"):
        ext.update({k: 0.123456, f"{k}_lo": 0.012345, f"{k}_hi": 0.987654})
    for h in (12, 24, 36):
        ext.update({f"dfs_cal_{h}_all_pred": 0.5, f"dfs_cal_{h}_all_obs": 0.45, f"dfs_cal_{h}_all_obs_lo": 0.4,
                    f"dfs_cal_{h}_all_obs_hi": 0.5})
    hist = [{"round": r, "train_loss": 1.23456, "val": ci, "val_centers": centers, "failures": {},
             "bytes_sent": 12345678, "seconds": 123.4} for r in range(1, 11)]
    return {"strategy": "fedtrimmedavg", "rounds": 10, "selected_round": 7, "selection_metric": "pooled_auc",
            "threshold": 0.43, "history": hist,
            "external": {"centers": {"external-validation-center-with-a-long-name": ext}}}


def _synth_summary() -> dict:
    site = {"role": "external", "n_patients": 1234, "n_mri_complete": 1100, "n_tumor_mask": 1000,
            "n_pathology": 1200, "n_genomics": 1150, "n_labeled": 1234, "n_benefit": 600, "mri_format": "dicom"}
    return {"sites": {"center_a": site, "external": site, **{f"center-with-a-long-name-{k}": site for k in range(3)}}}


def _baseline_summary() -> dict:
    e = {"auc": {"value": 0.7123, "lo": 0.6012, "hi": 0.8111}, "accuracy": {"value": 0.6543},
         "c_index": {"value": 0.6012, "lo": 0.5511, "hi": 0.6599}}
    arm = {"external": e, "n_train": 432, "val": {"val_auc": 0.71, "val_c_index": 0.61}, "best_epoch": 17,
           "seconds": 123.0}
    return {"external_site": "external", "n_external": 150, "oracle_external_auc": 0.865,
            "modalities": ["mri", "pathology", "genomics"], "skipped_arms": {},
            "arms": {n: arm for n in ("pooled", "unimodal:pathology", "local:center-with-a-long-name")},
            "loco": _loco()}


LOCO_SHOWN = ("auc", "auc_over_oracle", "ece", "ece_floor", "ece_calibrated", "ece_loco_calibrated", "c_index")


def _loco() -> dict:
    """Leave-one-center-out results with every column the table can show (the widest case)."""
    folds = {f"center_{c}": {"n_held_out": 142, **{k: {"value": 0.1234 + i / 100} for i, k in enumerate(LOCO_SHOWN)}}
             for c in "abcdef"}
    summary = {k: {"mean": 0.7404 + i / 100, "sd": 0.0712, "folds": 6} for i, k in enumerate(LOCO_SHOWN)}
    return {"folds": folds, "summary": summary}


def _tables():
    from common.learn.baseline import render_table
    from common.cli import synth_table
    from common.reports.console import render_external, render_round_centers, render_rounds

    from types import SimpleNamespace

    from common.cli.data import add_preprocess_row, preprocess_table

    m = _metrics_fixture()
    pre = preprocess_table()
    res = SimpleNamespace(n_patients=1234, failures=[1, 2], seconds=1234.5,
                          mri={"built": 1100, "cached": 134}, pathology={"built": 1200, "cached": 34, "tiles": 123456,
                                                                        "tiles_per_s": 123.4})
    add_preprocess_row(pre, "university-hospital-center-a", res)
    return [render_rounds(m), render_round_centers(m), *render_external(m), synth_table(_synth_summary(), "t"),
            *render_table(_baseline_summary()), pre]


def test_every_table_fits_80_columns_with_no_number_cut():
    import re

    for table in _tables():
        con = Console(width=80, record=True, file=open(os.devnull, "w"))
        con.print(table)
        text = con.export_text()
        first = table.columns[0]                            # the label column is never squeezed away
        assert all(str(cell)[:4] in text for cell in first._cells), (first.header, text)
        # a short label (a site name, an arm) is never broken over two lines
        assert all(str(cell) in text for cell in first._cells if len(str(cell)) <= 12), (first.header, text)
        assert all(len(ln) <= 80 for ln in text.splitlines()), text
        assert "…" not in text, text
        for cell in re.findall(r"\d+\.\d+", text):   # every number whole: 3 decimals or 2 in a CI, none cut
            assert len(cell.split(".")[1]) >= 1
    from common.learn.baseline import loco_table

    con = Console(width=80, record=True, file=open(os.devnull, "w"))
    con.print(loco_table(_loco()))        # seven metric columns: every center named, each mean and SD whole
    text = con.export_text()
    assert all(f"center_{c}" in text for c in "abcdef") and "0.740" in text and "0.800" in text, text
    assert "0.071" in text.splitlines()[-1], text
    rounds = Console(width=80, record=True, file=open(os.devnull, "w"))
    rounds.print(_tables()[0])
    text = rounds.export_text()
    assert "0.712 (0.55-0.89)" in text and "0.665 (0.60-0.73)" in text


def test_round_lines_and_selection_fit_80_columns():
    from common.reports.console import EventPrinter

    con = Console(width=80, record=True, file=open(os.devnull, "w"))
    show = EventPrinter(con)
    m = _metrics_fixture()
    run_dir = "demo/runs/20261202-093536"
    show({"event": "start", "run_id": 7846488988231781526, "strategy": "fedavg", "rounds": 10, "run_dir": run_dir})
    for h in m["history"][:2]:
        show({"event": "round", "of": 10, "answered": 6, "abstained": 1, **h})
    show({"event": "selected", "round": 7, "metric": "pooled_auc", "value": 0.712, "patients": 120, "centers": 6,
          "threshold": 0.43})
    text = con.export_text()
    assert all(len(ln) <= 80 for ln in text.splitlines()), text
    assert "1/10   1.235   0.712 [0.55-0.89]   0.665 (0.60-0.73)    5/0/1   12.3   123" in text
    assert "selected: round 7, pooled_auc 0.712 on 6 centers / 120 patients" in text
    assert "decision threshold 0.430" in text
    show({"event": "selected", "round": 9, "metric": "val_loss", "value": -0.612, "patients": 98, "centers": 5,
          "threshold": 0.5})
    assert "selected: round 9, val_loss 0.612 on 5 centers / 98 patients" in con.export_text()   # the loss itself
    assert "federation: run 7846488988231781526, fedavg, 10 rounds" in text.splitlines()
    assert f"  run directory: {run_dir}" in text.splitlines()     # the path on its own line, never broken


def test_a_key_on_the_command_line_wins_over_the_feature_file(tmp_path):
    """`--features FILE` sets the schema's lists and modalities; an explicit override of the same key (a
    one-branch development run) is not silently replaced by the file."""
    from argparse import Namespace

    from common.cli.data import _with_features
    from common.config import load_config

    f = tmp_path / "features.yaml"
    f.write_text("genomic_features: [TP53_mut]\nclinical_features: [age]\nmodalities: [mri, pathology, genomics]\n")
    cfg = load_config(_with_features(Namespace(features=str(f), overrides=["model.modalities=[pathology]"])))
    assert list(cfg.model.modalities) == ["pathology"] and list(cfg.data.genomic_features) == ["TP53_mut"]
    cfg = load_config(_with_features(Namespace(features=str(f), overrides=[])))
    assert list(cfg.model.modalities) == ["mri", "pathology", "genomics"]


def test_a_federation_every_site_refuses_fails_on_one_line_that_says_why(tiny_cohort, tmp_path):
    """A run asking for a site's own setting (here its torch threads) is refused by every site at the role
    query; the coordinator sees the sites' reason in the one line, not only 'status finished:failed'."""
    from tests.conftest import TEST_OVERRIDES

    r = _run(["simulate", "--data", str(tiny_cohort), "--out", str(tmp_path / "r"), "--quiet", *TEST_OVERRIDES,
              "train.num_threads=2"], 200)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    line = r.stderr.strip()
    assert line.startswith("federation failed: run ") and "finished:failed" in line
    assert "the server said: RuntimeError: only 0 training centers answered" in line
    assert "run override(s) refused: train.num_threads;" in line and str(tmp_path / "r" / "logs") in line


def test_an_interval_with_a_negative_bound_reads_unambiguously():
    from common.reports.console import frange

    assert frange(0.712, 0.65, 0.77) == "0.712 (0.65-0.77)"
    assert frange(0.248, -0.42, 0.92) == "0.248 (-0.42 to 0.92)"     # not "(-0.42-0.92)"
    assert frange(-0.203, -0.59, -0.01, "[]") == "-0.203 [-0.59 to -0.01]"
    assert frange(float("nan"), 0.1, 0.2) == "-" and frange(0.5, None, 0.6) == "0.500"
