"""``newadj schema``: the federation learns its data schema from the sites, then the coordinator reviews it.

A ServerApp run with ``mode = "schema"`` sends every node a schema QUERY
(``client/schema.py``): each site answers with its genomic and clinical column names
and modality names, and how many of its patients have each (0 below the site's floor);
never a value.  From the training centers' answers (the external center is listed but
never decides anything) a feature is proposed when at least ``data.schema.min_centers``
training centers and ``data.schema.min_patient_fraction`` of all training patients have
it.  ``RUN_DIR/schema.json`` keeps every answer; ``RUN_DIR/features.yaml`` is the
proposal, which a run then uses with ``--features FILE`` (``common.config.feature_overrides``).

The proposal also says, per kept feature, which training centers lack it (``missing_by_site``:
their patients enter with the pooled mean), and flags covariates whose distribution at one
center differs from the other training centers' more than case mix plausibly explains
(``flags``: often a value in another unit).  Flags are advice for the coordinator's review;
they never drop a feature.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import math
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
# Ratios of means that point to another unit rather than another case mix: powers of ten, and the
# SI/conventional factors of the common labs (bilirubin umol/L per mg/dL, creatinine umol/L per mg/dL,
# glucose mg/dL per mmol/L; albumin g/L per g/dL is the factor 10); each also inverted.
UNIT_FACTORS = tuple(f for base in (10.0, 100.0, 1000.0, 17.1, 88.4, 18.0) for f in (base, 1.0 / base))
UNIT_TOLERANCE = 0.15
# thresholds of the shift check when the config names none (conf/data/default.yaml, `schema:`)
SHIFT_DEFAULTS = {"shift_smd": 2.0, "shift_sd_ratio": 4.0}


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


def _stats(n: float, total: float, total_sq: float) -> tuple[float, float] | None:
    """(mean, sample SD) from a count and the sums of x and x^2; None below 2 values."""
    if n < 2:
        return None
    mean = total / n
    var = max(total_sq / n - mean * mean, 0.0) * n / (n - 1)
    return mean, math.sqrt(var)


def _column(answer: dict, kind: str, name: str) -> tuple[int, float, float]:
    """(count, sum, sum of squares) of one column in one center's answer; zeros when it lacks the column."""
    cols = [str(c) for c in (answer.get(f"{kind}-columns") or [])]
    if name not in cols:
        return 0, 0.0, 0.0
    j = cols.index(name)
    counts, sums, sumsqs = (list(answer.get(f"{kind}-{key}") or []) for key in ("counts", "sum", "sumsq"))
    at = lambda vals: vals[j] if j < len(vals) else 0  # noqa: E731
    return int(at(counts)), float(at(sums)), float(at(sumsqs))


def missing_by_site(train: dict, kept: dict[str, list[str]]) -> dict[str, list[str]]:
    """{kept feature: the training centers that lack it entirely}: no column, or a count of 0 (which
    includes a column fewer patients than the site's floor have).  Their patients enter with the pooled mean."""
    return {name: [c for c, a in sorted(train.items()) if _column(a, kind, name)[0] == 0]
            for kind, names in kept.items() for name in names}


def likely_unit_factor(site_mean: float, others_mean: float) -> float | None:
    """The common unit factor the ratio of two means matches within ``UNIT_TOLERANCE`` (the closest one), or None."""
    if site_mean == 0 or others_mean == 0 or (site_mean > 0) != (others_mean > 0):
        return None
    ratio = site_mean / others_mean
    near = [f for f in UNIT_FACTORS if abs(ratio / f - 1.0) <= UNIT_TOLERANCE]
    return min(near, key=lambda f: abs(math.log(ratio / f)), default=None)


def _shift(site: tuple[float, float], others: tuple[float, float]) -> tuple[float | None, float | None]:
    """(standardised mean difference, SD ratio) of a center against the others; None where an SD is 0.

    The SMD divides by the root of the mean of the two variances, the usual covariate balance measure.
    A constant column at one center (a rare mutation no patient there has) has no SD ratio.
    """
    (m1, s1), (m0, s0) = site, others
    pooled = math.sqrt((s1 * s1 + s0 * s0) / 2)
    smd = (m1 - m0) / pooled if pooled > 1e-12 else None
    ratio = s1 / s0 if s1 > 1e-12 and s0 > 1e-12 else None
    return smd, ratio


def _flag_message(flag: dict, aside: list[str]) -> str:
    """One line that names the feature, the center and what to check."""
    external = flag["role"] == "external"
    where = f"{flag['center']}" + (" (external center)" if external else "")
    ref = ("the training centers" if external else "the other training centers") + \
        (f" but {', '.join(aside)}" if aside else "")
    smd = "n/a" if flag["smd"] is None else f"{flag['smd']:+.1f}"
    sdr = "n/a" if flag["sd_ratio"] is None else f"{flag['sd_ratio']:.2g}"
    head = (f"{flag['kind']} feature `{flag['feature']}` at {where}: mean {flag['site_mean']:.3g} vs "
            f"{flag['others_mean']:.3g} at {ref} (SMD {smd}, SD ratio {sdr}")
    if flag["likely_factor"] is not None:
        return head + f"; means x{flag['likely_factor']:.3g}: likely another unit); check its unit"
    return head + "); check how it is measured or coded there"


