"""Tile encoders: uint8 NHWC RGB batches -> float32 [N, dim] embeddings.

``build_encoder(cfg)`` takes the ``pathology.encoder`` config node:

* ``stats`` (default): deterministic hand-crafted features, no weights.
  Ruifrok-Johnston colour deconvolution to haematoxylin / eosin / residual
  optical density, then per-tile statistics (see :data:`STATS_FEATURES`).
  Stain-intensity shifts between centres are reduced by also describing each
  stain after per-tile normalisation to its own 99th percentile.
* ``resnet``: a 2-D ResNet (MONAI's network, ``depth`` 18 / 34 / 50) whose weights come from a
  local state-dict file (``path``; torchvision's layer names, e.g. ImageNet weights saved with
  ``torch.save(model.state_dict())``), batched, on CUDA with mixed precision when present.
* ``torchscript``: a local TorchScript file (``path``), ImageNet-normalised input.
* ``timm`` / ``hf``: only when the package is importable, and only from a local
  ``path``; nothing is ever downloaded.

``Encoder.fingerprint`` changes whenever the encoder or its weights change; the
cache key includes it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from common.hashing import sha256_file
from scipy import ndimage

# Ruifrok & Johnston (2001) stain OD vectors (rows: haematoxylin, eosin, DAB/residual).
RJ_STAINS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
RJ_STAINS = RJ_STAINS / np.linalg.norm(RJ_STAINS, axis=1, keepdims=True)
OD_FROM_STAINS_INV = np.linalg.inv(RJ_STAINS).astype(np.float32)  # concentrations = OD @ inv(M)

STATS_VERSION = 2   # 2: float64 sums (the per-tile float32 sums of v1 were off by up to ~4e-4)
# optical density of each 8-bit intensity: -log10((v + 1) / 256)
_OD_LUT = (-np.log10((np.arange(256, dtype=np.float32) + 1.0) / 256.0)).astype(np.float32)
_U8_UNIT = np.arange(256, dtype=np.float32) / np.float32(255.0)   # v / 255
_PCTS = (10, 50, 90, 99)
STATS_FEATURES: list[str] = (
    ["tissue_frac", "od_mean"]
    + [f"{s}_{k}" for s in ("H", "E") for k in ("mean", "std", *[f"p{p}" for p in _PCTS])]
    + ["D_mean", "D_std", "H_E_ratio", "H_E_corr"]
    + [f"{s}n_{k}" for s in ("H", "E") for k in ("mean", "std", "p50")]
    + [f"H_hist{i}" for i in range(4)]
    + ["nuclei_frac", "nuclei_frac_rel", "nuclei_per_kpx", "nucleus_area_mean", "nucleus_area_std",
       "nuclei_frac_E_low"]
    + ["grad_energy", "grad_energy_H", "laplace_var", "local_var", "local_var_H"]
    + ["R_mean", "G_mean", "B_mean", "R_std", "G_std", "B_std", "grey_mean", "grey_std", "sat_mean"]
)


def _plain(cfg: Any) -> dict:
    if cfg is None:
        return {}
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return dict(cfg)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]




class Encoder:
    name: str = "base"
    dim: int = 0
    fingerprint: str = ""

    def __call__(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, fingerprint={self.fingerprint!r})"


def _check_batch(batch: np.ndarray) -> np.ndarray:
    batch = np.asarray(batch)
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected a uint8 batch N x H x W x 3, got shape {batch.shape}")
    if batch.dtype != np.uint8:
        raise ValueError(f"expected a uint8 batch, got {batch.dtype}")
    return batch


# --- stats -----------------------------------------------------------------------------

class StatsEncoder(Encoder):
    """Hand-crafted H&E tile descriptor (``len(STATS_FEATURES)`` values), deterministic, no weights."""

    name = "stats"

    def __init__(self, nuclei_od: float = 0.8, min_nucleus_px: int = 6, background_od: float = 0.15):
        self.nuclei_od = float(nuclei_od)
        self.min_nucleus_px = int(min_nucleus_px)
        self.background_od = float(background_od)
        self.dim = len(STATS_FEATURES)
        self.feature_names = list(STATS_FEATURES)
        self.fingerprint = f"stats-v{STATS_VERSION}-" + _digest(
            {"nuclei_od": self.nuclei_od, "min_nucleus_px": self.min_nucleus_px,
             "background_od": self.background_od, "features": STATS_FEATURES})
        self._struct3 = np.zeros((3, 3, 3), bool)               # 4-connected within a tile, never across
        self._struct3[1] = ndimage.generate_binary_structure(2, 1)

    @staticmethod
    def deconvolve(batch: np.ndarray) -> np.ndarray:
        """uint8 [..., 3] RGB -> float32 [..., 3] stain concentrations (H, E, residual) in OD units."""
        return np.maximum(_OD_LUT[np.asarray(batch, np.uint8)] @ OD_FROM_STAINS_INV, 0.0)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = _check_batch(batch)
        out = np.zeros((len(batch), self.dim), np.float32)
        for start in range(0, len(batch), self.CHUNK):  # a few tiles at a time: bounded, cache-friendly
            out[start:start + self.CHUNK] = self._tiles(batch[start:start + self.CHUNK])
        return out

    CHUNK = 4   # tiles per array pass: 4 x 224² planes stay in cache (4: 9.3 ms/tile, 16: 14.8, 1: 10.7)

    def _tiles(self, tiles: np.ndarray) -> np.ndarray:
        """Features of a chunk of tiles, computed for the whole chunk at once: one pass per colour plane
        (no reductions over the 3-channel axis, which numpy does slowly), sums in float64, and only the
        masked percentiles and the nuclei sizes loop over the chunk's tiles. ``tests/test_pathology.py``
        holds the plain per-tile definition of every feature and checks this against it."""
        n, h, w, _ = tiles.shape
        npx = h * w
        f64 = np.float64
        u = [np.ascontiguousarray(tiles[..., c]) for c in range(3)]           # uint8 planes
        od = [_OD_LUT[c] for c in u]                                           # optical density per plane
        od_sum = od[0] + od[1] + od[2]
        M = OD_FROM_STAINS_INV
        H, E, D = (np.maximum(od[0] * M[0, j] + od[1] * M[1, j] + od[2] * M[2, j], 0.0) for j in range(3))
        tissue = od_sum > self.background_od
        # statistics over tissue pixels (all pixels of a tile with fewer than 16 tissue pixels)
        whole = tissue.sum(axis=(1, 2)) < 16
        t = tissue | whole[:, None, None]
        tf = t.astype(np.float32)
        cnt = tf.sum(axis=(1, 2), dtype=f64)
        ax = (1, 2)

        def msum(v):
            return (v * tf).sum(axis=ax, dtype=f64)

        def mean_std(s1, s2, c):
            m = s1 / c
            return m, np.sqrt(np.maximum(s2 / c - m * m, 0.0))

        Hm, Hs = mean_std(msum(H), msum(H * H), cnt)
        Em, Es = mean_std(msum(E), msum(E * E), cnt)
        Dm, Ds = mean_std(msum(D), msum(D * D), cnt)
        corr = np.where((Hs > 1e-6) & (Es > 1e-6), (msum(H * E) / cnt - Hm * Em) / np.maximum(Hs * Es, 1e-30), 0.0)
        pH = np.empty((n, len(_PCTS))); pE = np.empty((n, len(_PCTS))); p99H = np.empty(n); hist = np.empty((n, 4))
        all_t = t.all(axis=(1, 2))
        i50, i99 = _PCTS.index(50), _PCTS.index(99)
        for k in range(n):
            Ht, Et = (H[k], E[k]) if all_t[k] else (H[k][t[k]], E[k][t[k]])
            pH[k] = np.percentile(Ht, _PCTS)
            pE[k] = np.percentile(Et, _PCTS)
            p99H[k] = pH[k, i99] if all_t[k] else np.percentile(H[k], 99)
            hist[k] = np.bincount(np.minimum((np.clip(Ht, 0, 2.0) * 2.0).astype(np.int64).ravel(), 3), minlength=4)
        cols = [tissue.sum(axis=ax) / npx, od_sum.sum(axis=ax, dtype=f64) / npx,
                Hm, Hs, *pH.T, Em, Es, *pE.T, Dm, Ds, Hm / (Em + 1e-3), corr]
        # per-tile stain-intensity normalisation (robust to centre-wise staining strength)
        for m, s_, p in ((Hm, Hs, pH), (Em, Es, pE)):
            scale = p[:, i99] + 1e-3
            cols += [m / scale, s_ / scale, p[:, i50] / scale]
        cols += list((hist / cnt[:, None]).T)
        # nuclei: strongly haematoxylin-stained pixels and their connected components (within a tile)
        nuc = H > self.nuclei_od
        rel_thr = np.maximum(0.5 * self.nuclei_od, 0.6 * p99H).astype(np.float32)
        nuc_rel = H > rel_thr[:, None, None]
        lab, _ = ndimage.label(nuc, structure=self._struct3)      # no connection across tiles
        sizes = np.bincount(lab.ravel())
        last = np.maximum.accumulate(lab.reshape(n, -1).max(axis=1))  # labels are numbered in tile order
        first = np.concatenate([[0], last[:-1]]) + 1
        n_nuc = np.zeros(n); a_mean = np.zeros(n); a_std = np.zeros(n)
        for k in range(n):
            sz = sizes[first[k]:last[k] + 1]
            sz = sz[sz >= self.min_nucleus_px]
            if len(sz):
                n_nuc[k], a_mean[k], a_std[k] = len(sz), sz.mean(), sz.std()
        e_low = (nuc & (E < pE[:, i50].astype(np.float32)[:, None, None])).sum(axis=ax) / npx
        cols += [nuc.sum(axis=ax) / npx, nuc_rel.sum(axis=ax) / npx, 1000.0 * n_nuc / npx, a_mean, a_std, e_low]
        # texture (every filter runs within a tile: size 1 / no derivative along the chunk axis)
        rgb = [_U8_UNIT[c] for c in u]                                         # v / 255 per plane
        grey = rgb[0] * np.float32(0.299) + rgb[1] * np.float32(0.587) + rgb[2] * np.float32(0.114)
        gy, gx = np.gradient(grey, axis=ax)
        hy, hx = np.gradient(H, axis=ax)
        lap = ndimage.correlate1d(grey, [1, -2, 1], axis=1) + ndimage.correlate1d(grey, [1, -2, 1], axis=2)
        win = (1, 7, 7)
        m = ndimage.uniform_filter(grey, win)
        lv = ndimage.uniform_filter(grey * grey, win) - m * m
        mh = ndimage.uniform_filter(H, win)
        lvh = ndimage.uniform_filter(H * H, win) - mh * mh

        def mean_std_all(v):
            return mean_std(v.sum(axis=ax, dtype=f64), (v * v).sum(axis=ax, dtype=f64), npx)

        cols += [(gx * gx + gy * gy).sum(axis=ax, dtype=f64) / npx, (hx * hx + hy * hy).sum(axis=ax, dtype=f64) / npx,
                 mean_std_all(lap)[1] ** 2, np.maximum(lv, 0).sum(axis=ax, dtype=f64) / npx,
                 np.maximum(lvh, 0).sum(axis=ax, dtype=f64) / npx]
        s1 = [c.sum(axis=ax, dtype=np.int64).astype(f64) for c in u]           # exact channel statistics
        s2 = [(c.astype(np.int32) ** 2).sum(axis=ax, dtype=np.int64).astype(f64) for c in u]
        ch = [mean_std(a / 255.0, b / 65025.0, npx) for a, b in zip(s1, s2)]
        mx = _U8_UNIT[np.maximum(np.maximum(u[0], u[1]), u[2])]
        mn = _U8_UNIT[np.minimum(np.minimum(u[0], u[1]), u[2])]
        sat = (mx - mn) / np.maximum(mx, 1e-6)
        gm, gs = mean_std_all(grey)
        cols += [*(c[0] for c in ch), *(c[1] for c in ch), gm, gs, sat.sum(axis=ax, dtype=f64) / npx]
        f = np.stack([np.asarray(c, f64) for c in cols], axis=1).astype(np.float32)
        return np.nan_to_num(f, nan=0.0, posinf=0.0, neginf=0.0)


# --- learned encoders ----------------------------------------------------------------------

THUMBNAIL_VERSION = 1


class ThumbnailEncoder(Encoder):
    """The tile itself, for a CNN trained in the federation: optical density (``-log10((v + 1) / 256)`` per
    colour plane, so background is ~0 and stains add linearly) box-averaged to ``side`` x ``side`` pixels and
    flattened channel-first (``3 * side * side`` values).  It encodes no rule about the tissue: what in the
    tile matters is learned by the model's tile CNN (``model.pathology.tile_net``), from the training
    centers' labels.  Deterministic, no weights."""

    name = "thumbnail"

    def __init__(self, side: int = 56):
        self.side = int(side)
        if not 8 <= self.side <= 224:
            raise ValueError(f"encoder thumbnail: side {self.side} outside 8..224")
        self.dim = 3 * self.side * self.side
        self.tile_shape = (3, self.side, self.side)
        self.fingerprint = f"thumbnail-v{THUMBNAIL_VERSION}-" + _digest({"side": self.side})

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        batch = _check_batch(batch)
        od = torch.from_numpy(_OD_LUT[batch]).permute(0, 3, 1, 2)          # N x 3 x H x W
        small = F.adaptive_avg_pool2d(od, (self.side, self.side))      # box average (exact for integer factors)
        return small.reshape(len(batch), -1).numpy().astype(np.float32, copy=False)


