"""common.data.site: the reader API the rest of the project codes against."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.data.site import (
    PatientRecord,
    Problem,
    SiteData,
    SiteDataError,
)
from common.data.images import open_slide, read_volume
from common.data.splits import assign_splits
from tests import sitebuilder as sb


def test_open_valid_site(site):
    s = SiteData.open(site)
    assert (s.center_id, s.display_name, s.role) == ("test-center", "Test Center", "train")
    assert s.root == site
    assert [p.patient_id for p in s.patients] == ["P000", "P001", "P002", "P003"]
    assert [p.row for p in s.patients] == [2, 3, 4, 5]
    assert s.clinical_columns == ["age", "afp_ng_ml"]
    assert s.genomic_columns == ["TP53_mut", "CTNNB1_mut", "CCND1_cnv", "CD274_expr"]
    assert all(p.severity == "warning" for p in s.problems)

    p0, p1, p2, p3 = s.patients
    assert (p0.benefit, p0.dfs_months, p0.dfs_event, p0.split) == (1, 12.5, 1, "train")
    assert p0.clinical == {"age": 55.0, "afp_ng_ml": 400.0}
    assert p0.genomics == {"TP53_mut": 1.0, "CTNNB1_mut": 0.0, "CCND1_cnv": 0.42, "CD274_expr": -1.3}
    assert p0.mri == {ph: site / "mri" / "P000" / f"{ph}.nii.gz" for ph in sb.PHASES}
    assert list(p0.mri) == list(sb.PHASES)
    assert p0.tumor_mask == site / "mri" / "P000" / "tumor_mask.nii.gz"
    assert p0.slide == site / "pathology" / "P000.svs"
    assert p0.mri_complete() and p0.mri_complete(["arterial"])

    assert p1.mri["arterial"] == site / "mri" / "P001" / "arterial" and p1.mri["arterial"].is_dir()
    assert p1.mri_complete() and p1.slide == site / "pathology" / "P001.tif" and p1.split == "val"

    assert p2.benefit is None and p2.clinical["afp_ng_ml"] is None
    assert p2.genomics == {"TP53_mut": 1.0, "CTNNB1_mut": None, "CCND1_cnv": None, "CD274_expr": 2.0}
    assert not p2.mri_complete() and p2.mri_complete(["arterial", "portal"])
    # the one patient with an empty split cell among this site's 2 training patients: round(2 * 0.2) = 0 validate
    assert p2.split == assign_splits([("P002", None), ("P000", 1)], 0.2)["P002"] == "train"

    assert p3.genomics is None and p3.mri == {} and p3.slide is None and p3.tumor_mask is None
    assert p3.dfs_months is None and p3.dfs_event is None and p3.split == "test"

    assert [p.patient_id for p in s.split("test")] == ["P003"]
    assert [p.patient_id for p in s.split("val")] == ["P001"] + (["P002"] if p2.split == "val" else [])
    with pytest.raises(ValueError):
        s.split("validation")


def test_phases_are_configurable(site):
    s = SiteData.open(site, phases=("arterial", "portal"))
    assert s.patient("P002").mri_complete()
    # delayed is not a configured phase any more: ignored with a warning
    assert "delayed" not in s.patient("P000").mri
    assert any(p.file == "mri/P000/delayed.nii.gz" and p.severity == "warning" for p in s.problems)


def test_site_toml_is_optional(site):
    (site / "site.toml").unlink()
    s = SiteData.open(site)
    assert (s.center_id, s.display_name, s.role) == ("site", "site", "train")


def test_external_site_empty_split_means_test(site):
    (site / "site.toml").write_text('role = "external"\n', encoding="utf-8")
    s = SiteData.open(site)
    assert s.role == "external"
    assert s.patient("P002").split == "test"


def test_the_validation_split_is_exact_stratified_and_deterministic():
    rng = np.random.default_rng(0)
    ids = [f"HCC-{i:05d}" for i in range(403)]
    labels = {i: int(rng.random() < 0.3) for i in ids}
    a = assign_splits(((i, labels[i]) for i in ids), 0.2)
    assert a == assign_splits(((i, labels[i]) for i in reversed(ids)), 0.2)      # row order does not matter
    val = [i for i in ids if a[i] == "val"]
    assert len(val) == round(403 * 0.2)                                        # exactly 81, not about 81
    pos = sum(labels.values())
    assert abs(sum(labels[i] for i in val) - pos * 0.2) <= 1                    # the label share is kept
    assert all(v == "train" for v in assign_splits(((i, 0) for i in ids), 0.0).values())
    assert all(v == "val" for v in assign_splits(((i, 0) for i in ids), 1.0).values())
    # one more patient moves at most two others (its stratum's quota, and the remainder between strata)
    b = assign_splits([*((i, labels[i]) for i in ids), ("HCC-99999", 0)], 0.2)
    assert sum(a[i] != b[i] for i in ids) <= 2
    # a small center: 18 patients, 20 % -> 4 validate (the old independent draw gave 10)
    small = assign_splits(((f"E{i:03d}", i % 2) for i in range(18)), 0.2)
    assert sum(v == "val" for v in small.values()) == 4


def test_strict_raises_with_every_problem(site):
    rows = sb.clinical_rows()
    rows[0]["benefit"] = "2"
    rows[1]["dfs_event"] = "x"
    sb.write_clinical(site, rows)
    with pytest.raises(SiteDataError) as exc:
        SiteData.open(site)
    errs = [p for p in exc.value.problems if p.severity == "error"]
    assert [(p.file, p.row, p.field) for p in errs] == [("clinical.csv", 2, "benefit"), ("clinical.csv", 3, "dfs_event")]
    text = str(exc.value)
    assert "clinical.csv:2 [benefit] label must be 0, 1 or empty, got '2'" in text
    assert "clinical.csv:3 [dfs_event]" in text
    # non-strict keeps the readable rows, with the bad value dropped
    s = SiteData.open(site, strict=False)
    assert s.patient("P000").benefit is None and s.patient("P000").dfs_months == 12.5
    assert len(s.errors) == 2


def test_problem_str():
    assert str(Problem("error", "clinical.csv", 14, "benefit", "label must be 0, 1 or empty, got '2'")) == (
        "clinical.csv:14 [benefit] label must be 0, 1 or empty, got '2'"
    )
    assert str(Problem("error", "pathology/P1.svs", None, None, "bad")) == "pathology/P1.svs bad"
    err = SiteDataError([Problem("error", "a.csv", 2, "x", "m1"), Problem("warning", "b", None, None, "m2")])
    assert "a.csv:2 [x] m1" in str(err) and "b m2" in str(err) and len(err.problems) == 2


def test_csv_variants_are_read(site):
    """UTF-8 with BOM, CRLF line ends, quoted cells, blank lines, NA cells, 1.0 labels."""
    text = (
        "patient_id,benefit,dfs_months,dfs_event,split,age,afp_ng_ml\r\n"
        "P000,1.0,12.5,1,train,55,400\r\n"
        "\r\n"
        '"P001",0,"30",0,val,61,NA\r\n'
        "P002,,8,1,,47,nan\r\n"
        "P003, 1 ,,,TEST,70,8.1\r\n"
    )
    (site / "clinical.csv").write_bytes(text.encode("utf-8-sig"))
    s = SiteData.open(site)
    assert [p.row for p in s.patients] == [2, 4, 5, 6]
    assert s.patient("P000").benefit == 1 and s.patient("P003").benefit == 1
    assert s.patient("P001").clinical["afp_ng_ml"] is None and s.patient("P001").dfs_months == 30.0
    assert s.patient("P003").split == "test"


def test_encoding_error_names_line_even_with_bom(site):
    data = "patient_id,benefit\nP000,1\nP001,0\n".encode("utf-8-sig") + b"P\xe902,1\n"
    (site / "clinical.csv").write_bytes(data)
    s = SiteData.open(site, strict=False)
    assert [(p.file, p.row, p.field) for p in s.errors] == [("clinical.csv", 4, None)]
    assert s.patients == []  # unreadable clinical.csv: no orphan errors for mri/ and pathology/


def test_unknown_site_toml_key_is_a_warning(site):
    (site / "site.toml").write_text('center_id = "c9"\ncolour = "blue"\n', encoding="utf-8")
    s = SiteData.open(site)
    assert s.center_id == "c9"
    assert ("site.toml", None, "colour") in {(p.file, p.row, p.field) for p in s.warnings}


def test_two_files_for_one_phase_is_an_error(site):
    sb.write_nifti(site / "mri" / "P001" / "arterial.nii.gz")  # next to the DICOM folder
    s = SiteData.open(site, strict=False)
    assert [(p.file, p.field) for p in s.errors] == [("mri/P001/arterial.nii.gz", "arterial")]


def test_patient_record_defaults():
    r = PatientRecord(patient_id="X", row=2)
    assert r.mri == {} and r.genomics is None and not r.mri_complete()
    r.mri = {ph: Path(ph) for ph in sb.PHASES}
    assert r.mri_complete() and r.mri_complete(("arterial",))


# --------------------------------------------------------------------------- images


def test_read_volume_nifti(site):
    data, affine = read_volume(site / "mri" / "P000" / "arterial.nii.gz")
    assert data.shape == sb.SHAPE
    np.testing.assert_allclose(affine, sb.affine_for())


def test_read_volume_dicom_series_matches_nifti_grid(site):
    import pydicom

    folder = site / "mri" / "P001" / "arterial"
    data, affine = read_volume(folder)
    assert data.shape == sb.SHAPE
    np.testing.assert_allclose(affine, sb.affine_for(), atol=1e-5)  # LPS -> RAS
    slices = sorted(
        (pydicom.dcmread(f) for f in folder.iterdir()), key=lambda ds: float(ds.ImagePositionPatient[2])
    )
    for k, ds in enumerate(slices):  # sorted by position, not by file name
        np.testing.assert_array_equal(data[:, :, k], ds.pixel_array.T)


def test_read_volume_errors_name_the_file(site):
    bad = site / "mri" / "P000" / "portal.nii.gz"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(SiteDataError) as exc:
        read_volume(bad)
    assert exc.value.problems[0].file == str(bad)
    (site / "mri" / "P001" / "arterial" / "readme").write_text("x")
    with pytest.raises(SiteDataError) as exc:
        read_volume(site / "mri" / "P001" / "arterial")
    assert exc.value.problems[0].file.endswith("arterial/readme")


def test_open_slide(site):
    slide = open_slide(site / "pathology" / "P000.svs")
    try:
        assert slide.level_count == 3
        assert slide.dimensions == (256, 256)
        assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(0.5)
        region = slide.read_region((0, 0), slide.level_count - 1, (32, 32))
        assert region.size == (32, 32)
    finally:
        slide.close()
    (site / "pathology" / "P001.tif").write_text("not a tiff")
    with pytest.raises(SiteDataError) as exc:
        open_slide(site / "pathology" / "P001.tif")
    assert "P001.tif" in str(exc.value)
