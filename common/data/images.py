"""The one way the project opens a site's images: MRI volumes through MONAI's readers, slides through tiffslide.

* :class:`MedicalImageReader`: a MONAI ``ImageReader`` that picks nibabel for NIfTI and
  pydicom for a DICOM series folder (or ``.dcm`` file) by the path, so an error names the
  file that failed.  Preprocessing (``common/preprocess/mri.py``) loads with it;
  validation decodes with :func:`read_volume`, which uses it too.
* :func:`open_slide`: a whole-slide image (tiffslide, OpenSlide's API), with
  :func:`slide_mpp` for its level-0 resolution.

Failures raise :class:`common.data.contract.SiteDataError` naming the file.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from monai.data import ImageReader, NibabelReader, PydicomReader

from common.data.contract import NIFTI_SUFFIXES, SiteDataError, _err, _listdir

# MONAI 1.6 logs "nvImageCodec is not available" (a logging call, not a warning) from every
# LoadImage / reader it builds: a GPU decoder a CPU site never has.  Quieted at its logger, at the
# source; real errors of that module still show.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)

MPP_KEYS = ("tiffslide.mpp-x", "openslide.mpp-x", "aperio.MPP")


class MedicalImageReader(ImageReader):
    """NIfTI/Analyze through nibabel, DICOM (series folder or ``.dcm`` file) through pydicom.

    LoadImage tries the user's reader first; choosing by path here keeps the
    error for a bad file about that file instead of a list of reader failures.
    """

    _NIFTI_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".img", ".img.gz")

    def __init__(self):
        super().__init__()
        self.nibabel = NibabelReader()
        # fname_regex=None: only files that really are DICOM (preamble check) are read.
        self.pydicom = PydicomReader(fname_regex=None)
        self._active: ImageReader | None = None

    def _pick(self, name: str) -> ImageReader:
        if Path(name).is_dir() or name.lower().endswith((".dcm", ".dicom", ".ima")):
            return self.pydicom
        return self.nibabel

    def verify_suffix(self, filename) -> bool:
        return True

    def read(self, data, **kwargs):
        names = [str(n) for n in (data if isinstance(data, (list, tuple)) else [data])]
        readers = {type(self._pick(n)) for n in names}
        if len(readers) != 1:
            raise ValueError(f"cannot stack NIfTI and DICOM inputs in one image: {names}")
        self._active = self._pick(names[0])
        for n in names:
            p = Path(n)
            if p.is_dir():
                bad = not_dicom(p)
                if bad is not None:
                    raise ValueError(f"{bad}: not a DICOM file")
        return self._active.read(data, **kwargs)

    def get_data(self, img):
        if self._active is None:
            raise RuntimeError("get_data() called before read()")
        return self._active.get_data(img)


def not_dicom(folder: Path) -> Path | None:
    """The first entry of a DICOM series folder that is not a DICOM file (or a sub-folder), else None."""
    import pydicom

    entries = _listdir(folder)           # hidden files (.DS_Store, ._x) are not the site's data
    if not entries:
        return folder
    for f in entries:
        if not f.is_file() or not pydicom.misc.is_dicom(str(f)):
            return f
    return None


def read_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Decode a whole volume (a .nii / .nii.gz file or a DICOM series folder) as preprocessing would.

    Returns ``(data, affine)``, ``affine`` the 4x4 voxel -> RAS (mm) matrix.  Raises
    :class:`SiteDataError` naming the file that cannot be read.
    """
    path = Path(path)
    if path.is_dir():
        bad = not_dicom(path)
        if bad is not None:
            what = "DICOM series folder is empty" if bad == path else "not a DICOM file"
            raise SiteDataError(_err(str(bad), None, None, what))
    elif not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise SiteDataError(_err(str(path), None, None, "not a NIfTI file (.nii / .nii.gz) or a DICOM folder"))
    reader = MedicalImageReader()
    try:
        data, meta = reader.get_data(reader.read(str(path)))
    except Exception as e:  # nibabel / gzip / zlib / EOF / pydicom errors
        kind = "DICOM series" if path.is_dir() else "NIfTI volume"
        msg = " ".join(str(e).split())[:300]
        raise SiteDataError(_err(str(path), None, None, f"cannot decode {kind} ({type(e).__name__}: {msg})")) from e
    data = np.asarray(data)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return data, np.asarray(meta["affine"], dtype=np.float64)


def open_slide(path: str | Path):
    """A ``tiffslide.TiffSlide`` for a whole-slide image (OpenSlide's API); :class:`SiteDataError` naming
    the file when it is not one."""
    import tiffslide

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "slide file not found", str(path))
    try:
        slide = tiffslide.TiffSlide(str(path))
        _ = slide.level_dimensions, slide.properties
    except Exception as e:  # tifffile raises several types for non-TIFF input
        raise SiteDataError(_err(str(path), None, None,
                                 f"cannot open whole-slide image ({type(e).__name__}: {e})")) from e
    slide._newadj_path = str(path)  # for error messages from functions given the slide object
    return slide


def slide_mpp(slide) -> float | None:
    """Level-0 microns per pixel from the slide's metadata, or None."""
    props = slide.properties
    for key in MPP_KEYS:
        v = props.get(key)
        try:
            if v not in (None, "") and float(v) > 0 and math.isfinite(float(v)):
                return float(v)
        except (TypeError, ValueError):
            pass
    return None
