"""Site policy: what a center agrees to answer, enforced by a ClientApp mod.

Each site may keep a ``policy.toml`` in its site folder (owned by the site's
IT; format and defaults in ``conf/policy/default.yaml``).  ``policy_mod`` runs
around every handler of the ClientApp and

* before the handler: refuses message types the site does not answer, a
  ``local-epochs`` above ``max_local_epochs``, a ``server-round`` above
  ``max_server_round`` and training / evaluating on a split with fewer than
  ``min_cohort_size`` patients;
* after the handler: refuses a reply holding a record other than the
  whitelisted ones (``arrays``, ``metrics``, ``info``) or a metric / info key
  outside the whitelist -- refused as a whole, never silently trimmed.

A refusal is the reply ``Error(code=403, reason="policy of <center>: ...")``,
which the ServerApp logs with the center's name.  The policy file is re-read
on every message; a malformed one makes the site refuse everything.
"""
from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord

log = logging.getLogger(__name__)

ERR_REFUSED = 403
POLICY_FILE = "policy.toml"
DEFAULT_POLICY_YAML = Path(__file__).resolve().parents[1] / "conf" / "policy" / "default.yaml"
MESSAGE_TYPES = ("query", "train", "evaluate")
_RECORD_KINDS = {"array": ArrayRecord, "metric": MetricRecord, "config": ConfigRecord}


class PolicyError(ValueError):
    """A policy file that cannot be used (the site then refuses every message)."""


@dataclass(frozen=True)
class Policy:
    message_types: tuple[str, ...]
    max_local_epochs: int
    max_server_round: int
    min_cohort_size: int
    reply_records: dict = field(default_factory=dict)   # record name -> array | metric | config
    metric_keys: frozenset = frozenset()
    info_keys: frozenset = frozenset()
    audit_dir: str | None = None
    source: str = ""                                     # where it came from (for messages)


def _defaults() -> dict:
    return yaml.safe_load(DEFAULT_POLICY_YAML.read_text())


