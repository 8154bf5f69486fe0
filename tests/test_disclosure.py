"""The site's disclosure rules (client/disclosure.py), run-override allow-list and site config
(common/data/policy.py), pooled AUC from released cells, DP over the centers present, and packages
that would run code when loaded."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from common.config import join_overrides
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict

from client import disclosure as D
from client import policy as policy_module
from client.policy import policy_mod
from common.metrics import auc_from_cells, auc_from_histograms, score_histogram
from common.data.policy import PolicyError, key_listed, load_policy, site_config


def _exact_auc(y, p) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p))


# --------------------------------------------------------------------------- cells


@pytest.mark.parametrize("seed", range(20))
def test_merged_cells_hold_zero_or_at_least_k_and_confusion_is_a_sum_of_cells(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(12, 200))
    y = rng.integers(0, 2, n).astype(float)
    y[:5], y[5:10] = 0, 1
    p = np.clip(rng.normal(0.3 + 0.3 * y, rng.uniform(0.05, 0.3)), 0, 1)
    k, bins = int(rng.integers(2, 6)), int(rng.integers(2, 21))
    cells = D.release_histogram(y, p, bins, k)
    assert all(c == 0 or c >= k for c in cells.neg + cells.pos)
    assert sum(cells.neg) == (y == 0).sum() and sum(cells.pos) == (y == 1).sum()
    grid = D.grid_edges(bins)
    assert all(np.isclose(grid, e).any() for e in cells.edges) and cells.edges[0] == 0 and cells.edges[-1] == 1
    for t in rng.uniform(0, 1, 5):
        used, c = cells.confusion(t)
        assert used in cells.edges[:-1]
        pred = p >= used    # the counts of the raw scores at the edge used are the sums of released cells
        assert c == {"tp": int((pred & (y == 1)).sum()), "fp": int((pred & (y == 0)).sum()),
                     "tn": int((~pred & (y == 0)).sum()), "fn": int((~pred & (y == 1)).sum())}
    est, lo, hi = auc_from_cells([(cells.edges, cells.neg, cells.pos)])
    assert lo - 1e-12 <= _exact_auc(y, p) <= hi + 1e-12 and lo <= est <= hi


def test_a_label_below_the_cell_floor_cannot_be_released():
    with pytest.raises(ValueError):
        D.merge_cells([3, 4], [1, 2], 5)


def test_pooled_auc_over_sites_with_different_grids_and_merges_bounds_the_exact_auc():
    rng = np.random.default_rng(7)
    cells, ys, ps = [], [], []
    for bins, k in ((20, 5), (10, 3), (16, 5)):
        y = rng.integers(0, 2, 80).astype(float)
        p = np.clip(rng.normal(0.35 + 0.25 * y, 0.2), 0, 1)
        r = D.release_histogram(y, p, bins, k)
        cells.append((r.edges, r.neg, r.pos))
        ys.append(y), ps.append(p)
    est, lo, hi = auc_from_cells(cells)
    exact = _exact_auc(np.concatenate(ys), np.concatenate(ps))
    assert lo <= exact <= hi and lo <= est <= hi   # the estimate's error is at most the width of the bounds
    # one grid, nothing merged: the histogram estimate and bounds exactly
    h = score_histogram(ys[0], ps[0], 20)
    assert auc_from_cells([(D.grid_edges(20), h[0], h[1])]) == pytest.approx(auc_from_histograms(h))


# --------------------------------------------------------------------------- terms and ledger


def _site(tmp_path: Path, policy: str = "") -> Path:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "site.toml").write_text('center_id = "c1"\nrole = "train"\n')
    (site / "policy.toml").write_text(policy)
    return site


def test_one_grid_per_run_clamped_bins_and_threshold_cap(tmp_path):
    pol = load_policy(_site(tmp_path))
    ledger = tmp_path / D.LEDGER_FILE
    t, why = D.admit_evaluate(pol, ledger, 1, {"bins": 10000, "threshold": 0.5})
    assert why is None and t.bins == 20 and "bins 10000 clamped to 20" in t.notices[0]
    t, _ = D.admit_evaluate(pol, ledger, 1, {"bins": 7, "threshold": 0.5})
    assert t.bins == 20 and "grid is 20 bins" in t.notices[0]
    for thr in (0.3, 0.7):
        assert D.admit_evaluate(pol, ledger, 1, {"bins": 20, "threshold": thr})[1] is None
    t, why = D.admit_evaluate(pol, ledger, 1, {"bins": 20, "threshold": 0.31})
    assert t is None and "max_thresholds is 3" in why
    assert D.admit_evaluate(pol, ledger, 1, {"threshold": 0.7})[1] is None      # one already asked: fine
    t, _ = D.admit_evaluate(pol, ledger, 2, {"bins": 7, "threshold": 0.31})     # another run starts afresh
    assert t.bins == 7 and not t.notices
    assert json.loads(ledger.read_text())["1"]["thresholds"] == [0.5, 0.3, 0.7]


def test_sites_that_release_no_round_metrics_answer_one_full_report_per_run(tmp_path):
    pol = load_policy(_site(tmp_path, "release_round_metrics = false\n"))
    ledger = tmp_path / D.LEDGER_FILE
    t, _ = D.admit_evaluate(pol, ledger, 1, {"split": "val"})
    assert not t.release and "not released" in t.notices[0]
    t, _ = D.admit_evaluate(pol, ledger, 1, {"split": "test", "full-report": True})
    assert t.release and t.full_report
    t, _ = D.admit_evaluate(pol, ledger, 1, {"split": "test", "full-report": True})
    assert not t.release and "already released" in t.notices[0]


def test_the_full_report_sends_the_ece_floor_and_weak_calibration_only_where_the_sites_whitelist_has_them(tmp_path):
    from common.config import load_config
    from common.federation import reply_schema as W

    rng = np.random.default_rng(0)
    n = 120
    prob = rng.uniform(0.05, 0.95, n)
    risk = rng.normal(size=n)
    pred = {"benefit": (rng.uniform(size=n) < prob).astype(float), "prob": prob, "logit": np.log(prob / (1 - prob)),
            "dfs_time": rng.uniform(1, 60, n), "dfs_event": (rng.uniform(size=n) < 0.6).astype(float), "risk": risk}
    cfg = load_config(["train.n_boot=20"])
    terms = D.Terms(bins=10, threshold=0.5, full_report=True)
    listed = {"ece_floor", "ece_calibrated_floor"}

    out = D.release_metrics(pred, terms, load_policy(_site(tmp_path)), cfg, [])   # default policy: the schema
    assert 0 < out["ece_floor"] < 1 and "ece-lo" in out and "ece_calibrated_floor" not in out   # no calibration
    # the calibration intercept and slope, each with its interval (labels drawn from the probabilities)
    assert out["cal_slope-lo"] < out["cal_slope"] < out["cal_slope-hi"] and out["cal_slope-lo"] < 1 < out["cal_slope-hi"]
    assert out["cal_intercept-lo"] < out["cal_intercept"] < out["cal_intercept-hi"]
    default = load_policy(_site(tmp_path))
    assert D.check_released(default, out, 10) is None and all(key_listed(k, default.metric_keys) for k in out)
    # the server reads them into the external center's entry (the console's table and bench_quality read that)
    from server.evaluation import center_entry

    entry, _ = center_entry(out)
    assert [entry[k] for k in ("cal_slope", "cal_slope_lo", "cal_slope_hi")] == [out[k] for k in W.full_report_keys("cal_slope")]
    listed |= {k for n_ in W.FULL_REPORT_LISTED for k in W.full_report_keys(n_)}
    # a site that wrote its own list before the floor existed: no floor, and the reply stays within its list
    own = sorted(k for n_ in W.FULL_REPORT for k in W.full_report_keys(n_)) + list(W.BENEFIT_METRICS) + [
        "num-examples", "dfs-abstained", "n-dfs", "n-events", "td-*", "dfs-cal-*", *W.PAIR_WIRE.values()]
    site = _site(tmp_path, "metric_keys = [" + ", ".join(f'"{k}"' for k in own) + "]\n")
    pol = load_policy(site)
    out = D.release_metrics(pred, terms, pol, cfg, [])
    assert "ece" in out and not listed & set(out)
    assert all(key_listed(k, pol.metric_keys) for k in out)
    # a list that names one of them by pattern: that one (value and interval), not the other
    site = _site(tmp_path, "metric_keys = [" + ", ".join(f'"{k}"' for k in own + ["cal_slope*"]) + "]\n")
    out = D.release_metrics(pred, terms, load_policy(site), cfg, [])
    assert {"cal_slope", "cal_slope-lo", "cal_slope-hi"} <= set(out) and not any(k.startswith("cal_intercept") for k in out)


@pytest.mark.parametrize("text, needle", [
    ("min_patients = { benefit = 0 }\n", "must be at least 1"),
    ("min_patients = { survival = 5 }\n", "min_patients must be a table"),
    ("min_cell_count = 'five'\n", "min_cell_count must be an integer"),
    ("release_round_metrics = 'no'\n", "release_round_metrics must be true or false"),
    ("max_histogram_bins = 0\n", "max_histogram_bins must be at least 1"),
])
def test_malformed_disclosure_rules_are_refused(tmp_path, text, needle):
    with pytest.raises(PolicyError, match=needle):
        load_policy(_site(tmp_path, text))


# --------------------------------------------------------------------------- what a run may change


def test_run_overrides_outside_the_allow_list_are_refused_naming_the_key(tmp_path):
    site = _site(tmp_path, '[config]\ndata.cache_dir = ".site-cache"\n')
    cfg = site_config(site, ["model=small", "federation.num_rounds=3", "train.lr=0.01"])
    assert cfg.federation.num_rounds == 3 and cfg.train.lr == 0.01 and cfg.data.cache_dir == ".site-cache"
    for bad in ("train.min_patients=1", "data.cache_dir=/tmp/elsewhere", "preprocess.pathology.encoder.path=/x.pt",
                "+audit_dir=/tmp", "~train.device", "train.device=cuda"):
        key = bad.lstrip("+~").split("=")[0]
        with pytest.raises(PolicyError, match=f"refused by this site: {key.replace('.', '[.]')}"):
            site_config(site, [bad])
    # the site may widen or narrow its own list
    (site / "policy.toml").write_text('allowed_run_keys = ["model", "model.*"]\n')
    with pytest.raises(PolicyError, match="federation.num_rounds"):
        site_config(site, ["federation.num_rounds=3"])
    (site / "policy.toml").write_text('allowed_run_keys_extra = ["seed"]\n')
    assert site_config(site, ["seed=7", "federation.num_rounds=3"]).seed == 7
    # null switches an allowed setting off; it names nothing
    assert site_config(site, ["federation.update_checks.max_norm_ratio=null"]).federation.update_checks \
        .max_norm_ratio is None


SECRET = "hunter2-secret"


@pytest.mark.parametrize("override, named", [
    # Hydra's package syntax put a config group's file over another package (data.cache_dir, the encoder)
    ("+model@data=../../../../tmp/x", "model@data"),
    ("+model@preprocess.pathology.encoder=small", "model@preprocess.pathology.encoder"),
    ("model@data=small", "model@data"),
    # an interpolation resolves at the site: the site's environment would come back in an error text
    ("model.fusion=${oc.env:SITE_DB_PASSWORD}", "model.fusion (an interpolation)"),
    ("model.fusion='${oc.env:SITE_DB_PASSWORD}'", "model.fusion (an interpolation)"),
    ("data.genomic_features=[${oc.env:SITE_DB_PASSWORD}]", "data.genomic_features (an interpolation)"),
    ("train.lr=str(${oc.env:SITE_DB_PASSWORD})", "train.lr (an interpolation)"),
    # a group option that is a path, adding and deleting keys, sweeps
    ("model=../../../../tmp/evil", "model (not one of the installed model configurations)"),
    ("+train.extra=1", "train.extra (a + override)"),
    ("++federation.strategy=fedavg", "federation.strategy (a + override)"),
    ("~federation.strategy", "federation.strategy (a ~ override)"),
    ("federation.num_rounds=3,300", "federation.num_rounds (a sweep)"),
    # allowed keys with a value of another kind, keys the configuration does not have
    ("train.lr=/etc/passwd", "train.lr (a value of another kind"),
    ("model.no_such_key=1", "model.no_such_key (no such setting)"),
    # what no default policy lets a run name: the seed, the bootstrap count, a floor, an encoder, a path
    ("seed=3", "seed"),
    ("train.n_boot=1", "train.n_boot"),
    ("train.min_patients=1", "train.min_patients"),
    ("preprocess.pathology.encoder.name=torchscript", "preprocess.pathology.encoder.name"),
    ("data.cache_dir=/tmp/x", "data.cache_dir"),
])
def test_override_attacks_are_refused_naming_the_key_and_never_the_value(tmp_path, monkeypatch, override, named):
    monkeypatch.setenv("SITE_DB_PASSWORD", SECRET)
    site = _site(tmp_path)
    with pytest.raises(PolicyError) as err:
        site_config(site, ["model=small", override])
    text = str(err.value)
    assert named in text, text
    assert SECRET not in text and "/etc/passwd" not in text and "/tmp/x" not in text and "evil" not in text
    # the same through the policy mod: the run is refused before any handler, with the key named
    from client.policy import check_run

    why = check_run(load_policy(site), {"overrides": join_overrides(["model=small", override])})
    assert why is not None and named.split(" (")[0] in why and SECRET not in why


def test_a_package_brings_its_architecture_and_schema_never_the_sites_settings(tmp_path):
    """A model package carries the architecture and the feature lists; everything else is the site's own."""
    from common.config import load_config
    from common.learn.task import model_config

    site = _site(tmp_path, '[config]\ndata.cache_dir = ".site-cache"\n')
    pkg = {"model": model_config(load_config(["model=small"])),
           "schema": {"genomic_features": ["TP53_mut"], "clinical_features": ["age"], "scaling": []}}
    cfg = site_config(site, package=pkg)
    assert cfg.model.name == "small" and list(cfg.data.genomic_features) == ["TP53_mut"]
    assert list(cfg.data.clinical_features) == ["age"]
    assert cfg.data.cache_dir == ".site-cache" and cfg.train.min_patients == load_config([]).train.min_patients
    assert cfg.preprocess.pathology.encoder.name == load_config([]).preprocess.pathology.encoder.name


