"""The training engine's model selection: ``train.refit`` trains the selected epoch count again on training and
validation patients together, keeps the validation split's threshold, and leaves federated clients alone."""
from __future__ import annotations

import torch


def _setup(tiny_cohort, refit: bool, epochs: int = 3, extra: tuple = ()):
    from common.config import load_config
    from common.learn.dataset import ConcatSites, site_dataset
    from common.preprocess.cache import resolve_cache_dir
    from tests.conftest import LOCAL_OVERRIDES

    cfg = load_config(LOCAL_OVERRIDES + [f"train.epochs={epochs}", f"train.refit={str(refit).lower()}",
                                         "train.patience=10", *extra])
    sites = ["center_a", "center_b", "center_c"]
    tr = ConcatSites([site_dataset(resolve_cache_dir(tiny_cohort / s, cfg), ["train"], cfg) for s in sites])
    va = ConcatSites([site_dataset(resolve_cache_dir(tiny_cohort / s, cfg), ["val"], cfg) for s in sites])
    return cfg, tr, va


def _train(cfg, train_ds, val_ds, **kw):
    from common.learn.baseline import model_for
    from common.learn.engine import train_model

    torch.manual_seed(0)
    model = model_for(cfg, train_ds)
    return train_model(model, train_ds, val_ds, cfg.train, cfg.model.loss, seed=5, **kw)


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_refit_trains_the_selected_epochs_on_train_and_validation_and_keeps_the_validation_threshold(tiny_cohort):
    from common.learn.dataset import ConcatSites

    cfg, tr, va = _setup(tiny_cohort, refit=False)
    assert len(va) > 0
    plain = _train(cfg, tr, va)
    cfg_r, tr_r, va_r = _setup(tiny_cohort, refit=True)
    refit = _train(cfg_r, tr_r, va_r)
    assert not plain.refit and refit.refit
    # the selection pass is the same run: same epoch, same validation scores, same threshold
    assert refit.best_epoch == plain.best_epoch and refit.history == plain.history
    assert refit.threshold == plain.threshold and refit.val == plain.val
    # ... and the weights are those of training from the same start on train + validation for that many epochs
    assert not _same(refit.state_dict, plain.state_dict)
    both = _train(cfg, ConcatSites([tr, va]), None, epochs=plain.best_epoch, select_best=False,
                  early_stopping=False)
    assert _same(refit.state_dict, both.state_dict)


def test_refit_leaves_federated_training_and_runs_without_validation_alone(tiny_cohort):
    cfg, tr, va = _setup(tiny_cohort, refit=False, epochs=1)
    cfg_r, tr_r, va_r = _setup(tiny_cohort, refit=True, epochs=1)
    # a federated client: a few local epochs, the server selects rounds
    fed = _train(cfg, tr, va, select_best=False, early_stopping=False)
    fed_r = _train(cfg_r, tr_r, va_r, select_best=False, early_stopping=False)
    assert not fed_r.refit and _same(fed.state_dict, fed_r.state_dict)
    # no validation split: nothing to select on, nothing to refit
    no_val = _train(cfg_r, tr_r, None)
    assert not no_val.refit


def test_ema_selects_and_keeps_the_moving_average_of_the_weights(tiny_cohort):
    import pytest

    from common.config import load_config
    from common.learn.baseline import model_for
    from tests.conftest import LOCAL_OVERRIDES

    small = "train.batch_size=3"                      # several steps in the one epoch
    cfg, tr, va = _setup(tiny_cohort, refit=False, epochs=1, extra=(small,))
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in model_for(cfg, tr).state_dict().items()}
    raw = _train(cfg, tr, va)

    def with_ema(decay):
        c = load_config(LOCAL_OVERRIDES + ["train.epochs=1", small, f"train.ema={decay}"])
        return _train(c, tr, va)

    def dist(a, b):
        return sum(float((a[k].float() - b[k].float()).abs().sum()) for k in a if a[k].is_floating_point())

    # a decay near 0 follows the raw weights; a decay near 1 stays at the first step's weights (the average starts there)
    assert dist(with_ema(1e-9).state_dict, raw.state_dict) < 1e-3 * dist(raw.state_dict, init)
    slow = with_ema(0.999999)
    assert dist(slow.state_dict, init) < 0.5 * dist(raw.state_dict, init)     # 1 of 5 Adam steps: 0.38
    # the average is what was validated: its validation scores are not the raw weights'
    assert slow.val != raw.val
    with pytest.raises(ValueError, match="train.ema"):
        with_ema(1.5)


