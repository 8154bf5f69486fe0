"""The only reader of a center's site data folder (see shared/data-contract.md).

Layout::

    <site_dir>/
      site.toml                           optional: center_id, display_name, role, notes
      clinical.csv                        required, one row per patient
      genomics.csv                        optional
      mri/<patient_id>/<phase>.nii.gz     or mri/<patient_id>/<phase>/ (DICOM series)
      mri/<patient_id>/tumor_mask.nii.gz  optional
      pathology/<patient_id>.<svs|tif|tiff|ndpi>

``SiteData.open`` parses the tables and lists the image files; it never decodes an
image (``read_volume`` / ``open_slide`` do, and ``common.data.validation`` uses them).
Every problem found is a :class:`Problem` naming the file (relative to the site
folder), the 1-based CSV line and the column.  Nothing here writes to the folder.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "DEFAULT_PHASES",
    "SLIDE_EXTENSIONS",
    "Problem",
    "SiteDataError",
    "PatientRecord",
    "SiteData",
    "assign_split",
    "read_volume",
    "open_slide",
    "PATIENT_ID_RE",
]

DEFAULT_PHASES: tuple[str, ...] = ("arterial", "portal", "delayed")
DEFAULT_CACHE_DIR = ".newadj-cache"
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
TUMOR_MASK = "tumor_mask"
PATIENT_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
SPLITS = ("train", "val", "test")
ROLES = ("train", "external")
RESERVED_CLINICAL = ("patient_id", "benefit", "dfs_months", "dfs_event", "split")
SITE_TOML_KEYS = ("center_id", "display_name", "role", "notes")
# Cells read as "missing" besides the empty cell (what common tools write for NaN).
MISSING_TOKENS = frozenset({"", "na", "nan", "n/a", "null", "none"})

CLINICAL_CSV = "clinical.csv"
GENOMICS_CSV = "genomics.csv"
SITE_TOML = "site.toml"


# --------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class Problem:
    severity: str  # "error" | "warning"
    file: str  # relative to the site folder
    row: int | None  # 1-based line in the CSV (header = 1); None if n/a
    field: str | None  # column / phase / key
    message: str

    def __str__(self) -> str:
        loc = self.file if self.row is None else f"{self.file}:{self.row}"
        if self.field:
            loc += f" [{self.field}]"
        return f"{loc} {self.message}"

    @property
    def is_error(self) -> bool:
        return self.severity == "error"


class SiteDataError(Exception):
    """Raised when site data cannot be used; ``.problems`` lists every problem found."""

    def __init__(self, problems: Problem | Iterable[Problem], header: str | None = None):
        if isinstance(problems, Problem):
            problems = [problems]
        self.problems: list[Problem] = list(problems)
        self.header = header
        super().__init__(self._text())

    def _text(self) -> str:
        errors = [p for p in self.problems if p.severity == "error"]
        lines = [self.header or f"{len(errors)} error(s) in site data"]
        lines += [f"  {p.severity}: {p}" for p in self.problems]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self._text()


def _err(file: str, row: int | None, fld: str | None, msg: str) -> Problem:
    return Problem("error", file, row, fld, msg)


def _warn(file: str, row: int | None, fld: str | None, msg: str) -> Problem:
    return Problem("warning", file, row, fld, msg)


# --------------------------------------------------------------------------- records


@dataclass
class PatientRecord:
    patient_id: str
    row: int  # line in clinical.csv
    benefit: int | None = None
    dfs_months: float | None = None
    dfs_event: int | None = None
    split: str = "train"  # resolved: train | val | test
    clinical: dict[str, float | None] = field(default_factory=dict)
    genomics: dict[str, float | None] | None = None
    mri: dict[str, Path] = field(default_factory=dict)  # phase -> .nii(.gz) or DICOM dir
    tumor_mask: Path | None = None
    slide: Path | None = None
    phases: tuple[str, ...] = field(default=DEFAULT_PHASES, repr=False)

    def mri_complete(self, phases: Sequence[str] | None = None) -> bool:
        """True when every phase (default: the phases the site was opened with) is present."""
        phases = self.phases if phases is None else tuple(phases)
        return bool(phases) and all(p in self.mri for p in phases)

    @property
    def labeled(self) -> bool:
        return self.benefit is not None

    @property
    def has_survival(self) -> bool:
        return self.dfs_months is not None and self.dfs_event is not None


class HasProblems:
    """``errors`` / ``warnings`` views of a ``problems`` list (site data and validation reports)."""

    problems: list

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]


@dataclass
class SiteData(HasProblems):
    root: Path
    center_id: str
    display_name: str
    role: str  # train | external
    patients: list[PatientRecord]
    genomic_columns: list[str]
    clinical_columns: list[str]
    problems: list[Problem] = field(default_factory=list)
    phases: tuple[str, ...] = DEFAULT_PHASES
    notes: str | None = None

    def split(self, name: str) -> list[PatientRecord]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return [p for p in self.patients if p.split == name]

    def patient(self, patient_id: str) -> PatientRecord:
        for p in self.patients:
            if p.patient_id == patient_id:
                return p
        raise KeyError(patient_id)

    @classmethod
    def open(
        cls,
        site_dir: str | Path,
        phases: Sequence[str] = DEFAULT_PHASES,
        val_fraction: float = 0.2,
        strict: bool = True,
        cache_dir: str | Path = DEFAULT_CACHE_DIR,
    ) -> "SiteData":
        """Parse site.toml, clinical.csv, genomics.csv and list mri/ and pathology/.

        Images are not decoded.  With ``strict=True`` any error-level problem raises
        :class:`SiteDataError` (listing all problems); with ``strict=False`` the
        problems are in ``.problems`` and the rows that could be read are kept.
        """
        reader = _SiteReader(Path(site_dir), tuple(phases), float(val_fraction), cache_dir)
        site = reader.read()
        if strict and site.errors:
            raise SiteDataError(
                site.problems,
                header=f"site folder {site.root} has {len(site.errors)} error(s)",
            )
        return site


# --------------------------------------------------------------------------- helpers


def assign_split(patient_id: str, val_fraction: float) -> str:
    """Deterministic train/val assignment from sha256(patient_id)."""
    digest = hashlib.sha256(patient_id.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return "val" if u < val_fraction else "train"


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("~$") or name in ("__MACOSX", "Thumbs.db", "desktop.ini")


def _listdir(path: Path) -> list[Path]:
    return sorted((p for p in path.iterdir() if not _is_hidden(p.name)), key=lambda p: p.name)


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _decode_csv(data: bytes, file: str) -> tuple[str | None, Problem | None]:
    """utf-8 / utf-8-sig only; anything else is an error naming the line of the bad byte."""
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError as e:
        # utf-8-sig reports offsets in the data after the BOM
        start = e.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data[:start].count(b"\n") + 1
        col = start - (data.rfind(b"\n", 0, start) + 1) + 1
        bad = data[start : start + 1].hex()
        hint = ""
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            hint = " (looks like UTF-16)"
        return None, _err(
            file,
            line,
            None,
            f"not valid UTF-8{hint}: byte 0x{bad} at line {line}, column {col}; "
            "save the file as UTF-8 (other encodings are not guessed)",
        )


@dataclass
class _Table:
    columns: list[str]
    rows: list[tuple[int, dict[str, str]]]  # (line number, column -> stripped cell)


def _read_csv(path: Path, file: str, problems: list[Problem]) -> _Table | None:
    """Read a CSV file; returns None (and records an error) when it is unusable."""
    try:
        data = path.read_bytes()
    except OSError as e:
        problems.append(_err(file, None, None, f"cannot read file: {e.strerror or e}"))
        return None
    text, prob = _decode_csv(data, file)
    if prob is not None:
        problems.append(prob)
        return None
    assert text is not None
    if not text.strip():
        problems.append(_err(file, 1, None, "file is empty (no header line)"))
        return None
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    rows: list[tuple[int, dict[str, str]]] = []
    last_line = 0
    try:
        for record in reader:
            start = last_line + 1
            last_line = reader.line_num
            if not record or all(not c.strip() for c in record):
                continue  # blank line
            if header is None:
                header = [c.strip() for c in record]
                bad = False
                seen: set[str] = set()
                for i, name in enumerate(header):
                    if not name:
                        problems.append(_err(file, start, None, f"column {i + 1} has an empty name"))
                        bad = True
                    elif name in seen:
                        problems.append(_err(file, start, name, f"duplicated column name '{name}'"))
                        bad = True
                    seen.add(name)
                if bad:
                    return None
                continue
            if len(record) != len(header):
                problems.append(
                    _err(file, start, None, f"expected {len(header)} fields (as in the header), got {len(record)}")
                )
                continue
            rows.append((start, {k: v.strip() for k, v in zip(header, record)}))
    except csv.Error as e:
        problems.append(_err(file, reader.line_num or None, None, f"malformed CSV: {e}"))
        return None
    if header is None:
        problems.append(_err(file, 1, None, "file has no header line"))
        return None
    return _Table(header, rows)


def _is_missing(cell: str) -> bool:
    return cell.strip().lower() in MISSING_TOKENS


def _parse_float(cell: str) -> float:
    v = float(cell)
    if not math.isfinite(v):
        raise ValueError(cell)
    return v


def _toml_line(e: Exception) -> int | None:
    m = re.search(r"line (\d+)", str(e))
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- volumes and slides


def read_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Decode a whole volume: a .nii / .nii.gz file or a DICOM series folder.

    Returns ``(data, affine)`` where ``affine`` is the 4x4 voxel -> RAS+ (mm) matrix.
    Raises :class:`SiteDataError` naming the offending file.
    """
    path = Path(path)
    if path.is_dir():
        return _read_dicom_series(path)
    name = path.name.lower()
    if not name.endswith(NIFTI_SUFFIXES):
        raise SiteDataError(_err(str(path), None, None, "not a NIfTI file (.nii / .nii.gz) or a DICOM folder"))
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as e:  # nibabel / gzip / zlib / EOF errors
        raise SiteDataError(
            _err(str(path), None, None, f"cannot decode NIfTI volume ({type(e).__name__}: {e})")
        ) from e
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return data, affine


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    files = [p for p in _listdir(folder)]
    if not files:
        raise SiteDataError(_err(str(folder), None, None, "DICOM series folder is empty"))
    slices = []
    for f in files:
        if f.is_dir():
            raise SiteDataError(_err(str(f), None, None, "unexpected sub-folder inside a DICOM series folder"))
        try:
            ds = pydicom.dcmread(str(f))
        except InvalidDicomError as e:
            raise SiteDataError(_err(str(f), None, None, f"not a DICOM file ({e})")) from e
        except Exception as e:
            raise SiteDataError(_err(str(f), None, None, f"cannot read DICOM file ({type(e).__name__}: {e})")) from e
        try:
            ipp = np.array([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
            iop = np.array([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
            spacing = [float(v) for v in ds.PixelSpacing]
        except (AttributeError, TypeError, ValueError) as e:
            raise SiteDataError(
                _err(
                    str(f),
                    None,
                    None,
                    "DICOM file lacks ImagePositionPatient / ImageOrientationPatient / PixelSpacing",
                )
            ) from e
        try:
            arr = ds.pixel_array.astype(np.float32)
        except Exception as e:
            raise SiteDataError(
                _err(str(f), None, None, f"cannot decode DICOM pixel data ({type(e).__name__}: {e})")
            ) from e
        if arr.ndim != 2:
            raise SiteDataError(_err(str(f), None, None, f"expected one 2-D slice per file, got shape {arr.shape}"))
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
        arr = arr * slope + intercept
        slices.append((f, ipp, iop, spacing, arr, getattr(ds, "SliceThickness", None)))

    f0, _, iop0, sp0, arr0, thick0 = slices[0]
    row_dir, col_dir = iop0[:3], iop0[3:]
    normal = np.cross(row_dir, col_dir)
    for f, _, iop, sp, arr, _ in slices[1:]:
        if arr.shape != arr0.shape:
            raise SiteDataError(
                _err(str(f), None, None, f"slice shape {arr.shape} differs from {arr0.shape} of {f0.name}")
            )
        if not np.allclose(iop, iop0, atol=1e-3):
            raise SiteDataError(_err(str(f), None, None, f"ImageOrientationPatient differs from {f0.name}"))
        if not np.allclose(sp, sp0, atol=1e-4):
            raise SiteDataError(_err(str(f), None, None, f"PixelSpacing differs from {f0.name}"))
    slices.sort(key=lambda s: float(np.dot(s[1], normal)))
    pos = [float(np.dot(s[1], normal)) for s in slices]
    for i in range(1, len(pos)):
        if abs(pos[i] - pos[i - 1]) < 1e-4:
            raise SiteDataError(
                _err(str(slices[i][0]), None, None, f"same slice position as {slices[i - 1][0].name} (duplicate slice)")
            )
    # volume indexed (column, row, slice) so that axis 0 follows the DICOM row direction
    data = np.stack([s[4].T for s in slices], axis=-1)
    if len(slices) > 1:
        step = (slices[-1][1] - slices[0][1]) / (len(slices) - 1)
    else:
        thick = float(thick0) if thick0 not in (None, "") else 1.0
        step = normal * thick
    lps = np.eye(4)
    lps[:3, 0] = row_dir * sp0[1]  # column spacing
    lps[:3, 1] = col_dir * sp0[0]  # row spacing
    lps[:3, 2] = step
    lps[:3, 3] = slices[0][1]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS
    return data, affine


def open_slide(path: str | Path):
    """Open a whole-slide image with tiffslide (OpenSlide as a fallback, if installed)."""
    path = Path(path)
    if not path.is_file():
        raise SiteDataError(_err(str(path), None, None, "slide file does not exist"))
    first_error: Exception | None = None
    try:
        import tiffslide

        return tiffslide.TiffSlide(str(path))
    except Exception as e:  # tifffile.TiffFileError, NotImplementedError, ...
        first_error = e
    try:
        import openslide  # type: ignore[import-not-found]
    except Exception:
        openslide = None
    if openslide is not None:
        try:
            return openslide.OpenSlide(str(path))
        except Exception:
            pass
    e = first_error
    raise SiteDataError(
        _err(str(path), None, None, f"cannot open whole-slide image ({type(e).__name__}: {e})")
    ) from e


def slide_mpp(slide) -> tuple[float, float] | None:
    """Level-0 microns per pixel from tiffslide / OpenSlide properties, or None."""
    props = slide.properties
    for prefix in ("tiffslide", "openslide"):
        x, y = props.get(f"{prefix}.mpp-x"), props.get(f"{prefix}.mpp-y")
        try:
            if x not in (None, "") and y not in (None, ""):
                fx, fy = float(x), float(y)
                if fx > 0 and fy > 0 and math.isfinite(fx) and math.isfinite(fy):
                    return fx, fy
        except (TypeError, ValueError):
            pass
    return None


# --------------------------------------------------------------------------- the reader


class _SiteReader:
    def __init__(self, root: Path, phases: tuple[str, ...], val_fraction: float, cache_dir: str | Path):
        self.root = root
        self.phases = phases
        self.val_fraction = val_fraction
        self.cache_dir = Path(cache_dir)
        self.problems: list[Problem] = []

    def read(self) -> SiteData:
        root = self.root
        center_id, display_name, role, notes = root.name, None, "train", None
        if not root.is_dir():
            self.problems.append(_err(".", None, None, f"site folder {root} does not exist or is not a folder"))
            return SiteData(root, center_id, center_id, role, [], [], [], self.problems, self.phases)
        center_id, display_name, role, notes = self._read_site_toml()
        self._check_top_level()
        patients, clinical_columns, clinical_ok = self._read_clinical(role)
        by_id = {p.patient_id: p for p in patients}
        genomic_columns = self._read_genomics(by_id, clinical_ok)
        self._list_mri(by_id, clinical_ok)
        self._list_pathology(by_id, clinical_ok)
        for p in patients:
            p.phases = self.phases
        return SiteData(
            root=root,
            center_id=center_id,
            display_name=display_name or center_id,
            role=role,
            patients=patients,
            genomic_columns=genomic_columns,
            clinical_columns=clinical_columns,
            problems=self.problems,
            phases=self.phases,
            notes=notes,
        )

    # -- site.toml
    def _read_site_toml(self) -> tuple[str, str | None, str, str | None]:
        center_id, display_name, role, notes = self.root.name, None, "train", None
        path = self.root / SITE_TOML
        if not path.exists():
            return center_id, display_name, role, notes
        try:
            raw = path.read_bytes()
        except OSError as e:
            self.problems.append(_err(SITE_TOML, None, None, f"cannot read file: {e.strerror or e}"))
            return center_id, display_name, role, notes
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            _, prob = _decode_csv(raw, SITE_TOML)
            self.problems.append(prob)  # type: ignore[arg-type]
            return center_id, display_name, role, notes
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            self.problems.append(_err(SITE_TOML, _toml_line(e), None, f"invalid TOML: {e}"))
            return center_id, display_name, role, notes
        if isinstance(doc.get("site"), dict):  # accept a [site] table too
            table = dict(doc["site"])
            for k, v in doc.items():
                if k != "site":
                    table.setdefault(k, v)
            doc = table
        for key in doc:
            if key not in SITE_TOML_KEYS:
                self.problems.append(_warn(SITE_TOML, None, key, f"unknown key '{key}' ignored"))

        def get_str(key: str) -> str | None:
            if key not in doc:
                return None
            v = doc[key]
            if not isinstance(v, str):
                self.problems.append(_err(SITE_TOML, None, key, f"{key} must be a string, got {v!r}"))
                return None
            return v

        cid = get_str("center_id")
        if cid is not None:
            if PATIENT_ID_RE.fullmatch(cid):
                center_id = cid
            else:
                self.problems.append(
                    _err(SITE_TOML, None, "center_id", f"center_id must match [A-Za-z0-9._-]{{1,64}}, got {cid!r}")
                )
        display_name = get_str("display_name")
        r = get_str("role")
        if r is not None:
            if r in ROLES:
                role = r
            else:
                self.problems.append(_err(SITE_TOML, None, "role", f"role must be 'train' or 'external', got {r!r}"))
        notes = get_str("notes")
        return center_id, display_name, role, notes

    # -- folder
    def _check_top_level(self) -> None:
        known_files = {CLINICAL_CSV, GENOMICS_CSV, SITE_TOML, "policy.toml"}  # policy.toml: the site's federation policy (client/policy.py)
        known_dirs = {"mri", "pathology"}
        cache_name = self.cache_dir.name if not self.cache_dir.is_absolute() else None
        for entry in sorted(self.root.iterdir(), key=lambda p: p.name):
            name = entry.name
            if _is_hidden(name) or name == cache_name:
                continue
            if entry.is_dir():
                if name not in known_dirs:
                    self.problems.append(_warn(name, None, None, "unexpected folder ignored"))
            elif name not in known_files:
                hint = ""
                if name.lower() in known_files:
                    hint = f" (did you mean '{name.lower()}'? names are case-sensitive)"
                self.problems.append(_warn(name, None, None, f"unexpected file ignored{hint}"))
        for d in known_dirs:
            p = self.root / d
            if p.exists() and not p.is_dir():
                self.problems.append(_err(d, None, None, f"'{d}' must be a folder"))

    # -- rows keyed by patient_id (clinical.csv, genomics.csv)
    def _has_id_column(self, table, F: str) -> bool:
        if "patient_id" in table.columns:
            return True
        self.problems.append(
            _err(F, 1, "patient_id", f"required column 'patient_id' is missing (columns: {', '.join(table.columns)})")
        )
        return False

    def _unique_rows(self, table, F: str):
        """(line, cells, patient_id) of each row with a valid, not yet seen patient_id; the others are reported."""
        seen: dict[str, int] = {}
        for line, cells in table.rows:
            pid = cells["patient_id"]
            if not self._check_id(pid, F, line):
                continue
            if pid in seen:
                self.problems.append(
                    _err(F, line, "patient_id", f"duplicated patient_id '{pid}' (first on line {seen[pid]})")
                )
                continue
            seen[pid] = line
            yield line, cells, pid

    # -- clinical.csv
    def _read_clinical(self, role: str) -> tuple[list[PatientRecord], list[str], bool]:
        F = CLINICAL_CSV
        path = self.root / F
        if not path.is_file():
            self.problems.append(_err(F, None, None, "clinical.csv is missing (required: one row per patient)"))
            return [], [], False
        table = _read_csv(path, F, self.problems)
        if table is None:
            return [], [], False
        if not self._has_id_column(table, F):
            return [], [], False
        covariates = [c for c in table.columns if c not in RESERVED_CLINICAL]
        patients: list[PatientRecord] = []
        for line, cells, pid in self._unique_rows(table, F):
            rec = PatientRecord(patient_id=pid, row=line)
            rec.benefit = self._binary(cells, "benefit", F, line, label=True)
            rec.dfs_event = self._binary(cells, "dfs_event", F, line)
            rec.dfs_months = self._float(cells, "dfs_months", F, line, nonneg=True)
            if (rec.dfs_months is None) != (rec.dfs_event is None):
                have, lack = ("dfs_months", "dfs_event") if rec.dfs_event is None else ("dfs_event", "dfs_months")
                if not self._bad_cell(cells, lack):
                    self.problems.append(
                        _warn(F, line, lack, f"{have} is given but {lack} is empty; survival is unusable for this patient")
                    )
            rec.split = self._split(cells, F, line, pid, role)
            rec.clinical = {c: self._float(cells, c, F, line) for c in covariates}
            patients.append(rec)
        if not patients and not any(p.severity == "error" and p.file == F for p in self.problems):
            self.problems.append(_warn(F, None, None, "no patient rows"))
        return patients, covariates, True

    def _bad_cell(self, cells: dict[str, str], col: str) -> bool:
        """A cell that is present but failed to parse (already reported as an error)."""
        return col in cells and not _is_missing(cells[col])

    def _check_id(self, pid: str, file: str, line: int) -> bool:
        if not pid:
            self.problems.append(_err(file, line, "patient_id", "patient_id is empty"))
            return False
        if not PATIENT_ID_RE.fullmatch(pid):
            self.problems.append(
                _err(
                    file,
                    line,
                    "patient_id",
                    f"patient_id must be 1-64 characters of [A-Za-z0-9._-], got {pid!r}",
                )
            )
            return False
        return True

    def _binary(self, cells: dict[str, str], col: str, file: str, line: int, label: bool = False) -> int | None:
        if col not in cells or _is_missing(cells[col]):
            return None
        raw = cells[col]
        try:
            v = float(raw)
        except ValueError:
            v = float("nan")
        if v in (0.0, 1.0):
            return int(v)
        what = "label" if label else col
        self.problems.append(_err(file, line, col, f"{what} must be 0, 1 or empty, got '{raw}'"))
        return None

    def _float(self, cells: dict[str, str], col: str, file: str, line: int, nonneg: bool = False) -> float | None:
        if col not in cells or _is_missing(cells[col]):
            return None
        raw = cells[col]
        try:
            v = _parse_float(raw)
        except ValueError:
            self.problems.append(_err(file, line, col, f"{col} must be a number or empty, got '{raw}'"))
            return None
        if nonneg and v < 0:
            self.problems.append(_err(file, line, col, f"{col} must be >= 0, got '{raw}'"))
            return None
        return v

    def _split(self, cells: dict[str, str], file: str, line: int, pid: str, role: str) -> str:
        raw = cells.get("split", "")
        value = raw.strip().lower()
        if value == "" or _is_missing(value):
            return "test" if role == "external" else assign_split(pid, self.val_fraction)
        if value not in SPLITS:
            self.problems.append(_err(file, line, "split", f"split must be train, val, test or empty, got '{raw}'"))
            return "test" if role == "external" else assign_split(pid, self.val_fraction)
        if role == "external" and value != "test":
            self.problems.append(
                _warn(file, line, "split", f"external site: split '{raw}' given; external patients are only evaluated")
            )
        return value

    # -- genomics.csv
    def _read_genomics(self, by_id: dict[str, PatientRecord], clinical_ok: bool) -> list[str]:
        F = GENOMICS_CSV
        path = self.root / F
        if not path.exists():
            return []
        if not path.is_file():
            self.problems.append(_err(F, None, None, "genomics.csv must be a file"))
            return []
        table = _read_csv(path, F, self.problems)
        if table is None:
            return []
        if not self._has_id_column(table, F):
            return []
        features = [c for c in table.columns if c != "patient_id"]
        if not features:
            self.problems.append(_warn(F, 1, None, "no feature columns besides patient_id"))
        for line, cells, pid in self._unique_rows(table, F):
            values = {c: self._float(cells, c, F, line) for c in features}
            rec = by_id.get(pid)
            if rec is None:
                if clinical_ok:
                    self.problems.append(
                        _err(F, line, "patient_id", f"genomics row for patient '{pid}' who has no row in clinical.csv")
                    )
                continue
            rec.genomics = values
        return features

    # -- mri/
    def _list_mri(self, by_id: dict[str, PatientRecord], clinical_ok: bool) -> None:
        mri = self.root / "mri"
        if not mri.is_dir():
            return
        phase_set = set(self.phases)
        for pdir in _listdir(mri):
            rel_p = _rel(pdir, self.root)
            if not pdir.is_dir():
                self.problems.append(_warn(rel_p, None, None, "file directly under mri/ ignored (expected mri/<patient_id>/)"))
                continue
            pid = pdir.name
            rec = by_id.get(pid)
            if not PATIENT_ID_RE.fullmatch(pid):
                self.problems.append(_err(rel_p, None, "patient_id", f"folder name {pid!r} is not a valid patient_id"))
                continue
            if rec is None:
                if clinical_ok:
                    self.problems.append(
                        _err(rel_p, None, "patient_id", f"MRI folder for patient '{pid}' who has no row in clinical.csv")
                    )
                continue
            found: dict[str, Path] = {}
            for entry in _listdir(pdir):
                rel_e = _rel(entry, self.root)
                name = entry.name
                if entry.is_dir():
                    key, kind = name, "DICOM folder"
                else:
                    key = None
                    for suf in NIFTI_SUFFIXES:
                        if name.endswith(suf):
                            key = name[: -len(suf)]
                            break
                    kind = "NIfTI file"
                    if key is None:
                        self.problems.append(
                            _warn(rel_e, None, None, "ignored: expected <phase>.nii.gz, <phase>/ or tumor_mask.nii.gz")
                        )
                        continue
                if key == TUMOR_MASK:
                    if entry.is_dir():
                        self.problems.append(_err(rel_e, None, TUMOR_MASK, "tumor mask must be a .nii.gz file"))
                        continue
                    if rec.tumor_mask is not None:
                        self.problems.append(
                            _err(rel_e, None, TUMOR_MASK, f"two tumor masks: {rec.tumor_mask.name} and {name}")
                        )
                        continue
                    rec.tumor_mask = entry
                    continue
                if key not in phase_set:
                    self.problems.append(
                        _warn(rel_e, None, key, f"{kind} '{name}' is not a configured phase ({', '.join(self.phases)}); ignored")
                    )
                    continue
                if key in found:
                    self.problems.append(
                        _err(rel_e, None, key, f"phase '{key}' given twice: {found[key].name} and {name}; keep one")
                    )
                    continue
                found[key] = entry
            rec.mri = {ph: found[ph] for ph in self.phases if ph in found}
            missing = [ph for ph in self.phases if ph not in found]
            if not found:
                msg = "MRI folder has no phase volumes" + (" (only a tumor mask)" if rec.tumor_mask else "")
                self.problems.append(_warn(rel_p, None, None, msg))
            elif missing:
                self.problems.append(
                    _warn(
                        rel_p,
                        None,
                        missing[0],
                        f"incomplete phase set: missing {', '.join(missing)}; this patient has no MRI for this run",
                    )
                )

    # -- pathology/
    def _list_pathology(self, by_id: dict[str, PatientRecord], clinical_ok: bool) -> None:
        pdir = self.root / "pathology"
        if not pdir.is_dir():
            return
        for entry in _listdir(pdir):
            rel_e = _rel(entry, self.root)
            if entry.is_dir():
                self.problems.append(_warn(rel_e, None, None, "folder under pathology/ ignored (expected <patient_id>.svs)"))
                continue
            ext = entry.suffix.lower()
            if ext not in SLIDE_EXTENSIONS:
                self.problems.append(
                    _warn(rel_e, None, None, f"ignored: slide extension must be one of {', '.join(SLIDE_EXTENSIONS)}")
                )
                continue
            pid = entry.name[: -len(entry.suffix)]
            if not PATIENT_ID_RE.fullmatch(pid):
                self.problems.append(_err(rel_e, None, "patient_id", f"file name {pid!r} is not a valid patient_id"))
                continue
            rec = by_id.get(pid)
            if rec is None:
                if clinical_ok:
                    self.problems.append(
                        _err(rel_e, None, "patient_id", f"slide for patient '{pid}' who has no row in clinical.csv")
                    )
                continue
            if rec.slide is not None:
                self.problems.append(
                    _err(rel_e, None, "patient_id", f"two slides for patient '{pid}': {rec.slide.name} and {entry.name}")
                )
                continue
            rec.slide = entry
