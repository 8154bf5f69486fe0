"""Write a tiny but real, valid site folder (see shared/data-contract.md) for tests.

Real files: NIfTI volumes via nibabel, a DICOM series via pydicom, small pyramidal
tiled TIFF slides via tifffile (tiffslide reads level-0 mpp from the resolution tags).
Tests break one thing at a time with the helpers below.

Layout written by ``build_site(root)`` (line numbers are clinical.csv lines)::

    site.toml            center_id = "test-center", role = "train"
    clinical.csv         P000 (line 2), P001 (3), P002 (4), P003 (5)
    genomics.csv         P000 (line 2), P001 (3), P002 (4, partly untested)
    mri/P000/            arterial, portal, delayed .nii.gz + tumor_mask.nii.gz
    mri/P001/            arterial/ (DICOM series) + portal, delayed .nii.gz
    mri/P002/            arterial, portal .nii.gz only (incomplete: a warning)
    pathology/P000.svs   pyramidal tiled TIFF with mpp
    pathology/P001.tif   pyramidal tiled TIFF with mpp
"""

from __future__ import annotations

import csv
import datetime
from pathlib import Path
from typing import Sequence

import numpy as np

PHASES = ("arterial", "portal", "delayed")
SHAPE = (8, 8, 4)  # x, y, z voxels of every phase volume
SPACING = (0.8, 0.8, 2.5)  # mm

CLINICAL_HEADER = ["patient_id", "benefit", "dfs_months", "dfs_event", "split", "age", "afp_ng_ml"]
CLINICAL_ROWS = [
    {"patient_id": "P000", "benefit": "1", "dfs_months": "12.5", "dfs_event": "1", "split": "train", "age": "55", "afp_ng_ml": "400"},
    {"patient_id": "P001", "benefit": "0", "dfs_months": "30.0", "dfs_event": "0", "split": "val", "age": "61", "afp_ng_ml": "12.3"},
    {"patient_id": "P002", "benefit": "", "dfs_months": "8.0", "dfs_event": "1", "split": "", "age": "47", "afp_ng_ml": ""},
    {"patient_id": "P003", "benefit": "1", "dfs_months": "", "dfs_event": "", "split": "test", "age": "70", "afp_ng_ml": "8.1"},
]
GENOMICS_HEADER = ["patient_id", "TP53_mut", "CTNNB1_mut", "CCND1_cnv", "CD274_expr"]
GENOMICS_ROWS = [
    {"patient_id": "P000", "TP53_mut": "1", "CTNNB1_mut": "0", "CCND1_cnv": "0.42", "CD274_expr": "-1.3"},
    {"patient_id": "P001", "TP53_mut": "0", "CTNNB1_mut": "1", "CCND1_cnv": "-0.1", "CD274_expr": "0.7"},
    {"patient_id": "P002", "TP53_mut": "1", "CTNNB1_mut": "", "CCND1_cnv": "", "CD274_expr": "2.0"},
]


def affine_for(spacing: Sequence[float] = SPACING, origin: Sequence[float] = (-3.0, -3.0, 10.0)) -> np.ndarray:
    a = np.diag([float(spacing[0]), float(spacing[1]), float(spacing[2]), 1.0])
    a[:3, 3] = origin
    return a