def _device(cfg: Mapping):
    import torch

    want = str(cfg.get("device", "auto"))
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(want)


class TorchEncoder(Encoder):
    """Wraps a torch module: uint8 NHWC -> ImageNet-normalised float NCHW -> [N, dim] embeddings."""

    def __init__(self, module, name: str, cfg: Mapping, weights_id: str):
        import torch

        self.module = module.eval()
        self.name = name
        self.device = _device(cfg)
        self.amp = str(cfg.get("amp", "auto")) != "off"
        self.module.to(self.device)
        # channels-last tensors let oneDNN / cuDNN pick their fast convolution kernels (ResNet-18 on one CPU
        # core: 10-27% faster per tile in our runs, same outputs); a module that cannot take it keeps its own
        try:
            self.module.to(memory_format=torch.channels_last)
            self.channels_last = True
        except (TypeError, RuntimeError):  # pragma: no cover - e.g. a TorchScript module that refuses it
            self.channels_last = False
        self.input_size = int(cfg["input_size"]) if cfg.get("input_size") else None
        self.mean = torch.tensor(cfg.get("mean", [0.485, 0.456, 0.406]), dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", [0.229, 0.224, 0.225]), dtype=torch.float32).view(1, 3, 1, 1)
        self.fingerprint = f"{name}-" + _digest({"weights": weights_id, "input_size": self.input_size,
                                                 "mean": self.mean.flatten().tolist(),
                                                 "std": self.std.flatten().tolist()})
        if cfg.get("dim"):
            self.dim = int(cfg["dim"])
        else:  # infer with a dummy batch
            size = self.input_size or 224
            self.dim = int(self(np.zeros((1, size, size, 3), np.uint8)).shape[1])

    def _forward(self, x):
        out = self.module(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if isinstance(out, dict):  # e.g. {"pooler_output": ...}
            out = out.get("pooler_output", next(iter(out.values())))
        if hasattr(out, "pooler_output") and out.pooler_output is not None:
            out = out.pooler_output
        elif hasattr(out, "last_hidden_state"):
            out = out.last_hidden_state[:, 0]
        return out.reshape(out.shape[0], -1)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        batch = _check_batch(batch)
        cuda = self.device.type == "cuda"
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, non_blocking=cuda)
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
            if self.input_size and x.shape[-1] != self.input_size:
                x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                                  align_corners=False, antialias=True)
            x = (x - self.mean.to(x.device)) / self.std.to(x.device)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            # mixed precision on a GPU (bf16 where supported), full precision on the CPU
            amp = cuda and self.amp
            dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
            with torch.autocast(device_type="cuda", dtype=dtype, enabled=amp):
                y = self._forward(x)
        return y.float().cpu().numpy()


