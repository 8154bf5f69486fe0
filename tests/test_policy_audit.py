"""Site policy and audit log: policy decisions on hand-made messages, and a replay of
every audit line of real federations (no patient-level data may ever leave a site)."""
from __future__ import annotations

import csv
import hashlib
import json
import shutil
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict

from client import policy as policy_module
from client.audit import AUDIT_FILE, append_line, audit_mod, read_audit
from client.policy import PolicyError, check_request, load_policy, policy_mod
from tests.conftest import TEST_OVERRIDES

# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _no_site_data(monkeypatch):
    """Unit tests use site folders without data: every split has 100 patients unless a test says otherwise.
    (The federation tests run the ClientApp in other processes, unaffected.)"""
    monkeypatch.setattr(policy_module, "_split_size", lambda ctx, split: 100)


def _site(tmp_path: Path, policy: str | None = None, center: str = "center_x") -> Path:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "site.toml").write_text(f'center_id = "{center}"\nrole = "train"\n')
    if policy is not None:
        (site / "policy.toml").write_text(policy)
    return site


def _ctx(site: Path, **node) -> Context:
    return Context(run_id=7, node_id=5, node_config={"data-dir": str(site), **node}, state=RecordDict(),
                   run_config={})


def _msg(mtype: str, config: dict | None = None, arrays: bool = True) -> Message:
    content = {"config": ConfigRecord(config or {})}
    if arrays:
        content["arrays"] = ArrayRecord({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
                                         "b": torch.ones(2)})
    md = Metadata(run_id=7, message_id=f"msg-{mtype}-{time.monotonic_ns()}", src_node_id=1, dst_node_id=5,
                  reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600, message_type=mtype)
    return Message(RecordDict(content), metadata=md)


class _Handler:
    """A dummy ``call_next`` that records whether it ran and returns a fixed reply."""

    def __init__(self, records: dict | None = None):
        self.calls = 0
        self.records = records if records is not None else {"metrics": MetricRecord({"num-examples": 10,
                                                                                      "train-loss": 0.5})}

    def __call__(self, msg, context):
        self.calls += 1
        return Message(RecordDict(self.records), reply_to=msg)


def _run(mod, msg, ctx, handler):
    return mod(msg, ctx, handler)


def _chain(msg, ctx, handler):
    """audit_mod(policy_mod(handler)), as ClientApp(mods=[audit_mod, policy_mod]) wires them."""
    return audit_mod(msg, ctx, lambda m, c: policy_mod(m, c, handler))


# --------------------------------------------------------------------------- policy unit tests


def test_defaults_apply_without_policy_file(tmp_path):
    pol = load_policy(_site(tmp_path))
    assert set(pol.message_types) == {"query", "train", "evaluate"}
    assert pol.max_local_epochs >= 1 and pol.max_server_round >= 1 and pol.min_cohort_size >= 1
    assert set(pol.reply_records) == {"arrays", "metrics", "evaluation", "info", "cv-arrays"}
    # the whitelists are the project's reply schema (common/federation/reply_schema.py), patterns included
    from common.federation import reply_schema as W
    from common.data.policy import key_listed

    assert pol.metric_keys == set(W.METRIC_KEY_PATTERNS) and pol.info_keys == set(W.INFO_KEYS)
    sent = ["num-examples", "train-loss", "train-seconds", "samples-per-s", "hist-neg", "hist-pos", "loss", "tp",
            "c-conc", "c-var-d", "n-dfs", "dfs-abstained", "td-24-edges", "td-36-pos", "hz-exposure", "risk-counts",
            "auc-lo", "c_index-hi", "td-auc-12", "dfs-cal-24-high-obs-lo", "ibs"]
    assert all(key_listed(k, pol.metric_keys) for k in sent)
    assert not any(key_listed(k, pol.metric_keys) for k in ("per-patient-prob", "c-index", "td-24", "patient_id"))
    assert {"role", "center-id", "n-train", "n-val", "n-test", "n-benefit", "n-dfs", "notice"} <= pol.info_keys
    # the disclosure floors are the site's, with the documented defaults
    assert pol.min_patients == {"benefit": 10, "dfs": 10} and pol.min_cell_count == 5
    assert pol.max_histogram_bins == 20 and pol.max_thresholds == 3 and pol.release_round_metrics is True
    assert "data.cache_dir" not in pol.allowed_run_keys and "train.min_patients" not in pol.allowed_run_keys


