"""One training round under Flower's SecAgg+ (server side).

In flwr 1.41 SecAgg+ exists only on the legacy path: ``SecAggPlusWorkflow``
driving a legacy ``flwr.server.strategy`` through a ``LegacyContext``, and
``secaggplus_mod`` on the clients (see ``client/secure_aggregation.py``).  This
module runs that workflow for *one* round inside our own round loop, so that
everything around it -- roles, the configured strategy (``server/strategies``),
validation, selection, checkpoints, resume -- is the same code for plain and
secure runs:

1. the configured strategy's ``configure_train`` builds the round's config
   (server round, FedProx mu, FedOpt's current weights) exactly as in a plain
   round;
2. ``SecAggPlusWorkflow`` sends that config and the global weights to the
   training centers; they train with the same ClientApp handler as in a plain
   run, mask their (num-examples weighted) update, and the server only ever
   unmasks the *sum*: the example-weighted average of the updates;
3. that average goes back through the configured strategy's
   ``aggregate_train`` as a single reply, so FedAvg returns it unchanged and
   FedAdam / FedYogi apply their server optimiser to it.

Strategies that need the individual updates (FedMedian, FedTrimmedAvg) cannot
run under secure aggregation and are refused at start.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import flwr.compat.common.recorddict_compat as compat
import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

from common.federation.wire import PARAM_KEYS, content_bytes
from server.messaging import NO_REPLY, send_and_collect

log = logging.getLogger("newadj.server")

NEEDS_INDIVIDUAL_UPDATES = ("fedmedian", "fedtrimmedavg")


def check_secure_config(fed) -> None:
    """Refuse combinations SecAgg+ cannot serve, before any round starts."""
    if not bool(fed.secure_aggregation.enabled):
        return
    name = str(fed.strategy).lower()
    if name in NEEDS_INDIVIDUAL_UPDATES:
        raise ValueError(f"federation.strategy={name} needs each center's update, which secure aggregation hides; "
                         "use fedavg, fedprox, fedadam or fedyogi with federation.secure_aggregation.enabled=true")
    if bool(fed.differential_privacy.enabled):
        raise ValueError("federation.differential_privacy and federation.secure_aggregation cannot be combined in "
                         "this version (the DP accountant needs the individual replies); enable one of them")


class MeteredGrid:
    """A Grid proxy that counts payload bytes both ways and records who failed or stayed silent."""

    def __init__(self, grid):
        self._grid = grid
        self.bytes_sent = 0
        self.bytes_received = 0
        self.failures: dict[int, str] = {}

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        msgs = list(messages)
        self.bytes_sent += sum(content_bytes(m.content) for m in msgs)
        replies = []
        for nid, r in send_and_collect(self._grid, msgs, timeout).items():
            if r is None:
                self.failures.setdefault(nid, NO_REPLY)
                continue
            if r.has_error():
                self.failures[nid] = r.error.reason
            else:
                self.bytes_received += content_bytes(r.content)
            replies.append(r)
        return replies   # a list: the workflow iterates the replies more than once


@dataclass
class SecureRound:
    average: ArrayRecord | None          # example-weighted average of the updates (None: the protocol halted)
    num_examples: int = 0
    n_results: int = 0
    train_loss: float | None = None
    slowest_client_seconds: float | None = None
    failures: dict = field(default_factory=dict)   # node id -> reason
    bytes_sent: int = 0
    bytes_received: int = 0


def _fit_metrics(collected: dict):
    def aggregate(results: list[tuple[int, dict]]) -> dict:
        n = sum(k for k, _ in results)
        collected["n_results"] = len(results)
        collected["num_examples"] = n
        collected["train_loss"] = sum(k * float(m["train-loss"]) for k, m in results) / max(1, n)
        collected["slowest"] = max(float(m.get("train-seconds", 0.0)) for _, m in results)
        return {"train-loss": collected["train_loss"]}
    return aggregate


def secure_train_round(grid, context: Context, train_ids: list[int], rnd: int, arrays: ArrayRecord,
                       config: ConfigRecord, sa, timeout: float) -> SecureRound:
    """Run one SecAgg+ training round over ``train_ids``; return the unmasked average only."""
    metered = MeteredGrid(grid)
    manager = SimpleClientManager()
    for nid in train_ids:
        manager.register(GridClientProxy(nid, metered, context.run_id))
    keys = list(arrays.keys())
    fit_config = {k: v for k, v in dict(config).items()}
    fit_config[PARAM_KEYS] = json.dumps(keys)
    collected: dict = {}
    strategy = LegacyFedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=len(train_ids),
                            min_evaluate_clients=0, min_available_clients=len(train_ids),
                            on_fit_config_fn=lambda _r: dict(fit_config),
                            fit_metrics_aggregation_fn=_fit_metrics(collected))
    legacy = LegacyContext(Context(run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
                                   state=RecordDict(), run_config=context.run_config),
                           strategy=strategy, client_manager=manager)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: rnd})
    nds = [np.asarray(a, dtype=np.float32) if np.issubdtype(a.dtype, np.floating) else a
           for a in arrays.to_numpy_ndarrays()]
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters(nds), keep_input=True)
    workflow = SecAggPlusWorkflow(num_shares=_share(sa.num_shares), reconstruction_threshold=_share(sa.reconstruction_threshold),
                                  max_weight=float(sa.max_weight), clipping_range=float(sa.clipping_range),
                                  quantization_range=int(sa.quantization_range), modulus_range=int(sa.modulus_range),
                                  timeout=timeout)
    workflow(metered, legacy)
    out = SecureRound(average=None, failures=dict(metered.failures), bytes_sent=metered.bytes_sent,
                      bytes_received=metered.bytes_received)
    if "n_results" not in collected:      # the protocol halted (too few centers left to unmask): no update
        return out
    agg = parameters_to_ndarrays(compat.arrayrecord_to_parameters(
        legacy.state.array_records[MAIN_PARAMS_RECORD], keep_input=True))
    # dequantisation yields float64: back to the global model's dtypes
    out.average = ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(a, dtype=ref.dtype))
                               for k, a, ref in zip(keys, agg, nds, strict=True)})
    out.num_examples = int(collected["num_examples"])
    out.n_results = int(collected["n_results"])
    out.train_loss = float(collected["train_loss"])
    out.slowest_client_seconds = float(collected["slowest"])
    return out


def _share(v):
    """num_shares / reconstruction_threshold: a float in (0, 1] is a fraction, an integer a count."""
    f = float(v)
    return int(f) if f > 1 else f


def average_as_reply(average: ArrayRecord, num_examples: int, train_loss: float | None) -> Message:
    """The unmasked average as one train reply, for the configured strategy's ``aggregate_train``."""
    metrics = {"num-examples": int(num_examples)}
    if train_loss is not None:
        metrics["train-loss"] = float(train_loss)
    return Message(RecordDict({"arrays": average, "metrics": MetricRecord(metrics)}), dst_node_id=0,
                   message_type=MessageType.TRAIN)