def _center_flag(kind: str, name: str, center: str, role: str, site: tuple, others: tuple, aside: list[str],
                 smd_max: float, sd_ratio_max: float) -> dict | None:
    """The flag of one feature at one center given (mean, SD) there and at the other training centers, or None."""
    smd, sd_ratio = _shift(site, others)
    shifted = smd is not None and abs(smd) > smd_max
    spread = sd_ratio is not None and max(sd_ratio, 1.0 / sd_ratio) > sd_ratio_max
    if not (shifted or spread):
        return None
    factor = likely_unit_factor(site[0], others[0])
    flag = {"feature": name, "kind": kind, "center": center, "role": role,
            "site_mean": round(site[0], 6), "others_mean": round(others[0], 6),
            "smd": None if smd is None else round(smd, 3), "sd_ratio": None if sd_ratio is None else round(sd_ratio, 3),
            "likely_factor": None if factor is None else round(factor, 6)}
    return {**flag, "message": _flag_message(flag, aside)}


def _feature_flags(kind: str, name: str, cols: dict, roles: dict, smd_max: float, sd_ratio_max: float) -> list[dict]:
    """The flags of one feature: each center with it against the pooled moments of the other training centers.

    A training center whose means differ from the rest by a unit factor would widen the others' SD for every
    other center and flag them all; it is set aside from their reference (and the external center's) as long
    as at least two training centers, and more than those set aside, remain.  With two centers nothing is
    set aside: which one uses another unit cannot be told, and both are flagged.
    """
    aside: set[str] = set()
    while True:
        flags = []
        for center, role in roles.items():
            others = [v for c, v in cols.items()
                      if c != center and roles[c] != "external" and c not in aside and v[0] > 0]
            site, rest = _stats(*cols[center]), _stats(*(sum(v[i] for v in others) for i in range(3)))
            if site is not None and rest is not None:
                flag = _center_flag(kind, name, center, role, site, rest, sorted(aside - {center}), smd_max,
                                    sd_ratio_max)
                flags.extend([flag] if flag else [])
        unit = {f["center"] for f in flags if f["likely_factor"] is not None and f["role"] != "external"} - aside
        ref = [c for c, v in cols.items() if roles[c] != "external" and v[0] > 0 and c not in aside | unit]
        if not unit or len(ref) < 2 or len(ref) <= len(aside | unit):
            return flags
        aside |= unit


def shift_flags(answers: dict, kept: dict[str, list[str]], smd_max: float, sd_ratio_max: float) -> list[dict]:
    """Kept covariates whose distribution at one center differs from the other training centers' by more
    than case mix plausibly explains: |SMD| above ``smd_max`` or an SD ratio beyond ``sd_ratio_max`` either way.

    The external center is checked too, against the training centers, and keeps ``role: external``; it never
    enters another center's reference.  Centers are taken in the order of their names, so the same answers
    always give the same flags.
    """
    roles = {c: str(a.get("role") or "train") for c, a in sorted(answers.items())}
    return [flag for kind, names in kept.items() for name in names
            for flag in _feature_flags(kind, name, {c: _column(answers[c], kind, name) for c in roles}, roles,
                                       smd_max, sd_ratio_max)]


def _setting(rule, key: str) -> float:
    """A shift threshold from ``data.schema``, its default when the config predates it."""
    value = rule.get(key) if hasattr(rule, "get") else getattr(rule, key, None)
    return float(SHIFT_DEFAULTS[key] if value is None else value)


def propose_features(answers: dict, rule) -> dict:
    """The feature file's content: kept genomic / clinical features and modalities, with their coverage,
    the training centers that lack each kept feature and the covariate shifts worth a look."""
    train = {c: a for c, a in answers.items() if a.get("role") != "external"}
    n_train = sum(int(a.get("n-patients", 0)) for a in train.values())
    min_centers, frac = int(rule.min_centers), float(rule.min_patient_fraction)
    smd_max, sd_ratio_max = _setting(rule, "shift_smd"), _setting(rule, "shift_sd_ratio")

    def keep(cov: dict) -> list[str]:
        return [name for name, c in cov.items()
                if c["centers"] >= min_centers and c["patients"] >= frac * n_train and c["patients"] > 0]

    gen = _coverage(train, "genomic-columns", "genomic-counts", "genomic")
    clin = _coverage(train, "clinical-columns", "clinical-counts", "clinical")
    mods = _coverage(train, "modality-names", "modality-counts")
    kept_gen, kept_clin = keep(gen), keep(clin)
    scaling = {name: r for cov, names in ((gen, kept_gen), (clin, kept_clin)) for name in names
               if (r := scaling_rule(cov[name])) is not None}
    strip = lambda cov: {k: {"centers": v["centers"], "patients": v["patients"]} for k, v in cov.items()}  # noqa: E731
    kept = {"genomic": kept_gen, "clinical": kept_clin}
    return {"genomic_features": kept_gen, "clinical_features": kept_clin, "modalities": keep(mods),
            "scaling": scaling,
            "missing_by_site": missing_by_site(train, kept),
            "flags": shift_flags(answers, kept, smd_max, sd_ratio_max),
            "rule": {"min_centers": min_centers, "min_patient_fraction": frac, "training_patients": n_train,
                     "training_centers": sorted(train), "shift_smd": smd_max, "shift_sd_ratio": sd_ratio_max},
            "coverage": {"genomic": strip(gen), "clinical": strip(clin), "modalities": mods}}


def write_features(path: Path, proposal: dict, n_answers: int) -> None:
    header = (f"# Federation feature file proposed by `newadj schema` on {_dt.date.today()} from {n_answers} "
              f"centers' answers\n# (names and counts only). Review it, edit the lists if needed, then run with "
              f"`--features {path.name}`.\n# coverage: training centers / training patients (at or above each "
              f"site's floor) that have the feature.\n# missing_by_site: training centers without a kept feature "
              f"(their patients enter with the pooled mean);\n# flags: a center whose values differ from the others' "
              f"more than case mix explains (advice: check the unit or coding there).\n")
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
    for flag in proposal["flags"]:
        log.warning("schema: %s", flag["message"])
    return proposal