def test_lr_schedule_cosine_and_plateau_follow_their_rules_and_leave_federated_training_alone(tiny_cohort):
    import math

    import pytest

    from common.learn.engine import _selection

    epochs = 4
    cfg, tr, va = _setup(tiny_cohort, refit=False, epochs=epochs)
    const = _train(cfg, tr, va)
    assert all("lr" not in rec for rec in const.history)       # the default: train.lr throughout
    lr0 = float(cfg.train.lr)

    cfg_c, tr_c, va_c = _setup(tiny_cohort, refit=False, epochs=epochs, extra=("train.lr_schedule=cosine",))
    cos = _train(cfg_c, tr_c, va_c)
    want = [lr0 * 0.5 * (1 + math.cos(math.pi * e / epochs)) for e in range(len(cos.history))]
    assert [rec["lr"] for rec in cos.history] == pytest.approx(want)
    if cos.best_epoch > 1:                                         # epoch 1 runs at train.lr either way
        assert not _same(cos.state_dict, const.state_dict)

    # plateau with patience 0: the rate halves after every epoch that does not beat the best selection key so far
    cfg_p, tr_p, va_p = _setup(tiny_cohort, refit=False, epochs=epochs,
                               extra=("train.lr_schedule=plateau", "train.lr_plateau.patience=0"))
    pla = _train(cfg_p, tr_p, va_p)
    best, lr = None, lr0
    for rec in pla.history:
        assert rec["lr"] == pytest.approx(lr)
        key = _selection(rec, "auto", rec["train_loss"])[0]
        if best is None or key > best * (1 + 1e-4):          # torch's default relative threshold
            best = key
        else:
            lr *= 0.5

    # refit replays the selection run's rates: it differs from a constant-rate refit of the same epochs
    cfg_rc, tr_rc, va_rc = _setup(tiny_cohort, refit=True, epochs=epochs, extra=("train.lr_schedule=cosine",))
    refit_cos = _train(cfg_rc, tr_rc, va_rc)
    assert refit_cos.history == cos.history and refit_cos.refit
    if cos.best_epoch > 1:
        cfg_r, tr_r, va_r = _setup(tiny_cohort, refit=True, epochs=cos.best_epoch)
        refit_const = _train(cfg_r, tr_r, va_r)
        if refit_const.best_epoch == cos.best_epoch:
            assert not _same(refit_cos.state_dict, refit_const.state_dict)

    # a federated client's local epochs keep train.lr; a wrong name is refused, naming the setting
    fed = _train(cfg, tr, va, epochs=2, select_best=False, early_stopping=False)
    fed_c = _train(cfg_c, tr_c, va_c, epochs=2, select_best=False, early_stopping=False)
    assert _same(fed.state_dict, fed_c.state_dict)
    cfg_x, tr_x, va_x = _setup(tiny_cohort, refit=False, epochs=1, extra=("train.lr_schedule=step",))
    with pytest.raises(ValueError, match="train.lr_schedule"):
        _train(cfg_x, tr_x, va_x)


def test_l2_penalises_weight_matrices_only(tiny_cohort):
    """`train.l2`: (l2/2)||W||^2 of every weight matrix added to the training loss (also where the engine trains
    a fixed number of epochs without selecting, as a federated client's local epochs); biases, LayerNorm scales,
    the no-data embedding and the absent-modality constants are not penalised."""
    import pytest

    from common.config import load_config
    from common.learn.baseline import model_for
    from common.learn.engine import l2_penalised

    fast = ("model=linear", "train.lr=0.05")          # a few steps on tiny sites: a larger step lets the penalty act
    cfg, tr, va = _setup(tiny_cohort, refit=False, epochs=6, extra=fast)
    cfg_l2, _, _ = _setup(tiny_cohort, refit=False, epochs=6, extra=(*fast, "train.l2=5"))
    kw = dict(select_best=False, early_stopping=False)   # the last epoch's weights, as a federated client sends

    def norms(sd):
        mats = sum(float((v ** 2).sum()) for k, v in sd.items() if k.endswith("weight") and v.dim() >= 2)
        return mats, sd["absent_terms"]

    names = {n for n, _ in l2_penalised(model_for(load_config(["model=newadjnet"]), tr))}
    assert names and all(n.endswith("weight") for n in names)
    assert not names & {"absent_terms", "no_data"} and not any(".post." in n or n.startswith("post.") for n in names)
    assert any(n.startswith("branches.mri.features") for n in names)       # convolution kernels are
    plain, pen = _train(cfg, tr, va, **kw), _train(cfg_l2, tr, va, **kw)
    (w_plain, absent_plain), (w_pen, absent_pen) = norms(plain.state_dict), norms(pen.state_dict)
    assert w_pen < 0.5 * w_plain, (w_pen, w_plain)   # the penalty shrinks the weight matrices ...
    assert not torch.equal(absent_plain, absent_pen)  # ... while the unpenalised constants still train
    assert pen.history[-1]["train_loss"] > plain.history[-1]["train_loss"]   # the reported loss includes it
    cfg_bad, _, _ = _setup(tiny_cohort, refit=False, epochs=1, extra=("train.l2=-1",))
    with pytest.raises(ValueError, match="train.l2"):
        _train(cfg_bad, tr, va, **kw)