def _local_path(cfg: Mapping, name: str) -> Path:
    path = cfg.get("path")
    if not path:
        raise ValueError(f"encoder {name!r} needs a local weights path (preprocess.pathology.encoder.path); "
                         "nothing is downloaded")
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise FileNotFoundError(f"{p}: encoder {name!r} weights not found (nothing is downloaded)")
    return p


def _weights_id(p: Path) -> str:
    if p.is_file():
        return sha256_file(p)
    files = sorted(f for f in p.rglob("*") if f.is_file())
    return _digest([(str(f.relative_to(p)), sha256_file(f)) for f in files])


def _need(pkg: str, name: str):
    import importlib.util

    if importlib.util.find_spec(pkg) is None:
        raise ImportError(f"encoder {name!r} needs the `{pkg}` package and a local path; nothing is downloaded. "
                          f"Install `{pkg}` or use encoder.name=stats / torchscript")


RESNET_LAYERS = {18: ("basic", [2, 2, 2, 2]), 34: ("basic", [3, 4, 6, 3]), 50: ("bottleneck", [3, 4, 6, 3])}


def _resnet_encoder(cfg: Mapping) -> "TorchEncoder":
    """A 2-D ResNet (MONAI's ``ResNet``, torchvision's layer names) from a local state-dict file; the pooled
    features before the classifier are the embedding (512 for depth 18 / 34, 2048 for 50)."""
    import torch
    from monai.networks.nets import ResNet

    p = _local_path(cfg, "resnet")
    depth = int(cfg.get("depth", 18))
    if depth not in RESNET_LAYERS:
        raise ValueError(f"encoder resnet: depth {depth} not among {sorted(RESNET_LAYERS)}")
    block, layers = RESNET_LAYERS[depth]
    module = ResNet(block=block, layers=layers, block_inplanes=[64, 128, 256, 512], spatial_dims=2,
                    n_input_channels=3, num_classes=1, feed_forward=False)
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)   # tensors only: nothing in it runs
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, a corrupt file
        raise ValueError(f"{p}: not a state dict of tensors ({type(exc).__name__}: {exc})") from exc
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith(("fc.", "module.fc."))}
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(f"{p}: weights do not fit a ResNet-{depth} (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")
    return TorchEncoder(module, "resnet", {**cfg, "dim": cfg.get("dim") or (2048 if block == "bottleneck" else 512)},
                        f"resnet{depth}:{_weights_id(p)}")


