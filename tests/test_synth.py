"""Tests for the synthetic cohort generator (common/synth.py)."""
from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.config import deep_merge
from common import synth

SCALE = 0.05  # 8 patients per site (the minimum), 56 in all
# smaller slides keep the test fast; everything else is the default config
FAST_CFG = {"pathology": {"size_px": [768, 1024]}}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    summary = synth.generate_cohort(out, seed=7, scale=SCALE, cfg=FAST_CFG, progress=False, workers=2)
    return out, summary


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_matches_contract(cohort):
    out, summary = cohort
    cfg = synth.load_config()
    names = [s["name"] for s in cfg["sites"]]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(names)
    assert set(summary["sites"]) == set(names)
    roles = {}
    for name in names:
        sdir = out / name
        meta = tomllib.loads((sdir / "site.toml").read_text())
        assert {"center_id", "display_name", "role"} <= set(meta)
        roles[name] = meta["role"]
        clin = pd.read_csv(sdir / "clinical.csv", dtype={"patient_id": str})
        assert list(clin.columns[:5]) == ["patient_id", "benefit", "dfs_months", "dfs_event", "split"]
        assert clin["patient_id"].is_unique
        assert clin["patient_id"].str.fullmatch(r"[A-Za-z0-9._-]{1,64}").all()
        assert clin["split"].isna().all()
        assert set(clin["benefit"].dropna().unique()) <= {0, 1}
        assert set(clin["dfs_event"].dropna().unique()) <= {0, 1}
        assert (clin["dfs_months"].dropna() >= 0).all()
        for col in clin.columns[5:]:
            assert pd.api.types.is_numeric_dtype(clin[col]), col
        assert len(clin) == summary["sites"][name]["n_patients"] >= 8
        pids = set(clin["patient_id"])
        gen = pd.read_csv(sdir / "genomics.csv", dtype={"patient_id": str})
        assert set(gen["patient_id"]) <= pids
        assert set(gen.columns[1:]) <= set(cfg["genomic_features"])
        for pdir in (sdir / "mri").iterdir():
            assert pdir.name in pids
            for f in pdir.iterdir():
                ok_nifti = f.name.endswith(".nii.gz") and f.name[:-7] in cfg["phases"] + ["tumor_mask"]
                ok_dicom = f.is_dir() and f.name in cfg["phases"] and any(f.glob("*.dcm"))
                assert ok_nifti or ok_dicom, f
        for f in (sdir / "pathology").iterdir():
            assert f.suffix == ".tiff" and f.stem in pids
    assert roles["external"] == "external"
    assert all(r == "train" for n, r in roles.items() if n != "external")
    # ground truth lives outside every site folder
    assert (out / "_truth.csv").is_file() and (out / "_cohort.json").is_file()
    truth = pd.read_csv(out / "_truth.csv")
    assert {"site", "patient_id", "true_prob", "z_mri", "z_path", "z_gen", "benefit"} <= set(truth.columns)
    assert len(truth) == summary["n_patients"]
    assert json.loads((out / "_cohort.json").read_text())["seed"] == 7
    assert not any(out.glob("*/_truth.csv"))


def test_default_sizes_and_scale():
    cfg = synth.load_config()
    train = [s["n"] for s in cfg["sites"] if s["role"] == "train"]
    ext = [s["n"] for s in cfg["sites"] if s["role"] == "external"]
    assert len(train) == 6 and sum(train) == 536 and len(set(train)) == 6
    assert len(ext) == 1 and 120 <= ext[0] <= 180


def test_deterministic(cohort, tmp_path):
    out, _ = cohort
    # same seed and scale -> identical files (even with a different worker count)
    synth.generate_cohort(tmp_path, seed=7, scale=SCALE, cfg=FAST_CFG, progress=False, workers=1)
    d1 = {k: v for k, v in _digest(out).items()}
    d2 = _digest(tmp_path)
    assert d1 == d2


def test_nifti_readable_and_scanners_differ(cohort):
    import nibabel as nib

    out, summary = cohort
    spacings, orients = set(), set()
    for name, s in summary["sites"].items():
        if s["mri_format"] != "nifti":
            continue
        vol = next((out / name / "mri").glob("*/portal.nii.gz"))
        img = nib.load(vol)
        assert img.ndim == 3 and img.shape == tuple(s["mri_shape"])
        data = np.asanyarray(img.dataobj)
        assert np.isfinite(data).all() and data.std() > 0
        spacings.add(tuple(np.round(img.header.get_zooms(), 2)))
        orients.add("".join(nib.aff2axcodes(img.affine)))
        mask_path = vol.parent / "tumor_mask.nii.gz"
        if mask_path.exists():
            mask = nib.load(mask_path)
            assert mask.shape == img.shape and np.allclose(mask.affine, img.affine)
            assert 0 < np.asarray(mask.dataobj).sum() < data.size / 4
    assert len(spacings) >= 4
    assert {"RAS", "LPS"} <= orients


