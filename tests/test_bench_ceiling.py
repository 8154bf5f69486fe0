"""benchmarks/bench_ceiling.py: the AUC a synthetic cohort's files allow, under the oracle."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

spec = importlib.util.spec_from_file_location("bench_ceiling", Path(__file__).parents[1] / "benchmarks" / "bench_ceiling.py")
bc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bc)

INFORMATIVE = {"CTNNB1_mut": {"logit0": -1.3, "coef": -1.0}, "CXCL9_expr": {"coef": 0.8, "noise_sd": 0.6}}


def _mean(w):
    return float((w * bc.GRID).sum())


def test_gene_posterior_reads_the_genes_it_has_and_only_those():
    prior = bc._gene_posterior(None, INFORMATIVE)
    assert _mean(prior) == pytest.approx(0.0, abs=1e-9)
    high = bc._gene_posterior(pd.Series({"CXCL9_expr": 1.6, "CTNNB1_mut": 0.0}), INFORMATIVE)
    assert _mean(high) > 0.8  # normal-normal: 0.8*1.6 / (0.64 + 0.36) = 1.28, a wild-type CTNNB1 adds a little
    mutated = bc._gene_posterior(pd.Series({"CTNNB1_mut": 1.0}), INFORMATIVE)
    assert _mean(mutated) < -0.3  # P(mut) falls with z_gen
    untested = bc._gene_posterior(pd.Series({"CXCL9_expr": np.nan, "TP53_mut": 1.0}), INFORMATIVE)
    np.testing.assert_allclose(untested, prior)  # empty cells and noise genes carry nothing
    clin = {"log10_afp_mean": 2.2, "log10_afp_clin_coef": -0.6, "log10_afp_noise_sd": 0.5}
    assert _mean(bc._afp_posterior(10 ** 3.4, clin)) < -0.5 < 0.5 < _mean(bc._afp_posterior(10 ** 1.0, clin))


def test_ceilings_of_a_cohort_and_a_mismatched_truth_refused(tiny_cohort, tmp_path):
    res = bc.ceilings(tiny_cohort, draws=300)
    assert "external" in res["centers"]
    for r in res["centers"].values():
        for k in ("all", "mri", "pathology", "genomics", "clinical"):
            assert 0.0 <= r[f"ceiling_{k}_auc"] <= 1.0
            assert r[f"ceiling_{k}_over_oracle"] == pytest.approx(r[f"ceiling_{k}_auc"] / r["oracle_auc"])
    # a truth file that is not the cohort's is refused, not scored
    bad = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, bad, ignore=shutil.ignore_patterns("mri", "pathology", ".newadj-*"))
    meta = json.loads((bad / "_cohort.json").read_text())
    meta["oracle_auc_external"] = 0.123
    (bad / "_cohort.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match="does not match"):
        bc.ceilings(bad, draws=50)
