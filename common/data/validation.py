"""`newadj validate-site`: check one center's data folder against the data contract.

``validate_site`` reads the folder with :mod:`common.data.site` (the only reader of
site data), and in deep mode decodes every image: each NIfTI / DICOM volume is
loaded fully, the phases of a patient must share a shape, the tumor mask must be on
the grid of the phases, and each slide is opened with tiffslide and a small region is
read at its lowest-resolution level.  It collects every problem (never stops at the
first) and never writes to the folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from common.data.site import (
    HasProblems,
    CLINICAL_CSV,
    DEFAULT_CACHE_DIR,
    DEFAULT_PHASES,
    GENOMICS_CSV,
    SPLITS,
    TUMOR_MASK,
    PatientRecord,
    Problem,
    SiteData,
    SiteDataError,
)
from common.data.images import open_slide, read_volume, slide_mpp

__all__ = ["ValidationReport", "validate_site"]

# Affine entries (mm) that may differ before two grids count as different.
GRID_ATOL = 1e-3
SLIDE_PROBE = 256  # side of the region read from the lowest-resolution slide level


@dataclass
class ValidationReport(HasProblems):
    root: Path
    problems: list[Problem] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    deep: bool = True

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "ok": self.ok,
            "deep": self.deep,
            "summary": self.summary,
            "problems": [
                {"severity": p.severity, "file": p.file, "row": p.row, "field": p.field, "message": p.message}
                for p in self.problems
            ],
        }

    def render(self, console=None) -> None:
        """Print a summary table, then every problem on one line (file:row [field] message)."""
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        console = console or Console()
        s = self.summary
        title = f"Site {s.get('center_id', '?')} ({s.get('role', '?')}) - {self.root}"
        table = Table(title=escape(title), show_header=True, header_style="bold")
        table.add_column("item")
        table.add_column("value")

        def add(k: str, v: Any) -> None:
            table.add_row(escape(k), escape(str(v)))

        n = s.get("n_patients", 0)
        add("patients", n)
        add("labeled (benefit)", f"{s.get('n_labeled', 0)} ({s.get('n_benefit_pos', 0)} benefit=1)")
        add("DFS (time+event / events)", f"{s.get('n_survival', 0)} / {s.get('n_events', 0)}")
        splits = s.get("splits", {})
        add("splits", ", ".join(f"{k} {splits.get(k, 0)}" for k in SPLITS))
        for mod in ("mri", "pathology", "genomics"):
            c = s.get(mod, {})
            add(mod, f"complete {c.get('complete', 0)}, partial {c.get('partial', 0)}, missing {c.get('missing', 0)}")
        add("tumor masks", s.get("n_tumor_mask", 0))
        clin = s.get("clinical", {})
        if clin:
            add("clinical covariates", ", ".join(f"{k} {v}/{n}" for k, v in clin.items()))
        else:
            add("clinical covariates", "none")
        add("check", "deep (images decoded)" if self.deep else "shallow (files listed only)")
        console.print(table)

        errors, warnings = self.errors, self.warnings
        if self.problems:
            console.print(f"{len(errors)} error(s), {len(warnings)} warning(s):")
        for p in self.problems:
            tag = "[bold red]ERROR  [/]" if p.severity == "error" else "[yellow]WARNING[/]"
            console.print(f"{tag} {escape(str(p))}", soft_wrap=True, highlight=False)
        if self.ok:
            console.print("[bold green]OK[/]: no errors" + (" (warnings above)" if warnings else ""))
        else:
            console.print(f"[bold red]FAILED[/]: {len(errors)} error(s)")


def validate_site(
    site_dir: str | Path,
    phases: Sequence[str] = DEFAULT_PHASES,
    deep: bool = True,
    val_fraction: float = 0.2,
    genomic_features: Sequence[str] | None = None,
    clinical_features: Sequence[str] | None = None,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    progress: Callable[[str], None] | None = None,
) -> ValidationReport:
    """Check a site folder; every problem is collected (the folder is never modified)."""
    root = Path(site_dir)
    site = SiteData.open(root, phases=phases, val_fraction=val_fraction, strict=False, cache_dir=cache_dir)
    problems: list[Problem] = list(site.problems)
    _check_feature_lists(site, genomic_features, clinical_features, problems)
    if deep:
        for i, rec in enumerate(site.patients):
            if progress is not None:
                progress(f"[{i + 1}/{len(site.patients)}] {rec.patient_id}")
            _check_mri(site.root, rec, problems)
            _check_slide(site.root, rec, problems)
    report = ValidationReport(root=root, problems=problems, deep=deep)
    report.summary = _summarize(site, genomic_features, problems)
    return report


# --------------------------------------------------------------------------- checks


def _rel(path: str | Path, root: Path) -> str:
    p = Path(path)
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        return str(p)


def _image_error(root: Path, err: SiteDataError, fallback: Path, fld: str | None) -> list[Problem]:
    out = []
    for p in err.problems or [Problem("error", str(fallback), None, None, str(err))]:
        out.append(Problem("error", _rel(p.file, root), None, fld, p.message))
    return out


def _load(root: Path, path: Path, fld: str, problems: list[Problem]) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        data, affine = read_volume(path)
    except SiteDataError as e:
        problems.extend(_image_error(root, e, path, fld))
        return None
    except Exception as e:  # never let one bad file stop the validation
        problems.append(Problem("error", _rel(path, root), None, fld, f"cannot read volume ({type(e).__name__}: {e})"))
        return None
    rel = _rel(path, root)
    if data.ndim != 3:
        problems.append(Problem("error", rel, None, fld, f"expected a 3-D volume, got shape {tuple(data.shape)}"))
        return None
    if min(data.shape) < 1:
        problems.append(Problem("error", rel, None, fld, f"volume is empty, shape {tuple(data.shape)}"))
        return None
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        problems.append(Problem("error", rel, None, fld, "invalid (singular or non-finite) voxel-to-world affine"))
        return None
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        problems.append(Problem("warning", rel, None, fld, "volume contains NaN or infinite values"))
    return data, affine


def _check_mri(root: Path, rec: PatientRecord, problems: list[Problem]) -> None:
    ref: tuple[str, Path, tuple[int, ...], np.ndarray] | None = None
    for phase, path in rec.mri.items():
        loaded = _load(root, path, phase, problems)
        if loaded is None:
            continue
        data, affine = loaded
        shape = tuple(int(x) for x in data.shape)
        if ref is None:
            ref = (phase, path, shape, affine)
            continue
        ref_phase, ref_path, ref_shape, ref_affine = ref
        if shape != ref_shape or not np.allclose(affine, ref_affine, atol=GRID_ATOL):
            what = f"shape {shape} differs from {ref_phase} shape {ref_shape}" if shape != ref_shape else \
                f"voxel grid (affine) differs from {ref_phase}"
            problems.append(Problem("warning", _rel(path, root), None, phase,
                                    f"{what} ({_rel(ref_path, root)}); preprocessing resamples it onto the "
                                    f"{ref_phase} grid (MONAI ResampleToMatchd)"))
        del data
    if rec.tumor_mask is not None:
        loaded = _load(root, rec.tumor_mask, TUMOR_MASK, problems)
        if loaded is None:
            return
        mask, affine = loaded
        rel = _rel(rec.tumor_mask, root)
        if ref is not None:
            ref_phase, ref_path, ref_shape, ref_affine = ref
            shape = tuple(int(x) for x in mask.shape)
            if shape != ref_shape or not np.allclose(affine, ref_affine, atol=GRID_ATOL):
                what = f"tumor mask shape {shape} differs from {ref_phase} shape {ref_shape}" if shape != ref_shape \
                    else f"tumor mask affine differs from {ref_phase}"
                problems.append(Problem("warning", rel, None, TUMOR_MASK,
                                        f"{what}; preprocessing resamples it onto the {ref_phase} grid "
                                        f"(nearest neighbour)"))
        finite = np.isfinite(mask) if np.issubdtype(mask.dtype, np.floating) else None
        if finite is not None and not finite.all():
            problems.append(Problem("warning", rel, None, TUMOR_MASK, "tumor mask contains NaN or infinite values"))
        elif not np.any(mask):
            problems.append(Problem("warning", rel, None, TUMOR_MASK, "tumor mask is empty (all zero)"))
        elif np.issubdtype(mask.dtype, np.floating) and not np.all(np.equal(np.round(mask), mask)):
            problems.append(
                Problem("warning", rel, None, TUMOR_MASK, "tumor mask has non-integer values; voxels > 0 count as tumor")
            )


def _check_slide(root: Path, rec: PatientRecord, problems: list[Problem]) -> None:
    if rec.slide is None:
        return
    rel = _rel(rec.slide, root)
    try:
        slide = open_slide(rec.slide)
    except SiteDataError as e:
        problems.extend(_image_error(root, e, rec.slide, None))
        return
    except Exception as e:
        problems.append(Problem("error", rel, None, None, f"cannot open whole-slide image ({type(e).__name__}: {e})"))
        return
    try:
        n_levels = int(slide.level_count)
        if n_levels < 1:
            problems.append(Problem("error", rel, None, None, "slide has no image levels"))
            return
        level = n_levels - 1
        w, h = (int(v) for v in slide.level_dimensions[level])
        w0, h0 = (int(v) for v in slide.level_dimensions[0])
        if min(w, h, w0, h0) < 1:
            problems.append(Problem("error", rel, None, None, f"slide has empty dimensions {w0}x{h0}"))
            return
        size = (min(SLIDE_PROBE, w), min(SLIDE_PROBE, h))
        try:
            region = slide.read_region((0, 0), level, size)
            arr = np.asarray(region)
            if arr.size == 0:
                raise ValueError("empty region")
        except Exception as e:
            problems.append(
                Problem(
                    "error",
                    rel,
                    None,
                    None,
                    f"cannot read pixels at level {level} ({w}x{h}): {type(e).__name__}: {e}",
                )
            )
            return
        if slide_mpp(slide) is None:
            problems.append(
                Problem(
                    "warning",
                    rel,
                    None,
                    "mpp",
                    "no microns-per-pixel metadata at level 0; the slide cannot be resampled to a fixed magnification",
                )
            )
        if n_levels == 1 and max(w0, h0) > 8192:
            problems.append(
                Problem("warning", rel, None, None, f"slide {w0}x{h0} has a single level (no pyramid); tiling will be slow")
            )
    except Exception as e:
        problems.append(Problem("error", rel, None, None, f"cannot read whole-slide image ({type(e).__name__}: {e})"))
    finally:
        try:
            slide.close()
        except Exception:
            pass


def _check_feature_lists(
    site: SiteData,
    genomic_features: Sequence[str] | None,
    clinical_features: Sequence[str] | None,
    problems: list[Problem],
) -> None:
    if clinical_features:
        for c in clinical_features:
            if (site.root / CLINICAL_CSV).is_file() and site.patients and c not in site.clinical_columns:
                problems.append(
                    Problem("warning", CLINICAL_CSV, 1, c, f"configured clinical feature '{c}' is not a column; treated as missing")
                )
    if genomic_features and (site.root / GENOMICS_CSV).is_file() and site.genomic_columns:
        absent = [g for g in genomic_features if g not in site.genomic_columns]
        if absent:
            problems.append(
                Problem(
                    "warning",
                    GENOMICS_CSV,
                    1,
                    absent[0],
                    f"federation features not in genomics.csv (treated as untested): {', '.join(absent)}",
                )
            )


def _summarize(site: SiteData, genomic_features: Sequence[str] | None, problems: list[Problem]) -> dict[str, Any]:
    pts = site.patients
    phases = site.phases
    feats = list(genomic_features) if genomic_features else list(site.genomic_columns)

    def gen_state(p: PatientRecord) -> str:
        if p.genomics is None:
            return "missing"
        vals = [p.genomics.get(f) for f in feats]
        n = sum(v is not None for v in vals)
        if feats and n == len(feats):
            return "complete"
        return "partial" if n > 0 else "missing"

    def mri_state(p: PatientRecord) -> str:
        if p.mri_complete(phases):
            return "complete"
        return "partial" if p.mri else "missing"

    def count(states: list[str]) -> dict[str, int]:
        return {k: states.count(k) for k in ("complete", "partial", "missing")}

    return {
        "center_id": site.center_id,
        "display_name": site.display_name,
        "role": site.role,
        "phases": list(phases),
        "n_patients": len(pts),
        "n_labeled": sum(p.benefit is not None for p in pts),
        "n_benefit_pos": sum(p.benefit == 1 for p in pts),
        "n_survival": sum(p.has_survival for p in pts),
        "n_events": sum(p.dfs_event == 1 for p in pts),
        "mri": count([mri_state(p) for p in pts]),
        "n_tumor_mask": sum(p.tumor_mask is not None for p in pts),
        "pathology": count(["complete" if p.slide is not None else "missing" for p in pts]),
        "genomics": count([gen_state(p) for p in pts]),
        "genomic_features": feats,
        "clinical": {c: sum(p.clinical.get(c) is not None for p in pts) for c in site.clinical_columns},
        "splits": {s: sum(p.split == s for p in pts) for s in SPLITS},
        "n_errors": sum(p.severity == "error" for p in problems),
        "n_warnings": sum(p.severity == "warning" for p in problems),
    }