def test_dicom_series(cohort):
    import nibabel as nib
    import pydicom

    out, summary = cohort
    name = next(n for n, s in summary["sites"].items() if s["mri_format"] == "dicom")
    shape = summary["sites"][name]["mri_shape"]
    series = next(p for p in (out / name / "mri").glob("*/arterial") if p.is_dir())
    files = sorted(series.glob("*.dcm"))
    assert len(files) == shape[2]
    dss = [pydicom.dcmread(f) for f in files]
    assert len({d.SeriesInstanceUID for d in dss}) == 1
    assert sorted(int(d.InstanceNumber) for d in dss) == list(range(1, shape[2] + 1))
    d0 = dss[0]
    assert d0.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert d0.Modality == "MR" and d0.pixel_array.shape == (shape[1], shape[0])
    assert float(d0.RescaleSlope) != 1.0
    z = sorted(float(d.ImagePositionPatient[2]) for d in dss)
    assert np.allclose(np.diff(z), float(d0.SliceThickness))
    # MONAI reads the folder as one volume whose geometry matches the NIfTI mask
    from monai.transforms import LoadImage

    img = LoadImage(reader="PydicomReader", image_only=True)(str(series))
    assert tuple(img.shape[-3:]) == tuple(shape)
    mask_path = series.parent / "tumor_mask.nii.gz"
    if mask_path.exists():
        aff = np.asarray(img.affine)
        assert np.allclose(aff, nib.load(mask_path).affine, atol=1e-3)


def test_slides_open_with_tiffslide(cohort):
    import tiffslide

    out, summary = cohort
    for name in ("center_a", "center_b"):
        path = next((out / name / "pathology").glob("*.tiff"))
        with tiffslide.TiffSlide(path) as sl:
            assert sl.level_count >= 2
            assert sl.dimensions == (1024, 768)
            assert sl.level_dimensions[1] == (512, 384)
            mpp = float(sl.properties["tiffslide.mpp-x"])
            assert mpp == pytest.approx(summary["sites"][name]["slide_mpp"], rel=1e-3)
            reg = np.asarray(sl.read_region((256, 256), 0, (256, 256)).convert("RGB"))
            assert reg.shape == (256, 256, 3)
            thumb = np.asarray(sl.read_region((0, 0), sl.level_count - 1, sl.level_dimensions[-1]).convert("RGB"))
            white = (thumb.min(axis=2) > 215).mean()
            assert 0.1 < white < 0.9  # tissue occupies only part of the slide


def test_missing_modalities(tmp_path):
    # tables only (no images): the missingness draws happen in _site_tables
    cfg = synth.load_config()
    site = cfg["sites"][0]
    n = 2000
    pids, clin, gen, truth, fl, _ = synth._site_tables(cfg, site, 0, n, seed=3)
    no_mri = fl["no_mri"] | fl["incomplete"]
    assert 0.05 < fl["no_mri"].mean() < 0.16
    assert fl["incomplete"].any() and fl["no_mask"].any()
    assert 0.05 < fl["no_slide"].mean() < 0.16
    assert 0.10 < fl["no_gen"].mean() < 0.21 and len(gen) == n - fl["no_gen"].sum()
    assert not (no_mri & fl["no_slide"] & fl["no_gen"]).any()
    # censoring ~30 %, out-of-range covariates are rare
    assert 0.2 < 1 - clin["dfs_event"].mean() < 0.45
    assert 0.005 < ((clin["child_pugh"] > 7) | (clin["ecog"] > 1) | (clin["age"] > 75)).mean() < 0.1
    # untested genes: empty column or absent column at some site
    d = next(s for s in cfg["sites"] if s["genomics_untested_empty"])
    _, _, gen_d, _, _, _ = synth._site_tables(cfg, d, 3, 50, seed=3)
    assert gen_d[d["genomics_untested_empty"][0]].isna().all()
    c = next(s for s in cfg["sites"] if s["genomics_untested_absent"])
    _, _, gen_c, _, _, _ = synth._site_tables(cfg, c, 2, 50, seed=3)
    assert c["genomics_untested_absent"][0] not in gen_c.columns


def test_missing_modalities_on_disk(cohort):
    out, summary = cohort
    n = summary["n_patients"]
    n_mri = sum(s["n_mri_complete"] for s in summary["sites"].values())
    n_slide = sum(s["n_pathology"] for s in summary["sites"].values())
    n_gen = sum(s["n_genomics"] for s in summary["sites"].values())
    assert n_mri < n and n_slide < n and n_gen < n
    assert n_slide == sum(len(list((out / s / "pathology").glob("*.tiff"))) for s in summary["sites"])


