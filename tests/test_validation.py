"""validate-site: one real bad file per test; each asserts the exact file, row and field."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from common.data.validation import ValidationReport, validate_site
from tests import sitebuilder as sb

BASELINE_WARNING = ("mri/P002", None, "delayed")  # the builder's incomplete phase set


def errors(report: ValidationReport) -> list[tuple[str, int | None, str | None]]:
    return [(p.file, p.row, p.field) for p in report.errors]


def only_error(report: ValidationReport, file: str, row: int | None, field: str | None):
    assert errors(report) == [(file, row, field)], [str(p) for p in report.problems]
    assert not report.ok
    return report.errors[0]


def append_line(path: Path, line: str) -> None:
    with open(path, "a", encoding="utf-8", newline="") as f:
        f.write(line + "\n")


# --------------------------------------------------------------------------- valid sites


def test_valid_site_has_no_errors(site):
    before = sb.snapshot(site)
    report = validate_site(site)
    assert report.ok, [str(p) for p in report.problems]
    assert [(p.file, p.row, p.field) for p in report.warnings] == [BASELINE_WARNING]
    s = report.summary
    assert s["center_id"] == "test-center" and s["role"] == "train"
    assert s["n_patients"] == 4 and s["n_labeled"] == 3 and s["n_benefit_pos"] == 2 and s["n_events"] == 2
    assert s["mri"] == {"complete": 2, "partial": 1, "missing": 1}
    assert s["pathology"] == {"complete": 2, "partial": 0, "missing": 2}
    assert s["genomics"] == {"complete": 2, "partial": 1, "missing": 1}
    assert s["clinical"] == {"age": 4, "afp_ng_ml": 3}
    assert s["splits"] == {"train": 2, "val": 1, "test": 1}
    assert s["n_tumor_mask"] == 1
    assert sb.snapshot(site) == before  # validation never modifies the folder


def test_render_prints_summary_and_every_problem(site):
    (site / "clinical.csv").write_text(
        (site / "clinical.csv").read_text().replace("P002,,8.0", "P002,2,8.0"), encoding="utf-8"
    )
    console = Console(record=True, width=200)
    validate_site(site).render(console)
    out = console.export_text()
    assert "test-center" in out and "patients" in out
    assert "clinical.csv:4 [benefit] label must be 0, 1 or empty, got '2'" in out  # markup escaped
    assert "mri/P002 [delayed] incomplete phase set" in out
    assert "FAILED" in out


def test_missing_modalities_are_not_errors(site):
    shutil.rmtree(site / "mri")
    shutil.rmtree(site / "pathology")
    (site / "genomics.csv").unlink()
    (site / "site.toml").unlink()
    report = validate_site(site)
    assert report.ok and report.problems == []
    assert report.summary["center_id"] == "site"
    assert report.summary["mri"] == {"complete": 0, "partial": 0, "missing": 4}


def test_incomplete_phase_set_is_a_warning(site):
    (site / "mri" / "P000" / "portal.nii.gz").unlink()
    report = validate_site(site)
    assert report.ok
    w = {(p.file, p.row, p.field) for p in report.warnings}
    assert ("mri/P000", None, "portal") in w


def test_hidden_files_and_cache_are_ignored(site):
    cache = site / ".newadj-cache" / "P000"
    cache.mkdir(parents=True)
    (cache / "garbage.nii.gz").write_bytes(b"not a volume")
    (site / "mri" / ".DS_Store").write_bytes(b"\x00\x01")
    (site / "mri" / "P000" / "._arterial.nii.gz").write_bytes(b"\x00\x01")
    (site / "mri" / "P001" / "arterial" / ".hidden").write_bytes(b"junk")
    (site / "pathology" / ".P000.svs").write_bytes(b"junk")
    report = validate_site(site)
    assert report.ok
    assert [(p.file, p.row, p.field) for p in report.problems] == [BASELINE_WARNING]


def test_missing_mpp_is_a_warning(site):
    sb.write_slide(site / "pathology" / "P001.tif", mpp=None)
    report = validate_site(site)
    assert report.ok
    assert ("pathology/P001.tif", None, "mpp") in {(p.file, p.row, p.field) for p in report.warnings}


def test_shallow_mode_does_not_decode_images(site):
    (site / "pathology" / "P000.svs").write_text("not a slide")
    assert validate_site(site, deep=False).ok
    assert not validate_site(site, deep=True).ok


# --------------------------------------------------------------------------- clinical.csv


def test_duplicated_patient_id(site):
    append_line(site / "clinical.csv", "P001,1,5,1,,50,3")
    e = only_error(validate_site(site), "clinical.csv", 6, "patient_id")
    assert "duplicated patient_id 'P001'" in e.message and "line 3" in e.message


def test_benefit_outside_0_1(site):
    (site / "clinical.csv").write_text(
        (site / "clinical.csv").read_text().replace("P002,,8.0", "P002,2,8.0"), encoding="utf-8"
    )
    e = only_error(validate_site(site), "clinical.csv", 4, "benefit")
    assert str(e) == "clinical.csv:4 [benefit] label must be 0, 1 or empty, got '2'"


def test_dfs_event_outside_0_1(site):
    rows = sb.clinical_rows()
    rows[1]["dfs_event"] = "3"
    sb.write_clinical(site, rows)
    e = only_error(validate_site(site), "clinical.csv", 3, "dfs_event")
    assert "'3'" in e.message


def test_negative_dfs_months(site):
    rows = sb.clinical_rows()
    rows[0]["dfs_months"] = "-4.5"
    sb.write_clinical(site, rows)
    e = only_error(validate_site(site), "clinical.csv", 2, "dfs_months")
    assert ">= 0" in e.message


def test_non_numeric_clinical_covariate(site):
    rows = sb.clinical_rows()
    rows[3]["age"] = "seventy"
    sb.write_clinical(site, rows)
    e = only_error(validate_site(site), "clinical.csv", 5, "age")
    assert "'seventy'" in e.message


def test_non_numeric_genomics_value(site):
    rows = sb.genomics_rows()
    rows[1]["TP53_mut"] = "yes"
    sb.write_genomics(site, rows)
    only_error(validate_site(site), "genomics.csv", 3, "TP53_mut")


@pytest.mark.parametrize("bad_id", ["P 004", "P004/../x", "Pé", "x" * 65])
def test_invalid_patient_id(site, bad_id):
    rows = sb.clinical_rows() + [{"patient_id": bad_id, "benefit": "0"}]
    sb.write_clinical(site, rows)
    only_error(validate_site(site), "clinical.csv", 6, "patient_id")


def test_missing_patient_id_column(site):
    rows = sb.clinical_rows()
    for r in rows:
        r["id"] = r.pop("patient_id")
    sb.write_clinical(site, rows, header=["id"] + sb.CLINICAL_HEADER[1:])
    only_error(validate_site(site), "clinical.csv", 1, "patient_id")


def test_missing_clinical_csv(site):
    (site / "clinical.csv").unlink()
    e = only_error(validate_site(site), "clinical.csv", None, None)
    assert "missing" in e.message


def test_unknown_split_value(site):
    rows = sb.clinical_rows()
    rows[1]["split"] = "training"
    sb.write_clinical(site, rows)
    e = only_error(validate_site(site), "clinical.csv", 3, "split")
    assert "'training'" in e.message


def test_unreadable_encoding_names_the_line(site):
    text = (site / "clinical.csv").read_text(encoding="utf-8")
    lines = text.splitlines()
    lines[0] += ",centre"
    lines[1:] = [ln + ",1" for ln in lines[1:]]
    lines[3] = lines[3][:-1] + "é"  # line 4, latin-1 byte 0xe9
    (site / "clinical.csv").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    e = only_error(validate_site(site), "clinical.csv", 4, None)
    assert "UTF-8" in e.message and "0xe9" in e.message


def test_wrong_number_of_fields(site):
    append_line(site / "clinical.csv", "P004,1,2,1")
    only_error(validate_site(site), "clinical.csv", 6, None)


# --------------------------------------------------------------------------- genomics.csv / orphans


def test_genomics_row_for_unknown_patient(site):
    rows = sb.genomics_rows() + [{"patient_id": "P999", "TP53_mut": "1"}]
    sb.write_genomics(site, rows)
    e = only_error(validate_site(site), "genomics.csv", 5, "patient_id")
    assert "P999" in e.message


def test_mri_folder_without_clinical_row(site):
    sb.write_nifti(site / "mri" / "P999" / "arterial.nii.gz")
    e = only_error(validate_site(site), "mri/P999", None, "patient_id")
    assert "clinical.csv" in e.message


def test_slide_without_clinical_row(site):
    shutil.copy(site / "pathology" / "P000.svs", site / "pathology" / "P999.svs")
    only_error(validate_site(site), "pathology/P999.svs", None, "patient_id")


# --------------------------------------------------------------------------- images


def test_truncated_nifti(site):
    path = site / "mri" / "P000" / "portal.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    e = only_error(validate_site(site), "mri/P000/portal.nii.gz", None, "portal")
    assert "cannot decode" in e.message


def test_corrupt_tumor_mask(site):
    path = site / "mri" / "P000" / "tumor_mask.nii.gz"
    path.write_bytes(gzip.compress(b"\x00" * 100))
    only_error(validate_site(site), "mri/P000/tumor_mask.nii.gz", None, "tumor_mask")


def test_non_image_named_svs(site):
    (site / "pathology" / "P000.svs").write_text("this is a text file, not a slide\n")
    e = only_error(validate_site(site), "pathology/P000.svs", None, None)
    assert "cannot open whole-slide image" in e.message


def test_dicom_folder_with_non_dicom_file(site):
    (site / "mri" / "P001" / "arterial" / "notes.txt").write_text("scanner notes")
    e = only_error(validate_site(site), "mri/P001/arterial/notes.txt", None, "arterial")
    assert "not a DICOM file" in e.message


def test_phases_and_mask_on_other_grids_validate_with_a_warning_and_preprocess(site, tmp_path):
    """Real DICOM phases often differ in slice count: preprocessing resamples them (and the mask) onto the
    first phase's grid, so validation warns instead of refusing the site."""
    from common.config import load_config
    from common.learn.dataset import site_dataset
    from common.preprocess.cache import preprocess_site

    sb.write_nifti(site / "mri" / "P000" / "delayed.nii.gz", shape=(8, 8, 5))
    sb.write_nifti(site / "mri" / "P000" / "tumor_mask.nii.gz", shape=(4, 4, 4), mask=True)
    report = validate_site(site)
    assert report.ok, [str(p) for p in report.errors]
    warned = {(p.file, p.field): p.message for p in report.warnings}
    assert "(8, 8, 5)" in warned[("mri/P000/delayed.nii.gz", "delayed")] and \
        "resamples it onto the arterial grid" in warned[("mri/P000/delayed.nii.gz", "delayed")]
    assert "tumor mask shape (4, 4, 4)" in warned[("mri/P000/tumor_mask.nii.gz", "tumor_mask")]
    shifted = sb.affine_for(origin=(0.0, 0.0, 0.0))
    sb.write_nifti(site / "mri" / "P000" / "tumor_mask.nii.gz", affine=shifted, mask=True)
    report = validate_site(site)
    assert report.ok and "affine" in {(p.file, p.field): p.message for p in report.warnings}[
        ("mri/P000/tumor_mask.nii.gz", "tumor_mask")]
    cfg = load_config(["model=small"])
    res = preprocess_site(site, cfg, progress=False)
    assert res.failures == [] and res.mri["built"] >= 2
    ds = site_dataset(res.cache_dir, None, cfg)
    p0 = next(it for it in ds.items if it["patient_id"] == "P000")
    assert p0["mri"] is not None and p0["mri"].shape == ds.mri_shape