def test_site_policy_file_overrides_defaults_and_rejects_unknown_keys(tmp_path):
    pol = load_policy(_site(tmp_path, 'message_types = ["query", "evaluate"]\nmax_local_epochs = 3\n'))
    assert pol.message_types == ("query", "evaluate") and pol.max_local_epochs == 3
    assert pol.max_server_round == load_policy(None).max_server_round  # untouched keys keep the default
    (tmp_path / "site" / "policy.toml").write_text("max_local_epoch = 3\n")
    with pytest.raises(PolicyError, match="unknown key.*max_local_epoch"):
        load_policy(tmp_path / "site")
    (tmp_path / "site" / "policy.toml").write_text('message_types = ["train", "predict"]\n')
    with pytest.raises(PolicyError, match="predict"):
        load_policy(tmp_path / "site")
    (tmp_path / "site" / "policy.toml").write_text("max_local_epochs = 'many'\n")
    with pytest.raises(PolicyError, match="max_local_epochs must be an integer"):
        load_policy(tmp_path / "site")


@pytest.mark.parametrize("mtype, config, reason", [
    ("train", {"local-epochs": 2, "server-round": 3}, None),
    ("train", {"local-epochs": 6, "server-round": 3}, "local-epochs 6 exceeds max_local_epochs 5"),
    ("train", {"local-epochs": 1, "server-round": 11}, "server-round 11 exceeds max_server_round 10"),
    ("evaluate", {"server-round": 11}, "server-round 11 exceeds max_server_round 10"),
    ("evaluate", {"split": "val"}, None),
    ("query", {}, "does not answer `query` messages (answers: train, evaluate)"),
    ("train", {"local-epochs": "3"}, "`local-epochs` must be an integer"),
])
def test_request_decisions(tmp_path, mtype, config, reason):
    pol = load_policy(_site(tmp_path, 'message_types = ["train", "evaluate"]\nmax_local_epochs = 5\n'
                                      'max_server_round = 10\n'))
    got = check_request(pol, _msg(mtype, config))
    assert got == reason if reason is None else reason in got


def test_mod_refuses_with_403_naming_the_center_and_never_runs_the_handler(tmp_path):
    site = _site(tmp_path, "max_local_epochs = 0\n", center="hospital_q")
    handler = _Handler()
    reply = _run(policy_mod, _msg("train", {"local-epochs": 1, "server-round": 1}), _ctx(site), handler)
    assert reply.has_error() and reply.error.code == 403
    assert reply.error.reason == "policy of hospital_q: local-epochs 1 exceeds max_local_epochs 0"
    assert handler.calls == 0
    # within the policy: the handler's reply goes out unchanged
    ok = _run(policy_mod, _msg("evaluate", {"split": "val"}), _ctx(site),
              _Handler({"metrics": MetricRecord({"num-examples": 4, "abstained": 1})}))
    assert not ok.has_error() and dict(ok.content["metrics"])["num-examples"] == 4
    # a reply with a cell of one patient is refused whole by the policy mod (second line behind the handler)
    small = _run(policy_mod, _msg("evaluate", {"split": "val"}), _ctx(site), _Handler({"metrics": MetricRecord(
        {"num-examples": 14, "n-pos": 7, "abstained": 0, "hist-edges": [0.0, 0.5, 1.0], "hist-neg": [1, 6],
         "hist-pos": [7, 0]})}))
    assert small.has_error() and "with [1] patients (< min_cell_count 5)" in small.error.reason


def test_message_type_refused(tmp_path):
    site = _site(tmp_path, 'message_types = ["query", "evaluate"]\n', center="c9")
    handler = _Handler()
    reply = _run(policy_mod, _msg("train", {"local-epochs": 1}), _ctx(site), handler)
    assert reply.error.code == 403 and reply.error.reason.startswith("policy of c9: does not answer `train`")
    assert handler.calls == 0


