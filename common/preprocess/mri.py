"""Per-patient MRI preprocessing with MONAI dictionary transforms.

One patient's contrast phases (NIfTI files or DICOM series folders) become one
array of shape ``(n_phases, *roi_size)``:

1. ``LoadImaged``: NIfTI through nibabel, a DICOM series folder (or a single
   ``.dcm``) through MONAI's ``PydicomReader`` (no ITK needed); channel first.
2. ``Orientationd`` to RAS.
3. ``Spacingd`` of the first phase to the common spacing (bilinear).
4. ``ResampleToMatchd``: every other phase (bilinear) and the tumor mask
   (nearest) onto the first phase's resampled grid, so phases acquired with
   different grids, spacings or orientations line up voxel for voxel, with a
   single interpolation each.
5. Per-volume intensity normalisation (z-score over non-zero voxels, or
   percentile scaling).
6. :class:`RoiCropd`: a box around the tumor mask plus ``crop_margin_mm``, or
   when there is no (or an empty) mask around the body foreground, grown to the
   aspect ratio of ``roi_size`` and to at least ``roi_size`` voxels, then
   resized to ``roi_size`` (uniform scale, so shapes are not distorted).
7. ``ConcatItemsd``: phases stacked as channels, cast to ``dtype``.
"""
from __future__ import annotations

import functools
import json
import math
import warnings
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from common.data.images import MedicalImageReader
from monai.transforms import (
    BorderPad,
    Compose,
    ConcatItemsd,
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    ResampleToMatchd,
    Resize,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialCrop,
)

MASK_KEY = "tumor_mask"
IMAGE_KEY = "image"
_DTYPES = {"float16": np.float16, "float32": np.float32}


def _plain(cfg: Any) -> dict:
    """A DictConfig (or any mapping) as a plain dict."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return dict(cfg)


# --- reading -------------------------------------------------------------------------

# --- cropping --------------------------------------------------------------------------

def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D sample (scikit-image)."""
    from skimage.filters import threshold_otsu

    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0 or values.max() <= values.min():
        return float(values.min()) if values.size else 0.0
    return float(threshold_otsu(values, nbins=int(bins)))


