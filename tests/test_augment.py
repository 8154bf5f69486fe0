"""Training-time MRI augmentation (MONAI transforms): deterministic, training only, MRI-less patients untouched."""
from __future__ import annotations

import torch

from common.learn.augment import build_mri_augmentation

ON = {"enabled": True, "prob": 1.0}


def _batch():
    """Three z-scored crops with a bright 'tumor' blob in the middle, and some noise."""
    g = torch.Generator().manual_seed(0)
    z, y, x = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 8),
                             indexing="ij")
    blob = torch.exp(-(x ** 2 + y ** 2 + z ** 2) / 0.2)
    mri = 2.0 * blob + 0.3 * torch.randn((3, 3, 16, 16, 8), generator=g)
    mri[1] = 0.0                                        # a patient without MRI
    return mri, torch.tensor([True, False, True])


def test_off_by_default_and_when_disabled():
    assert build_mri_augmentation(None, 0) is None
    assert build_mri_augmentation({"enabled": False}, 0) is None


def test_augmentation_is_deterministic_per_seed_and_leaves_mri_less_patients_alone():
    mri, has = _batch()
    a = build_mri_augmentation(ON, seed=7)(mri, has)
    b = build_mri_augmentation(ON, seed=7)(mri, has)
    c = build_mri_augmentation(ON, seed=8)(mri, has)
    assert a.shape == mri.shape and a.dtype == mri.dtype and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[1], mri[1])                    # no MRI: still all zeros
    assert not torch.allclose(a[0], mri[0])
    assert torch.equal(mri, _batch()[0])                # the input batch is not modified in place
    # mild: the volume still looks like itself (the tumor stays where and about as bright as it was)
    for i in (0, 2):
        r = torch.corrcoef(torch.stack([a[i].flatten(), mri[i].flatten()]))[0, 1]
        assert r > 0.6, float(r)
        assert abs(float(a[i].mean() - mri[i].mean())) < 0.5


def test_training_with_augmentation_is_reproducible_and_differs_from_plain_training(tiny_cohort):
    """The engine applies it to training batches only; the same seed gives the same weights (resume stays
    exact), and switching it on changes what is learned."""
    from common.config import load_config
    from common.learn.baseline import model_for
    from common.learn.dataset import site_dataset
    from common.learn.engine import train_model
    from common.preprocess.cache import resolve_cache_dir
    from tests.conftest import LOCAL_OVERRIDES

    def weights(aug: bool):
        cfg = load_config(LOCAL_OVERRIDES + ["train.epochs=1", f"train.augment.mri.enabled={str(aug).lower()}",
                                             "train.augment.mri.prob=1.0"])
        ds = site_dataset(resolve_cache_dir(tiny_cohort / "center_a", cfg), ["train"], cfg)
        torch.manual_seed(0)
        model = model_for(cfg, ds)
        return train_model(model, ds, None, cfg.train, cfg.model.loss, seed=5, select_best=False,
                           early_stopping=False).state_dict

    a, b, plain = weights(True), weights(True), weights(False)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], plain[k]) for k in a if ".mri." in k)