@pytest.mark.parametrize("records, needle", [
    ({"metrics": MetricRecord({"num-examples": 3, "per-patient-prob": [0.1, 0.9, 0.4]})},
     "metric key(s) per-patient-prob in `metrics` are not in the metric_keys whitelist"),
    ({"metrics": MetricRecord({"num-examples": 3}), "predictions": MetricRecord({"p": [0.1, 0.2]})},
     "record `predictions` is not allowed"),
    ({"info": ConfigRecord({"role": "train", "patients": "CE0001,CE0002"})},
     "key(s) patients in `info` are not in the info_keys whitelist"),
    ({"metrics": ConfigRecord({"num-examples": 3})}, "record `metrics` must be a metric record"),
])
def test_reply_outside_whitelist_is_refused_not_trimmed(tmp_path, records, needle):
    reply = _run(policy_mod, _msg("evaluate", {"split": "val"}), _ctx(_site(tmp_path, center="cz")),
                 _Handler(records))
    assert reply.has_error() and reply.error.code == 403
    assert reply.error.reason.startswith("policy of cz: reply refused: ") and needle in reply.error.reason


def test_minimum_cohort_size(tmp_path, monkeypatch):
    site = _site(tmp_path, "min_cohort_size = 5\n", center="small")
    sizes = {"train": 9, "val": 4, "test": 13}
    monkeypatch.setattr(policy_module, "_split_size", lambda ctx, split: sizes[split])
    handler = _Handler()
    r = _run(policy_mod, _msg("evaluate", {"split": "val"}), _ctx(site), handler)
    assert r.error.reason == "policy of small: the `val` split has 4 patients, fewer than min_cohort_size 5"
    r = _run(policy_mod, _msg("evaluate", {}), _ctx(site), handler)  # split defaults to val, as in client_app
    assert r.has_error()
    assert not _run(policy_mod, _msg("evaluate", {"split": "test"}), _ctx(site), handler).has_error()
    assert not _run(policy_mod, _msg("train", {"local-epochs": 1}), _ctx(site), handler).has_error()
    sizes["train"] = 2
    r = _run(policy_mod, _msg("train", {"local-epochs": 1}), _ctx(site), handler)
    assert "the `train` split has 2 patients" in r.error.reason
    r = _run(policy_mod, _msg("evaluate", {"split": "everything"}), _ctx(site), handler)
    assert r.error.reason == "policy of small: unknown split `everything`"
    assert handler.calls == 2


def test_malformed_policy_file_refuses_everything(tmp_path):
    site = _site(tmp_path, "max_local_epochs = = 3\n", center="broken")
    handler = _Handler()
    for mtype in ("query", "train", "evaluate"):
        r = _run(policy_mod, _msg(mtype, {"local-epochs": 1}), _ctx(site), handler)
        assert r.error.code == 403 and "policy of broken: policy file unusable" in r.error.reason
    assert handler.calls == 0


# --------------------------------------------------------------------------- audit unit tests