class RoiCropd(MapTransform):
    """Crop a box around the tumor (or the body foreground) and resize it to ``roi_size``.

    The bounding box of ``mask_key > 0`` (when present and not empty, else of
    the foreground of ``ref_key``) is grown by ``margin`` voxels per side, then
    symmetrically to the smallest box that contains it, has the proportions of
    ``roi_size`` and is at least ``roi_size``. That box is cut out (padded with
    ``pad_value`` where it leaves the volume) and resized to ``roi_size``: a small
    tumor keeps its native scale, a large one is shrunk uniformly.
    """

    def __init__(self, keys: Sequence[Hashable], ref_key: str, roi_size: Sequence[int], margin: Sequence[int],
                 mask_key: str = MASK_KEY, foreground: Mapping | None = None, pad_value: float = 0.0,
                 resize_mode: str = "trilinear", allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        self.ref_key, self.mask_key = ref_key, mask_key
        self.roi_size = [int(s) for s in roi_size]
        self.margin = [int(m) for m in margin]
        self.foreground = dict(foreground or {"method": "otsu", "bins": 256})
        self.pad_value = float(pad_value)
        self.resize_mode = resize_mode

    def _foreground(self, img: np.ndarray) -> np.ndarray:
        method = self.foreground.get("method", "otsu")
        vals = img[np.isfinite(img)]
        if method == "otsu":
            thr = otsu_threshold(vals, int(self.foreground.get("bins", 256)))
        elif method == "fraction":
            lo, hi = float(vals.min()), float(np.percentile(vals, 99))
            thr = lo + float(self.foreground.get("fraction", 0.1)) * (hi - lo)
        else:
            raise ValueError(f"unknown mri.foreground.method {method!r} (otsu, fraction)")
        return img > thr

    def box(self, data: Mapping) -> tuple[list[int], list[int], str]:
        """(start, end, source) of the crop in voxels of the reference grid; end exclusive."""
        shape = list(data[self.ref_key].shape[1:])
        sel, source = None, "foreground"
        if self.mask_key in data:
            m = np.asarray(data[self.mask_key])[0] > 0
            if m.any():
                sel, source = m, "mask"
            else:
                warnings.warn("tumor mask is empty after resampling; cropping the body foreground instead")
        if sel is None:
            sel = self._foreground(np.asarray(data[self.ref_key], dtype=np.float32)[0])
            if not sel.any():
                sel = np.ones(shape, dtype=bool)
        idx = np.nonzero(sel)
        lo = [int(i.min()) - m for i, m in zip(idx, self.margin)]
        hi = [int(i.max()) + 1 + m for i, m in zip(idx, self.margin)]
        ext = [h - l for l, h in zip(lo, hi)]
        scale = max(1.0, max(e / r for e, r in zip(ext, self.roi_size)))
        start, end = [], []
        for l, h, r in zip(lo, hi, self.roi_size):
            want = max(h - l, int(math.ceil(scale * r - 1e-6)))
            s = (l + h - want) // 2
            start.append(s)
            end.append(s + want)
        return start, end, source

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        start, end, _ = self.box(d)
        shape = list(d[self.ref_key].shape[1:])
        c_start = [max(0, s) for s in start]
        c_end = [min(n, e) for n, e in zip(shape, end)]
        border = []
        for s, e, cs, ce in zip(start, end, c_start, c_end):
            border += [cs - s, e - ce]
        crop = SpatialCrop(roi_start=c_start, roi_end=c_end)
        pad = BorderPad(spatial_border=border, mode="constant", value=self.pad_value) if any(border) else None
        for key in self.key_iterator(d):
            img = crop(d[key])
            if pad is not None:
                img = pad(img)
            if list(img.shape[1:]) != self.roi_size:
                mode = "nearest" if key == self.mask_key else self.resize_mode
                img = Resize(spatial_size=self.roi_size, mode=mode)(img)
            d[key] = img
        return d


# --- pipeline --------------------------------------------------------------------------



def _loader(keys: Sequence[str]) -> LoadImaged:
    # LoadImage also registers MONAI's default readers as fall-backs; some of them
    # warn at construction about optional GPU decoders that a CPU site never has.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LoadImaged(keys=list(keys), reader=MedicalImageReader(), image_only=True, dtype=np.float32)


def margin_voxels(cfg: Mapping) -> list[int]:
    return [int(math.ceil(float(cfg["crop_margin_mm"]) / float(s))) for s in cfg["spacing"]]


def build_mri_transform(cfg: Any, phases: Sequence[str], with_mask: bool) -> Compose:
    """The MONAI pipeline for one patient; input dict maps phase names (and ``tumor_mask``) to paths."""
    cfg = _plain(cfg)
    phases = [str(p) for p in phases]
    if not phases:
        raise ValueError("no MRI phases configured")
    if MASK_KEY in phases or IMAGE_KEY in phases:
        raise ValueError(f"phase names may not be {MASK_KEY!r} or {IMAGE_KEY!r}")
    ref, others = phases[0], phases[1:]
    keys = phases + ([MASK_KEY] if with_mask else [])
    interp = {"image": "bilinear", "mask": "nearest", "resize": "area", **cfg.get("interp", {})}
    spacing = [float(s) for s in cfg["spacing"]]
    roi = [int(s) for s in cfg["roi_size"]]
    if len(spacing) != 3 or len(roi) != 3:
        raise ValueError(f"mri.spacing and mri.roi_size must have 3 entries, got {spacing} and {roi}")

    t: list = [
        _loader(keys),
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys=[ref], pixdim=spacing, mode=interp["image"], padding_mode="zeros"),
    ]
    if others:
        t.append(ResampleToMatchd(keys=others, key_dst=ref, mode=interp["image"], padding_mode="zeros"))
    if with_mask:
        t.append(ResampleToMatchd(keys=[MASK_KEY], key_dst=ref, mode=interp["mask"], padding_mode="zeros"))

    intensity = cfg.get("intensity", "zscore_nonzero")
    if intensity == "zscore_nonzero":
        t.append(NormalizeIntensityd(keys=phases, nonzero=True, channel_wise=True))
    elif intensity == "zscore":
        t.append(NormalizeIntensityd(keys=phases, nonzero=False, channel_wise=True))
    elif intensity == "percentile":
        lo, hi = (float(p) for p in cfg.get("percentiles", [1.0, 99.0]))
        t.append(ScaleIntensityRangePercentilesd(keys=phases, lower=lo, upper=hi, b_min=0.0, b_max=1.0,
                                                 clip=True, channel_wise=True))
    elif intensity not in (None, "none"):
        raise ValueError(f"unknown mri.intensity {intensity!r} (zscore_nonzero, zscore, percentile, none)")

    t += [
        RoiCropd(keys=keys, ref_key=ref, roi_size=roi, margin=margin_voxels(cfg),
                 foreground=cfg.get("foreground"), pad_value=float(cfg.get("pad_value", 0.0)),
                 resize_mode=interp["resize"]),
        ConcatItemsd(keys=phases, name=IMAGE_KEY, dim=0),
        DeleteItemsd(keys=keys),
        EnsureTyped(keys=[IMAGE_KEY], data_type="numpy", dtype=_DTYPES[str(cfg.get("dtype", "float32"))],
                    track_meta=False),
    ]
    return Compose(t)


