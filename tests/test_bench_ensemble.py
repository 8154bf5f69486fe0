"""benchmarks/bench_ensemble.py: the seed ensemble of LOCO predictions."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

spec = importlib.util.spec_from_file_location("bench_ensemble", Path(__file__).parents[1] / "benchmarks" / "bench_ensemble.py")
be = importlib.util.module_from_spec(spec)
spec.loader.exec_module(be)


def _write(d: Path, frame: pd.DataFrame) -> Path:
    d.mkdir(parents=True)
    frame.to_csv(d / "loco_predictions.csv", index=False)
    return d


def test_ensemble_averages_each_patients_probability_and_scores_each_center(tmp_path):
    rng = np.random.default_rng(0)
    n = 40
    base = pd.DataFrame({"center": ["center_a"] * 20 + ["center_b"] * 20,
                         "patient_id": [f"P{i:03d}" for i in range(n)], "benefit": rng.integers(0, 2, n)})
    probs = [rng.random(n) for _ in range(3)]
    dirs = [_write(tmp_path / f"s{i}", base.assign(prob=p)) for i, p in enumerate(probs)]
    # a run's rows in another order are the same patients
    shuffled = base.assign(prob=probs[2]).sample(frac=1.0, random_state=1)
    (dirs[2] / "loco_predictions.csv").write_text(shuffled.to_csv(index=False))
    out = tmp_path / "e.json"
    assert be.main([*map(str, dirs), "--json", str(out)]) == 0
    import json
    res = json.loads(out.read_text())["by_k"]

    def fold_mean(p):
        return np.mean([roc_auc_score(base["benefit"][m], p[m]) for m in (base["center"] == "center_a",
                                                                           base["center"] == "center_b")])
    assert res["1"]["mean"] == pytest.approx(np.mean([fold_mean(p) for p in probs]))
    assert res["3"]["mean"] == pytest.approx(fold_mean(np.mean(probs, axis=0))) and res["3"]["subsets"] == 1
    assert res["2"]["subsets"] == 3
    from common.metrics import expected_calibration_error
    mean_p = pd.Series(np.mean(probs, axis=0))
    assert res["3"]["ece"] == pytest.approx(np.mean([expected_calibration_error(base["benefit"][m], mean_p[m])
                                                     for m in (base["center"] == "center_a",
                                                               base["center"] == "center_b")]))


def test_runs_with_other_patients_or_labels_are_refused(tmp_path):
    base = pd.DataFrame({"center": ["center_a"] * 4, "patient_id": ["A", "B", "C", "D"], "benefit": [0, 1, 0, 1],
                         "prob": [0.1, 0.8, 0.3, 0.6]})
    a = _write(tmp_path / "a", base)
    b = _write(tmp_path / "b", base.assign(benefit=[1, 1, 0, 1]))
    c = _write(tmp_path / "c", base.iloc[:3])
    for other in (b, c):
        with pytest.raises(SystemExit, match="same patients"):
            be.main([str(a), str(other)])
    with pytest.raises(SystemExit, match="no such file"):
        be.main([str(a), str(tmp_path / "missing")])