def test_audit_logs_request_and_reply_with_hashes_sizes_and_decision(tmp_path):
    site = _site(tmp_path, "max_local_epochs = 2\n", center="aud")
    log_path = site / AUDIT_FILE
    append_line(log_path, {"earlier": "line"})  # written before: must survive untouched
    before = log_path.read_bytes()
    msg = _msg("train", {"local-epochs": 1, "server-round": 1})
    arrays = {"w": torch.full((4, 4), 0.25)}
    reply = _chain(msg, _ctx(site), _Handler({"arrays": ArrayRecord(arrays),
                                              "metrics": MetricRecord({"num-examples": 8, "train-loss": 0.1})}))
    assert not reply.has_error()
    refused = _chain(_msg("train", {"local-epochs": 3}), _ctx(site), _Handler())
    assert refused.has_error()

    assert log_path.read_bytes().startswith(before)
    lines = read_audit(log_path)
    assert lines[0] == {"earlier": "line"} and len(lines) == 5
    rin, rout, rin2, rout2 = lines[1:]
    assert [x["direction"] for x in lines[1:]] == ["in", "out", "in", "out"]
    assert rin["run_id"] == 7 and rin["message_type"] == "train" and rin["center"] == "aud"
    assert rin["message_id"] == msg.metadata.message_id and rout["reply_to"] == msg.metadata.message_id
    assert rin["time"].endswith("+00:00")
    # incoming: record names, keys, sizes, per-array SHA-256
    assert rin["records"]["config"]["kind"] == "config"
    assert rin["records"]["config"]["values"] == {"local-epochs": 1, "server-round": 1}
    a_in = msg.content["arrays"]
    assert rin["records"]["arrays"]["keys"] == ["w", "b"]
    assert rin["records"]["arrays"]["bytes"] == a_in.count_bytes()
    assert rin["records"]["arrays"]["arrays"]["w"]["sha256"] == hashlib.sha256(a_in["w"].data).hexdigest()
    assert rin["bytes"] == sum(r.count_bytes() for r in msg.content.values())
    # outgoing
    a_out = reply.content["arrays"]
    assert rout["decision"] == "accepted"
    assert rout["records"]["arrays"]["arrays"]["w"] == {"dtype": "float32", "shape": [4, 4],
                                                        "sha256": hashlib.sha256(a_out["w"].data).hexdigest()}
    assert rout["records"]["metrics"]["values"] == {"num-examples": 8, "train-loss": 0.1}
    # the refusal is logged by the (outer) audit mod, with its reason
    assert rin2["records"]["config"]["values"]["local-epochs"] == 3
    assert rout2["decision"] == "refused" and rout2["error_code"] == 403 and rout2["records"] == {}
    assert rout2["reason"] == "policy of aud: local-epochs 3 exceeds max_local_epochs 2"


def test_audit_dir_from_node_config_or_policy(tmp_path):
    site = _site(tmp_path, 'audit_dir = "logs/audit"\n')
    _chain(_msg("evaluate", {"split": "val"}), _ctx(site), _Handler())
    assert len(read_audit(site / "logs" / "audit" / AUDIT_FILE)) == 2
    assert not (site / AUDIT_FILE).exists()
    node_dir = tmp_path / "node-audit"
    _chain(_msg("evaluate", {"split": "val"}), _ctx(site, **{"audit-dir": str(node_dir)}), _Handler())
    assert len(read_audit(node_dir / AUDIT_FILE)) == 2


def test_handler_crash_is_logged_and_reraised(tmp_path):
    site = _site(tmp_path)

    def boom(msg, ctx):
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        _chain(_msg("evaluate", {"split": "val"}), _ctx(site), boom)
    last = read_audit(site / AUDIT_FILE)[-1]
    assert last["direction"] == "out" and last["decision"] == "error" and "disk on fire" in last["reason"]


def test_unwritable_audit_log_fails_closed(tmp_path):
    site = _site(tmp_path)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    handler = _Handler()
    r = _chain(_msg("evaluate", {"split": "val"}), _ctx(site, **{"audit-dir": str(blocker)}), handler)
    assert r.has_error() and "audit log not writable" in r.error.reason and handler.calls == 0


# --------------------------------------------------------------------------- federation + replay

HIST_KEYS = ("hist-neg", "hist-pos")
HAZARD_INTERVALS = 20   # conf/train: hazard_max_months 60 / hazard_step_months 3


def _is_cell_list(key: str, prefixes: tuple[str, ...]) -> bool:
    """A key of the reply schema that holds cells (edges or counts), with one of these prefixes."""
    from common.federation import reply_schema as W
    from common.data.policy import key_listed

    cell_keys = (*W.BENEFIT_CELLS, "td-*-edges", "td-*-neg", "td-*-pos", *W.HAZARD_CELLS, *W.RISK_CELLS)
    return key.startswith(prefixes) and key_listed(key, cell_keys)
