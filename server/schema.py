"""``newadj schema``: the federation learns its data schema from the sites, then the coordinator reviews it.

A ServerApp run with ``mode = "schema"`` sends every node a schema QUERY
(``client/schema.py``): each site answers with its genomic and clinical column names
and modality names, and how many of its patients have each (0 below the site's floor);
never a value.  From the training centers' answers (the external center is listed but
never decides anything) a feature is proposed when at least ``data.schema.min_centers``
training centers and ``data.schema.min_patient_fraction`` of all training patients have
it.  ``RUN_DIR/schema.json`` keeps every answer; ``RUN_DIR/features.yaml`` is the
proposal, which a run then uses with ``--features FILE`` (``common.config.feature_overrides``).
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
from pathlib import Path

import numpy as np
import yaml
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from common.federation.reply_schema import MOMENTS
from server.messaging import send_and_collect
from server.roles import wait_for_nodes

log = logging.getLogger("newadj.server")
SCHEMA_JSON = "schema.json"
FEATURES_YAML = "features.yaml"


def query_schema(grid, node_ids, timeout: float) -> tuple[dict, dict]:
    """({center: schema answer}, {center or node: why it did not answer})."""
    msgs = [Message(RecordDict({"config": ConfigRecord({"schema": True})}), message_type=MessageType.QUERY,
                    dst_node_id=n) for n in node_ids]
    answers, failures = {}, {}
    for nid, r in send_and_collect(grid, msgs, timeout).items():
        if r is None:
            failures[str(nid)] = "no reply before the query timeout"
        elif r.has_error():
            failures[str(nid)] = r.error.reason
        else:
            info = dict(r.content["info"])
            answers[str(info.get("center-id", nid))] = {k: (list(v) if isinstance(v, list) else v)
                                                         for k, v in info.items()}
    return answers, failures


def _coverage(answers: dict, columns_key: str, counts_key: str, kind: str | None = None) -> dict:
    """{name: {"centers": k, "patients": n, and the summed moments}} over the given answers, taken in the order
    of the centers' names -- not of their replies' arrival -- so that the same answers always give the same
    feature order (the model's input layout) and the same sums."""
    out: dict = {}
    for _, a in sorted(answers.items()):
        moments = [a.get(f"{kind}-{m}") or [] for m in MOMENTS] if kind else []
        for j, (name, n) in enumerate(zip(a.get(columns_key) or [], a.get(counts_key) or [])):
            c = out.setdefault(str(name), {"centers": 0, "patients": 0, **({m: 0.0 for m in MOMENTS} if kind else {})})
            if int(n) > 0:
                c["centers"] += 1
                c["patients"] += int(n)
                for m, vals in zip(MOMENTS, moments):
                    c[m] += float(vals[j]) if j < len(vals) else 0.0
    return out


def scaling_rule(cov: dict) -> dict | None:
    """How one feature enters the model, from the training centers' pooled moments.

    log1p when every center's values are >= 0 and the raw values are skewed (standard
    deviation above the mean: AFP, node counts, receptor levels); then standardised.
    """
    n = cov["patients"]
    if n < 2:
        return None
    mean, var = cov["sum"] / n, max(cov["sumsq"] / n - (cov["sum"] / n) ** 2, 0.0)
    use_log = cov["nonneg"] == cov["centers"] and mean > 0 and np.sqrt(var) > mean
    if use_log:
        mean, var = cov["logsum"] / n, max(cov["logsumsq"] / n - (cov["logsum"] / n) ** 2, 0.0)
    sd = float(np.sqrt(var * n / (n - 1)))
    return {"log": bool(use_log), "center": round(float(mean), 6), "scale": round(sd, 6) if sd > 1e-9 else 1.0}


def propose_features(answers: dict, rule) -> dict:
    """The feature file's content: kept genomic / clinical features and modalities, with their coverage."""
    train = {c: a for c, a in answers.items() if a.get("role") != "external"}
    n_train = sum(int(a.get("n-patients", 0)) for a in train.values())
    min_centers, frac = int(rule.min_centers), float(rule.min_patient_fraction)

    def keep(cov: dict) -> list[str]:
        return [name for name, c in cov.items()
                if c["centers"] >= min_centers and c["patients"] >= frac * n_train and c["patients"] > 0]

    gen = _coverage(train, "genomic-columns", "genomic-counts", "genomic")
    clin = _coverage(train, "clinical-columns", "clinical-counts", "clinical")
    mods = _coverage(train, "modality-names", "modality-counts")
    kept_gen, kept_clin = keep(gen), keep(clin)
    scaling = {name: rule for cov, kept in ((gen, kept_gen), (clin, kept_clin)) for name in kept
               if (rule := scaling_rule(cov[name])) is not None}
    strip = lambda cov: {k: {"centers": v["centers"], "patients": v["patients"]} for k, v in cov.items()}  # noqa: E731
    return {"genomic_features": kept_gen, "clinical_features": kept_clin, "modalities": keep(mods),
            "scaling": scaling,
            "rule": {"min_centers": min_centers, "min_patient_fraction": frac, "training_patients": n_train,
                     "training_centers": sorted(train)},
            "coverage": {"genomic": strip(gen), "clinical": strip(clin), "modalities": mods}}


def write_features(path: Path, proposal: dict, n_answers: int) -> None:
    header = (f"# Federation feature file proposed by `newadj schema` on {_dt.date.today()} from {n_answers} "
              f"centers' answers\n# (names and counts only). Review it, edit the lists if needed, then run with "
              f"`--features {path.name}`.\n# coverage: training centers / training patients (at or above each "
              f"site's floor) that have the feature.\n")
    path.write_text(header + yaml.safe_dump(proposal, sort_keys=False))


def run_schema(grid, cfg, run_dir: Path, expected: int) -> dict:
    """The ServerApp's ``mode = "schema"``: ask, propose, write schema.json and features.yaml."""
    fed = cfg.federation
    node_ids = wait_for_nodes(grid, expected, float(fed.wait_nodes_timeout))
    answers, failures = query_schema(grid, node_ids, float(fed.query_timeout))
    for who, why in failures.items():
        log.error("center %s did not answer the schema query: %s", who, why)
    proposal = propose_features(answers, cfg.data.schema)
    (run_dir / SCHEMA_JSON).write_text(json.dumps({"answers": answers, "failures": failures,
                                                    "proposal": proposal}, indent=1))
    write_features(run_dir / FEATURES_YAML, proposal, len(answers))
    log.info("schema: %d centers answered; proposed %d genomic, %d clinical features, modalities %s; %s",
             len(answers), len(proposal["genomic_features"]), len(proposal["clinical_features"]),
             proposal["modalities"], run_dir / FEATURES_YAML)
    return proposal
