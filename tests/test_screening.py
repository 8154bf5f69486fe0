"""newadj screen: protocol checks, MC-dropout interval, the per-site CSV."""
from __future__ import annotations

import csv
import shutil

import pytest

from common.reports.screening import check_eligibility
from tests.test_evaluate import cli, make_package

OK = {"age": 60, "child_pugh": 6, "ecog": 1, "bclc_b": 1, "prior_treatment": 0}


@pytest.mark.parametrize("row, status, reason", [
    (OK, "eligible", None),
    ({**OK, "age": 18, "child_pugh": 7, "ecog": 0}, "eligible", None),          # inclusive bounds
    ({**OK, "age": 75.0}, "eligible", None),
    ({**OK, "age": 76}, "not eligible", "age 18-75"),
    ({**OK, "age": 17}, "not eligible", "age 18-75"),
    ({**OK, "child_pugh": 8}, "not eligible", "Child-Pugh"),
    ({**OK, "ecog": 2}, "not eligible", "ECOG"),
    ({**OK, "bclc_b": 0}, "not eligible", "BCLC stage B"),
    ({**OK, "prior_treatment": 1}, "not eligible", "prior treatment"),
    ({**OK, "ecog": None}, "incomplete", "ecog missing"),
    ({k: v for k, v in OK.items() if k != "bclc_b"}, "incomplete", "bclc_b missing"),
    ({**OK, "ecog": float("nan"), "child_pugh": 9}, "not eligible", "Child-Pugh"),  # a failure beats a gap
    ({}, "incomplete", "age missing"),
])
def test_eligibility(row, status, reason):
    r = check_eligibility(row)
    assert r["status"] == status
    assert len(r["checks"]) == 5
    if reason is None:
        assert r["reasons"] == []
    else:
        assert any(reason in x for x in r["reasons"]), r["reasons"]


def test_not_eligible_lists_every_failure_and_gap():
    r = check_eligibility({"age": 80, "child_pugh": 9, "ecog": None, "bclc_b": 1, "prior_treatment": 0})
    assert r["status"] == "not eligible"
    assert len([x for x in r["reasons"] if "missing" not in x]) == 2
    assert any("ecog missing" in x for x in r["reasons"])


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    return make_package(tmp_path_factory.mktemp("scr") / "model.pt", threshold=0.5)


def test_patient_interval_contains_point_estimate(tiny_cohort, pkg):
    from common.reports.screening import screen_patient

    r = screen_patient(pkg, tiny_cohort / "external", "EX0001", passes=30, seed=1)
    assert r["prob_lo"] <= r["prob"] <= r["prob_hi"]
    assert r["prob_lo"] < r["prob_hi"]  # dropout was active
    assert r["modalities_used"] and set(r["modalities_used"]) <= {"mri", "pathology", "genomics"}
    assert r["eligibility"]["status"] in ("eligible", "not eligible", "incomplete")
    again = screen_patient(pkg, tiny_cohort / "external", "EX0001", passes=30, seed=1)
    assert (again["prob_lo"], again["prob_hi"]) == (r["prob_lo"], r["prob_hi"])  # fixed seed
    # the model is back in eval mode: the point estimate does not move
    assert again["prob"] == pytest.approx(r["prob"])


def test_unknown_patient(tiny_cohort, pkg, capsys):
    rc = cli(["screen", "--no-verify", "--model", str(pkg), "--site", str(tiny_cohort / "external"), "--patient", "ZZ9999"])
    assert rc == 2
    assert "patient 'ZZ9999' not found" in capsys.readouterr().err


def test_screen_patient_cli_prints_checks(tiny_cohort, pkg, capsys):
    rc = cli(["screen", "--no-verify", "--model", str(pkg), "--site", str(tiny_cohort / "external"), "--patient", "EX0002",
              "--passes", "10"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "criterion 8" in out and "structured protocol checks" in out and "MC-dropout interval" in out


def test_screen_all_csv_stays_at_site(tiny_cohort, pkg, tmp_path):
    site = tmp_path / "external"
    shutil.copytree(tiny_cohort / "external", site)
    assert cli(["screen", "--no-verify", "--model", str(pkg), "--site", str(site), "--all", "--passes", "10"]) == 0
    out = site / ".newadj-screening.csv"
    assert out.exists()
    rows = list(csv.DictReader(out.open()))
    ids = [r["patient_id"] for r in csv.DictReader((site / "clinical.csv").open())]
    assert sorted(r["patient_id"] for r in rows) == sorted(ids)  # one row per patient of this site
    others = {r["patient_id"] for d in tiny_cohort.iterdir() if d.is_dir() and d.name != "external"
              and (d / "clinical.csv").exists() for r in csv.DictReader((d / "clinical.csv").open())}
    assert not others & {r["patient_id"] for r in rows}
    for r in rows:
        assert float(r["prob_lo"]) <= float(r["prob_hi"])
        assert r["eligibility"] in ("eligible", "not eligible", "incomplete")
    # explicit --out
    assert cli(["screen", "--no-verify", "--model", str(pkg), "--site", str(site), "--all", "--passes", "5",
                "--out", str(tmp_path / "s.csv")]) == 0
    assert len(list(csv.DictReader((tmp_path / "s.csv").open()))) == len(ids)