ALLOWED_REPLY_RECORDS = {"arrays", "metrics", "evaluation", "info", "cv-arrays"}
SECAGG_RECORD = RECORD_KEY_CONFIGS
SECAGG_KEYS = {v for k, v in vars(SecAggKey).items() if not k.startswith("_") and isinstance(v, str)}


def _copy_cohort(tiny_cohort: Path, dst: Path) -> Path:
    """The whole cohort, caches (.newadj-cache) included, so nothing is re-preprocessed."""
    shutil.copytree(tiny_cohort, dst, ignore=shutil.ignore_patterns(AUDIT_FILE))  # other runs may have logged into the shared fixture
    return dst


def _sites(cohort: Path) -> list[Path]:
    return sorted(p for p in cohort.iterdir() if p.is_dir() and (p / "clinical.csv").exists())


def _center(site: Path) -> str:
    toml = tomllib.loads((site / "site.toml").read_text()) if (site / "site.toml").exists() else {}
    return str(toml.get("center_id", site.name)), str(toml.get("role", "train"))


def _patient_ids(site: Path) -> set[str]:
    with (site / "clinical.csv").open() as fh:
        return {row["patient_id"] for row in csv.DictReader(fh)}


def _split_sizes(site: Path) -> dict[str, int]:
    pats = json.loads((site / ".newadj-cache" / "manifest.json").read_text())["patients"]
    sizes = {s: sum(p["split"] == s for p in pats) for s in ("train", "val", "test")}
    sizes["all"] = len(pats)
    return sizes


def _strings(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v)
    else:
        yield str(obj)


def _model_of(line: dict) -> str | None:
    """Identity of the model a logged request carried (the SHA-256 of each of its arrays)."""
    arrays = (line.get("records", {}).get("arrays") or {}).get("arrays")
    return None if not arrays else hashlib.sha256(json.dumps(
        {k: a["sha256"] for k, a in sorted(arrays.items())}).encode()).hexdigest()


def check_disclosure(site: Path, outs: list[dict], ins: dict[str, dict]) -> None:
    """Every released cell of every evaluate reply of a run holds 0 or >= the site's min_cell_count patients.

    Also: histograms have at most max_histogram_bins cells with edges on the run's one grid; confusion
    counts are sums of released cells at `threshold-used` (an edge), so they add nothing; the label
    counts respect the floors; every reply about the same model releases the same cells (so no
    combination of replies is finer than one of them); at most max_thresholds distinct thresholds.
    """
    from client.disclosure import grid_edges
    from common.data.policy import load_policy

    pol = load_policy(site)
    k = pol.min_cell_count
    grids, by_model, thresholds = set(), {}, set()
    for out in outs:
        # an evaluate reply's metrics, or a train reply's scores of the model it received (one message a round)
        record = "metrics" if out["message_type"] == "evaluate" else "evaluation"
        vals = (out["records"].get(record) or {}).get("values") or {}
        where = f"{site.name}: reply to {out['message_type']} {out['reply_to']}"
        if out.get("decision") != "accepted" or not vals or out["message_type"] not in ("evaluate", "train"):
            continue
        req = ((ins[out["reply_to"]].get("records") or {}).get("config") or {}).get("values") or {}
        thresholds.add(float(req.get("threshold", 0.5)))
        if "hist-neg" not in vals:
            assert not any(key in vals for key in ("tp", "fp", "tn", "fn", "n-pos", "auc")), \
                f"{where}: benefit metrics without released cells"
            assert "loss" not in vals or vals.get("dfs-abstained") == 0, f"{where}: a loss with no endpoint released"
            continue
        neg, pos = vals["hist-neg"], vals["hist-pos"]
        edges = vals.get("hist-edges") or [float(e) for e in np.linspace(0.0, 1.0, len(neg) + 1)]
        cells = [int(c) for c in neg + pos]
        assert all(c == 0 or c >= k for c in cells), f"{where}: cells {cells} below min_cell_count {k}"
        assert len(neg) == len(pos) == len(edges) - 1 <= pol.max_histogram_bins, f"{where}: {len(neg)} cells"
        assert "threshold-used" in vals, f"{where}: confusion counts at a threshold that is no released cell edge"
        n, n_pos = int(vals["num-examples"]), int(vals["n-pos"])
        assert n >= pol.min_patients["benefit"] and min(n_pos, n - n_pos) >= k, f"{where}: floors broken"
        assert sum(neg) == n - n_pos and sum(pos) == n_pos
        grid = [b for b in range(1, pol.max_histogram_bins + 1)
                if all(np.isclose(grid_edges(b), e).any() for e in edges)]
        assert grid, f"{where}: edges {edges} are on no grid of at most {pol.max_histogram_bins} bins"
        grids.add(max(grid))
        j = edges.index(vals["threshold-used"])
        assert (vals["tp"], vals["fn"], vals["fp"], vals["tn"]) == (sum(pos[j:]), sum(pos[:j]), sum(neg[j:]),
                                                                  sum(neg[:j])), f"{where}: confusion off the cells"
        model = _model_of(ins[out["reply_to"]])
        cut = (req.get("split"), tuple(edges), tuple(neg), tuple(pos))
        assert by_model.setdefault((model, req.get("split")), cut) == cut, \
            f"{where}: another partition of the same model's scores was released before"
    assert len(thresholds) <= pol.max_thresholds, f"{site.name}: {len(thresholds)} distinct thresholds answered"
    assert len(grids) <= 1, f"{site.name}: histograms on several grids in one run: {grids}"