def _ctx(site: Path, overrides: str) -> Context:
    return Context(run_id=9, node_id=5, node_config={"data-dir": str(site)}, state=RecordDict(),
                   run_config={"overrides": overrides})


def _msg(mtype: str, config: dict) -> Message:
    md = Metadata(run_id=9, message_id=f"m-{time.monotonic_ns()}", src_node_id=1, dst_node_id=5,
                  reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600, message_type=mtype)
    return Message(RecordDict({"config": ConfigRecord(config)}), metadata=md)


def test_policy_mod_refuses_a_run_with_site_owned_overrides_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(policy_module, "_split_size", lambda ctx, split: 100)
    site = _site(tmp_path)
    calls = []
    reply = policy_mod(_msg("query", {}), _ctx(site, "model=small data.cache_dir=/tmp/elsewhere train.min_patients=1"),
                       lambda m, c: calls.append(1))
    assert reply.has_error() and reply.error.code == 403 and not calls
    assert "policy of c1: run override(s) refused: data.cache_dir, train.min_patients;" in reply.error.reason
    # an evaluate beyond the threshold cap is refused before the handler, with the reason
    ok = lambda m, c: Message(RecordDict({"metrics": MetricRecord({"num-examples": 3, "abstained": 1})}),  # noqa: E731
                              reply_to=m)
    for thr in (0.1, 0.2, 0.3):
        assert not policy_mod(_msg("evaluate", {"split": "test", "threshold": thr}), _ctx(site, "model=small"),
                              ok).has_error()
    r = policy_mod(_msg("evaluate", {"split": "test", "threshold": 0.4}), _ctx(site, "model=small"), ok)
    assert r.has_error() and "max_thresholds is 3" in r.error.reason


