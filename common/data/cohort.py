"""A simulation cohort: a folder with one site folder per center.

Used only where the whole cohort is on one machine (simulation, baselines);
a real deployment sees one site per client.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from common.preprocess.cache import MANIFEST, preprocess_site, resolve_cache_dir


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
        role = "train"
        if (d / "site.toml").exists():
            role = tomllib.loads((d / "site.toml").read_text()).get("role", "train")
        sites.append(SiteRef(d.name, d, role))
    if not sites:
        raise FileNotFoundError(f"{cohort_dir}: no site folders (each needs a clinical.csv)")
    return sites


def ensure_caches(sites: list[SiteRef], cfg, console=None, progress: bool = True,
                  workers: int | None = None) -> dict[str, Path]:
    """Preprocess every site (a no-op where its cache is current); returns site name -> cache dir."""
    out = {}
    for s in sites:
        res = preprocess_site(s.path, cfg, workers=workers, console=console, progress=progress)
        if not (res.cache_dir / MANIFEST).exists():
            raise RuntimeError(f"{s.path}: preprocessing wrote no manifest")
        out[s.name] = res.cache_dir
    return out


def cache_dir_of(site: SiteRef, cfg) -> Path:
    return resolve_cache_dir(site.path, cfg)