def write_nifti(
    path: Path,
    shape: Sequence[int] = SHAPE,
    affine: np.ndarray | None = None,
    *,
    mask: bool = False,
    seed: int = 0,
) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    if mask:
        data = np.zeros(tuple(shape), dtype=np.uint8)
        sl = tuple(slice(s // 4, max(s // 4 + 1, 3 * s // 4)) for s in shape)
        data[sl] = 1
    else:
        rng = np.random.default_rng(seed)
        data = (rng.random(tuple(shape)) * 1000).astype(np.int16)
    nib.save(nib.Nifti1Image(data, affine_for() if affine is None else affine), str(path))
    return path


def write_dicom_series(
    folder: Path,
    shape: Sequence[int] = SHAPE,
    spacing: Sequence[float] = SPACING,
    origin: Sequence[float] = (3.0, 3.0, 10.0),
    *,
    shuffle_names: bool = True,
) -> Path:
    """One axial slice per file; shape = (columns, rows, slices) as read_volume returns.

    The default orientation (rows along LPS -x, columns along LPS -y) and origin put
    the series on exactly the RAS grid of ``write_nifti``'s default affine.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    cols, rows, n = (int(s) for s in shape)
    series_uid, study_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(1)
    order = list(range(n))
    if shuffle_names:  # file names must not decide the slice order
        order = order[::-1]
    for name_idx, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality = "MR"
        ds.PatientID = "ANON"
        ds.StudyDate = datetime.date(2024, 1, 1).strftime("%Y%m%d")
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(origin[0]), float(origin[1]), float(origin[2]) + k * float(spacing[2])]
        ds.ImageOrientationPatient = [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = (rng.random((rows, cols)) * 1000).astype(np.int16).tobytes()
        ds.save_as(folder / f"IM{name_idx:04d}.dcm", enforce_file_format=True)
    return folder


def write_slide(path: Path, size: int = 256, mpp: float | None = 0.5, levels: int = 3, tile: int = 64) -> Path:
    """A small tiled pyramidal RGB TIFF (sub-IFD pyramid) that tiffslide opens."""
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    img = (rng.random((size, size, 3)) * 255).astype(np.uint8)

    def kw(scale: int) -> dict:
        if mpp is None:
            return {}
        return {"resolution": (1e4 / (mpp * scale), 1e4 / (mpp * scale)), "resolutionunit": "CENTIMETER"}

    with tifffile.TiffWriter(str(path)) as tw:
        tw.write(img, tile=(tile, tile), photometric="rgb", compression="zlib", subifds=levels - 1, metadata=None, **kw(1))
        for lv in range(1, levels):
            s = 2**lv
            sub = img[::s, ::s]
            t = max(16, min(tile, sub.shape[0]) // 16 * 16)
            tw.write(sub, tile=(t, t), photometric="rgb", compression="zlib", subfiletype=1, metadata=None, **kw(s))
    return path


def write_csv(path: Path, header: Sequence[str], rows: Sequence[dict], encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.DictWriter(f, fieldnames=list(header), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in header})
    return path


def clinical_rows() -> list[dict]:
    return [dict(r) for r in CLINICAL_ROWS]


def genomics_rows() -> list[dict]:
    return [dict(r) for r in GENOMICS_ROWS]


def write_clinical(root: Path, rows: Sequence[dict] | None = None, header: Sequence[str] = CLINICAL_HEADER) -> Path:
    return write_csv(root / "clinical.csv", header, clinical_rows() if rows is None else rows)


def write_genomics(root: Path, rows: Sequence[dict] | None = None, header: Sequence[str] = GENOMICS_HEADER) -> Path:
    return write_csv(root / "genomics.csv", header, genomics_rows() if rows is None else rows)


def build_site(root: Path, role: str = "train", center_id: str = "test-center") -> Path:
    """Write the valid tiny site described in the module docstring into ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "site.toml").write_text(
        f'center_id = "{center_id}"\ndisplay_name = "Test Center"\nrole = "{role}"\nnotes = "synthetic test site"\n',
        encoding="utf-8",
    )
    write_clinical(root)
    write_genomics(root)
    mri = root / "mri"
    for i, ph in enumerate(PHASES):
        write_nifti(mri / "P000" / f"{ph}.nii.gz", seed=i)
    write_nifti(mri / "P000" / "tumor_mask.nii.gz", mask=True)
    write_dicom_series(mri / "P001" / "arterial")
    write_nifti(mri / "P001" / "portal.nii.gz")
    write_nifti(mri / "P001" / "delayed.nii.gz")
    write_nifti(mri / "P002" / "arterial.nii.gz")
    write_nifti(mri / "P002" / "portal.nii.gz")
    write_slide(root / "pathology" / "P000.svs")
    write_slide(root / "pathology" / "P001.tif")
    return root


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """(size, mtime_ns, first bytes) of every file, to assert a folder was not modified."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        st = p.stat()
        if p.is_file():
            with open(p, "rb") as f:
                head = f.read(4096)
            out[p.relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns, head)
        else:
            out[p.relative_to(root).as_posix() + "/"] = (0, 0, b"")
    return out
