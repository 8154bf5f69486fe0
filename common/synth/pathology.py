"""The synthetic cohort's H&E slides: tissue, nuclei whose lymphocyte density carries z_path, each site's
stain, written as pyramidal TIFF."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from common.synth._config import _S_PATH, _rng, _sigmoid  # noqa: F401


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
    sig = task.get("signal") or {}
    # default: z_path sets the lymphocyte density; nuclear_size: the tumor nuclei's size and hematoxylin
    size_z = float(sig["nuclear_size_z"]) if sig.get("pathology", "lymphocytes") == "nuclear_size" else 0.0
    lymph_den = pc["lymph_density0"] * math.exp((0.0 if size_z else pc["lymph_z"]) * z)
    lymph_w = tissue * np.exp(float(pc["lymph_clustering"]) * 1.5 * clus).astype(np.float32)
    lymph = nuclei(lymph_den, pc["lymph_radius_um"], lymph_w)
    tum = nuclei(rng.uniform(*pc["tumor_density"]), pc["tumor_radius_um"] * math.exp(size_z * z), tissue)
    tumor_h = pc["tumor_h"] * math.exp(0.5 * size_z * z)

    nuc = np.maximum(lymph, tum)
    ch = tissue * (pc["stroma_h"] + pc["lymph_h"] * lymph + tumor_h * tum * (1 - lymph))
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
