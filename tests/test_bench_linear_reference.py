"""benchmarks/bench_linear_reference.py: its MRI features are the MRI branch's own central-box statistics."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

spec = importlib.util.spec_from_file_location(
    "bench_linear_reference", Path(__file__).parents[1] / "benchmarks" / "bench_linear_reference.py")
blr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(blr)


def test_mri_features_are_the_branch_center_stats(tiny_cohort, test_cfg):
    from common.data.cohort import discover_sites
    from common.learn.dataset import SiteDataset
    from common.learn.model import MRIEncoder
    from common.preprocess.cache import resolve_cache_dir

    site = next(s for s in discover_sites(tiny_cohort) if s.role == "train")
    cache = resolve_cache_dir(site.path, test_cfg)
    ds = SiteDataset(cache, path_norm="none")
    df = blr.patient_features(ds, 0.25, None).set_index("patient_id")
    man = ds.manifest
    p = next(p for p in man["patients"] if p.get("mri") and p.get("benefit") is not None)
    arr = torch.from_numpy(np.load(cache / p["mri"]).astype(np.float32))[None]
    enc = MRIEncoder(arr.shape[1], 8, {"widths": [8], "center_frac": 0.25, "num_groups": 8})
    stats = enc._center_stats(arr)[0].numpy()
    C = arr.shape[1]
    np.testing.assert_allclose([df.loc[p["patient_id"], f"img_mri_mean{k}"] for k in range(C)], stats[:C], rtol=1e-5)
    np.testing.assert_allclose([df.loc[p["patient_id"], f"img_mri_sd{k}"] for k in range(C)], stats[C:], rtol=1e-4)
    assert set(df["has_mri"]) <= {0.0, 1.0}


def test_a_nested_strength_is_chosen_by_the_other_centers_only(tiny_cohort, tmp_path, monkeypatch):
    import json

    import pytest
    import sklearn.linear_model as lm

    seen = []

    class Recording(lm.LogisticRegressionCV):   # what each fold's inner CV is given
        def fit(self, X, y, **kw):
            seen.append((len(X), len(self.cv)))
            return super().fit(X, y, **kw)

    monkeypatch.setattr(lm, "LogisticRegressionCV", Recording)
    out = tmp_path / "nested.json"
    assert blr.main(["--cohort", str(tiny_cohort), "--C", "nested", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r["chosen_C"]) == set(r["folds"]) and set(r["chosen_C"].values()) <= set(blr.NESTED_GRID)
    # six folds; each inner CV splits the five other centers, one held out at a time, and never sees the sixth
    assert len(seen) == 6 and all(k == 5 for _, k in seen)
    n_total = sum(n for n, _ in seen) // 5   # every patient is outside exactly 5 of the 6 folds
    assert all(n < n_total for n, _ in seen)
    with pytest.raises(SystemExit):
        blr.main(["--cohort", str(tiny_cohort), "--C", "strong"])
