"""Federated k-fold CV of the rounds (``federation.cv_folds``) on real small, uneven centers.

NCCTG lung (lifelines' copy): six institutions of 17-36 patients train, the others are the external center.
With a 20 % validation split every center has 3-7 validation patients, under its floor of 10, and abstains:
no round can be selected on validation.  With 5 folds every center releases its out-of-fold scores over all
its patients, and the selected round rests on every training patient.
"""
from __future__ import annotations

import pytest

from benchmarks.bench_real_cohorts import write_lung

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def lung(tmp_path_factory):
    from common.config import feature_overrides
    from server.ops.simulation import run_simulation
    from server.schema import FEATURES_YAML

    root = tmp_path_factory.mktemp("lung-cv")
    counts = write_lung(root / "cohort")
    run_simulation(root / "cohort", root / "schema", ["seed=0"], stream=False, mode="schema")
    return root, counts, ["seed=0", "train.n_boot=20", "federation.num_rounds=3", "federation.local_epochs=1",
                          *feature_overrides(root / "schema" / FEATURES_YAML)]


def _released(metrics):
    return [[c for c, e in h["val_centers"].items() if not e["dfs_abstained"]] for h in metrics["history"]]


def test_out_of_fold_validation_selects_on_every_training_patient(lung):
    from server.ops.simulation import run_simulation

    root, counts, overrides = lung
    n_train = sum(n for c, n in counts.items() if c != "external")
    plain = run_simulation(root / "cohort", root / "plain", overrides, stream=False)
    assert all(not r for r in _released(plain))            # every center under its floor on its validation split
    assert plain["selection"]["warning"]

    cv = run_simulation(root / "cohort", root / "cv", [*overrides, "federation.cv_folds=5"], stream=False)
    released = _released(cv)
    assert all(len(r) == 6 for r in released) and len(released) == 3
    assert cv["selection"]["patients"] == n_train and cv["selection"]["centers"] == 6
    assert not cv["selection"]["warning"]
    # the global model trained on every patient of each center (train and validation splits)
    assert cv["history"][0]["n_train_replies"] == 6
    assert 0.4 < cv["external"]["centers"]["external"]["c_index"] < 0.8


@pytest.mark.slow
def test_capacity_is_chosen_per_run_on_the_out_of_fold_validation(lung):
    from server.ops.simulation import run_simulation

    root, counts, overrides = lung
    m = run_simulation(root / "cohort", root / "capacity",
                       [*overrides, "federation.num_rounds=2", "federation.cv_folds=5",
                        "federation.capacity.l2=[0.0,3.0]", "federation.capacity.local_epochs=[1,2]"], stream=False)
    cap = m["capacity"]
    assert [(c["l2"], c["local_epochs"]) for c in cap["candidates"]] == [(0.0, 1), (0.0, 2), (3.0, 1), (3.0, 2)]
    keys = [c["key"] for c in cap["candidates"]]
    assert all(k is not None for k in keys)
    win = cap["candidates"][keys.index(max(keys))]
    assert cap["chosen"] == win["candidate"] and m["selected_round"] == win["selected_round"]
    # the run's model, its settings and its history are the chosen candidate's
    assert m["config"]["train"]["l2"] == win["l2"] and m["config"]["federation"]["local_epochs"] == win["local_epochs"]
    assert m["selected_val"]["loss"] == pytest.approx(-max(keys))
    assert len(m["history"]) == 2 and (root / "capacity" / "capacity" / "candidate-4" / "history.jsonl").exists()
