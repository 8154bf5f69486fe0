"""Client side of secure aggregation (Flower's SecAgg+) and of DP clipping.

``secure_aggregation_mod`` hands every SecAgg+ message (a TRAIN message
carrying the ``secaggplus_configs`` record, sent by ``server/secure_aggregation``)
to Flower's ``secaggplus_mod``.  When the protocol reaches the stage where the
center must train, the legacy FitIns is translated into the same message the
plain path sends (``arrays`` named by the state-dict keys + ``config``), the
same ``train`` handler runs (behind the site policy), and its reply is
translated back to a FitRes for ``secaggplus_mod`` to mask.  Plain TRAIN
messages pass through untouched: one training code path for both.

``dp_clipping_mod`` applies Flower's ``fixedclipping_mod`` only to train
messages whose config carries a ``clipping_norm`` (runs with
``federation.differential_privacy.enabled``): the update sent back is clipped
to that L2 norm before it leaves the site.
"""
from __future__ import annotations

import json

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.mod.centraldp_mods import KEY_CLIPPING_NORM
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from common.federation.wire import PARAM_KEYS



def is_secagg(msg: Message) -> bool:
    return (msg.metadata.message_type == MessageType.TRAIN and msg.has_content()
            and RECORD_KEY_CONFIGS in msg.content.config_records)


def secure_aggregation_mod(msg: Message, context: Context, call_next) -> Message:
    if not is_secagg(msg):
        return call_next(msg, context)
    return secaggplus_mod(msg, context, lambda m, c: _train_as_plain(m, c, call_next))


def _train_as_plain(msg: Message, context: Context, call_next) -> Message:
    """FitIns -> the plain train message -> the plain handler -> FitRes."""
    import torch   # the training stage only: the other SecAgg+ stages never import torch

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    keys = json.loads(str(config.pop(PARAM_KEYS)))
    nds = parameters_to_ndarrays(fitins.parameters)
    if len(keys) != len(nds):
        raise ValueError(f"secure aggregation: {len(nds)} arrays for {len(keys)} parameter names")
    msg.content = RecordDict({"arrays": ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(a))
                                                     for k, a in zip(keys, nds)}),
                              "config": ConfigRecord(config)})
    reply = call_next(msg, context)
    if reply.has_error():
        # secaggplus_mod cannot carry an error reply: raising makes the ClientApp answer with this reason
        raise RuntimeError(reply.error.reason)
    arrays = reply.content["arrays"]
    if list(arrays.keys()) != keys:
        raise ValueError("secure aggregation: the trained model's parameter names differ from the server's")
    metrics = dict(reply.content["metrics"])
    num_examples = int(metrics.pop("num-examples"))
    out = [np.asarray(a, np.float32) if np.issubdtype(a.dtype, np.floating) else a
           for a in arrays.to_numpy_ndarrays()]
    fitres = FitRes(status=Status(code=Code.OK, message="ok"), parameters=ndarrays_to_parameters(out),
                    num_examples=num_examples, metrics=metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def dp_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    if (msg.metadata.message_type == MessageType.TRAIN and msg.has_content()
            and "config" in msg.content.config_records
            and KEY_CLIPPING_NORM in msg.content.config_records["config"]):
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)