# --------------------------------------------------------------------------- DP over the centers present


def test_dp_aggregates_the_screened_centers_and_accounts_for_what_it_released(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    from common.config import load_config
    from server.strategies import build_strategy, privacy_spent

    fed = load_config(["federation.differential_privacy.enabled=true"]).federation
    strat = build_strategy(fed, n_train_centers=3)
    strat.current_arrays = ArrayRecord({"w": torch.zeros(4)})

    def reply(v: float) -> Message:
        md = Metadata(run_id=1, message_id="x", src_node_id=1, dst_node_id=0, reply_to_message_id="",
                      group_id="1", created_at=time.time(), ttl=60, message_type="train")
        return Message(RecordDict({"arrays": ArrayRecord({"w": torch.full((4,), v)}),
                                   "metrics": MetricRecord({"num-examples": 10, "dp-weight": 1.0})}), metadata=md)

    # a center is offline: Flower's wrapper raised in configure_train; here the round samples the 2 present
    class TwoNodes:
        def get_node_ids(self):
            return [11, 12]

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):   # as a ServerApp process has them
        monkeypatch.setattr(TaskIdentity, attr, value)
    msgs = list(strat.configure_train(1, ArrayRecord({"w": torch.zeros(4)}), ConfigRecord({}), TwoNodes()))
    assert sorted(m.metadata.dst_node_id for m in msgs) == [11, 12] and strat.num_sampled_clients == 2   # FedAvg samples in random order
    from flwr.clientapp.mod.centraldp_mods import KEY_CLIPPING_NORM
    assert msgs[0].content["config"][KEY_CLIPPING_NORM] == float(fed.differential_privacy.clipping_norm)
    # round 1: of the 2 addressed, one reply was rejected by screening: 1 is aggregated, and accounted as 1
    assert strat.aggregate_train(1, [reply(0.1)])[0] is not None
    assert strat.accountant.state_dict()["compositions"][0]["event"]["sample_size"] == 1
    # round 2: the strategy addressed 3 centers, one reply was rejected by screening: 2 are aggregated
    strat.num_sampled_clients = 3
    strat._prepare_accounting(2, [object(), object(), object()])
    arrays, _ = strat.aggregate_train(2, [reply(0.1), reply(0.2)])
    assert arrays is not None and strat.num_sampled_clients == 2
    spent = privacy_spent(strat)
    assert spent["releases"] == 2 and spent["epsilon"] > 0
    comp = strat.accountant.state_dict()["compositions"]
    assert [c["event"]["sample_size"] for c in comp] == [1, 2]
    # a round with no usable reply releases (and accounts) nothing
    strat._prepare_accounting(3, [object(), object()])
    assert strat.aggregate_train(3, [])[0] is None and privacy_spent(strat)["releases"] == 2


