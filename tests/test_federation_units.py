"""Federation building blocks that need no data: checkpoints, wire format, views, strategies."""
import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from omegaconf import OmegaConf

from common.metrics import roc_from_histograms, score_histogram, youden_from_histograms, youden_threshold
from common.federation.wire import from_arrays, to_arrays, upcast, weights_sha256
from server.checkpoints import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from server.roles import NodeView
from server.strategies import build_strategy


def _state():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(200, 300), torch.nn.GroupNorm(5, 300), torch.nn.Linear(300, 1)).state_dict()


def test_checkpoint_roundtrip_and_tamper_detection(tmp_path):
    sd = _state()
    path = save_checkpoint(tmp_path, 3, sd, {"config_hash": "abc"}, {"history": [1, 2]})
    assert latest_checkpoint(tmp_path) == path
    loaded, meta, server_state = load_checkpoint(path)
    assert meta["round"] == 3 and meta["config_hash"] == "abc" and len(meta["sha256"]) == 64
    assert server_state == {"history": [1, 2]}
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)
    # one byte changed -> refused with a message naming the file
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="round_003.pt"):
        load_checkpoint(path)


def test_fp16_wire_halves_bytes_and_upcasts():
    sd = _state()
    a32, a16 = to_arrays(sd), to_arrays(sd, fp16=True)
    assert a16.count_bytes() < 0.55 * a32.count_bytes()
    back = from_arrays(a16, sd)
    assert list(back) == list(sd) and all(back[k].shape == sd[k].shape for k in sd)
    assert all(v.dtype == torch.float32 for v in back.values())
    assert max(float((back[k] - sd[k]).abs().max()) for k in sd) < 1e-2
    up = upcast(a16)
    assert all(a.dtype == np.float32 for a in up.to_numpy_ndarrays())
    assert weights_sha256(sd) == weights_sha256(from_arrays(a32, sd))
    assert weights_sha256(sd) != weights_sha256(back)


def test_a_weight_record_is_one_array_and_refuses_another_layout():
    """The wire carries one flat array (one Flower object per record, not one per tensor); its reader
    names and shapes it by the model's own layout and refuses a record that does not fit it."""
    from common.federation.wire import WEIGHTS

    sd = _state()
    rec = to_arrays(sd)
    assert list(rec.keys()) == [WEIGHTS] and rec[WEIGHTS].shape == (sum(v.numel() for v in sd.values()),)
    smaller = dict(list(sd.items())[:-1])
    with pytest.raises(ValueError, match="weight record of"):
        from_arrays(rec, smaller)
    with pytest.raises(ValueError, match="one array"):
        from_arrays(ArrayRecord({k: v for k, v in sd.items()}), sd)
    with pytest.raises(ValueError, match="float tensors only"):
        to_arrays({"step": torch.tensor([3])})


class _Grid:
    def get_node_ids(self):
        return [1, 2, 3, 4]

    def send_and_receive(self, *a, **k):
        return "sent"


def test_node_view_hides_other_nodes_but_delegates():
    view = NodeView(_Grid(), [2, 4, 9])
    assert view.get_node_ids() == [2, 4]  # 9 is not connected
    assert view.send_and_receive() == "sent"


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg"])
def test_strategies_are_flowers_own(name):
    from common.config import load_config

    cfg = load_config([f"federation.strategy={name}"])
    s = build_strategy(cfg.federation)
    assert type(s).__module__.startswith("flwr.serverapp.strategy")
    assert type(s).__name__.lower() == name


def test_unknown_strategy_is_a_clear_error():
    with pytest.raises(ValueError, match="fedfoo"):
        build_strategy(OmegaConf.create({"strategy": "fedfoo", "min_train_nodes": 2, "min_available_nodes": 2}))


