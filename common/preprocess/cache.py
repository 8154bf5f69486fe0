"""``newadj preprocess``: build a site's local cache, the only input training reads.

Layout of ``<cache_dir>`` (default ``<site>/.newadj-cache``)::

    manifest.json             patients, splits, labels, tabular features + masks,
                              pointers to the cached arrays, failures, stats (the
                              latest preprocessing run's)
    manifest-<key>.json       the same, one per preprocessing configuration (key: a
                              hash of everything the manifest depends on); a run
                              reads its own, so runs with other settings (another
                              encoder) can share the cache at the same time
    hashes.json               content hashes of input files, keyed by (size, mtime)
    mri/<key>.npy             stacked phases, shape (n_phases, *roi_size)
    pathology/<key>.npz       one feature bag per slide (features, coords)

Every array's file name is a SHA-256 over the input files' *content* hashes,
the relevant config section and the encoder fingerprint, so a second run reuses
everything that is still valid (idempotent) and a run interrupted half-way
resumes where it stopped (each array is written atomically).  A file that
fails to decode is reported with its name, the patient keeps its other
modalities, and nothing already cached is lost.
"""
from __future__ import annotations

import hashlib
import json
import os
import logging
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from common.config import config_hash, to_plain
from common.hashing import sha256_file
from common.preprocess.tabular import feature_vector

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the on-disk layout of cached arrays changes
MANIFEST = "manifest.json"


def resolve_cache_dir(site_dir: Path, cfg) -> Path:
    from common.data.policy import with_site_config

    p = Path(str(with_site_config(cfg, site_dir).data.cache_dir))
    return p if p.is_absolute() else Path(site_dir) / p