def build_encoder(cfg: Any = None) -> Encoder:
    """An encoder from the ``pathology.encoder`` config node (``None`` -> ``stats``)."""
    cfg = _plain(cfg)
    name = str(cfg.get("name", "stats") or "stats").lower()
    if name == "stats":
        s = dict(cfg.get("stats") or {})
        return StatsEncoder(nuclei_od=s.get("nuclei_od", 0.8), min_nucleus_px=s.get("min_nucleus_px", 6),
                            background_od=s.get("background_od", 0.15))
    if name == "thumbnail":
        return ThumbnailEncoder(side=(cfg.get("thumbnail") or {}).get("side", 56))
    if name == "torchscript":
        import torch

        p = _local_path(cfg, name)
        import warnings

        try:
            with warnings.catch_warnings():  # torch 2.9+ marks TorchScript deprecated; it still loads
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.load(str(p), map_location=_device(cfg))
        except Exception as exc:
            raise ValueError(f"{p}: not a loadable TorchScript module ({type(exc).__name__}: {exc})") from exc
        return TorchEncoder(module, "torchscript", cfg, _weights_id(p))
    if name == "resnet":
        return _resnet_encoder(cfg)
    if name == "timm":
        _need("timm", name)
        p = _local_path(cfg, name)
        import timm

        model_name = cfg.get("model")
        if not model_name:
            raise ValueError("encoder 'timm' needs encoder.model (the timm architecture name) and encoder.path")
        module = timm.create_model(str(model_name), pretrained=True, num_classes=0,
                                   pretrained_cfg_overlay=dict(file=str(p)))
        return TorchEncoder(module, "timm", cfg, f"{model_name}:{_weights_id(p)}")
    if name in ("hf", "transformers"):
        _need("transformers", name)
        p = _local_path(cfg, name)
        from transformers import AutoModel

        module = AutoModel.from_pretrained(str(p), local_files_only=True)
        return TorchEncoder(module, "hf", cfg, _weights_id(p))
    raise ValueError(f"unknown pathology encoder {name!r} (stats, thumbnail, resnet, torchscript, timm, hf)")