def replay_audit(site: Path, bins: int, run_id: int, allowed: set[str] = ALLOWED_REPLY_RECORDS) -> list[dict]:
    """Every line of one site's audit log; fails on any reply that holds patient-level data."""
    lines = read_audit(site / AUDIT_FILE)
    assert lines, f"{site.name}: empty audit log"
    pids = _patient_ids(site)
    sizes = _split_sizes(site)
    patient_counts = {n for n in sizes.values() if n > 0}
    ins = {ln["message_id"]: ln for ln in lines if ln["direction"] == "in"}
    outs = [ln for ln in lines if ln["direction"] == "out"]
    assert len(outs) == len(ins), f"{site.name}: {len(ins)} messages received but {len(outs)} replies logged"
    for ln in lines:
        assert ln["run_id"] == run_id
    for out in outs:
        where = f"{site.name}: reply to {out['message_type']} {out['reply_to']}"
        assert out["reply_to"] in ins, f"{where} answers no logged request"
        # 1) only whitelisted records
        extra = set(out["records"]) - allowed
        assert not extra, f"{where} holds records {extra}"
        # 2) no patient id anywhere in record names, keys, values (or a refusal reason)
        text = list(_strings(out["records"])) + [str(out.get("reason", ""))]
        leaked = {p for p in pids for s in text if p in s}
        assert not leaked, f"{where} holds patient ids {sorted(leaked)[:5]}"
        # 3) no per-patient vectors: a list as long as a split is only allowed as a histogram of at most `bins`
        for name, rec in out["records"].items():
            assert name != "metrics" or rec["kind"] == "metric"
            if name == SECAGG_RECORD:
                # SecAgg+ protocol material (public keys, encrypted shares, masked vectors, node ids): only
                # the protocol's own keys; its lists are as long as the neighbour set, not a patient list
                unknown = set(rec.get("keys", [])) - SECAGG_KEYS
                assert not unknown, f"{where}: unexpected keys {unknown} in the SecAgg+ record"
                continue
            for key, val in (rec.get("values") or {}).items():
                if not isinstance(val, list):
                    continue
                if _is_cell_list(key, ("hist-", "td-", "risk-")):      # score cells on the run's grid
                    assert len(val) <= bins + key.endswith("-edges"), f"{where}: cells {key} has {len(val)} bins, not {bins}"
                    continue
                if _is_cell_list(key, ("hz-",)):                         # hazard intervals of the site's grid
                    assert len(val) <= HAZARD_INTERVALS + key.endswith("-edges"), f"{where}: {key} has {len(val)} cells"
                    continue
                assert len(val) not in patient_counts, \
                    f"{where}: list metric {key!r} has {len(val)} values = patients of a split {sizes}"
    # 4) the site's disclosure rules, over every reply of the run together
    check_disclosure(site, outs, ins)
    return lines