# --------------------------------------------------------------------------- nothing received is executed


class _Evil:
    """Pickles to a call of ``open(marker, "w")``: loading it with full unpickling creates the file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_package_that_runs_code_when_loaded_is_refused_by_evaluate_and_screen(tiny_cohort, tmp_path, capsys):
    from tests.test_evaluate import cli

    marker = tmp_path / "pwned"
    evil = tmp_path / "best_model.pt"
    torch.save({"state_dict": {}, "config": {}, "threshold": 0.5, "card": _Evil(str(marker))}, evil)
    sha = hashlib.sha256(evil.read_bytes()).hexdigest()   # the attacker sends the matching hash too
    (tmp_path / "best_model.json").write_text(json.dumps({"sha256": sha}))
    site = tiny_cohort / "external"
    assert cli(["evaluate", "--sha256", sha, "--model", str(evil), "--site", str(site),
                "--out", str(tmp_path / "r")]) == 2
    assert "refused: not a package of tensors and plain data" in capsys.readouterr().err
    assert cli(["screen", "--sha256", sha, "--model", str(evil), "--site", str(site), "--patient", "EX0001"]) == 2
    assert "refused" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "r").exists()
    # without a hash from another channel nothing is loaded at all; a wrong hash is refused before reading
    with pytest.raises(SystemExit, match="give --sha256"):
        cli(["evaluate", "--model", str(evil), "--site", str(site), "--out", str(tmp_path / "r")])
    assert cli(["evaluate", "--sha256", "0" * 64, "--model", str(evil), "--site", str(site),
                "--out", str(tmp_path / "r")]) == 2
    assert "is not the expected" in capsys.readouterr().err
    # control: the file really is an exploit -- full unpickling writes the marker
    code = f"import torch; torch.load({str(evil)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, cwd=Path(__file__).parents[1])
    assert marker.exists()


def test_a_checkpoint_with_a_pickled_object_is_refused(tmp_path):
    from server.checkpoints import CheckpointError, load_checkpoint, save_checkpoint

    path = save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, {"config_hash": "h"}, {"history": []})
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "server_state": _Evil(str(marker))}, path)
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()
