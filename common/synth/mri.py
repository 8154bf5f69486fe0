"""The synthetic cohort's MRI: contrast phases with a tumour whose enhancement carries z_mri, written as
NIfTI or DICOM series with each site's scanner geometry."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from common.synth._config import _S_MRI, _rng, _sigmoid  # noqa: F401


# --------------------------------------------------------------------------- MRI
_AX = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}


def _affine(axcodes: str, spacing, shape) -> np.ndarray:
    m = np.zeros((3, 3))
    for i, c in enumerate(axcodes.upper()):
        ax, sign = _AX[c]
        m[ax, i] = sign * float(spacing[i])
    a = np.eye(4)
    a[:3, :3] = m
    a[:3, 3] = -m @ ((np.asarray(shape) - 1) / 2.0)  # FOV centred on world 0
    return a


def _smooth_noise(rng, shape, sigma):
    from scipy.ndimage import gaussian_filter

    x = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return x / (x.std() + 1e-8)


def _mri_volumes(task: dict):
    """Returns (phase volumes in scanner units, tumor mask, affine)."""
    mc, sc = task["mri_cfg"], task["scanner"]
    phases = task["phases"]
    rng = _rng(task["seed"], task["site_idx"], task["pidx"], _S_MRI)
    shape = tuple(int(s) for s in sc["shape"])
    aff = _affine(sc.get("axcodes", "RAS"), sc["spacing"], shape)
    idx = np.indices(shape, dtype=np.float32).reshape(3, -1)
    w = (aff[:3, :3] @ idx + aff[:3, 3:4]).reshape((3,) + shape).astype(np.float32)
    edge = float(mc["edge_mm"])
    jit = float(mc["anatomy_jitter"])

    def ellipsoid(center, radii):
        q = sum(((w[i] - center[i]) / radii[i]) ** 2 for i in range(3))
        d = (1 - np.sqrt(q)) * float(np.mean(radii))
        return _sigmoid(d / edge).astype(np.float32)

    def cylinder(cxy, r):
        d = r - np.sqrt((w[0] - cxy[0]) ** 2 + (w[1] - cxy[1]) ** 2)
        return _sigmoid(d / edge).astype(np.float32)

    body = ellipsoid([0, 0, 0], np.asarray(mc["body_radii_mm"]) * (1 + jit * rng.standard_normal(3)))
    lc = np.asarray(mc["liver_center_mm"]) + 2.0 * rng.standard_normal(3)
    lr = np.asarray(mc["liver_radii_mm"]) * (1 + jit * rng.standard_normal(3))
    liver = ellipsoid(lc, lr) * body
    aorta = cylinder(mc["aorta_center_mm"], mc["aorta_radius_mm"] * (1 + jit * rng.standard_normal())) * body
    spine = cylinder(mc["spine_center_mm"], mc["spine_radius_mm"] * (1 + jit * rng.standard_normal())) * body
    u = rng.standard_normal(3)
    u = u / np.linalg.norm(u) * rng.random() ** (1 / 3)
    tc = lc + u * lr * float(mc["tumor_offset_frac"])
    z = task["z_mri"]
    sig = task.get("signal") or {}
    morph = sig.get("mri", "enhancement") == "morphology"
    r0 = rng.uniform(*mc["tumor_radius_mm"])
    if morph:  # z_mri sets the size (the same draws, so every other nuisance stays where it was)
        r0 *= min(max(math.exp(float(sig["morphology_size_z"]) * z), 0.6), 1.6)
    tr = r0 * (1 + 0.12 * rng.standard_normal(3)).clip(0.75, 1.25)
    tumor = ellipsoid(tc, tr) * liver.clip(0, 1)
    necro = None
    p_nec = float(mc["p_necrosis"])
    if morph:
        p_nec = float(_sigmoid(math.log(p_nec / (1 - p_nec)) + float(sig["morphology_necrosis_z"]) * z))
    if rng.random() < p_nec:
        necro = ellipsoid(tc, tr * rng.uniform(0.3, 0.5)) * tumor

    zs = 0.0 if morph else z  # enhancement, washout and texture carry z_mri only in the default signal
    enh = mc["enh0"] + mc["enh_z"] * zs + mc["enh_noise"] * rng.standard_normal()
    wash = [mc["wash0"] + mc["wash_z"] * zs, mc["wash0_delayed"] + mc["wash_z_delayed"] * zs]
    tex_sd = mc["tex0"] * math.exp(mc["tex_z"] * zs)
    tex = _smooth_noise(rng, shape, mc["tex_smooth_vox"])
    ltex = _smooth_noise(rng, shape, 1.5) * mc["liver_texture_sd"]
    # linear bias field along a random direction + patient gain
    dvec = rng.standard_normal(3)
    dvec /= np.linalg.norm(dvec)
    bias = 1 + sc.get("bias", 0.0) * np.tensordot(dvec, w / 40.0, axes=1)
    gain = math.exp(mc["patient_gain_sd"] * rng.standard_normal())

    def rel(name, p):
        vals = mc[name]
        return float(vals[min(p, len(vals) - 1)])

    vols = {}
    for p, ph in enumerate(phases):
        li = rel("liver", p)
        if p == 0:
            ti = li * (1 + enh)
        else:
            ti = li * (1 - wash[min(p - 1, 1)])
        ti = max(ti, mc["min_tumor_rel"] * li)
        img = body * rel("body", p)
        img = img * (1 - liver) + liver * li * (1 + ltex)
        img = img * (1 - aorta) + aorta * rel("aorta", p)
        img = img * (1 - spine) + spine * rel("spine", p)
        timg = ti * (1 + tex_sd * tex)
        if necro is not None:
            timg = timg * (1 - necro) + necro * 0.35 * li
        img = img * (1 - tumor) + tumor * np.clip(timg, 0, None)
        gamma = float(sc.get("contrast_gamma", 1.0))
        if gamma != 1.0:  # another contrast protocol (synth.shift.contrast): relative intensities bent
            img = np.power(np.clip(img, 0, None), gamma)
        img = img * bias * gain
        ns = float(sc["noise_sd"])
        img = np.sqrt((img + ns * rng.standard_normal(shape)) ** 2 + (ns * rng.standard_normal(shape)) ** 2)
        vols[ph] = (float(sc["scale"]) * img + float(sc.get("offset", 0.0))).astype(np.float32)
    mask = (tumor > 0.5).astype(np.uint8)
    return vols, mask, aff


def _save_nifti(path: Path, data: np.ndarray, aff: np.ndarray, dtype: str):
    import nibabel as nib

    if dtype == "int16":
        data = np.clip(np.rint(data), -32768, 32767).astype(np.int16)
    elif dtype == "uint8":
        data = data.astype(np.uint8)
    else:
        data = data.astype(np.float32)
    img = nib.Nifti1Image(data, aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def _save_dicom_series(folder: Path, vol: np.ndarray, aff: np.ndarray, task: dict, phase: str, pnum: int):
    """Write ``vol`` (voxel axes i, j, k with RAS affine ``aff``) as an MR series.

    Requires the in-plane axes to be L (i) and P (j): the DICOM patient frame is LPS, so
    column index = i, row index = j, slice k at ImagePositionPatient = LPS(0, 0, k).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, PYDICOM_IMPLEMENTATION_UID, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    sc = task["scanner"]
    m = aff[:3, :3]
    lps = np.diag([-1.0, -1.0, 1.0])
    mcol = lps @ m[:, 0]  # direction of increasing column index (i), LPS
    mrow = lps @ m[:, 1]  # increasing row index (j)
    mslc = lps @ m[:, 2]
    sx, sy, sz = (float(np.linalg.norm(v)) for v in (mcol, mrow, mslc))
    iop = list(mcol / sx) + list(mrow / sy)
    slope = float(sc.get("rescale_slope", 1.0))
    inter = float(sc.get("rescale_intercept", 0.0))
    stored = np.clip(np.rint((vol - inter) / slope), -32768, 32767).astype(np.int16)
    key = [task["seed"], task["site_name"], task["pid"]]
    study_uid = generate_uid(entropy_srcs=[str(x) for x in key + ["study"]])
    series_uid = generate_uid(entropy_srcs=[str(x) for x in key + ["series", phase]])
    for_uid = generate_uid(entropy_srcs=[str(x) for x in key + ["for"]])
    nz = vol.shape[2]
    prefix = task["mri_cfg"].get("dicom_series_prefix", "IM")
    for k in range(nz):
        sop_uid = generate_uid(entropy_srcs=[str(x) for x in key + ["sop", phase, k]])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.Modality = "MR"
        ds.Manufacturer = "NewAdjSynth"
        ds.StudyDate = "20230101"
        ds.SeriesDate = "20230101"
        ds.StudyTime = "090000"
        ds.PatientName = task["pid"]
        ds.PatientID = task["pid"]
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = for_uid
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.SeriesNumber = pnum + 1
        ds.SeriesDescription = phase
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = "SP"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.RepetitionTime = 4.0
        ds.EchoTime = 2.0
        ds.MagneticFieldStrength = 3.0
        ds.PatientPosition = "FFS"
        ds.ImagePositionPatient = [round(float(v), 4) for v in lps @ (aff[:3, 3] + m[:, 2] * k)]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in iop]
        ds.SliceLocation = round(float((lps @ (aff[:3, 3] + m[:, 2] * k))[2]), 4)
        ds.PixelSpacing = [round(sy, 4), round(sx, 4)]  # [row spacing, column spacing]
        ds.SliceThickness = round(sz, 4)
        ds.SpacingBetweenSlices = round(sz, 4)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = vol.shape[1]
        ds.Columns = vol.shape[0]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = slope
        ds.RescaleIntercept = inter
        ds.RescaleType = "US"
        sl = np.ascontiguousarray(stored[:, :, k].T)  # (rows = j, cols = i)
        ds.WindowCenter = float(np.median(sl) * slope + inter)
        ds.WindowWidth = float(max(1.0, (sl.max() - sl.min()) * slope))
        ds.PixelData = sl.tobytes()
        ds.save_as(folder / f"{prefix}{k + 1:04d}.dcm", enforce_file_format=True)


def _write_mri(task: dict) -> dict:
    vols, mask, aff = _mri_volumes(task)
    sc = task["scanner"]
    pdir = Path(task["site_dir"]) / "mri" / task["pid"]
    pdir.mkdir(parents=True, exist_ok=True)
    written = []
    for p, ph in enumerate(task["phases"]):
        if task["incomplete"] and p == task["drop_phase"]:
            continue
        if sc.get("format", "nifti") == "dicom":
            _save_dicom_series(pdir / ph, vols[ph], aff, task, ph, p)
        else:
            _save_nifti(pdir / f"{ph}.nii.gz", vols[ph], aff, sc.get("dtype", "float32"))
        written.append(ph)
    has_mask = not task["no_mask"]
    if has_mask:
        _save_nifti(pdir / "tumor_mask.nii.gz", mask, aff, "uint8")
    return {"phases": written, "mask": has_mask}