def _bins() -> int:
    return int(next(o for o in TEST_OVERRIDES if o.startswith("federation.histogram_bins=")).split("=")[1])


@pytest.mark.slow
def test_federation_audit_replay_holds_no_patient_level_data(tiny_cohort, tmp_path, flwr_home):
    from server.ops.simulation import run_simulation

    cohort = _copy_cohort(tiny_cohort, tmp_path / "cohort")
    metrics = run_simulation(cohort, tmp_path / "run", TEST_OVERRIDES, stream=False)
    run_id = int(metrics["flwr_run_id"])
    for site in _sites(cohort):
        center, role = _center(site)
        lines = replay_audit(site, _bins(), run_id)
        outs = [ln for ln in lines if ln["direction"] == "out"]
        assert all(ln["center"] == center for ln in lines)
        # the default policy refuses nothing that today's ClientApp sends
        assert all(ln["decision"] == "accepted" for ln in outs), [ln.get("reason") for ln in outs]
        types = [ln["message_type"] for ln in outs]
        assert types.count("query") == 1
        if role == "external":
            assert "train" not in types and types.count("evaluate") >= 1
        else:
            # one message per round; then the last round's model scored, then the selected model's hazard cells
            assert types.count("train") == metrics["rounds"] and types.count("evaluate") == 2
            first, *later = [ln for ln in outs if ln["message_type"] == "train"]
            assert set(first["records"]) == {"arrays", "metrics"} and first["records"]["arrays"]["arrays"]
            assert all(len(a["sha256"]) == 64 for a in first["records"]["arrays"]["arrays"].values())
            # from round 2 on, a train reply also scores the model it received: the previous round's validation
            assert later and all({"arrays", "metrics", "evaluation"} <= set(ln["records"]) for ln in later)


@pytest.mark.slow
def test_site_refusing_to_train_is_logged_and_the_run_completes(tiny_cohort, tmp_path, flwr_home):
    from server.ops.simulation import run_simulation

    cohort = _copy_cohort(tiny_cohort, tmp_path / "cohort")
    train_sites = [s for s in _sites(cohort) if _center(s)[1] != "external"]
    strict = train_sites[0]
    (strict / "policy.toml").write_text('# site IT: no training here\nmax_local_epochs = 0\n'
                                        'allowed_run_keys_extra = ["train.n_boot"]\n')
    center, _ = _center(strict)
    metrics = run_simulation(cohort, tmp_path / "run", TEST_OVERRIDES, stream=False)

    reason = f"policy of {center}: local-epochs 1 exceeds max_local_epochs 0"
    for h in metrics["history"]:
        assert h["failures"].get(center) == reason
        assert h["n_train_replies"] == len(train_sites) - 1
    lines = replay_audit(strict, _bins(), int(metrics["flwr_run_id"]))
    outs = [ln for ln in lines if ln["direction"] == "out"]
    train_out = [ln for ln in outs if ln["message_type"] == "train"]
    assert len(train_out) == metrics["rounds"]
    assert all(ln["decision"] == "refused" and ln["error_code"] == 403 and ln["reason"] == reason
               and ln["records"] == {} for ln in train_out)
    # it still answers what its policy allows
    assert all(ln["decision"] == "accepted" for ln in outs if ln["message_type"] != "train")
    for other in train_sites[1:]:
        other_outs = [ln for ln in read_audit(other / AUDIT_FILE) if ln["direction"] == "out"]
        assert all(ln["decision"] == "accepted" for ln in other_outs)