class ContentHasher:
    """SHA-256 of files, memoised on (size, mtime_ns) in ``hashes.json``."""

    def __init__(self, store: Path, root: Path):
        self.store, self.root = store, root
        try:
            self.known: dict[str, list] = json.loads(store.read_text())
        except (OSError, ValueError):
            self.known = {}

    def file(self, path: Path) -> str:
        st = path.stat()
        rel = os.path.relpath(path, self.root)
        hit = self.known.get(rel)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
        digest = sha256_file(path)
        self.known[rel] = [st.st_size, st.st_mtime_ns, digest]
        return digest

    def path(self, path: Path) -> str:
        """A file's hash, or for a DICOM series folder the hash of its sorted files' hashes."""
        if path.is_dir():
            parts = [f"{p.name}:{self.file(p)}" for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")]
            return hashlib.sha256("\n".join(parts).encode()).hexdigest()
        return self.file(path)

    def save(self) -> None:
        _atomic_write_text(self.store, json.dumps(self.known))


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


# --- jobs run in worker processes ------------------------------------------------

def _init_worker(n_threads: int) -> None:
    import torch

    torch.set_num_threads(n_threads)


def _mri_job(out: str, phase_paths: dict, mask: str | None, mri_cfg: dict, phases: list) -> dict:
    from common.preprocess.mri import preprocess_mri

    t0 = time.perf_counter()
    arr = preprocess_mri({k: Path(v) for k, v in phase_paths.items()}, Path(mask) if mask else None, mri_cfg, phases)
    out_p = Path(out)
    tmp = out_p.with_name(f".{out_p.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, out_p)
    return {"seconds": time.perf_counter() - t0, "shape": list(arr.shape)}


def _slide_job(out: str, slide: str, path_cfg: dict) -> dict:
    from common.preprocess.pathology import slide_to_bag

    t0 = time.perf_counter()
    bag = slide_to_bag(Path(slide), path_cfg)
    out_p = Path(out)
    tmp = out_p.with_name(f".{out_p.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, features=bag["features"], coords=bag["coords"])
    os.replace(tmp, out_p)
    return {"seconds": time.perf_counter() - t0, "n_tiles": int(bag["n_tiles"]), "dim": int(np.asarray(bag["features"]).shape[1])}


# --- orchestration -----------------------------------------------------------------

@dataclass
class PreprocessResult:
    cache_dir: Path
    n_patients: int
    manifest: Path  # this configuration's manifest (what a dataset of this run reads)
    mri: dict = field(default_factory=dict)  # built, cached, failed, seconds, volumes_per_s
    pathology: dict = field(default_factory=dict)  # built, cached, failed, tiles, seconds, tiles_per_s
    failures: list = field(default_factory=list)  # {patient_id, modality, file, error}
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures


def _first_readable(files, read):
    """``read`` of the first file that can be read (a corrupt cached file is the dataset's to skip and count)."""
    for f in files:
        try:
            return read(f)
        except Exception as exc:  # noqa: BLE001 - any unreadable file: try the next
            log.warning("%s: unreadable cached array (%s); skipped when the data are loaded", f, exc)
    return None


def preprocess_site(site_dir: Path, cfg, workers: int | None = None, cache_dir: Path | None = None,
                    console: Console | None = None, progress: bool = True) -> PreprocessResult:
    """Build (or refresh) the cache of one site; see the module docstring."""
    from common.preprocess.encoders import build_encoder
    from common.data.site import SiteData

    from common.data.policy import with_site_config

    t_start = time.perf_counter()
    console = console or Console(stderr=True)
    site_dir = Path(site_dir)
    cfg = with_site_config(cfg, site_dir)   # the site's own settings (cache location, encoders...) always win
    phases = list(cfg.data.phases)
    site = SiteData.open(site_dir, phases=phases, val_fraction=float(cfg.data.val_fraction), strict=True)
    cache = Path(cache_dir) if cache_dir else resolve_cache_dir(site_dir, cfg)
    (cache / "mri").mkdir(parents=True, exist_ok=True)
    (cache / "pathology").mkdir(parents=True, exist_ok=True)
    hasher = ContentHasher(cache / "hashes.json", site_dir)

    mri_cfg = to_plain(cfg.preprocess.mri)
    path_cfg = to_plain(cfg.preprocess.pathology)
    encoder = build_encoder(path_cfg.get("encoder", {}))
    mri_cfg_key = config_hash({"mri": mri_cfg, "phases": phases, "format": CACHE_FORMAT})
    # stain_norm none is the behaviour before the option existed: caches built then stay valid
    key_cfg = {k: v for k, v in path_cfg.items() if not (k == "stain_norm" and str(v) == "none")}
    path_cfg_key = config_hash({"pathology": key_cfg, "encoder": encoder.fingerprint, "format": CACHE_FORMAT})

    entries: dict[str, dict] = {}
    mri_jobs, slide_jobs = [], []
    n_mri_cached = n_path_cached = 0
    failures: list[dict] = []
    genomic_features = list(cfg.data.genomic_features)
    clinical_features = list(cfg.data.clinical_features)

    for rec in site.patients:
        gvals, gmask = feature_vector(rec.genomics, genomic_features)
        cvals, cmask = feature_vector(rec.clinical, clinical_features)
        e = entries[rec.patient_id] = {
            "patient_id": rec.patient_id, "split": rec.split, "benefit": rec.benefit,
            "dfs_months": rec.dfs_months, "dfs_event": rec.dfs_event,
            "genomics": gvals, "genomics_observed": gmask, "has_genomics": rec.genomics is not None,
            "clinical": cvals, "clinical_observed": cmask, "mri": None, "pathology": None,
        }
        if all(p in rec.mri for p in phases):
            try:
                hashes = {p: hasher.path(rec.mri[p]) for p in phases}
                mhash = hasher.path(rec.tumor_mask) if rec.tumor_mask else None
            except OSError as exc:
                failures.append({"patient_id": rec.patient_id, "modality": "mri", "file": str(rec.mri.get(phases[0])), "error": str(exc)})
            else:
                rel = f"mri/{_key(hashes, mhash, mri_cfg_key)}.npy"
                e["mri"] = rel
                if (cache / rel).exists():
                    n_mri_cached += 1
                else:
                    mri_jobs.append((rec.patient_id, rel, {p: str(rec.mri[p]) for p in phases},
                                     str(rec.tumor_mask) if rec.tumor_mask else None))
        if rec.slide is not None:
            try:
                shash = hasher.path(rec.slide)
            except OSError as exc:
                failures.append({"patient_id": rec.patient_id, "modality": "pathology", "file": str(rec.slide), "error": str(exc)})
            else:
                rel = f"pathology/{_key(shash, path_cfg_key)}.npz"
                e["pathology"] = rel
                if (cache / rel).exists():
                    n_path_cached += 1
                else:
                    slide_jobs.append((rec.patient_id, rel, str(rec.slide)))
    hasher.save()

    n_workers = max(1, int(workers if workers is not None else cfg.preprocess.workers))
    mri_stats = {"built": 0, "cached": n_mri_cached, "failed": 0, "seconds": 0.0}
    path_stats = {"built": 0, "cached": n_path_cached, "failed": 0, "tiles": 0, "seconds": 0.0, "dim": None}
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    t_work = time.perf_counter()
    # a live bar on a terminal only (it disappears when done); then one line per site
    with Progress(*columns, console=console, disable=not (progress and console.is_terminal), transient=True) as bar:
        t_mri = bar.add_task(f"{site.center_id}: MRI volumes", total=len(mri_jobs) + n_mri_cached,
                             completed=n_mri_cached, info=f"{n_mri_cached} cached")
        t_path = bar.add_task(f"{site.center_id}: slides", total=len(slide_jobs) + n_path_cached,
                              completed=n_path_cached, info=f"{n_path_cached} cached")
        ctx = get_context("spawn")
        pool = ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx, initializer=_init_worker,
                                   initargs=(max(1, (os.cpu_count() or 1) // n_workers),)) if n_workers > 1 else None
        try:
            futures = {}
            for pid, rel, phase_paths, mask in mri_jobs:
                args = (str(cache / rel), phase_paths, mask, mri_cfg, phases)
                futures[_submit(pool, _mri_job, args)] = ("mri", pid, rel, phase_paths[phases[0]])
            for pid, rel, slide in slide_jobs:
                futures[_submit(pool, _slide_job, (str(cache / rel), slide, path_cfg))] = ("pathology", pid, rel, slide)
            for fut in _completed(futures):
                modality, pid, rel, file = futures[fut]
                try:
                    res = fut.result()
                except Exception as exc:  # a bad file must not stop the site: report it, keep the rest
                    entries[pid][modality] = None
                    failures.append({"patient_id": pid, "modality": modality, "file": os.path.relpath(file, site_dir),
                                     "error": f"{type(exc).__name__}: {exc}"})
                    stats = mri_stats if modality == "mri" else path_stats
                    stats["failed"] += 1
                    console.print(f"[red]error[/red] {os.path.relpath(file, site_dir)} ({pid}, {modality}): {exc}")
                else:
                    if modality == "mri":
                        mri_stats["built"] += 1
                        mri_stats["seconds"] += res["seconds"]
                    else:
                        path_stats["built"] += 1
                        path_stats["tiles"] += res["n_tiles"]
                        path_stats["seconds"] += res["seconds"]
                        path_stats["dim"] = res["dim"]
                tid = t_mri if modality == "mri" else t_path
                stats = mri_stats if modality == "mri" else path_stats
                info = f"{stats['cached']} cached, {stats['failed']} failed"
                if modality == "pathology":
                    info += f", {stats['tiles']} tiles"
                bar.update(tid, advance=1, info=info)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
    wall = time.perf_counter() - t_work
    mri_stats["wall_seconds"] = path_stats["wall_seconds"] = wall
    mri_stats["volumes_per_s"] = mri_stats["built"] / wall if mri_stats["built"] and wall > 0 else None
    path_stats["tiles_per_s"] = path_stats["tiles"] / wall if path_stats["tiles"] and wall > 0 else None

    mri_shape = _first_readable((cache / e["mri"] for e in entries.values() if e["mri"]),
                                lambda f: list(np.load(f, mmap_mode="r").shape))
    path_dim = path_stats["dim"] or _first_readable((cache / e["pathology"] for e in entries.values() if e["pathology"]),
                                                    lambda f: int(np.load(f)["features"].shape[1])) or encoder.dim
    manifest = {
        "format": CACHE_FORMAT, "center_id": site.center_id, "display_name": site.display_name, "role": site.role,
        "phases": phases, "genomic_features": genomic_features, "clinical_features": clinical_features,
        "mri_shape": mri_shape, "path_dim": path_dim, "encoder": encoder.fingerprint,
        "config": {"mri": mri_cfg_key, "pathology": path_cfg_key},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "patients": list(entries.values()), "failures": failures,
    }
    text = json.dumps(manifest, indent=1)
    view_key = config_hash({"mri": mri_cfg_key, "pathology": path_cfg_key, "phases": phases,
                            "genomic": genomic_features, "clinical": clinical_features,
                            "val_fraction": float(cfg.data.val_fraction)})
    own = cache / MANIFEST.replace(".json", f"-{view_key[:16]}.json")
    _atomic_write_text(own, text)
    _atomic_write_text(cache / MANIFEST, text)
    if progress:
        n_mri = mri_stats["built"] + mri_stats["cached"]
        n_path = path_stats["built"] + path_stats["cached"]
        bad = f", [red]{len(failures)} failed[/red]" if failures else ""
        console.print(f"  {site.center_id}: {len(entries)} patients, {n_mri} MRI, {n_path} slides "
                      f"({mri_stats['built'] + path_stats['built']} built, "
                      f"{mri_stats['cached'] + path_stats['cached']} cached{bad}) in {time.perf_counter() - t_start:.1f}s")
    return PreprocessResult(cache_dir=cache, n_patients=len(entries), manifest=own, mri=mri_stats, pathology=path_stats,
                            failures=failures, seconds=time.perf_counter() - t_start)


class _Done:
    """A finished in-process job, shaped like a Future."""

    def __init__(self, fn, args):
        try:
            self._res, self._exc = fn(*args), None
        except Exception as exc:  # re-raised by result(), as a Future would
            self._res, self._exc = None, exc

    def result(self):
        if self._exc is not None:
            raise self._exc
        return self._res


class _Lazy:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args


def _submit(pool, fn, args):
    return pool.submit(fn, *args) if pool is not None else _Lazy(fn, args)


def _completed(futures: dict):
    """Yield futures as they complete; in-process jobs run one by one as they are asked for."""
    lazy = [f for f in futures if isinstance(f, _Lazy)]
    if lazy:
        for f in lazy:
            done = _Done(f.fn, f.args)
            futures[done] = futures.pop(f)
            yield done
    else:
        yield from as_completed(futures)


def manifest_path(cache: Path) -> tuple[Path, Path]:
    """(cache folder, manifest file) of a cache folder (its latest manifest) or of one configuration's manifest."""
    cache = Path(cache)
    if cache.suffix == ".json" and cache.name.startswith("manifest"):
        return cache.parent, cache
    return cache, cache / MANIFEST


def load_manifest(cache_dir: Path) -> dict:
    """A cache's manifest: ``cache_dir`` is the cache folder (its latest manifest) or one ``manifest-<key>.json``."""
    path = manifest_path(cache_dir)[1]
    if not path.exists():
        raise FileNotFoundError(f"{path}: no preprocessed cache here; run `newadj preprocess SITE_DIR` first")
    return json.loads(path.read_text())


def ensure_caches(sites, cfg, console=None, progress: bool = True, workers: int | None = None) -> dict[str, Path]:
    """Preprocess every site of a cohort (``common.data.cohort.SiteRef``; a no-op where its cache is current);
    returns site name -> this configuration's manifest (what :func:`common.learn.dataset.site_dataset` opens)."""
    out = {}
    for s in sites:
        res = preprocess_site(s.path, cfg, workers=workers, console=console, progress=progress)
        if not res.manifest.exists():
            raise RuntimeError(f"{s.path}: preprocessing wrote no manifest")
        out[s.name] = res.manifest
    return out