def _build(raw: dict, source: str) -> Policy:
    known = {f.name for f in fields(Policy)} - {"source"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise PolicyError(f"{source}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    try:
        mtypes = tuple(str(t) for t in raw["message_types"])
        bad = [t for t in mtypes if t not in MESSAGE_TYPES]
        if bad:
            raise PolicyError(f"{source}: message_types {bad} not among {list(MESSAGE_TYPES)}")
        records = {str(k): str(v) for k, v in dict(raw["reply_records"]).items()}
        bad = {k: v for k, v in records.items() if v not in _RECORD_KINDS}
        if bad:
            raise PolicyError(f"{source}: reply_records kinds {bad} not among {list(_RECORD_KINDS)}")
        ints = {}
        for k in ("max_local_epochs", "max_server_round", "min_cohort_size"):
            v = raw[k]
            if isinstance(v, bool) or not isinstance(v, int):
                raise PolicyError(f"{source}: {k} must be an integer, got {v!r}")
            ints[k] = v
        audit_dir = raw.get("audit_dir")
        return Policy(message_types=mtypes, reply_records=records,
                      metric_keys=frozenset(str(k) for k in raw["metric_keys"]),
                      info_keys=frozenset(str(k) for k in raw["info_keys"]),
                      audit_dir=None if audit_dir in (None, "") else str(audit_dir), source=source, **ints)
    except (KeyError, TypeError) as exc:
        raise PolicyError(f"{source}: invalid policy ({exc!r})") from exc


def load_policy(site_dir: Path | None) -> Policy:
    """The defaults of conf/policy/default.yaml, overridden by ``<site_dir>/policy.toml`` if present."""
    raw = _defaults()
    source = str(DEFAULT_POLICY_YAML)
    path = Path(site_dir) / POLICY_FILE if site_dir is not None else None
    if path is not None and path.exists():
        try:
            site = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise PolicyError(f"{path}: cannot read ({exc})") from exc
        unknown = sorted(set(site) - set(raw))
        if unknown:
            raise PolicyError(f"{path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(raw))})")
        raw.update(site)
        source = str(path)
    return _build(raw, source)


# --------------------------------------------------------------------------- decisions
def message_category(msg: Message) -> str:
    return str(msg.metadata.message_type).split(".", 1)[0]


def _config(msg: Message):
    if msg.has_content() and "config" in msg.content.config_records:
        return msg.content.config_records["config"]
    return {}


def _int_value(conf, key: str) -> tuple[int | None, str | None]:
    v = conf.get(key)
    if v is None:
        return None, None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
        return None, f"`{key}` must be an integer, got {v!r}"
    return int(v), None


def check_request(policy: Policy, msg: Message, default_epochs: Callable[[], int] | None = None) -> str | None:
    """Why the incoming message is refused (before any work), or None."""
    cat = message_category(msg)
    if cat not in policy.message_types:
        return f"does not answer `{cat}` messages (answers: {', '.join(policy.message_types) or 'none'})"
    conf = _config(msg)
    rnd, err = _int_value(conf, "server-round")
    if err:
        return err
    if rnd is not None and rnd > policy.max_server_round:
        return f"server-round {rnd} exceeds max_server_round {policy.max_server_round}"
    if cat == "train":
        epochs, err = _int_value(conf, "local-epochs")
        if err:
            return err
        if epochs is None and default_epochs is not None:
            epochs = int(default_epochs())
        if epochs is not None and epochs > policy.max_local_epochs:
            return f"local-epochs {epochs} exceeds max_local_epochs {policy.max_local_epochs}"
    return None


def requested_split(msg: Message) -> str | None:
    """The split a train / evaluate message works on (as client_app.py picks it)."""
    cat = message_category(msg)
    if cat == "train":
        return "train"
    if cat == "evaluate":
        return str(_config(msg).get("split", "val"))
    return None


def check_cohort(policy: Policy, split: str, n_patients: int | None) -> str | None:
    """Why training / evaluating on a split of ``n_patients`` is refused, or None (None n: no such split)."""
    if n_patients is not None and n_patients < policy.min_cohort_size:
        return (f"the `{split}` split has {n_patients} patients, fewer than min_cohort_size "
                f"{policy.min_cohort_size}")
    return None


def check_reply(policy: Policy, reply: Message) -> str | None:
    """Why the outgoing reply is refused (records / keys outside the whitelist), or None."""
    if reply.has_error():
        return None
    problems = []
    for name, rec in reply.content.items():
        kind = policy.reply_records.get(name)
        if kind is None:
            problems.append(f"record `{name}` is not allowed (allowed: {', '.join(sorted(policy.reply_records))})")
            continue
        if not isinstance(rec, _RECORD_KINDS[kind]):
            problems.append(f"record `{name}` must be a {kind} record, got {type(rec).__name__}")
            continue
        if isinstance(rec, MetricRecord):
            extra = sorted(set(rec.keys()) - policy.metric_keys)
            if extra:
                problems.append(f"metric key(s) {', '.join(extra)} in `{name}` are not in the metric_keys whitelist")
        elif isinstance(rec, ConfigRecord):
            extra = sorted(set(rec.keys()) - policy.info_keys)
            if extra:
                problems.append(f"key(s) {', '.join(extra)} in `{name}` are not in the info_keys whitelist")
    return "; ".join(problems) or None


def refuse(msg: Message, center: str, reason: str) -> Message:
    full = f"policy of {center}: {reason}"
    log.warning("refused %s: %s", msg.metadata.message_type, full)
    return Message(Error(code=ERR_REFUSED, reason=full), reply_to=msg)


# --------------------------------------------------------------------------- the site
_IDENTITY: dict[tuple, tuple[Path, str]] = {}


def _key(run_config, node_config) -> tuple:
    return (tuple(sorted((k, str(v)) for k, v in run_config.items())),
            tuple(sorted((k, str(v)) for k, v in node_config.items())))


def site_identity(run_config, node_config) -> tuple[Path, str]:
    """(site folder, center id) without loading any data (cheap; as client.site_runtime resolves them)."""
    key = _key(run_config, node_config)
    if key not in _IDENTITY:
        from client.site_runtime import _resolve_site

        site_dir, _role, center = _resolve_site(run_config, node_config)
        if not center:
            toml = {}
            if (site_dir / "site.toml").exists():
                toml = tomllib.loads((site_dir / "site.toml").read_text())
            center = str(toml.get("center_id", site_dir.name))
        _IDENTITY[key] = (Path(site_dir), str(center))
    return _IDENTITY[key]


def _split_size(context: Context, split: str) -> int | None:
    """Patients in one split of this site (None: the site has no such split)."""
    from client.site_runtime import site_runtime

    ds = site_runtime(context.run_config, context.node_config).split(split)
    return None if ds is None else len(ds)


def _default_epochs(context: Context) -> int:
    from client.site_runtime import site_runtime

    return int(site_runtime(context.run_config, context.node_config).cfg.federation.local_epochs)


def policy_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower mod: enforce the site policy on the request and on the reply."""
    site_dir, center = site_identity(context.run_config, context.node_config)
    try:
        policy = load_policy(site_dir)
    except PolicyError as exc:
        return refuse(msg, center, f"policy file unusable, refusing everything: {exc}")
    reason = check_request(policy, msg, default_epochs=lambda: _default_epochs(context))
    if reason is None and (split := requested_split(msg)) is not None:
        if split not in ("train", "val", "test"):
            reason = f"unknown split `{split}`"
        else:
            reason = check_cohort(policy, split, _split_size(context, split))
    if reason is not None:
        return refuse(msg, center, reason)
    reply = call_next(msg, context)
    reason = check_reply(policy, reply)
    if reason is not None:
        return refuse(msg, center, f"reply refused: {reason}")
    return reply
