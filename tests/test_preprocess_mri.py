"""MRI preprocessing on real files written to tmp_path (NIfTI via nibabel, DICOM via pydicom)."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from omegaconf import OmegaConf

from common.preprocess.mri import build_mri_transform, preprocess_mri

CONF = Path(__file__).resolve().parents[1] / "conf" / "preprocess" / "default.yaml"
PHASES = ["arterial", "portal", "delayed"]


@pytest.fixture(scope="module")
def cfg():
    c = OmegaConf.to_container(OmegaConf.load(CONF).mri, resolve=True)
    c["dtype"] = "float32"
    return c


def phantom(shape=(64, 60, 24), tumor_center=(40, 22, 14), tumor_radius=5, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """An int16 'abdomen': ellipsoid body with smooth texture, a bright spherical tumor, noisy air."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    c = [(n - 1) / 2 for n in shape]
    body = ((x - c[0]) / (0.45 * shape[0])) ** 2 + ((y - c[1]) / (0.42 * shape[1])) ** 2 + ((z - c[2]) / (0.6 * shape[2])) ** 2 < 1
    vol = rng.normal(20, 5, shape).astype(np.float32)
    tex = 400 + 60 * np.sin(x / 4.0) * np.cos(y / 5.0) + 3 * z
    vol[body] = tex[body] + rng.normal(0, 10, int(body.sum()))
    tumor = (x - tumor_center[0]) ** 2 + (y - tumor_center[1]) ** 2 + (z - tumor_center[2]) ** 2 <= tumor_radius ** 2
    vol[tumor] = 1500 + rng.normal(0, 20, int(tumor.sum()))
    return np.clip(vol, 0, 32000).astype(np.int16), tumor.astype(np.uint8)


def affine_ras(spacing=(0.8, 0.9, 2.5), origin=(-30.0, 12.0, 40.0)) -> np.ndarray:
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = origin
    return a


def write_nifti(path: Path, vol: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(vol, affine), str(path))
    return path


