"""Federated leave-one-center-out development (issue 17): federation.holdout_center holds one training center
out of training and scores it at the end; the real external center is sealed (asked its role, sent nothing)."""
from __future__ import annotations

import json

import pytest

from common.federation.roles import trains
from server.roles import apply_holdout
from server.rounds import membership
from tests.conftest import TEST_OVERRIDES


class _Grid:
    def __init__(self, ids):
        self.ids = ids

    def get_node_ids(self):
        return list(self.ids)


def _roles():
    return {1: {"center-id": "center_a", "role": "train"}, 2: {"center-id": "center_b", "role": "train"},
            3: {"center-id": "center_c", "role": "train"}, 9: {"center-id": "external", "role": "external"}}


def test_holdout_plays_external_and_the_external_center_is_sealed():
    roles = _roles()
    lines = apply_holdout(roles, "center_b")
    assert roles[2]["role"] == "external" and roles[2]["held-out"] and roles[9]["role"] == "sealed"
    assert len(lines) == 2
    assert membership(_Grid([1, 2, 3, 9]), roles) == ([1, 3], [2])
    # a later look (a center rejoined) changes nothing more; an ordinary run changes nothing at all
    assert apply_holdout(roles, "center_b") == [] and roles[9]["role"] == "sealed"
    plain = _roles()
    assert apply_holdout(plain, None) == [] and plain == _roles()
    assert membership(_Grid([1, 2, 3, 9]), plain) == ([1, 2, 3], [9])
    # the one definition that rounds, evaluation, the model card, the console and the report share
    assert [trains(r) for r in ("train", "external", "sealed")] == [True, False, False]


def test_holdout_must_name_a_training_center():
    with pytest.raises(RuntimeError, match="no training center 'external'"):
        apply_holdout(_roles(), "external")
    with pytest.raises(RuntimeError, match="center_a, center_b, center_c"):
        apply_holdout(_roles(), "center_z")


@pytest.mark.slow
def test_a_real_fold_never_trains_on_the_held_out_center(tiny_cohort, tmp_path, flwr_home):
    from server.ops.simulation import run_simulation

    m = run_simulation(tiny_cohort, tmp_path / "fold", TEST_OVERRIDES + ["federation.holdout_center=center_b"],
                       stream=False)
    assert m["centers"]["center_b"]["role"] == "external" and m["centers"]["external"]["role"] == "sealed"
    for h in m["history"]:
        assert "center_b" not in h["client_train_seconds"] and "external" not in h["client_train_seconds"]
        assert "center_b" not in (h.get("val_centers") or {})
        assert len(h["client_train_seconds"]) == 5
    assert list(m["external"]["centers"]) == ["center_b"]          # scored at the end, the external center not
    assert m["external"]["centers"]["center_b"]["n"] == m["centers"]["center_b"]["n_test"]
    card = json.loads((tmp_path / "fold" / "best_model.json").read_text())["card"]   # the model says how it was made
    assert card["holdout_center"] == "center_b"
    assert sorted(card["training_centers"]) == ["center_a", "center_c", "center_d", "center_e", "center_f"]


@pytest.mark.slow
def test_the_federation_trains_the_tile_cnn_from_thumbnails(tiny_cohort, tmp_path, flwr_home):
    """A CNN trained in the federation (issue 17, item 2): with the thumbnail encoder every center trains the
    pathology branch's tile CNN on its own tiles and the server averages it like any other layer.  The encoder
    is a site setting: a run may ask for it only where the site's policy lists the key (each site here does)."""
    from omegaconf import OmegaConf

    from common.data.cohort import discover_sites
    from common.data.policy import DEFAULT_POLICY_YAML
    from server.ops.simulation import run_simulation
    from tests.conftest import TINY_SITE_POLICY, max_abs_diff, round_weights, write_site_policy
    from tests.test_policy_audit import _copy_cohort

    cohort = _copy_cohort(tiny_cohort, tmp_path / "cohort")
    allowed = list(OmegaConf.load(DEFAULT_POLICY_YAML).allowed_run_keys) + ["preprocess.pathology.encoder.*"]
    for site in discover_sites(cohort):
        write_site_policy(site.path, f"allowed_run_keys = {json.dumps(allowed)}\n" + TINY_SITE_POLICY)
    thumb = ["preprocess.pathology.encoder.name=thumbnail", "preprocess.pathology.encoder.thumbnail.side=16"]
    m = run_simulation(cohort, tmp_path / "run", TEST_OVERRIDES + thumb, stream=False)
    assert len(m["history"]) == 2 and m["external"]["centers"]["external"]["n"] > 0
    w1, w2 = round_weights(tmp_path / "run", 1), round_weights(tmp_path / "run", 2)
    cnn = {k: w1[k] for k in w1 if "tile_proj.features" in k}
    assert cnn and max_abs_diff(cnn, {k: w2[k] for k in cnn}) > 0


@pytest.mark.slow
def test_simulate_loco_runs_one_fold_per_training_center(tiny_cohort, tmp_path, flwr_home, capsys):
    """`newadj simulate --loco` (the CLI over server.ops.simulation.run_loco, which bench_quality --fed-loco also
    uses): one real simulation per training center held out, the external center sealed in each, loco.json with
    every fold and the summary the table prints."""
    from common.cli import main

    out = tmp_path / "fed-cv"
    assert main(["simulate", "--data", str(tiny_cohort), "--out", str(out), "--loco", "--quiet",
                 *TEST_OVERRIDES, "federation.num_rounds=1"]) == 0
    loco = json.loads((out / "loco.json").read_text())
    centers = ["center_a", "center_b", "center_c", "center_d", "center_e", "center_f"]
    assert sorted(loco["folds"]) == centers and loco["failed"] == {}
    for c in centers:
        fold = json.loads((out / c / "metrics.json").read_text())
        assert list(fold["external"]["centers"]) == [c] and fold["centers"]["external"]["role"] == "sealed"
        assert loco["folds"][c]["n_held_out"] == fold["centers"][c]["n_test"]
    assert loco["summary"]["auc"]["folds"] + loco["summary"]["auc"]["abstained"] == 6
    assert "Federated leave-one-center-out CV" in capsys.readouterr().out
    # --loco runs its folds afresh: it does not resume one
    assert main(["simulate", "--resume", str(out / "center_a"), "--loco"]) == 2
