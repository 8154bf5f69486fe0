"""A hostile ServerApp, for tests only: it tries to read patient-level data back from the sites.

``tests/test_hostile_server.py`` ships it in a copy of the app (the sites' ClientApp is the
project's own) to real SuperNodes.  With the run config key ``attack``:

* ``overrides``: the run's overrides set site-owned keys (the floor ``train.min_patients=1``,
  ``data.cache_dir=/tmp/elsewhere``, an encoder weights path); it only asks every node its role;
* ``disclosure``: the same model is scored again and again on every site's patients with 10,000
  bins, then another bin count, then a sweep of thresholds, then a full report;
* ``collect``: one evaluation on every site's patients with 1,000 bins and a full report (what a
  hostile bundle's own ClientApp would answer, if a site ran it: ``tests/test_hostile_bundles.py``);
* ``errors``: a train message whose weights do not fit the model (the handler raises), then a
  well-formed evaluation (the same warm runtime must answer it).

Every reply (metrics, notices, refusal reasons) is written to ``RUN_DIR/hostile.json``.
"""
from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

from common.federation.wire import to_arrays
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from common.config import load_config
from common.learn.task import model_from_config

app = ServerApp()
SWEEP = (0.05, 0.15, 0.25, 0.35)


def _ask(grid: Grid, nodes: list[int], mtype: str, config: dict, arrays: ArrayRecord | None = None) -> dict:
    content = {"config": ConfigRecord(config)}
    if arrays is not None:
        content["arrays"] = arrays
    msgs = [Message(RecordDict(dict(content)), message_type=mtype, dst_node_id=n) for n in nodes]
    out = {}
    for r in grid.send_and_receive(msgs, timeout=300):
        nid = str(r.metadata.src_node_id)
        if r.has_error():
            out[nid] = {"error": r.error.reason}
            continue
        rec = {}
        if "metrics" in r.content:
            rec["metrics"] = dict(r.content["metrics"])
        if "info" in r.content:
            rec["info"] = dict(r.content["info"])
        out[nid] = rec
    return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    run_dir = Path(str(rc["run-dir"]))
    run_dir.mkdir(parents=True, exist_ok=True)
    expected = int(rc.get("expected-nodes", 1))
    deadline = time.monotonic() + 120
    while len(list(grid.get_node_ids())) < expected and time.monotonic() < deadline:
        time.sleep(1)
    nodes = sorted(grid.get_node_ids())
    steps = [{"step": "query", "replies": _ask(grid, nodes, MessageType.QUERY, {})}]
    attack = str(rc.get("attack"))
    if attack in ("collect", "errors"):
        cfg = load_config(shlex.split(str(rc.get("overrides", ""))))
        arrays = to_arrays(model_from_config(cfg).state_dict())
        if attack == "errors":
            import torch

            bad = ArrayRecord({"weights": torch.zeros(7)})     # no model has seven weights
            steps.append({"step": "bad-weights", "replies": _ask(grid, nodes, MessageType.TRAIN,
                                                                 {"server-round": 1, "local-epochs": 1}, bad)})
        steps.append({"step": "evaluate", "replies": _ask(grid, nodes, MessageType.EVALUATE, {
            "split": "test", "bins": 1000, "threshold": 0.5, "full-report": True}, arrays)})
    if attack == "disclosure":
        cfg = load_config(shlex.split(str(rc.get("overrides", ""))))
        arrays = to_arrays(model_from_config(cfg).state_dict())   # the same model every time
        ask = lambda **c: _ask(grid, nodes, MessageType.EVALUATE, {"split": "test", **c}, arrays)  # noqa: E731
        steps.append({"step": "bins=10000", "replies": ask(bins=10000, threshold=0.5)})
        steps.append({"step": "bins=7", "replies": ask(bins=7, threshold=0.5)})
        for t in SWEEP:
            steps.append({"step": f"threshold={t}", "replies": ask(bins=10000, threshold=t)})
        steps.append({"step": "full-report", "replies": ask(bins=10000, threshold=0.5, **{"full-report": True})})
    (run_dir / "hostile.json").write_text(json.dumps({"nodes": nodes, "steps": steps}, indent=1, default=str))