def test_latent_model_oracle(tmp_path):
    from sklearn.metrics import roc_auc_score

    cfg = synth.load_config()
    frames = [synth._site_tables(cfg, s, i, 1500, seed=11)[3] for i, s in enumerate(cfg["sites"])]
    truth = pd.concat(frames, ignore_index=True)
    y = truth["benefit"]
    oracle = roc_auc_score(y, truth["true_prob"])
    singles = {z: roc_auc_score(y, truth[z]) for z in ("z_mri", "z_path", "z_gen")}
    assert 0.83 < oracle < 0.93
    for z, auc in singles.items():
        assert 0.62 < auc < 0.78, (z, auc)
        assert oracle > auc + 0.08
    # genomics carries z_gen through the informative genes
    gen = synth._genomics(cfg, {"name": "x"}, np.random.default_rng(0), truth["z_gen"].to_numpy(),
                          truth["patient_id"].tolist())
    assert np.corrcoef(gen["CXCL9_expr"], truth["z_gen"])[0, 1] > 0.5
    assert abs(np.corrcoef(gen["TP53_mut"], truth["z_gen"])[0, 1]) < 0.1
    # oracle_auc() reads _truth.csv (default: the external site)
    truth.to_csv(tmp_path / "_truth.csv", index=False)
    ext = truth[truth["role"] == "external"]
    assert synth.oracle_auc(tmp_path / "_truth.csv") == pytest.approx(roc_auc_score(ext["benefit"], ext["true_prob"]))
    assert synth.oracle_auc(tmp_path / "_truth.csv", site="center_a") > 0.8


def test_signal_visible_in_images():
    """z_mri moves tumor/liver arterial contrast; z_path moves nuclear density in tissue."""
    cfg = synth.load_config()
    site = cfg["sites"][0]
    ratios = []
    for z in (-1.5, 1.5):
        task = dict(seed=0, site_idx=0, pidx=0, mri_cfg=cfg["mri"], scanner=site["mri"],
                    phases=cfg["phases"], z_mri=z)
        vols, mask, _ = synth._mri_volumes(task)
        art, por = vols[cfg["phases"][0]], vols[cfg["phases"][1]]
        ratios.append(art[mask > 0].mean() / por[mask > 0].mean())
    assert ratios[1] > ratios[0] * 1.3
    dens = []
    pc = deep_merge(cfg["pathology"], {"size_px": [512, 512]})
    for z in (-1.5, 1.5):
        task = dict(seed=0, site_idx=0, pidx=0, path_cfg=pc, stain=site["stain"], z_path=z)
        rgb, _ = synth._slide_rgb(task)
        g = rgb.astype(float).mean(axis=2)
        tissue = g < 225
        dens.append((g[tissue] < 110).mean())
    assert dens[1] > dens[0] * 1.5


# ---------------------------------------------------------------- harder cohorts (synth.shift, synth.signal)
def test_shift_widens_one_center_only():
    from common.synth.shift import apply_shift_and_signal

    base = synth.load_config()
    cfg = apply_shift_and_signal(synth.load_config({"shift": {
        "center": "external", "scanner": 3.0, "contrast": 1.3, "stain": 2.0, "panel_drop": ["CXCL9_expr"],
        "prevalence": 1.0}}))
    for b, s in zip(base["sites"], cfg["sites"]):
        if s["name"] != "external":
            assert s == b, s["name"]  # every other center untouched
            continue
        assert s["mri"]["noise_sd"] == pytest.approx(3 * b["mri"]["noise_sd"])
        assert s["mri"]["bias"] == pytest.approx(3 * b["mri"]["bias"])
        assert s["mri"]["contrast_gamma"] == pytest.approx(1.3)
        assert s["stain"]["h_shift"] == pytest.approx([2 * v for v in b["stain"]["h_shift"]])
        assert s["stain"]["h_scale"] == pytest.approx(b["stain"]["h_scale"] ** 2)
        assert s["b0_offset"] == pytest.approx(b["b0_offset"] + 1.0)
        assert "CXCL9_expr" in s["genomics_untested_empty"]
    # the images of the shifted center move: noisier MRI, other colours
    ext = next(s for s in cfg["sites"] if s["name"] == "external")
    ext0 = next(s for s in base["sites"] if s["name"] == "external")
    noise = []
    for site in (ext0, ext):
        task = dict(seed=0, site_idx=6, pidx=0, mri_cfg=cfg["mri"], scanner=site["mri"], phases=cfg["phases"],
                    z_mri=0.0)
        vols, _, _ = synth._mri_volumes(task)
        v = vols[cfg["phases"][0]]
        noise.append(float(np.std(v[:3, :3, :]) / np.percentile(v, 99)))  # air in a corner / bright tissue
    assert noise[1] > 2 * noise[0]
    pc = deep_merge(cfg["pathology"], {"size_px": [256, 256]})
    means = [synth._slide_rgb(dict(seed=0, site_idx=6, pidx=0, path_cfg=pc, stain=site["stain"], z_path=0.0))[0]
             .reshape(-1, 3).mean(axis=0) for site in (ext0, ext)]
    assert np.abs(means[1] - means[0]).max() > 5
    # prevalence: the same latents, higher benefit odds at the shifted center only
    t0 = synth._site_tables(base, ext0, 6, 2000, seed=1)[3]
    t1 = synth._site_tables(cfg, ext, 6, 2000, seed=1)[3]
    assert t1["true_prob"].mean() > t0["true_prob"].mean() + 0.1
    with pytest.raises(ValueError, match="synth.shift.center"):
        apply_shift_and_signal(synth.load_config({"shift": {"center": "nowhere"}}))
    with pytest.raises(ValueError, match="synth.signal.mri"):
        apply_shift_and_signal(synth.load_config({"signal": {"mri": "colour"}}))