def test_youden_from_histograms_matches_exact_youden_on_bin_edges():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.15), 0, 1)
    hist = score_histogram(y, p, 50)
    thr = youden_from_histograms(hist)
    # the chosen edge maximises J among all bin edges, computed directly from the raw scores
    edges = np.arange(1, 50) / 50
    j = [((p >= e) & (y == 1)).sum() / (y == 1).sum() - ((p >= e) & (y == 0)).sum() / (y == 0).sum() for e in edges]
    assert thr == pytest.approx(edges[int(np.argmax(j))])
    assert abs(thr - youden_threshold(y, p)) < 0.05
    fpr, tpr = roc_from_histograms(hist)
    assert fpr[0] == 0 and tpr[-1] == 1
    assert youden_from_histograms(np.zeros((2, 10), int), default=0.4) == 0.4


def test_run_resume_reuses_the_submitted_overrides_and_refuses_new_ones(tmp_path, capsys):
    from common.cli import main
    from server.ops.simulation import RunFailed
    from server.ops.submit import RUN_SPEC, resume_spec

    run = tmp_path / "run"
    run.mkdir()
    assert main(["run", "--kit", str(tmp_path / "kit"), "--out", str(run), "--resume"]) == 2
    assert f"{run / RUN_SPEC}: not a run directory of `newadj run`" in capsys.readouterr().err.replace("\n", "")
    with pytest.raises(RunFailed):
        resume_spec(run)
    (run / RUN_SPEC).write_text('{"kit": "k", "overrides": ["model=small", "federation.num_rounds=3"]}')
    assert resume_spec(run) == ["model=small", "federation.num_rounds=3"]
    assert main(["run", "--kit", str(tmp_path / "kit"), "--out", str(run), "--resume", "train.epochs=9"]) == 2
    assert "do not pass new ones" in capsys.readouterr().err


def test_client_site_cache_keeps_the_most_recently_used_centers_only(tiny_cohort, monkeypatch):
    from client import site_runtime as sr
    from common.data.cohort import discover_sites

    monkeypatch.setattr(sr, "_RUNTIMES", type(sr._RUNTIMES)())
    rc = {"overrides": "model=small federation.client_site_cache=2"}
    a, b, c = [{"data-dir": str(s.path)} for s in discover_sites(tiny_cohort)[:3]]
    ra = sr.site_runtime(rc, a)
    sr.site_runtime(rc, b)
    assert sr.site_runtime(rc, a) is ra                      # a hit, and now the most recent
    rcc = sr.site_runtime(rc, c)                             # evicts b, the least recently used
    assert [rt.center_id for rt in sr._RUNTIMES.values()] == [ra.center_id, rcc.center_id]
    assert sr.site_runtime(rc, b).center_id == "center_b"    # reloaded from the site cache on demand
    assert len(sr._RUNTIMES) == 2


def test_expired_messages_count_as_no_reply_and_replies_are_matched_by_reply_to():
    import time as _time

    from flwr.app import Error, Message, Metadata, RecordDict
    from flwr.common.constant import ErrorCode

    from server.messaging import send_and_collect

    def md(src: int, dst: int, mid: str, reply_to: str = "") -> Metadata:
        return Metadata(run_id=7, message_id=mid, src_node_id=src, dst_node_id=dst, reply_to_message_id=reply_to,
                        group_id="1", created_at=_time.time(), ttl=3600, message_type="train")

    def request(dst: int) -> Message:
        return Message(RecordDict(), metadata=md(0, dst, f"m{dst}"))

    def superlink_error(code: int, req: Message) -> Message:
        # made by the SuperLink itself: it does not carry the destination's node id
        return Message(metadata=md(0, 0, f"e{req.metadata.message_id}", req.metadata.message_id),
                       error=Error(code, "made by the SuperLink"))

    class Grid:
        """Flower's push / pull API: the replies come over several pulls, node 4 never answers."""

        def push_messages(self, msgs):
            self.ttls = [m.metadata.ttl for m in msgs]
            self.by = {m.metadata.dst_node_id: m for m in msgs}
            self.pulls = 0
            return [m.metadata.message_id for m in msgs]

        def pull_messages(self, ids):
            self.pulls += 1
            by = self.by
            batches = {1: [Message(RecordDict(), reply_to=by[1])],
                       2: [superlink_error(ErrorCode.MESSAGE_UNAVAILABLE, by[2]),
                           superlink_error(ErrorCode.NODE_UNAVAILABLE, by[3])]}
            return [r for r in batches.get(self.pulls, []) if r.metadata.reply_to_message_id in set(ids)]

    grid = Grid()
    t0 = _time.monotonic()
    out = send_and_collect(grid, [request(n) for n in (1, 2, 3, 4)], timeout=1.0, poll=0.05)
    assert _time.monotonic() - t0 < 3.0                          # the timeout ends it, not Flower's 3 s pull sleep
    assert grid.ttls == [1.0] * 4 and grid.pulls > 2
    assert out[1] is not None and not out[1].has_error()
    assert out[2] is None and out[4] is None                       # expired at the SuperLink / never answered
    assert out[3].has_error() and out[3].error.code == ErrorCode.NODE_UNAVAILABLE


