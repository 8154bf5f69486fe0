"""Training-time MRI augmentation for scanner shift, built from MONAI's array transforms.

A center that the model has never seen brings another scanner: another intensity
inhomogeneity (bias field), contrast and gain, noise level, resolution and a slightly
different field of view.  ``train.augment.mri`` switches on a MONAI ``Compose`` of
``RandBiasField``, ``RandAdjustContrast``, ``RandScaleIntensity`` / ``RandShiftIntensity``,
``RandGaussianNoise``, ``RandGaussianSmooth`` (a lower resolution) and a small ``RandAffine``,
applied per volume to the training batch only (validation and every released metric see the
volumes as they are).  Per-volume harmonisation is the preprocessing's: every phase of every
volume is z-scored over its non-zero voxels before the tumor-centred crop
(``common/preprocess/mri.py``), so the crop keeps the tumor's intensity relative to its own
volume; the augmented crop is therefore not z-scored again, and gain / offset stay small
(residual differences of that normalisation).  Patients without MRI (an all-zero volume with
``has_mri`` false) are left alone.

Deterministic: the transforms draw from MONAI's random state, seeded with the training seed,
so a federated round is reproduced exactly on resume.
"""
from __future__ import annotations

from typing import Mapping

import torch


def build_mri_augmentation(cfg: Mapping | None, seed: int):
    """A callable ``(mri [B, C, D, H, W], has_mri [B]) -> mri`` or None when switched off."""
    if not cfg or not bool(cfg.get("enabled", False)):
        return None
    from monai.transforms import (Compose, RandAdjustContrast, RandAffine, RandBiasField, RandGaussianNoise,
                                  RandGaussianSmooth, RandScaleIntensity, RandShiftIntensity)

    p = float(cfg.get("prob", 0.3))
    rot = float(cfg.get("rotate_rad", 0.08))
    scale = float(cfg.get("scale", 0.08))
    chain = Compose([
        RandBiasField(prob=p, coeff_range=(0.0, float(cfg.get("bias_coeff", 0.2)))),
        RandAdjustContrast(prob=p, gamma=tuple(cfg.get("gamma", (0.85, 1.2)))),
        RandScaleIntensity(prob=p, factors=float(cfg.get("gain", 0.1))),
        RandShiftIntensity(prob=p, offsets=float(cfg.get("offset", 0.1))),
        RandGaussianNoise(prob=p, std=float(cfg.get("noise_std", 0.05))),
        RandGaussianSmooth(prob=p, sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0), sigma_z=(0.25, 1.0)),
        RandAffine(prob=p, rotate_range=(rot, rot, rot), scale_range=(scale, scale, scale),
                   padding_mode="border", mode="bilinear"),
    ])
    chain.set_random_state(seed=int(seed) % (2 ** 32))

    def augment(mri: torch.Tensor, has_mri: torch.Tensor) -> torch.Tensor:
        out = mri.clone()
        for i in range(mri.shape[0]):
            if not bool(has_mri[i]):
                continue
            v = torch.as_tensor(chain(mri[i].detach().cpu().float()))
            v = v.as_tensor() if hasattr(v, "as_tensor") else v   # MONAI MetaTensor -> plain tensor
            out[i] = v.to(out.dtype)
        return out

    return augment


__all__ = ["build_mri_augmentation"]