def test_signal_moves_to_other_features():
    """morphology: z_mri sets the tumor's size, not its contrast; nuclear_size: z = 0 gives the default slide,
    otherwise another one; alternate genes: z_gen leaves the immune genes for others."""
    from common.synth.shift import apply_shift_and_signal

    cfg = apply_shift_and_signal(synth.load_config({"signal": {"mri": "morphology", "pathology": "nuclear_size",
                                                                "genomics": "alternate"}}))
    base = apply_shift_and_signal(synth.load_config())
    site = cfg["sites"][0]
    ratio, size = [], []
    for z in (-1.5, 1.5):
        task = dict(seed=0, site_idx=0, pidx=0, mri_cfg=cfg["mri"], scanner=site["mri"], phases=cfg["phases"],
                    z_mri=z, signal=cfg["signal"])
        vols, mask, _ = synth._mri_volumes(task)
        art, por = vols[cfg["phases"][0]], vols[cfg["phases"][1]]
        ratio.append(art[mask > 0].mean() / por[mask > 0].mean())
        size.append(int(mask.sum()))
    assert size[1] > 3 * size[0]
    assert abs(ratio[1] / ratio[0] - 1) < 0.1  # the default signal would move it by > 30 % (test above)
    pc = deep_merge(cfg["pathology"], {"size_px": [384, 384]})

    def slide(c, z):
        return synth._slide_rgb(dict(seed=0, site_idx=0, pidx=0, path_cfg=pc, stain=site["stain"], z_path=z,
                                     signal=c["signal"]))[0]
    assert np.array_equal(slide(cfg, 0.0), slide(base, 0.0))
    assert not np.array_equal(slide(cfg, 1.5), slide(base, 1.5))
    assert slide(cfg, 1.5).astype(float).mean() < slide(cfg, -1.5).astype(float).mean() - 0.5
    truth = synth._site_tables(cfg, site, 0, 2000, seed=2)[3]
    gen = synth._genomics(cfg, site, np.random.default_rng(0), truth["z_gen"].to_numpy(), truth["patient_id"].tolist())
    assert np.corrcoef(gen["VEGFA_cnv"], truth["z_gen"])[0, 1] > 0.5
    assert abs(np.corrcoef(gen["CXCL9_expr"], truth["z_gen"])[0, 1]) < 0.1


def test_shifted_cohort_on_disk(tmp_path):
    cfg = {"pathology": {"size_px": [256, 256]}, "sites": [
        s for s in synth.load_config()["sites"] if s["name"] in ("center_a", "external")],
        "shift": {"center": "external", "panel_drop": ["IFNG_expr"], "scanner": 2.0},
        "signal": {"mri": "morphology"}}
    summary = synth.generate_cohort(tmp_path, seed=5, scale=0.05, cfg=cfg, progress=False, workers=1)
    meta = json.loads((tmp_path / "_cohort.json").read_text())
    assert meta["shift"]["center"] == "external" and meta["signal"]["mri"] == "morphology"
    assert summary["shift"]["scanner"] == 2.0
    gen = pd.read_csv(tmp_path / "external" / "genomics.csv")
    assert gen["IFNG_expr"].isna().all()
    assert pd.read_csv(tmp_path / "center_a" / "genomics.csv")["IFNG_expr"].notna().any()
