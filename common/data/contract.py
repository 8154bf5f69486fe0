"""The data contract (``shared/data-contract.md``) as constants, and how a problem with a site's data is named.

Every problem is a :class:`Problem`: the file (relative to the site folder), the 1-based CSV
line, the column / phase / key, and the message; :class:`SiteDataError` carries them all.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

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


class SiteDataError(ValueError):
    """Raised when site data cannot be used; ``.problems`` lists every problem found."""

    def __init__(self, problems: Problem | Iterable[Problem], header: str | None = None):
        if isinstance(problems, Problem):
            problems = [problems]
        self.problems: list[Problem] = list(problems)
        self.header = header
        super().__init__(self._text())

    def _text(self) -> str:
        if len(self.problems) == 1 and self.header is None:
            return str(self.problems[0])
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



class HasProblems:
    """``errors`` / ``warnings`` views of a ``problems`` list (site data and validation reports)."""

    problems: list

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("~$") or name in ("__MACOSX", "Thumbs.db", "desktop.ini")


def _listdir(path: Path) -> list[Path]:
    return sorted((p for p in path.iterdir() if not _is_hidden(p.name)), key=lambda p: p.name)


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


