"""Preprocessing throughput: volumes/s and tiles/s of a cold run, and the speed-up of a cached re-run.

    python benchmarks/bench_preprocess.py --cohort COHORT [--workers 2] [--fresh]

Prints one JSON object (also written to --json) with per-site and total numbers.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from common.data.cohort import discover_sites
from common.config import load_config
from common.preprocess.cache import preprocess_site, resolve_cache_dir


def run_all(sites, cfg, workers):
    t0 = time.perf_counter()
    res = [preprocess_site(s.path, cfg, workers=workers, progress=False) for s in sites]
    return res, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cohort", required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--fresh", action="store_true", help="delete existing caches first (cold run)")
    ap.add_argument("--json", default=None)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    cfg = load_config(a.overrides)
    sites = discover_sites(Path(a.cohort))
    if a.fresh:
        for s in sites:
            shutil.rmtree(resolve_cache_dir(s.path, cfg), ignore_errors=True)
    cold, t_cold = run_all(sites, cfg, a.workers)
    warm, t_warm = run_all(sites, cfg, a.workers)
    vols = sum(r.mri["built"] for r in cold)
    tiles = sum(r.pathology["tiles"] for r in cold)
    out = {
        "cohort": a.cohort, "workers": a.workers, "sites": len(sites), "patients": sum(r.n_patients for r in cold),
        "cold_seconds": round(t_cold, 1), "volumes_built": vols, "slides_built": sum(r.pathology["built"] for r in cold),
        "tiles": tiles, "volumes_per_s_overall": round(vols / t_cold, 2), "tiles_per_s_overall": round(tiles / t_cold, 1),
        "mri_seconds_per_volume_worker": round(sum(r.mri["seconds"] for r in cold) / max(vols, 1), 3),
        "pathology_tiles_per_s_worker": round(tiles / max(sum(r.pathology["seconds"] for r in cold), 1e-9), 1),
        "cached_seconds": round(t_warm, 2), "cached_speedup": round(t_cold / max(t_warm, 1e-9), 1),
        "rebuilt_on_second_run": sum(r.mri["built"] + r.pathology["built"] for r in warm),
        "failures": sum(len(r.failures) for r in cold),
    }
    print(json.dumps(out))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
