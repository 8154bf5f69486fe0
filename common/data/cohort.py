"""A simulation cohort: a folder with one site folder per center.

Used only where the whole cohort is on one machine (simulation, baselines);
a real deployment sees one site per client.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.data.identity import site_identity


@dataclass(frozen=True)
class SiteRef:
    name: str
    path: Path
    role: str  # train | external


def discover_sites(cohort_dir: Path) -> list[SiteRef]:
    cohort_dir = Path(cohort_dir)
    if not cohort_dir.is_dir():
        raise FileNotFoundError(f"{cohort_dir}: cohort folder not found")
    sites = []
    for d in sorted(p for p in cohort_dir.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        if not (d / "clinical.csv").exists():
            continue
        sites.append(SiteRef(d.name, d, site_identity(d).role))
    if not sites:
        raise FileNotFoundError(f"{cohort_dir}: no site folders (each needs a clinical.csv)")
    return sites