def test_merge_failures_keeps_each_reason_once():
    from server.rounds import merge_failures

    same = "policy of center_a: local-epochs 1 exceeds max_local_epochs 0"
    merged = merge_failures({"center_a": same, "center_b": "no reply"}, {"center_a": same, "center_c": "timeout"})
    assert merged == {"center_a": same, "center_b": "no reply", "center_c": "evaluate: timeout"}
    assert merge_failures({"center_b": "no reply"}, {"center_b": "nan loss"}) == {"center_b": "no reply; evaluate: nan loss"}


def test_a_center_keeps_its_own_normalisation_layers_between_rounds():
    """federation.local_norm (FedBN-style): what a center trained in its norm layers comes back over the next
    round's global model, in Flower's per-run node state; every other weight is the global one."""
    from flwr.app import Context, RecordDict

    from client.client_app import keep_local_norm, restore_local_norm

    def net(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GroupNorm(2, 8), torch.nn.LayerNorm(8),
                                   torch.nn.Linear(8, 1))

    from common.learn.model import norm_parameter_names

    trained, global_next = net(1), net(2)
    with torch.no_grad():                                     # norm layers start at 1 / 0: make "trained" ones differ
        for prm in trained.parameters():
            prm.add_(torch.randn_like(prm))
    assert norm_parameter_names(trained) == ["1.weight", "1.bias", "2.weight", "2.bias"]
    ctx = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})
    restore_local_norm(global_next, ctx)                      # first round: nothing kept yet, the model as received
    assert all(torch.equal(v, net(2).state_dict()[k]) for k, v in global_next.state_dict().items())
    keep_local_norm(trained.state_dict(), trained, ctx)
    restore_local_norm(global_next, ctx)
    got, mine, glob = global_next.state_dict(), trained.state_dict(), net(2).state_dict()
    for k in got:
        assert torch.equal(got[k], mine[k] if k in norm_parameter_names(trained) else glob[k]), k
        assert not torch.equal(mine[k], glob[k])


def test_schema_proposal_does_not_depend_on_the_order_the_centers_answered_in():
    """The feature lists are the model's input layout: the same answers arriving in another order (replies race
    each other) must propose the same features in the same order, with the same scaling."""
    from common.federation.reply_schema import MOMENTS
    from server.schema import propose_features

    def answer(genes: dict, n: int) -> dict:
        vals = {m: [] for m in MOMENTS}
        for mean, sd in genes.values():
            vals["sum"].append(mean * n)
            vals["sumsq"].append((sd ** 2 + mean ** 2) * n)
            vals["logsum"].append(mean * n / 2)
            vals["logsumsq"].append(sd * n)
            vals["nonneg"].append(1)
        return {"role": "train", "n-patients": n, "genomic-columns": list(genes), "genomic-counts": [n] * len(genes),
                **{f"genomic-{m}": v for m, v in vals.items()}, "clinical-columns": [], "clinical-counts": [],
                "modality-names": ["mri"], "modality-counts": [n]}

    answers = {"center_b": answer({"CD274_expr": (0.1, 1.0), "TP53_mut": (0.2, 0.4)}, 30),
               "center_a": answer({"TP53_mut": (0.3, 0.46), "MYC_cnv": (0.1, 0.3)}, 40),
               "center_c": answer({"MYC_cnv": (0.123456789, 0.3), "CD274_expr": (0.3, 1.1)}, 17)}
    rule = OmegaConf.create({"min_centers": 1, "min_patient_fraction": 0.2})
    proposals = [propose_features(dict(order), rule) for order in
                 (answers.items(), reversed(list(answers.items())),
                  sorted(answers.items(), key=lambda kv: kv[1]["n-patients"]))]
    assert proposals[0]["genomic_features"] == ["TP53_mut", "MYC_cnv", "CD274_expr"]    # center_a's columns first
    for other in proposals[1:]:
        assert other == proposals[0]


