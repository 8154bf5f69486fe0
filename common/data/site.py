"""The only reader of a center's site data folder (see shared/data-contract.md).

Layout::

    <site_dir>/
      site.toml                           optional: center_id, display_name, role, notes
      clinical.csv                        required, one row per patient
      genomics.csv                        optional
      mri/<patient_id>/<phase>.nii.gz     or mri/<patient_id>/<phase>/ (DICOM series)
      mri/<patient_id>/tumor_mask.nii.gz  optional
      pathology/<patient_id>.<svs|tif|tiff|ndpi>

``SiteData.open`` parses the tables (``common/data/tables.py``) and the site's identity
(``common/data/identity.py``), assigns the splits (``common/data/splits.py``) and lists the
image files; it never decodes an image (``common/data/images.py`` does, and validation
uses it).  Nothing here writes to the folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from common.data.contract import (  # noqa: F401 - re-exported: the contract's names, where the reader is
    CLINICAL_CSV, DEFAULT_CACHE_DIR, DEFAULT_PHASES, GENOMICS_CSV, NIFTI_SUFFIXES, PATIENT_ID_RE, RESERVED_CLINICAL,
    ROLES, SITE_TOML, SLIDE_EXTENSIONS, SPLITS, TUMOR_MASK, HasProblems, Problem, SiteDataError, _err, _is_hidden, _listdir,
    _rel, _warn)
from common.data.identity import read_identity
from common.data.splits import assign_splits
from common.data.tables import _decode_csv, _is_missing, _parse_float, _read_csv  # noqa: F401

AUTO = "auto"   # a split still to assign (common/data/splits.py)

__all__ = ["DEFAULT_PHASES", "SLIDE_EXTENSIONS", "Problem", "SiteDataError", "PatientRecord", "SiteData",
           "PATIENT_ID_RE"]


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
        ident, problems = read_identity(root)
        self.problems.extend(problems)
        center_id, display_name, role, notes = ident.center_id, ident.display_name, ident.role, ident.notes
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
        # rows without a split: an exact-size, label-stratified, deterministic validation share
        auto = [p for p in patients if p.split == AUTO]
        chosen = assign_splits(((p.patient_id, p.benefit if p.benefit is not None else f"dfs{p.dfs_event}")
                                for p in auto), self.val_fraction)
        for p in auto:
            p.split = chosen[p.patient_id]
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
            return "test" if role == "external" else AUTO
        if value not in SPLITS:
            self.problems.append(_err(file, line, "split", f"split must be train, val, test or empty, got '{raw}'"))
            return "test" if role == "external" else AUTO
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