def write_dicom_series(folder: Path, vol: np.ndarray, affine: np.ndarray, series_uid: str | None = None) -> Path:
    """Axial DICOM series of ``vol`` (indexed [i, j, k] like the NIfTI) with LPS geometry matching ``affine`` (RAS)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    ras2lps = np.diag([-1.0, -1.0, 1.0])
    col_vec, row_vec = ras2lps @ affine[:3, 0], ras2lps @ affine[:3, 1]  # i -> along a row (columns), j -> rows
    dc, dr = np.linalg.norm(col_vec), np.linalg.norm(row_vec)
    slice_thickness = float(np.linalg.norm(affine[:3, 2]))
    study, series = generate_uid(), series_uid or generate_uid()
    for k in range(vol.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"IM{k:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.PatientID = "MR", "P0"
        ds.InstanceNumber = k + 1
        ipp = ras2lps @ (affine @ np.array([0.0, 0.0, k, 1.0]))[:3]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in [*(col_vec / dc), *(row_vec / dr)]]
        ds.PixelSpacing = [f"{dr:.6f}", f"{dc:.6f}"]  # [between rows, between columns]
        ds.SliceThickness = f"{slice_thickness:.6f}"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = vol.shape[1], vol.shape[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(vol[:, :, k].T.astype(np.int16)).tobytes()  # [row=j, col=i]
        ds.save_as(str(folder / f"IM{k:04d}.dcm"), enforce_file_format=True)
    return folder


def write_patient(root: Path, vol, mask, affine, dicom: bool = False) -> tuple[dict, Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for n, ph in enumerate(PHASES):
        v = (vol.astype(np.float32) * (1 + 0.1 * n)).astype(np.int16)  # each phase a little different
        paths[ph] = write_dicom_series(root / ph, v, affine) if dicom else write_nifti(root / f"{ph}.nii.gz", v, affine)
    m = write_nifti(root / "tumor_mask.nii.gz", mask, affine) if mask is not None else None
    return paths, m


def corr(a, b) -> float:
    return float(np.corrcoef(np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel())[0, 1])


def test_shape_dtype_and_config_forms(tmp_path, cfg):
    vol, mask = phantom()
    paths, m = write_patient(tmp_path, vol, mask, affine_ras())
    out = preprocess_mri(paths, m, cfg, PHASES)
    assert out.shape == (3, *cfg["roi_size"]) and out.dtype == np.float32
    assert np.isfinite(out).all()
    # float16 from the shipped config, given as a DictConfig
    dc = OmegaConf.load(CONF).mri
    out16 = preprocess_mri(paths, m, dc, PHASES)
    assert out16.dtype == np.float16 and out16.shape == out.shape
    np.testing.assert_allclose(out16.astype(np.float32), out, atol=2e-2, rtol=1e-2)
    # per-volume z-score: the non-zero part of each phase is roughly standardised before cropping
    assert np.abs(out).max() < 50
    t = build_mri_transform(cfg, PHASES, with_mask=False)
    assert len(t.transforms) > 5


def test_nifti_and_dicom_series_agree(tmp_path, cfg):
    vol, mask = phantom()
    aff = affine_ras()
    p_nii, m = write_patient(tmp_path / "nii", vol, mask, aff)
    p_dcm, _ = write_patient(tmp_path / "dcm", vol, None, aff, dicom=True)
    a = preprocess_mri(p_nii, m, cfg, PHASES)
    b = preprocess_mri(p_dcm, m, cfg, PHASES)  # DICOM phases, NIfTI mask: geometry must line up
    assert a.shape == b.shape
    assert corr(a, b) > 0.99
    assert np.abs(a - b).max() < 0.05 * (np.abs(a).max())
    # without a mask both use the foreground crop
    a2 = preprocess_mri(p_nii, None, cfg, PHASES)
    b2 = preprocess_mri(p_dcm, None, cfg, PHASES)
    assert corr(a2, b2) > 0.99


def test_orientation_invariance(tmp_path, cfg):
    vol, mask = phantom()
    aff = affine_ras()
    p1, m1 = write_patient(tmp_path / "ras", vol, mask, aff)
    # Same physical volume stored LPS: flip i and j and adjust the affine accordingly.
    flip = np.eye(4)
    flip[0, 0], flip[1, 1] = -1, -1
    flip[0, 3], flip[1, 3] = vol.shape[0] - 1, vol.shape[1] - 1
    aff_lps = aff @ flip
    assert nib.aff2axcodes(aff_lps) == ("L", "P", "S")
    p2, m2 = write_patient(tmp_path / "lps", vol[::-1, ::-1].copy(), mask[::-1, ::-1].copy(), aff_lps)
    a = preprocess_mri(p1, m1, cfg, PHASES)
    b = preprocess_mri(p2, m2, cfg, PHASES)
    np.testing.assert_allclose(a, b, atol=1e-3)


def test_crop_follows_tumor(tmp_path, cfg):
    for n, center in enumerate([(40, 22, 14), (22, 38, 9)]):
        vol, mask = phantom(tumor_center=center, seed=n)
        paths, m = write_patient(tmp_path / f"p{n}", vol, mask, affine_ras())
        out = preprocess_mri(paths, m, cfg, PHASES)
        # the tumor (brightest structure, ~1500 vs ~400 body) sits in the middle of the crop
        a = out[0]
        hot = a > 0.5 * (a.max() + np.median(a))
        assert hot.sum() > 20
        com = np.array(np.nonzero(hot)).mean(axis=1)
        mid = (np.array(a.shape) - 1) / 2
        assert np.all(np.abs(com - mid) <= np.array(a.shape) * 0.15), (com, mid)


def test_missing_mask_falls_back_to_foreground(tmp_path, cfg):
    vol, mask = phantom()
    paths, _ = write_patient(tmp_path, vol, None, affine_ras())
    out = preprocess_mri(paths, None, cfg, PHASES)
    assert out.shape == (3, *cfg["roi_size"])
    # the crop covers the whole body: the edges are air (0 after nonzero z-score or low), the centre is tissue
    a = out[0].astype(np.float32)
    c = [s // 2 for s in a.shape]
    assert a[c[0], c[1], c[2]] > a[0, 0, c[2]]
    # an empty mask behaves like no mask (with a warning)
    empty = write_nifti(tmp_path / "empty_mask.nii.gz", np.zeros_like(mask), affine_ras())
    with pytest.warns(UserWarning, match="empty"):
        out2 = preprocess_mri(paths, empty, cfg, PHASES)
    np.testing.assert_allclose(out, out2, atol=1e-5)


def test_different_spacings_same_shape_and_mixed_phase_grids(tmp_path, cfg):
    vol, mask = phantom()
    outs = []
    for n, sp in enumerate([(0.7, 0.7, 2.0), (1.2, 1.0, 5.0), (2.0, 2.0, 1.0)]):
        paths, m = write_patient(tmp_path / f"s{n}", vol, mask, affine_ras(sp))
        outs.append(preprocess_mri(paths, m, cfg, PHASES))
    assert all(o.shape == (3, *cfg["roi_size"]) for o in outs)
    # phases on different grids: portal phase stored at half resolution with its own affine
    aff = affine_ras()
    paths, m = write_patient(tmp_path / "mixed", vol, mask, aff)
    half = vol[::2, ::2, :]
    aff2 = aff.copy()
    aff2[:3, :2] *= 2
    aff2[:3, 3] += aff[:3, :2] @ np.array([0.5, 0.5])  # voxel centres of the 2x2 blocks
    write_nifti(tmp_path / "mixed" / "portal.nii.gz", half, aff2)
    ref = preprocess_mri(paths, m, cfg, PHASES)
    assert ref.shape == (3, *cfg["roi_size"])
    assert corr(ref[0], ref[1]) > 0.9  # portal lines up with arterial despite its coarser grid


def test_bad_file_is_named(tmp_path, cfg):
    vol, mask = phantom()
    paths, m = write_patient(tmp_path, vol, mask, affine_ras())
    bad = tmp_path / "portal_bad.nii.gz"
    bad.write_bytes(b"not a nifti at all")
    paths["portal"] = bad
    with pytest.raises(ValueError, match="portal_bad.nii.gz"):
        preprocess_mri(paths, m, cfg, PHASES)
    paths["portal"] = tmp_path / "nope.nii.gz"
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        preprocess_mri(paths, m, cfg, PHASES)


def test_building_the_loader_logs_nothing_about_gpu_decoders(caplog):
    """MONAI 1.6 logs 'nvImageCodec is not available' from every LoadImage; our loader keeps it quiet."""
    import logging

    from common.preprocess.mri import _loader

    with caplog.at_level(logging.INFO):
        _loader(["arterial"])
        _loader(["portal", "delayed"])
    assert not [r for r in caplog.records if "nvImageCodec" in r.getMessage()]
