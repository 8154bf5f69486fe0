"""Synthetic multi-center HCC cohort generator.

``generate_cohort(out_dir, seed, scale, cfg)`` writes a cohort folder with one
sub-folder per center in exactly the layout of the site data contract
(``shared/data-contract.md``)::

    out_dir/
      _truth.csv            # ground truth, OUTSIDE every site folder
      _cohort.json          # summary + seed + scale
      center_a/ ... center_f/ external/
        site.toml           # center_id, display_name, role (train | external)
        clinical.csv        # patient_id, benefit, dfs_months, dfs_event, split (empty), covariates
        genomics.csv        # patient_id + federation gene features (some untested per site)
        mri/<pid>/<phase>.nii.gz          # NIfTI (nibabel) ...
        mri/<pid>/<phase>/IM0001.dcm ...  # ... or a DICOM MR series (pydicom) for one center
        mri/<pid>/tumor_mask.nii.gz       # present for most patients
        pathology/<pid>.tiff              # pyramidal tiled JPEG TIFF with mpp metadata

Every tunable number is in ``conf/synth/default.yaml``.

Latent model (the ground truth)
-------------------------------
Each patient has independent latent factors ``z_mri, z_path, z_gen, z_clin ~ N(0,1)``::

    logit     = b0 + site.b0_offset + a_mri*z_mri + a_path*z_path + a_gen*z_gen + a_clin*z_clin
    true_prob = sigmoid(logit)
    benefit   ~ Bernoulli(true_prob)

With the default ``a_mri = a_path = a_gen = 1.3``, ``a_clin = 0.4`` the oracle AUC of
``true_prob`` is about 0.88, each single latent alone gives about 0.71 and any two
about 0.80, so a multimodal model can beat every single-modality model.

How each latent shows in the data:

* ``z_mri`` (MRI): the tumor's arterial-phase enhancement relative to liver
  (``1 + enh0 + enh_z*z_mri``), its portal/delayed washout (``wash0 + wash_z*z_mri``)
  and its texture heterogeneity (noise sd ``tex0*exp(tex_z*z_mri)``). All are ratios
  to the surrounding liver, so they survive per-volume intensity normalisation and a
  crop around the tumor. Tumor size/position, necrosis, bias field, gain and the
  scanner scale/offset/noise/grid/orientation are nuisances.
* ``z_path`` (pathology): density of small, dark, clustered lymphocyte nuclei
  within tissue (``lymph_density0*exp(lymph_z*z_path)`` per 1000 um^2). Tumor nuclei
  density, tissue fraction and the per-center stain colour shift (stain vectors,
  concentrations, background) are nuisances.
* ``z_gen`` (genomics): P(CTNNB1_mut) = sigmoid(-1.3 - 1.0*z_gen); CXCL9_expr,
  IFNG_expr, CD274_expr = coef*z_gen + noise. All other genes are noise.
* ``z_clin`` (clinical): log10(AFP) = mean - 0.6*z_clin + noise; small weight.

DFS (months) is Weibull with proportional hazards,
``log HR = hr_benefit*benefit + hr_latent*(z_mri+z_path+z_gen)/sqrt(3) + hr_clin*z_clin``
(lower hazard for benefit = 1), censored administratively at a follow-up time
~ U(followup_min, followup_max) (about 30 % censored).

Missing modalities are drawn per patient (no MRI, one phase missing, no tumor mask,
no slide, no genomics row) with configurable rates; never all three at once.

Determinism: every random draw comes from ``numpy.random.default_rng`` seeded with
``(seed, site index, patient index, stream)``, so the same seed and scale give
byte-identical files whatever the number of workers.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd

from common.config import CONF_DIR, deep_merge, to_plain

DEFAULT_CONFIG = CONF_DIR / "synth" / "default.yaml"
DATA_CONFIG = CONF_DIR / "data" / "default.yaml"

TRUTH_FILE = "_truth.csv"
COHORT_FILE = "_cohort.json"

# random stream ids (4th element of the seed sequence)
_S_TABLE, _S_MRI, _S_PATH = 0, 1, 2


# --------------------------------------------------------------------------- config
def _load_yaml(path: Path) -> dict:
    import yaml

    with open(path) as f:
        return yaml.safe_load(f) or {}


def load_config(cfg: dict | None = None) -> dict:
    """Default synth config deep-merged with ``cfg``; phases/genes resolved."""
    base = _load_yaml(DEFAULT_CONFIG)
    if cfg is not None:
        cfg = to_plain(cfg)
        if "synth" in cfg and "sites" not in cfg and isinstance(cfg["synth"], dict):
            cfg = cfg["synth"]  # a whole Hydra root config was passed
        base = deep_merge(base, cfg)
    data_cfg = None
    if base.get("phases") is None or base.get("genomic_features") is None:
        data_cfg = _load_yaml(DATA_CONFIG) if DATA_CONFIG.exists() else {}
    if base.get("phases") is None:
        base["phases"] = list(data_cfg.get("phases") or ["arterial", "portal", "delayed"])
    if base.get("genomic_features") is None:
        base["genomic_features"] = list(data_cfg.get("genomic_features") or [])
    return base


def _rng(seed: int, site_idx: int, pidx: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), site_idx, pidx + 1, stream]))


def _sigmoid(x):
    from scipy.special import expit

    return expit(x)


# --------------------------------------------------------------------------- tables
def _site_tables(cfg: dict, site: dict, site_idx: int, n: int, seed: int):
    """Latents, labels, clinical, genomics and missingness for one site (main process)."""
    lat = cfg["latent"]
    rng = _rng(seed, site_idx, -1, _S_TABLE)
    z = rng.standard_normal((n, 4))
    z_mri, z_path, z_gen, z_clin = z.T
    logit = (lat["b0"] + site.get("b0_offset", 0.0) + lat["a_mri"] * z_mri
             + lat["a_path"] * z_path + lat["a_gen"] * z_gen + lat["a_clin"] * z_clin)
    prob = _sigmoid(logit)
    benefit = (rng.random(n) < prob).astype(int)

    # DFS -----------------------------------------------------------------
    d = cfg["dfs"]
    lp = (d["hr_benefit"] * benefit + d["hr_latent"] * (z_mri + z_path + z_gen) / math.sqrt(3)
          + d["hr_clin"] * z_clin)
    u = rng.random(n)
    t_event = d["weibull_scale_months"] * (-np.log(1 - u) / np.exp(lp)) ** (1 / d["weibull_shape"])
    follow = rng.uniform(d["followup_min_months"], d["followup_max_months"], n)
    dfs = np.maximum(np.minimum(t_event, follow), d["min_months"])
    event = (t_event <= follow).astype(int)

    # clinical ------------------------------------------------------------
    c = cfg["clinical"]
    age = np.clip(rng.normal(c["age_mean"], c["age_sd"], n), 18, 75).round(0)
    cp = rng.choice(c["child_pugh_values"], size=n, p=_norm_p(c["child_pugh_probs"]))
    ecog = rng.choice(c["ecog_values"], size=n, p=_norm_p(c["ecog_probs"]))
    log_afp = c["log10_afp_mean"] + c["log10_afp_clin_coef"] * z_clin + rng.normal(0, c["log10_afp_noise_sd"], n)
    afp = np.round(10 ** log_afp, 1)
    tcount = 1 + rng.poisson(c["tumor_count_poisson"], n)
    diam = np.clip(np.exp(rng.normal(c["max_diameter_log_mean"], c["max_diameter_log_sd"], n)), 1, 20).round(1)
    prior = (rng.random(n) < c["p_prior_treatment"]).astype(int)
    bclc_b = ((tcount >= 2) | (diam > 5)).astype(int)
    flip = rng.random(n) < c["p_bclc_b_flip"]
    bclc_b = np.where(flip, 1 - bclc_b, bclc_b)
    oor = rng.random(n) < c["p_out_of_range"]
    which = rng.integers(0, 3, n)
    oor_cp = rng.integers(8, 10, n)
    oor_age = rng.integers(76, 89, n)
    cp = np.where(oor & (which == 0), oor_cp, cp)
    ecog = np.where(oor & (which == 1), 2, ecog)
    age = np.where(oor & (which == 2), oor_age, age)

    # missingness ---------------------------------------------------------
    m = deep_merge(cfg["missing"], site.get("missing") or {})
    no_mri = rng.random(n) < m["p_no_mri"]
    incomplete = (rng.random(n) < m["p_incomplete_phases"]) & ~no_mri
    drop_phase = rng.integers(0, len(cfg["phases"]), n)
    no_mask = rng.random(n) < m["p_no_mask"]
    no_slide = rng.random(n) < m["p_no_slide"]
    no_gen = rng.random(n) < m["p_no_genomics"]
    restore = rng.integers(0, 3, n)
    unlabeled = rng.random(n) < m.get("p_unlabeled", 0.0)
    # "has MRI" for the all-missing rule means a complete, usable phase set
    all_missing = (no_mri | incomplete) & no_slide & no_gen
    for i in np.flatnonzero(all_missing):
        if restore[i] == 0:
            no_mri[i] = False
            incomplete[i] = False
        elif restore[i] == 1:
            no_slide[i] = False
        else:
            no_gen[i] = False

    pids = [f"{site.get('pid_prefix', site['name'][:2].upper())}{i + 1:04d}" for i in range(n)]
    clinical = pd.DataFrame({
        "patient_id": pids,
        "benefit": pd.array(np.where(unlabeled, pd.NA, benefit), dtype="Int64"),
        "dfs_months": np.where(unlabeled, np.nan, np.round(dfs, 1)),
        "dfs_event": pd.array(np.where(unlabeled, pd.NA, event), dtype="Int64"),
        "split": [""] * n,
        "age": age.astype(int),
        "child_pugh": cp.astype(int),
        "ecog": ecog.astype(int),
        "afp_ng_ml": afp,
        "tumor_count": tcount.astype(int),
        "max_diameter_cm": diam,
        "prior_treatment": prior,
        "bclc_b": bclc_b.astype(int),
    })

    genomics = _genomics(cfg, site, rng, z_gen, pids)
    genomics = genomics.loc[~no_gen].reset_index(drop=True)

    truth = pd.DataFrame({
        "site": site["name"], "role": site.get("role", "train"), "patient_id": pids,
        "true_prob": np.round(prob, 6), "z_mri": np.round(z_mri, 6), "z_path": np.round(z_path, 6),
        "z_gen": np.round(z_gen, 6), "z_clin": np.round(z_clin, 6), "benefit": benefit,
    })
    flags = dict(no_mri=no_mri, incomplete=incomplete, drop_phase=drop_phase, no_mask=no_mask,
                 no_slide=no_slide, no_gen=no_gen)
    return pids, clinical, genomics, truth, flags, (z_mri, z_path)


def _norm_p(p):
    p = np.asarray(p, float)
    return p / p.sum()


def _genomics(cfg, site, rng, z_gen, pids) -> pd.DataFrame:
    g = cfg["genomics"]
    n = len(pids)
    feats = cfg["genomic_features"]
    cols: dict[str, np.ndarray] = {}
    amp_shared = rng.random(n) < g["cnv_amp_rate"]
    amp_size = rng.uniform(0.8, 2.0, n)
    for f in feats:
        inf = g["informative"].get(f)
        if f.endswith("_mut"):
            if inf is not None:
                p = _sigmoid(inf["logit0"] + inf["coef"] * z_gen)
            else:
                p = np.full(n, g["mutation_rates"].get(f, g["default_mutation_rate"]))
            v = (rng.random(n) < p).astype(float)
        elif f.endswith("_cnv"):
            v = rng.normal(0, g["cnv_noise_sd"], n)
            if f in g.get("cnv_co_amplified", []):
                v = v + np.where(amp_shared, amp_size, 0.0)
            else:
                amp = rng.random(n) < g["cnv_amp_rate"]
                v = v + np.where(amp, rng.uniform(0.8, 2.0, n), 0.0)
            if inf is not None:
                v = v + inf.get("coef", 0.0) * z_gen
        else:  # expression z-score (or any other numeric feature)
            if inf is not None:
                v = inf["coef"] * z_gen + rng.normal(0, inf.get("noise_sd", 1.0), n)
            else:
                v = rng.normal(0, g["expr_noise_sd"], n)
        cols[f] = np.round(v, g["decimals"])
    df = pd.DataFrame({"patient_id": pids, **cols})
    for f in site.get("genomics_untested_empty") or []:
        if f in df:
            df[f] = np.nan
    absent = [f for f in site.get("genomics_untested_absent") or [] if f in df]
    return df.drop(columns=absent)


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
    r0 = rng.uniform(*mc["tumor_radius_mm"])
    tr = r0 * (1 + 0.12 * rng.standard_normal(3)).clip(0.75, 1.25)
    tumor = ellipsoid(tc, tr) * liver.clip(0, 1)
    necro = None
    if rng.random() < mc["p_necrosis"]:
        necro = ellipsoid(tc, tr * rng.uniform(0.3, 0.5)) * tumor

    z = task["z_mri"]
    enh = mc["enh0"] + mc["enh_z"] * z + mc["enh_noise"] * rng.standard_normal()
    wash = [mc["wash0"] + mc["wash_z"] * z, mc["wash0_delayed"] + mc["wash_z_delayed"] * z]
    tex_sd = mc["tex0"] * math.exp(mc["tex_z"] * z)
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


# --------------------------------------------------------------------------- pathology
def _upsample(x: np.ndarray, shape, step: int = 4) -> np.ndarray:
    """Bilinear upsampling to ``shape / step`` then nearest x``step`` (cheap, smooth enough)."""
    from scipy.ndimage import zoom

    mid = (-(-shape[0] // step), -(-shape[1] // step))
    y = zoom(x, (mid[0] / x.shape[0], mid[1] / x.shape[1]), order=1, mode="nearest", grid_mode=True)
    y = y[: mid[0], : mid[1]]
    y = np.repeat(np.repeat(y, step, axis=0), step, axis=1)
    return np.ascontiguousarray(y[: shape[0], : shape[1]])


def _stamp_blobs(shape, pos_flat: np.ndarray, amp: np.ndarray, sigma: float) -> np.ndarray:
    """Sum of isotropic Gaussian blobs (peak ``amp``) centred at flat pixel indices."""
    h, w = shape
    r = max(1, int(math.ceil(2.5 * sigma)))
    off = np.arange(-r, r + 1)
    dy, dx = np.meshgrid(off, off, indexing="ij")
    ker = np.exp(-(dy * dy + dx * dx) / (2 * sigma * sigma)).astype(np.float32).ravel()
    dy, dx = dy.ravel(), dx.ravel()
    out = np.zeros(h * w, np.float32)
    cy, cx = pos_flat // w, pos_flat % w
    chunk = max(1, 2_000_000 // ker.size)
    for s0 in range(0, pos_flat.size, chunk):
        yy = cy[s0:s0 + chunk, None] + dy[None, :]
        xx = cx[s0:s0 + chunk, None] + dx[None, :]
        ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        vals = (amp[s0:s0 + chunk, None] * ker[None, :])[ok]
        out += np.bincount((yy * w + xx)[ok], weights=vals, minlength=h * w).astype(np.float32)
    return out.reshape(shape)


def _slide_rgb(task: dict) -> tuple[np.ndarray, float]:
    from scipy.ndimage import gaussian_filter

    pc, st = task["path_cfg"], task["stain"]
    rng = _rng(task["seed"], task["site_idx"], task["pidx"], _S_PATH)
    h_px, w_px = int(pc["size_px"][0]), int(pc["size_px"][1])
    mpp = float(pc["mpp"])
    lf = int(pc["lowres_factor"])
    lh, lw = max(8, h_px // lf), max(8, w_px // lf)

    # tissue mask: blobby low-res field biased to the centre, thresholded at a quantile
    yy, xx = np.mgrid[0:lh, 0:lw].astype(np.float32)
    cy, cx = lh / 2 + rng.normal(0, lh * 0.08), lw / 2 + rng.normal(0, lw * 0.08)
    rad = np.sqrt(((yy - cy) / (lh * 0.45)) ** 2 + ((xx - cx) / (lw * 0.45)) ** 2)
    field = gaussian_filter(rng.standard_normal((lh, lw)).astype(np.float32), lh / 10, mode="reflect")
    field = field / (field.std() + 1e-8) - 1.6 * rad
    frac = rng.uniform(*pc["tissue_fraction"])
    thr = np.quantile(field, 1 - frac)
    tissue_lr = _sigmoid((field - thr) / 0.03).astype(np.float32)
    stroma_lr = gaussian_filter(rng.standard_normal((lh, lw)).astype(np.float32), 1.5)
    stroma_lr = stroma_lr / (stroma_lr.std() + 1e-8)
    clus_lr = gaussian_filter(rng.standard_normal((lh, lw)).astype(np.float32), 2.0)
    clus_lr = clus_lr / (clus_lr.std() + 1e-8)

    shape = (h_px, w_px)
    tissue = np.clip(_upsample(tissue_lr, shape), 0, 1)
    stroma = _upsample(stroma_lr, shape)
    clus = _upsample(clus_lr, shape)

    # fibrous texture: anisotropic smoothed noise at half resolution
    hh, hw = -(-h_px // 2), -(-w_px // 2)
    fib = gaussian_filter(rng.standard_normal((hh, hw)).astype(np.float32), (0.6, 3.0), truncate=2.5)
    fib = np.repeat(np.repeat(fib / (fib.std() + 1e-8), 2, axis=0), 2, axis=1)[:h_px, :w_px]

    tissue_area_um2 = float(tissue.sum()) * mpp * mpp

    def nuclei(density_per_1000, radius_um, weight):
        """Poisson nuclei over tissue (density per 1000 um^2), placed with prob ~ weight."""
        n = int(rng.poisson(max(density_per_1000 * tissue_area_um2 / 1000.0, 0.0)))
        if n == 0:
            return np.zeros(shape, np.float32)
        pflat = weight.ravel()
        pmax = float(pflat.max())
        keep = np.empty(0, np.int64)
        while keep.size < n:  # rejection sampling of positions with prob ~ weight
            m = int((n - keep.size) * pmax / max(float(pflat.mean()), 1e-6) * 1.2) + 64
            pos = rng.integers(0, pflat.size, m)
            keep = np.concatenate([keep, pos[rng.random(m) * pmax < pflat[pos]]])
        keep = keep[:n]
        amp = rng.uniform(0.8, 1.25, n).astype(np.float32)
        g = _stamp_blobs(shape, keep, amp, radius_um / mpp / 1.4)
        return np.clip((g - 0.4) * 4.0, 0, 1)

    z = task["z_path"]
    lymph_den = pc["lymph_density0"] * math.exp(pc["lymph_z"] * z)
    lymph_w = tissue * np.exp(float(pc["lymph_clustering"]) * 1.5 * clus).astype(np.float32)
    lymph = nuclei(lymph_den, pc["lymph_radius_um"], lymph_w)
    tum = nuclei(rng.uniform(*pc["tumor_density"]), pc["tumor_radius_um"], tissue)

    nuc = np.maximum(lymph, tum)
    ch = tissue * (pc["stroma_h"] + pc["lymph_h"] * lymph + pc["tumor_h"] * tum * (1 - lymph))
    e_lo, e_hi = pc["stroma_e"]
    ce = tissue * (e_lo + (e_hi - e_lo) * _sigmoid(0.8 * stroma + 0.5 * fib)) * (1 - 0.6 * nuc)
    ch *= np.float32(st.get("h_scale", 1.0) * math.log(10))
    ce *= np.float32(st.get("e_scale", 1.0) * math.log(10))

    def vec(base, shift):
        v = np.asarray(base, float) + np.asarray(shift or [0, 0, 0], float)
        v = np.clip(v, 0.01, None)
        return (v / np.linalg.norm(v)).astype(np.float32)

    hv = vec(pc["h_vector"], st.get("h_shift"))
    ev = vec(pc["e_vector"], st.get("e_shift"))
    bg = np.float32(st.get("background", 245))
    rgb = np.empty(shape + (3,), np.uint8)
    noise = rng.standard_normal(shape, dtype=np.float32) * np.float32(pc["pixel_noise"])
    for c in range(3):
        img = np.exp(-(ch * hv[c] + ce * ev[c])) * bg + noise
        np.clip(img, 0, 255, out=img)
        rgb[..., c] = img
    return rgb, mpp


def _write_slide(path: Path, rgb: np.ndarray, mpp: float, pc: dict):
    import tifffile

    tile = int(pc["tile"])
    levels = [rgb]
    while min(levels[-1].shape[:2]) // 2 >= int(pc["min_level_px"]):
        a = levels[-1]
        h2, w2 = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
        a = a[:h2, :w2].astype(np.uint16)
        d = (a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2] + 2) // 4
        levels.append(d.astype(np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    opts = dict(tile=(tile, tile), photometric="rgb", compression="jpeg",
                compressionargs={"level": int(pc["jpeg_quality"])}, resolutionunit="CENTIMETER",
                metadata=None)
    with tifffile.TiffWriter(path) as tw:
        res0 = 1e4 / mpp
        tw.write(levels[0], subifds=len(levels) - 1, resolution=(res0, res0),
                 description=f"NewAdjSynth H&E mpp={mpp}", software="newadj-synth", **opts)
        for lv, a in enumerate(levels[1:], start=1):
            r = res0 / (2 ** lv)
            tw.write(a, subfiletype=1, resolution=(r, r), **opts)
    return len(levels)


# --------------------------------------------------------------------------- worker
def _patient_job(task: dict) -> dict:
    out = {"site": task["site_name"], "pid": task["pid"], "mri": None, "slide": False}
    if task["do_mri"]:
        out["mri"] = _write_mri(task)
    if task["do_slide"]:
        rgb, mpp = _slide_rgb(task)
        _write_slide(Path(task["site_dir"]) / "pathology" / f"{task['pid']}.tiff", rgb, mpp, task["path_cfg"])
        out["slide"] = True
    return out


def _write_site_toml(path: Path, site: dict, site_idx: int):
    def q(s):
        return json.dumps(str(s))  # TOML basic strings are JSON-compatible for plain text

    lines = [
        f"center_id = {q(site.get('center_id', site['name']))}",
        f"display_name = {q(site.get('display_name', site['name']))}",
        f"role = {q(site.get('role', 'train'))}",
        f"notes = {q('synthetic cohort (common/synth.py); scanner ' + str(site['mri'].get('format', 'nifti')))}",
    ]
    path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- main entry
def generate_cohort(out_dir: Path, seed: int = 0, scale: float = 1.0, cfg: dict | None = None,
                    progress: bool = True, workers: int | None = None) -> dict:
    """Write a synthetic multi-center cohort to ``out_dir``; returns the summary dict.

    ``cfg`` is (part of) ``conf/synth/default.yaml`` as a plain dict, merged over the
    default. ``workers``: processes for the image writing (default: CPU count;
    1 = in-process). Existing site folders of the same names are replaced.
    """
    t0 = time.perf_counter()
    cfg = load_config(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    phases = list(cfg["phases"])
    endpoints = set(cfg.get("endpoints") or ())
    modalities = set(cfg.get("modalities") or ())
    for what, got, known in (("endpoints", endpoints, {"benefit", "dfs"}),
                             ("modalities", modalities, {"mri", "pathology", "genomics"})):
        if got - known:
            raise ValueError(f"synth.{what}: unknown {sorted(got - known)} (choose from {sorted(known)})")

    sites = cfg["sites"]
    tasks: list[dict] = []
    truths, summary_sites = [], {}
    for si, site in enumerate(sites):
        n = max(int(cfg.get("min_site_patients", 8)), int(round(float(site["n"]) * float(scale))))
        sdir = out_dir / site["name"]
        if sdir.exists():
            shutil.rmtree(sdir)
        sdir.mkdir(parents=True)
        pids, clinical, genomics, truth, fl, (z_mri, z_path) = _site_tables(cfg, site, si, n, seed)
        _write_site_toml(sdir / "site.toml", site, si)
        keep = ["patient_id", *(["benefit"] if "benefit" in endpoints else []),
                *(["dfs_months", "dfs_event"] if "dfs" in endpoints else []), "split"]
        if cfg.get("clinical_covariates", True):
            keep += [c for c in clinical.columns if c not in ("patient_id", "benefit", "dfs_months", "dfs_event",
                                                              "split")]
        clinical[keep].to_csv(sdir / "clinical.csv", index=False)
        if "genomics" in modalities:
            genomics.to_csv(sdir / "genomics.csv", index=False)
        fl["no_mri"] |= "mri" not in modalities
        fl["no_slide"] |= "pathology" not in modalities
        truths.append(truth)
        path_cfg = deep_merge(cfg["pathology"], site.get("pathology") or {})
        scanner = dict(site["mri"])
        if scanner.get("format", "nifti") == "dicom":
            ax = scanner.get("axcodes", "LPS").upper()
            if ax[:2] != "LP":
                raise ValueError(f"{site['name']}: DICOM sites need axcodes starting with 'LP' (got {ax})")
        for i, pid in enumerate(pids):
            do_mri = not fl["no_mri"][i]
            do_slide = not fl["no_slide"][i]
            if not (do_mri or do_slide):
                continue
            tasks.append(dict(
                seed=int(seed), site_idx=si, pidx=i, pid=pid, site_name=site["name"], site_dir=str(sdir),
                phases=phases, mri_cfg=cfg["mri"], scanner=scanner, path_cfg=path_cfg,
                stain=site.get("stain") or {}, z_mri=float(z_mri[i]), z_path=float(z_path[i]),
                do_mri=do_mri, do_slide=do_slide, incomplete=bool(fl["incomplete"][i]),
                drop_phase=int(fl["drop_phase"][i]), no_mask=bool(fl["no_mask"][i]),
            ))
        n_mri_complete = int((~fl["no_mri"] & ~fl["incomplete"]).sum())
        summary_sites[site["name"]] = {
            "role": site.get("role", "train"),
            "display_name": site.get("display_name", site["name"]),
            "n_patients": n,
            "n_mri": int((~fl["no_mri"]).sum()),
            "n_mri_complete": n_mri_complete,
            "n_tumor_mask": int((~fl["no_mri"] & ~fl["no_mask"]).sum()),
            "n_pathology": int((~fl["no_slide"]).sum()),
            "n_genomics": int((~fl["no_gen"]).sum()) if "genomics" in modalities else 0,
            "n_labeled": int(clinical["benefit"].notna().sum()) if "benefit" in endpoints else 0,
            "n_benefit": int(truth["benefit"].sum()),
            "mri_format": scanner.get("format", "nifti"),
            "mri_shape": [int(s) for s in scanner["shape"]],
            "mri_spacing": [float(s) for s in scanner["spacing"]],
            "mri_axcodes": scanner.get("axcodes", "RAS"),
            "slide_mpp": float(path_cfg["mpp"]),
            "slide_size_px": [int(s) for s in path_cfg["size_px"]],
        }

    truth_df = pd.concat(truths, ignore_index=True)
    truth_df.to_csv(out_dir / TRUTH_FILE, index=False)

    # ---- images (the expensive part) ----
    if workers is None:
        workers = os.cpu_count() or 1
    workers = max(1, min(int(workers), len(tasks) or 1))
    # slides dominate the cost: schedule slide jobs first for better load balance
    order = sorted(range(len(tasks)), key=lambda k: (not tasks[k]["do_slide"], k))
    _run_jobs([tasks[k] for k in order], workers, progress)

    summary = {
        "seed": int(seed),
        "scale": float(scale),
        "phases": phases,
        "genomic_features": list(cfg["genomic_features"]),
        "n_patients": int(sum(s["n_patients"] for s in summary_sites.values())),
        "n_train_patients": int(sum(s["n_patients"] for s in summary_sites.values() if s["role"] != "external")),
        "sites": summary_sites,
        "oracle_auc_external": _safe_auc(truth_df[truth_df["role"] == "external"]),
        "oracle_auc_all": _safe_auc(truth_df),
        "truth_csv": TRUTH_FILE,
    }
    (out_dir / COHORT_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    summary = dict(summary, elapsed_s=round(time.perf_counter() - t0, 2), out_dir=str(out_dir))
    return summary


def _run_jobs(tasks: list[dict], workers: int, progress: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    cols = (TextColumn("[bold]synth[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*cols, disable=not progress, transient=False) as bar:
        tid = bar.add_task("patients", total=len(tasks))
        if workers <= 1:
            for t in tasks:
                _patient_job(t)
                bar.advance(tid)
            return
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                                 initializer=_worker_init) as ex:
            futs = [ex.submit(_patient_job, t) for t in tasks]
            for f in as_completed(futs):
                f.result()
                bar.advance(tid)


def _worker_init():  # keep every worker single-threaded (we parallelise over patients)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(k, "1")


# --------------------------------------------------------------------------- oracle
def _safe_auc(df: pd.DataFrame) -> float | None:
    from sklearn.metrics import roc_auc_score

    if len(df) == 0 or df["benefit"].nunique() < 2:
        return None
    return float(roc_auc_score(df["benefit"], df["true_prob"]))


def oracle_auc(truth_csv, site: str | None = None) -> float | None:
    """AUC of the true benefit probability vs the drawn benefit label.

    ``site=None``: the external site(s) (``role == "external"``; falls back to the site
    named ``external``); ``site="all"``: every patient; otherwise that site's name.
    Returns None when the selection has a single class.
    """
    df = pd.read_csv(truth_csv)
    if site is None:
        sel = df[df["role"] == "external"] if "role" in df else df[df["site"] == "external"]
    elif site == "all":
        sel = df
    else:
        sel = df[df["site"] == site]
    return _safe_auc(sel)
