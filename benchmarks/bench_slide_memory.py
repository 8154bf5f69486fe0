"""Memory/throughput benchmark of ``slide_to_bag`` on a large synthetic whole-slide image.

1. Writes (streaming, tile by tile: tifffile consumes a generator, so the writer
   never holds more than one tile) a pyramidal tiled-JPEG TIFF of
   ``--size`` x ``--size`` pixels at ``--mpp`` with blobs of H&E-like tissue.
2. Runs ``slide_to_bag`` on it in a child process and reports tiles/s and the
   child's peak RSS (``ru_maxrss``, plus a psutil sampler) as one JSON line.

    python benchmarks/bench_slide_memory.py --size 40000 --out /tmp/bench_slide.tif
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TILE = 256
# tissue blobs: (cx, cy, rx, ry) as fractions of the slide side
BLOBS = [(0.30, 0.35, 0.22, 0.18), (0.68, 0.62, 0.20, 0.25), (0.45, 0.80, 0.12, 0.08)]


def _textures(n: int = 8, seed: int = 0) -> list[np.ndarray]:
    """A few 256x256 H&E-like textures (pink stroma + purple nuclei), reused across tiles."""
    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[-3:4, -3:4]
    disk = yy ** 2 + xx ** 2 <= 9
    for k in range(n):
        img = np.empty((TILE + 8, TILE + 8, 3), np.float32)
        img[...] = (235, 160, 200)
        img += rng.normal(0, 6, img.shape[:2] + (1,))
        for _ in range(int(rng.uniform(60, 260))):
            y, x = rng.integers(4, TILE + 4, 2)
            img[y - 3:y + 4, x - 3:x + 4][disk] = (70, 40, 140)
        out.append(np.clip(img[4:-4, 4:-4], 0, 255).astype(np.uint8))
    return out


def _tissue(xs: np.ndarray, ys: np.ndarray, size: int) -> np.ndarray:
    m = np.zeros(np.broadcast_shapes(xs.shape, ys.shape), bool)
    for cx, cy, rx, ry in BLOBS:
        m |= ((xs / size - cx) / rx) ** 2 + ((ys / size - cy) / ry) ** 2 <= 1
    return m


def tile_generator(size: int, ds: int, textures: list[np.ndarray]):
    """Tiles (row-major) of the pyramid level with downsample ``ds``: tissue where the blobs are."""
    w = h = size // ds
    bg = np.full((TILE, TILE, 3), 243, np.uint8)
    rng_idx = 0
    for ty in range(0, h, TILE):
        for tx in range(0, w, TILE):
            ys = ((ty + np.arange(TILE)) * ds)[:, None].astype(np.float64)
            xs = ((tx + np.arange(TILE)) * ds)[None, :].astype(np.float64)
            m = _tissue(xs, ys, size)
            if not m.any():
                yield bg
                continue
            tex = textures[(tx // TILE * 7 + ty // TILE * 13) % len(textures)]
            if ds > 1:  # coarser level: paler/denser-looking averaged texture is fine for a benchmark
                tex = textures[rng_idx % len(textures)]
                rng_idx += 1
            yield np.where(m[..., None], tex, bg)


def write_slide(path: Path, size: int, mpp: float, levels: int = 4, factor: int = 4) -> Path:
    import tifffile

    textures = _textures()
    kw = dict(tile=(TILE, TILE), compression="jpeg", compressionargs={"level": 85}, photometric="rgb",
              resolutionunit="CENTIMETER")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tifffile.TiffWriter(str(tmp), bigtiff=True) as tw:
        for lvl in range(levels):
            ds = factor ** lvl
            n = size // ds
            if n < TILE:
                break
            extra = dict(subifds=levels - 1) if lvl == 0 else dict(subfiletype=1)
            tw.write(tile_generator(size, ds, textures), shape=(n, n, 3), dtype=np.uint8,
                     resolution=(1e4 / (mpp * ds), 1e4 / (mpp * ds)), **kw, **extra)
    os.replace(tmp, path)
    return path


CHILD = r"""
import json, sys, time, threading, psutil
from common.preprocess.pathology import slide_to_bag
cfg = json.loads(sys.argv[2])
proc = psutil.Process()
peak = [proc.memory_info().rss]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss); time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
bag = slide_to_bag(sys.argv[1], cfg)
dt = time.perf_counter() - t0
stop.set()
print("RESULT " + json.dumps({"n_tiles": bag["n_tiles"], "seconds": dt, "dim": int(bag["features"].shape[1]),
      "level": bag["level"], "mpp": bag["mpp"], "psutil_peak_rss_mb": peak[0] / 2**20}))
"""


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=40000, help="level-0 side in pixels")
    ap.add_argument("--mpp", type=float, default=0.25, help="level-0 microns per pixel")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_slide_40k.tif"))
    ap.add_argument("--reuse", action="store_true", help="reuse --out if it exists")
    ap.add_argument("--target-mpp", type=float, default=None, help="override pathology.target_mpp")
    ap.add_argument("--max-tiles", type=int, default=None, help="override pathology.max_tiles")
    ap.add_argument("--threads", type=int, default=1, help="torch/BLAS threads in the child")
    args = ap.parse_args(argv)

    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "preprocess" / "default.yaml").pathology, resolve=True)
    if args.target_mpp is not None:
        cfg["target_mpp"] = args.target_mpp
    if args.max_tiles is not None:
        cfg["max_tiles"] = args.max_tiles

    t0 = time.perf_counter()
    if not (args.reuse and args.out.exists()):
        write_slide(args.out, args.size, args.mpp)
    write_s = time.perf_counter() - t0
    # the writer's own peak (this process) so far
    writer_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               OPENBLAS_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(args.out), json.dumps(cfg)], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"slide_to_bag failed (rc={proc.returncode})")
    child = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])
    child_peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    res = {
        "size": args.size, "mpp": args.mpp, "file_mb": round(args.out.stat().st_size / 2**20, 1),
        "write_seconds": round(write_s, 1), "writer_peak_rss_mb": round(writer_peak_mb, 1),
        "target_mpp": cfg["target_mpp"], "max_tiles": cfg["max_tiles"], "encoder": cfg["encoder"]["name"],
        "n_tiles": child["n_tiles"], "dim": child["dim"], "read_level": child["level"],
        "seconds": round(child["seconds"], 2),
        "tiles_per_s": round(child["n_tiles"] / child["seconds"], 1) if child["seconds"] > 0 else None,
        "peak_rss_mb": round(child_peak_mb, 1), "psutil_peak_rss_mb": round(child["psutil_peak_rss_mb"], 1),
        "under_1_5_gb": child_peak_mb < 1536,
    }
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
