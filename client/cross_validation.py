"""Federated k-fold cross-validation of the engine's rounds (``federation.cv_folds = k``), at a center.

Every training center deals its training and validation patients into k folds (``common.data.splits.fold_of``).
Each round carries, besides the global model, k fold models: fold model f trains on the center's other folds
only.  Before training, the center scores the fold models it received, each on its own held-out fold, and
releases what the site's rules allow about those out-of-fold predictions together: one release per round over
every patient of the center, so a center whose 20 % validation split was under its floors now validates
(its floors themselves unchanged).  The global model trains on all of the center's patients; the server selects
its round on the pooled out-of-fold validation.
"""
from __future__ import annotations

import numpy as np

from common.federation.wire import CV_ARRAYS, fold_key  # noqa: F401  (the record of the fold models)


def cv_data(rt, k: int):
    """(every training and validation patient of the center as one dataset, each one's fold)."""
    from common.data.splits import fold_of

    ds = rt.fit_patients()
    return ds, fold_of([str(it["patient_id"]) for it in ds.items], k)


def out_of_fold_predictions(rt, cv_arrays, data, batch_size: int) -> dict:
    """Every patient of ``data`` (:func:`cv_data`) scored by the fold model that did not train on it (the
    engine's ``predict`` fields)."""
    from flwr.app import ArrayRecord

    from common.federation.wire import WEIGHTS
    from common.learn.dataset import Subset
    from common.learn.engine import predict

    ds, folds = data
    parts = []
    for f in range(len(cv_arrays)):
        idx = np.flatnonzero(folds == f)
        if len(idx):
            model = rt.model_with(ArrayRecord({WEIGHTS: cv_arrays[fold_key(f)]}))
            parts.append(predict(model, Subset(ds, idx), batch_size))
    return {key: np.concatenate([q[key] for q in parts]) for key in parts[0]}


def train_folds(rt, cv_arrays, data, epochs: int, train_cfg, seed_of, proximal_mu: float, fp16: bool):
    """The fold models after this round's local epochs, each on the patients of ``data`` (:func:`cv_data`)
    outside its fold (an ArrayRecord)."""
    from flwr.app import ArrayRecord

    from common.federation.wire import WEIGHTS, to_arrays
    from common.learn.dataset import Subset
    from common.learn.engine import train_model

    ds, folds = data
    out = {}
    for f in range(len(cv_arrays)):
        model = rt.model_with(ArrayRecord({WEIGHTS: cv_arrays[fold_key(f)]}))
        res = train_model(model, Subset(ds, np.flatnonzero(folds != f)), None, train_cfg, rt.cfg.model.loss,
                          seed=seed_of(f), epochs=epochs, select_best=False, early_stopping=False,
                          proximal_mu=proximal_mu)
        out[fold_key(f)] = to_arrays(res.state_dict, fp16)[WEIGHTS]
    return ArrayRecord(out)
