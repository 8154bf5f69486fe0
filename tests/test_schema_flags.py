"""`newadj schema` reviews covariates by site: which training centers lack a kept feature, and which center's
values differ from the others' more than case mix explains (issue 36, item 4).

The answers are built with the site's own moment function (``client.schema._moments``) from arrays, so the
server reads exactly what a site would send; the last test goes through a real `newadj schema` run.
"""
from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from client.schema import _moments
from common.federation.reply_schema import MOMENTS
from common.learn.dataset import feature_scaling
from server.schema import likely_unit_factor, propose_features

FLOOR = 5
RULE = OmegaConf.create({"min_centers": 1, "min_patient_fraction": 0.2, "shift_smd": 2.0, "shift_sd_ratio": 4.0})


def answer(clinical: dict[str, np.ndarray], n: int, role: str = "train", genomic: dict | None = None) -> dict:
    """A schema answer of a center with ``n`` patients whose columns hold these values (a None: missing)."""
    info = {"role": role, "n-patients": n, "modality-names": ["mri"], "modality-counts": [n]}
    for kind, cols in (("clinical", clinical), ("genomic", genomic or {})):
        stats = [_moments(list(v), FLOOR) for v in cols.values()]
        info[f"{kind}-columns"] = list(cols)
        info[f"{kind}-counts"] = [st[0] for st in stats]
        for j, m in enumerate(MOMENTS):
            info[f"{kind}-{m}"] = [st[1][j] for st in stats]
    return info


def normal(seed: int, mean: float, sd: float, n: int = 60) -> np.ndarray:
    """``n`` normal draws shifted and scaled to exactly this mean and SD, so a test states the shift it checks."""
    z = np.random.default_rng(seed).normal(0.0, 1.0, n)
    return mean + sd * (z - z.mean()) / z.std(ddof=1)


def flags_of(proposal: dict, feature: str) -> list[dict]:
    return [f for f in proposal["flags"] if f["feature"] == feature]


def test_a_center_reporting_albumin_in_g_per_l_is_flagged_with_the_factor_10():
    answers = {"center_a": answer({"albumin": normal(1, 3.5, 0.5)}, 60),
               "center_b": answer({"albumin": normal(2, 3.6, 0.5)}, 60),
               "center_c": answer({"albumin": normal(3, 35.0, 5.0)}, 60),     # g/L among centers in g/dL
               "center_d": answer({"albumin": normal(4, 3.4, 0.5)}, 60)}
    prop = propose_features(answers, RULE)
    flags = flags_of(prop, "albumin")
    assert [f["center"] for f in flags] == ["center_c"]       # the others are not flagged for its sake
    flag = flags[0]
    assert flag["kind"] == "clinical" and flag["role"] == "train"
    assert flag["likely_factor"] == pytest.approx(10.0)
    assert flag["smd"] > 2.0 and flag["sd_ratio"] > 4.0
    assert flag["site_mean"] == pytest.approx(35.0, rel=0.1) and flag["others_mean"] == pytest.approx(3.5, rel=0.1)
    assert "`albumin`" in flag["message"] and "center_c" in flag["message"] and "unit" in flag["message"]
    assert "\n" not in flag["message"]
    assert "albumin" in prop["clinical_features"] and "albumin" in prop["scaling"]   # advice: the feature stays


def test_a_center_in_the_inverse_unit_is_named_with_the_inverse_factor():
    answers = {"center_a": answer({"bilirubin": normal(5, 17.1, 3.0)}, 60),   # umol/L
               "center_b": answer({"bilirubin": normal(6, 17.5, 3.0)}, 60),
               "center_c": answer({"bilirubin": normal(7, 1.0, 0.18)}, 60)}   # mg/dL
    flags = flags_of(propose_features(answers, RULE), "bilirubin")
    assert [f["center"] for f in flags] == ["center_c"]
    assert flags[0]["likely_factor"] == pytest.approx(1 / 17.1, rel=1e-4)
    assert flags[0]["smd"] < -2.0


def test_a_mild_case_mix_shift_is_not_flagged():
    answers = {"center_a": answer({"age": normal(8, 60.0, 10.0)}, 80),
               "center_b": answer({"age": normal(9, 61.0, 10.0)}, 80),
               "center_c": answer({"age": normal(10, 65.5, 11.0)}, 80)}    # older patients: SMD about 0.5
    prop = propose_features(answers, RULE)
    assert prop["flags"] == []
    assert prop["missing_by_site"] == {"age": []}
    assert 0.4 < (65.5 - 60.5) / np.sqrt((11.0 ** 2 + 10.0 ** 2) / 2) < 0.6      # the shift this case is about


def test_a_feature_a_center_lacks_is_listed_as_missing_there():
    answers = {"center_a": answer({"age": normal(11, 60, 10), "afp": normal(12, 100, 30)}, 60),
               "center_b": answer({"age": normal(13, 61, 10)}, 60),                         # no AFP column
               "center_c": answer({"age": normal(14, 62, 10), "afp": [1.0, 2.0, None]}, 60),   # below the floor
               "center_d": answer({"age": normal(15, 59, 10), "afp": normal(16, 110, 30)}, 60)}
    prop = propose_features(answers, RULE)
    assert prop["clinical_features"] == ["age", "afp"]
    assert prop["missing_by_site"] == {"age": [], "afp": ["center_b", "center_c"]}
    assert prop["flags"] == []


