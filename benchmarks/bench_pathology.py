"""Where a slide's preprocessing time goes: open, thumbnail, tissue mask, tile grid, tile reads, encoder.

    python benchmarks/bench_pathology.py --slides 'runs/full/*/pathology/*.tiff' --every 10 \
        --slides /tmp/bench_slide.tif [--resnet-random /tmp/resnet18.pt] [--json out.json] [overrides ...]

Runs in one process on one core (torch and BLAS limited to one thread) and prints, per group of slides,
milliseconds per slide for each phase and tiles/s per core, as one JSON object. The phases are the
functions ``slide_to_bag`` chains, imported from whatever ``common`` is on the path, so the same script
times an older checkout (``PYTHONPATH=<worktree>``) for a before/after table. ``--resnet-random PATH``
also times the ``resnet`` encoder (ResNet-18, random weights written to PATH: the speed does not depend
on the weights) on the same tiles.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import time
from pathlib import Path

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402

PHASES = ("open", "thumbnail", "tissue", "grid", "read", "encode")


def _plain(node):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)


def time_slides(paths: list[str], cfg: dict, encoder) -> dict:
    from common.preprocess import pathology as P

    sec = dict.fromkeys(PHASES, 0.0)
    tiles = 0

    def timed(phase, fn, *a):
        t = time.perf_counter()
        out = fn(*a)
        sec[phase] += time.perf_counter() - t
        return out

    for p in paths:
        s = timed("open", P.open_slide, p)
        rgb, _, ds = timed("thumbnail", P.read_thumbnail, s, cfg)
        mask = timed("tissue", P.tissue_from_rgb, rgb, cfg["tissue"])
        coords = timed("grid", P.tile_grid, s, mask, cfg, ds)
        batches = iter(P.iter_tile_batches(s, coords, cfg))
        while True:
            b = timed("read", next, batches, None)
            if b is None:
                break
            timed("encode", encoder, b)
        tiles += len(coords)
        s.close()
    total = sum(sec.values())
    return {"slides": len(paths), "tiles": tiles, "tiles_per_slide": round(tiles / max(len(paths), 1), 1),
            "ms_per_slide": {k: round(1000 * v / max(len(paths), 1), 1) for k, v in sec.items()},
            "seconds": round(total, 2), "tiles_per_s_core": round(tiles / total, 1) if total else None,
            "encode_ms_per_tile": round(1000 * sec["encode"] / max(tiles, 1), 2),
            "read_ms_per_tile": round(1000 * sec["read"] / max(tiles, 1), 2)}


def random_resnet(path: Path) -> Path:
    import torch
    from monai.networks.nets import ResNet

    torch.manual_seed(0)
    net = ResNet(block="basic", layers=[2, 2, 2, 2], block_inplanes=[64, 128, 256, 512], spatial_dims=2,
                 n_input_channels=3, num_classes=1000)
    torch.save(net.state_dict(), path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", action="append", required=True, help="a glob; repeat for several groups")
    ap.add_argument("--every", type=int, default=1, help="take every k-th slide of each glob")
    ap.add_argument("--resnet-random", type=Path, default=None, help="also time a ResNet-18 (weights written here)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from common.config import load_config
    from common.preprocess.encoders import build_encoder

    cfg = _plain(load_config(a.overrides).preprocess.pathology)
    encoders = {"stats": build_encoder(cfg["encoder"])}
    if a.resnet_random:
        encoders["resnet18"] = build_encoder({**cfg["encoder"], "name": "resnet", "depth": 18, "device": "cpu",
                                              "path": str(random_resnet(a.resnet_random))})
    import common

    out = {"code": str(Path(common.__file__).resolve().parents[1]), "threads": torch.get_num_threads(), "groups": {}}
    for pattern in a.slides:
        paths = sorted(glob.glob(pattern))[::max(1, a.every)]
        if not paths:
            raise SystemExit(f"{pattern}: no slide matches")
        for name, enc in encoders.items():
            time_slides(paths[:1], cfg, enc)  # warm-up: imports, first allocations
            out["groups"][f"{pattern} [{name}]"] = time_slides(paths, cfg, enc)
    print(json.dumps(out, indent=1))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