def test_pooled_evaluation_does_not_depend_on_the_order_the_replies_arrived_in():
    """The pooled figures (and what the server fits from them) are sums over the centers' replies: the same
    replies in another arrival order must give the same numbers, to the last bit."""
    from types import SimpleNamespace

    from server.rounds import pooled_evaluation

    def reply(loss: float, n: int):
        return SimpleNamespace(content={"metrics": {"num-examples": n, "loss": loss, "abstained": 1,
                                                    "dfs-abstained": 1}})

    replies = {"center_a": reply(0.1, 1), "center_b": reply(0.2, 1), "center_c": reply(0.3, 1)}
    # (0.1 + 0.2) + 0.3 != (0.3 + 0.2) + 0.1 in floating point: arrival order would show in the pooled loss
    assert (0.1 + 0.2) + 0.3 != (0.3 + 0.2) + 0.1
    runs = [pooled_evaluation(dict(order), "metrics") for order in
            (replies.items(), reversed(list(replies.items())))]
    assert runs[0]["pooled"]["loss"] == runs[1]["pooled"]["loss"]
    assert list(runs[0]["centers"]) == list(runs[1]["centers"]) == ["center_a", "center_b", "center_c"]


def test_auto_selection_waits_for_ranking_cells_and_then_ranks_every_round():
    """``federation.select_metric: auto`` decides on the pooled AUC at the first round whose benefit cells rank
    models, not at round 1 (whose near-constant scores fill one cell), and then selects over every round so far;
    if the cells never rank, the C-index decides after the last round."""
    from server.evaluation import best_of, decide_auto, decide_auto_at_end

    both = {"benefit": 80, "dfs": 80}
    flat = {"auc": 0.5, "auc_lower": 0.0, "auc_upper": 1.0, "c_index": 0.70, "loss": 1.2, "youden_threshold": 0.5}
    ranks = {"auc": 0.74, "auc_lower": 0.6, "auc_upper": 0.85, "c_index": 0.62, "loss": 1.1, "youden_threshold": 0.4}
    assert decide_auto(flat, both) == (None, "the training centers' released benefit cells do not rank models yet")
    assert decide_auto(ranks, both)[0] == "pooled_auc"
    assert decide_auto(flat, both, final=True)[0] == "pooled_c_index"
    assert decide_auto(flat, {"benefit": 0, "dfs": 80})[0] == "pooled_c_index"      # DFS only: at once
    assert decide_auto({"loss": 1.0}, {"benefit": 0, "dfs": 0})[0] == "val_loss"
    history = [{"round": 1, "val": flat}, {"round": 2, "val": ranks},
               {"round": 3, "val": {**ranks, "auc": 0.71, "c_index": 0.75}}]
    best = best_of(history, "pooled_auc")
    assert (best["round"], best["key"], best["threshold"]) == (2, 0.74, 0.4)   # round 1 cannot rank: never chosen
    assert best_of(history, "pooled_c_index")["round"] == 3
    assert best_of(history, "val_loss")["round"] == 2                           # the first of equal keys
    assert best_of(history[:1], "pooled_auc")["round"] == 1                     # nothing ranks: the latest round
    assert best_of(history, None)["round"] == 3
    # after the last round: a last round without a C-index does not hide the earlier rounds' C-indices
    no_c = {"round": 4, "val": {**flat, "c_index": float("nan")}}
    assert decide_auto_at_end([history[0], no_c], both)[0] == "pooled_c_index"
    assert decide_auto_at_end([{"round": 1, "val": {"loss": 1.0}}, {"round": 2, "val": {}}], both)[0] == "val_loss"