def test_replay_catches_patient_level_replies(tmp_path):
    """The replay itself: a forged log with a leaking reply fails, a clean one passes."""
    site = tmp_path / "s"
    (site / ".newadj-cache").mkdir(parents=True)
    (site / "clinical.csv").write_text("patient_id,benefit\nQQ0001,1\nQQ0002,0\nQQ0003,1\n")
    (site / ".newadj-cache" / "manifest.json").write_text(json.dumps({"patients": [
        {"patient_id": p, "split": s} for p, s in (("QQ0001", "train"), ("QQ0002", "train"), ("QQ0003", "val"))]}))

    def forge(records):
        (site / AUDIT_FILE).unlink(missing_ok=True)
        append_line(site / AUDIT_FILE, {"direction": "in", "run_id": 1, "message_id": "m", "message_type": "evaluate"})
        append_line(site / AUDIT_FILE, {"direction": "out", "run_id": 1, "reply_to": "m", "message_type": "evaluate",
                                        "records": records, "decision": "accepted"})

    ok = {"metrics": {"kind": "metric", "values": {"num-examples": 2, "abstained": 1}}}
    forge(ok)
    replay_audit(site, 4, 1)
    for bad, needle in [
        ({"metrics": {"kind": "metric", "values": {"worst": "QQ0002"}}}, "patient ids"),
        ({"info": {"kind": "config", "values": {"QQ0001": 1}}}, "patient ids"),
        ({"metrics": {"kind": "metric", "values": {"probs": [0.2, 0.7]}}}, "patients of a split"),
        ({"metrics": {"kind": "metric", "values": {"hist-pos": [0, 1, 0, 0, 1]}}}, "not 4"),
        # what today's federation would release: one patient alone in a score cell (site floor: 5)
        ({"metrics": {"kind": "metric", "values": {
            "num-examples": 16, "n-pos": 10, "abstained": 0, "hist-edges": [0.0, 0.5, 1.0], "hist-neg": [1, 5],
            "hist-pos": [5, 5], "threshold-used": 0.5, "tp": 5, "fn": 5, "fp": 5, "tn": 1}}}, "below min_cell_count"),
        # confusion counts at a threshold inside a released cell: finer than the cells
        ({"metrics": {"kind": "metric", "values": {
            "num-examples": 20, "n-pos": 10, "abstained": 0, "hist-edges": [0.0, 0.5, 1.0], "hist-neg": [5, 5],
            "hist-pos": [5, 5], "threshold-used": 0.5, "tp": 7, "fn": 3, "fp": 5, "tn": 5}}}, "confusion off the cells"),
        ({"scores": {"kind": "metric", "values": {}}}, "holds records"),
    ]:
        forge(bad)
        with pytest.raises(AssertionError, match=needle):
            replay_audit(site, 4, 1)


def test_a_capacity_candidates_l2_is_honoured_only_where_train_l2_is_a_run_key(tmp_path):
    """federation.capacity sends each candidate's ridge as `l2` in the train message: a run setting, so the
    site's allowed_run_keys decide, as for the override it stands for."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    open_site = load_policy(_site(tmp_path / "a"))
    strict = load_policy(_site(tmp_path / "b", 'allowed_run_keys = ["federation.num_rounds"]\n'))
    assert check_request(open_site, _msg("train", {"local-epochs": 1, "l2": 0.5})) is None
    assert "train.l2" in check_request(strict, _msg("train", {"local-epochs": 1, "l2": 0.5}))
    assert "finite number" in check_request(open_site, _msg("train", {"local-epochs": 1, "l2": -1.0}))


def test_a_site_decides_on_fold_models_and_newton_rounds(tmp_path):
    """What leaves is the site's decision: how many fold models it trains (each update differs from the
    model's by one fold of its patients) and whether it sends Cox derivatives at all."""
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    default = load_policy(_site(tmp_path / "a"))
    strict = load_policy(_site(tmp_path / "b", "max_cv_folds = 0\nnewton_rounds = false\n"))
    assert check_request(default, _msg("train", {"local-epochs": 1, "cv-folds": 5})) is None
    assert "max_cv_folds 0" in check_request(strict, _msg("train", {"local-epochs": 1, "cv-folds": 5}))
    assert "exceeds max_cv_folds 10" in check_request(default, _msg("train", {"local-epochs": 1, "cv-folds": 11}))
    assert check_request(default, _msg("train", {"newton": True, "server-round": 1})) is None
    assert "newton_rounds false" in check_request(strict, _msg("train", {"newton": True, "server-round": 1}))