def test_the_external_centers_shift_is_flagged_but_decides_nothing():
    train = {"center_a": answer({"albumin": normal(17, 3.5, 0.5)}, 60),
             "center_b": answer({"albumin": normal(18, 3.6, 0.5)}, 60)}
    external = answer({"albumin": normal(19, 35.0, 5.0), "ldh": normal(20, 200, 40)}, 60, role="external")
    without = propose_features(train, RULE)
    prop = propose_features({**train, "center_x": external}, RULE)
    flags = flags_of(prop, "albumin")
    assert [(f["center"], f["role"]) for f in flags] == [("center_x", "external")]
    assert flags[0]["likely_factor"] == pytest.approx(10.0)
    assert "center_x (external center)" in flags[0]["message"]
    for key in ("genomic_features", "clinical_features", "modalities", "scaling", "missing_by_site"):
        assert prop[key] == without[key], key
    assert "ldh" not in prop["clinical_features"]


def test_the_thresholds_are_settings():
    answers = {"center_a": answer({"age": normal(8, 60.0, 10.0)}, 80),
               "center_b": answer({"age": normal(9, 61.0, 10.0)}, 80),
               "center_c": answer({"age": normal(10, 65.5, 11.0)}, 80)}
    strict = OmegaConf.merge(RULE, {"shift_smd": 0.4})
    assert [f["center"] for f in propose_features(answers, strict)["flags"]] == ["center_c"]
    assert propose_features(answers, strict)["flags"][0]["likely_factor"] is None


@pytest.mark.parametrize("ratio, factor", [(10.4, 10.0), (0.0118, 1 / 88.4), (18.3, 18.0), (1000.0, 1000.0),
                                           (3.0, None), (-10.0, None)])
def test_the_ratio_of_means_names_the_closest_unit_factor(ratio, factor):
    got = likely_unit_factor(ratio, 1.0)
    assert got == (None if factor is None else pytest.approx(factor))


def test_a_missing_value_of_a_scaled_feature_enters_as_the_pooled_mean():
    answers = {"center_a": answer({"albumin": normal(21, 3.5, 0.5)}, 60),
               "center_b": answer({"albumin": normal(22, 3.8, 0.6)}, 60)}
    rules = [{"name": k, **v} for k, v in propose_features(answers, RULE)["scaling"].items()]
    scale = feature_scaling(["albumin"], rules)
    assert scale([None])[0] == 0.0 and scale([float("nan")])[0] == 0.0
    center = rules[0]["center"]
    assert scale([center])[0] == pytest.approx(0.0, abs=1e-6)       # the same input as the pooled mean
    assert scale([center + rules[0]["scale"]])[0] == pytest.approx(1.0)


def _albumin_answers() -> dict:
    return {"center_a": answer({"albumin": normal(1, 3.5, 0.5)}, 60),
            "center_b": answer({"albumin": normal(2, 3.6, 0.5), "afp": normal(23, 100, 30)}, 60),
            "center_c": answer({"albumin": normal(3, 35.0, 5.0), "afp": normal(24, 90, 30)}, 60)}


def test_the_feature_file_keeps_missing_by_site_and_flags_and_still_loads(tmp_path):
    import json

    import yaml

    from common.config import feature_overrides
    from server.schema import write_features

    prop = propose_features(_albumin_answers(), RULE)
    path = tmp_path / "features.yaml"
    write_features(path, prop, 3)
    doc = yaml.safe_load(path.read_text())
    assert doc["missing_by_site"] == {"albumin": [], "afp": ["center_a"]}
    assert doc["flags"] == prop["flags"] and doc["flags"][0]["center"] == "center_c"
    assert json.loads(json.dumps(prop))["flags"] == prop["flags"]          # schema.json holds them as they are
    assert any(o.startswith("data.clinical_features=") for o in feature_overrides(path))


def test_newadj_schema_prints_each_flag_on_one_line(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    import server.ops.simulation as sim
    from common.cli.federation import cmd_schema

    answers = _albumin_answers()
    result = {"answers": answers, "failures": {}, "proposal": propose_features(answers, RULE)}
    monkeypatch.setattr(sim, "run_simulation", lambda *a, **k: result)
    args = SimpleNamespace(data=str(tmp_path), kit=None, out=str(tmp_path / "s"), overrides=[], verbose=False)
    assert cmd_schema(args) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("flag:")]
    assert lines == [f"flag: {f['message']}" for f in result["proposal"]["flags"]]
    assert "`albumin` at center_c" in lines[0]


def test_a_real_schema_run_names_the_center_in_another_unit_and_the_one_lacking_a_covariate(tmp_path):
    """Through `newadj schema` (a Flower run, real site folders): NCCTG lung with one institution's weight loss
    recorded in another unit (x10) and another institution without the meal-calories column at all."""
    import pandas as pd

    from benchmarks.bench_real_cohorts import write_lung
    from server.ops.simulation import run_simulation

    cohort = tmp_path / "lung"
    write_lung(cohort)
    shifted = cohort / "center_inst01" / "clinical.csv"
    df = pd.read_csv(shifted)
    df["wt_loss"] = df["wt_loss"] * 10
    df.to_csv(shifted, index=False)
    lacking = cohort / "center_inst12" / "clinical.csv"
    pd.read_csv(lacking).drop(columns=["meal_cal"]).to_csv(lacking, index=False)

    proposal = run_simulation(cohort, tmp_path / "schema", ["seed=0"], stream=False, mode="schema")["proposal"]
    unit = [f for f in proposal["flags"] if f["feature"] == "wt_loss" and f["center"] == "center_inst01"]
    assert unit and unit[0]["likely_factor"] == pytest.approx(10.0) and "center_inst01" in unit[0]["message"]
    assert not [f for f in proposal["flags"] if f["feature"] == "wt_loss" and f["center"] != "center_inst01"]
    assert proposal["missing_by_site"]["meal_cal"] == ["center_inst12"]
    assert "meal_cal" in proposal["clinical_features"] and "wt_loss" in proposal["clinical_features"]