def preprocess_mri(phase_paths: Mapping[str, Path], mask_path: Path | None, cfg: Any,
                   phases: Sequence[str]) -> np.ndarray:
    """One patient's phases -> ``(len(phases), *roi_size)`` array (``cfg.dtype``).

    ``phase_paths`` maps each phase to a NIfTI file or a DICOM series folder;
    ``mask_path`` is the optional tumor mask (any grid; it is resampled).
    Raises ``FileNotFoundError`` / ``ValueError`` naming the offending file.
    """
    phases = [str(p) for p in phases]
    missing = [p for p in phases if p not in phase_paths]
    if missing:
        raise ValueError(f"missing MRI phase(s) {missing}; have {sorted(phase_paths)}")
    data = {p: str(phase_paths[p]) for p in phases}
    if mask_path is not None:
        data[MASK_KEY] = str(mask_path)
    for key, path in data.items():
        if not Path(path).exists():
            raise FileNotFoundError(f"{path}: {key} file not found")
    transform = _cached_transform(json.dumps(_plain(cfg), sort_keys=True, default=str), tuple(phases),
                                  mask_path is not None)
    try:
        with torch.no_grad():
            out = transform(data)
    except Exception as exc:
        bad = _first_unreadable(data)
        if bad is not None:
            raise ValueError(f"{bad[1]}: cannot read {bad[0]} image ({bad[2]})") from exc
        raise
    return out[IMAGE_KEY]


@functools.lru_cache(maxsize=8)
def _cached_transform(cfg_json: str, phases: tuple, with_mask: bool) -> Compose:
    """One pipeline (and one MONAI loader) per configuration and worker process, not one per patient."""
    return build_mri_transform(json.loads(cfg_json), phases, with_mask)


def _first_unreadable(data: Mapping[str, str]):
    loader = _loader(["x"])
    for key, path in data.items():
        try:
            loader({"x": path})
        except Exception as exc:  # noqa: BLE001 - we only want the name of the bad file
            msg = str(exc).strip().splitlines()
            return key, path, f"{type(exc).__name__}: {msg[0] if msg else ''}"[:300]
    return None
