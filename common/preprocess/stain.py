"""Stain normalisation of H&E tiles before the encoder (``preprocess.pathology.stain_norm``).

``macenko``: Macenko et al. (ISBI 2009) as implemented by torchstain (numpy backend).  The slide's own stain
matrix and 99th-percentile stain concentrations are estimated ONCE per slide (after a white balance that
maps the slide's glass to the reference light level), from a fixed, evenly spaced
sample of its tissue tiles (torchstain's ``fit``), then every tile of the slide is unmixed with that matrix,
its concentrations are scaled to torchstain's reference maxima and it is re-coloured with the reference
H&E matrix.  One estimate per slide (rather than per tile, as ``normalize`` does) keeps tiles of one slide
comparable with each other and is robust for tiles with little stain of one kind.

Why Macenko and not stain augmentation: the tile features are computed once at the site and cached
(the CLAM pattern), so a train-time colour jitter would need many encoded copies of every slide; a
per-slide normalisation costs one extra read of the sample tiles and applies identically at training,
validation, the external center and screening.  Deterministic: the same slide gives the same tiles.
"""
from __future__ import annotations

import numpy as np

METHODS = ("none", "macenko")


class SlideStainNormalizer:
    """Maps uint8 NHWC RGB tile batches of one slide to the reference stain appearance."""

    def __init__(self, sample: np.ndarray, io: float = 240.0, alpha: float = 1.0, beta: float = 0.15):
        from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

        ref = NumpyMacenkoNormalizer()
        self.he_ref, self.max_ref = np.asarray(ref.HERef, float), np.asarray(ref.maxCRef, float)
        pix = np.asarray(sample, np.uint8).reshape(-1, 3).astype(np.float32)
        # white balance first: the slide's glass (99th percentile per channel) becomes the reference light
        # level, so a center's dimmer or tinted background is not taken for stain
        self._gain = (io / np.clip(np.percentile(pix, 99, axis=0), 120.0, 255.0)).astype(np.float32)
        pix = np.clip(pix * self._gain, 0, 255)
        od = -np.log((pix.astype(float) + 1) / io)
        if int((~np.any(od < beta, axis=1)).sum()) < 100:
            raise ValueError("fewer than 100 stained pixels in the sample tiles")
        est = NumpyMacenkoNormalizer()
        with np.errstate(all="raise"):
            est.fit(pix.astype(np.uint8).reshape(1, -1, 3), Io=io, alpha=alpha, beta=beta)
        he, mx = np.asarray(est.HERef, float), np.asarray(est.maxCRef, float)
        if not (np.all(np.isfinite(he)) and np.all(np.isfinite(mx)) and np.all(mx > 1e-6)):
            raise ValueError("degenerate stain estimate")
        self.he, self.max = he, mx
        self.io = float(io)
        self._pinv = np.linalg.pinv(he)                     # [2, 3]: OD -> concentrations (least squares)
        self._scale = (self.max_ref / self.max)[:, None]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        b = np.asarray(batch)
        shape = b.shape
        pix = np.clip(b.reshape(-1, 3).astype(np.float32) * self._gain, 0, 255)
        od = -np.log((pix + 1) / self.io)                                       # [P, 3]
        conc = (self._pinv.astype(np.float32) @ od.T) * self._scale.astype(np.float32)   # [2, P]
        out = self.io * np.exp(-(self.he_ref.astype(np.float32) @ conc))        # [3, P]
        return np.clip(out.T, 0, 255).astype(np.uint8).reshape(shape)

    def describe(self) -> dict:
        return {"method": "macenko", "he": self.he.round(4).tolist(), "max_c": self.max.round(4).tolist()}


def sample_indices(n: int, k: int = 16) -> np.ndarray:
    """``k`` evenly spaced tile indices of ``n`` (all when fewer): the slide's stain sample."""
    if n <= k:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(int))