# --------------------------------------------------------------------------- site.toml


def test_site_toml_invalid_role(site):
    (site / "site.toml").write_text('center_id = "c1"\nrole = "training"\n', encoding="utf-8")
    e = only_error(validate_site(site), "site.toml", None, "role")
    assert "'training'" in e.message


def test_site_toml_invalid_toml(site):
    (site / "site.toml").write_text('center_id = "c1"\nrole = external\n', encoding="utf-8")
    e = only_error(validate_site(site), "site.toml", 2, None)
    assert "invalid TOML" in e.message


# --------------------------------------------------------------------------- never stops early


def test_collects_every_problem(site):
    rows = sb.clinical_rows()
    rows[0]["benefit"] = "yes"
    rows[2]["dfs_months"] = "-1"
    sb.write_clinical(site, rows + [dict(rows[1])])
    (site / "pathology" / "P001.tif").write_bytes(b"II*\x00garbage")
    path = site / "mri" / "P000" / "arterial.nii.gz"
    path.write_bytes(path.read_bytes()[:100])
    sb.write_nifti(site / "mri" / "P404" / "arterial.nii.gz")
    (site / "site.toml").write_text('role = "central"\n', encoding="utf-8")
    report = validate_site(site)
    assert set(errors(report)) == {
        ("site.toml", None, "role"),
        ("clinical.csv", 2, "benefit"),
        ("clinical.csv", 4, "dfs_months"),
        ("clinical.csv", 6, "patient_id"),
        ("mri/P404", None, "patient_id"),
        ("mri/P000/arterial.nii.gz", None, "arterial"),
        ("pathology/P001.tif", None, None),
    }
    assert report.summary["n_errors"] == 7
