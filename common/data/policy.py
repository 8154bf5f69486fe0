"""The site policy: the one reader of ``<site>/policy.toml``, the file the site's IT owns.

Defaults live in ``conf/policy/default.yaml``; a site's ``policy.toml`` overrides
any of them (unknown keys are an error: a typo must not silently weaken a rule).
The policy says

* what the site answers (message types, epochs, rounds, smallest split);
* what an evaluate reply may release (``min_patients`` per endpoint,
  ``min_cell_count``, ``max_histogram_bins``, ``release_round_metrics``,
  ``max_thresholds``; applied by ``client/disclosure.py``);
* which run overrides a coordinator may send (``allowed_run_keys``), and the
  site's own settings (``[config]``: cache location, preprocessing, encoders,
  threads...), which always win over anything a run or a model package says.

:func:`site_config` is how every site-side command (the ClientApp, ``newadj
preprocess``, ``evaluate``, ``screen``) builds its configuration: the project's
defaults, then only the allowed keys of the run (or of a model package's stored
config), then the site's own ``[config]``.
"""
from __future__ import annotations

import fnmatch
import functools
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable

import yaml
from omegaconf import OmegaConf

from common.federation import reply_schema as W
from common.config import CONF_DIR, load_config, to_plain

POLICY_FILE = "policy.toml"
_SHA256 = re.compile(r"[0-9a-f]{64}")
DEFAULT_POLICY_YAML = CONF_DIR / "policy" / "default.yaml"
MESSAGE_TYPES = ("query", "train", "evaluate")
RECORD_KINDS = ("array", "metric", "config")
ENDPOINTS = ("benefit", "dfs")


class PolicyError(ValueError):
    """A policy file that cannot be used (the site then refuses every message)."""


@dataclass(frozen=True)
class Policy:
    message_types: tuple[str, ...]
    max_local_epochs: int
    max_server_round: int
    min_cohort_size: int
    min_patients: dict = field(default_factory=dict)      # endpoint -> fewest patients behind a released metric
    min_cell_count: int = 5
    max_histogram_bins: int = 20
    release_round_metrics: bool = True
    max_thresholds: int = 3
    allowed_run_keys: tuple[str, ...] = ()
    config: dict = field(default_factory=dict)            # the site's own settings (Hydra keys, nested)
    reply_records: dict = field(default_factory=dict)     # record name -> array | metric | config
    metric_keys: frozenset = frozenset()
    info_keys: frozenset = frozenset()
    audit_dir: str | None = None
    bundle_publisher: str = "newadj"                      # the app bundle this site runs (client/executor.py)
    bundle_name: str = "newadj"
    bundle_version: str | None = None                     # None: the newadj version installed at the site
    approved_bundles: tuple[str, ...] = ()                # SHA-256 of each bundle file the site reviewed
    runtime_max_rss_mb: int = 0                           # the warm runtime restarts above this (0: never)
    max_cv_folds: int = 10                                # fold models a cross-validated run may ask for (0: none)
    newton_rounds: bool = True                            # answer model=cox's Newton rounds (derivatives)
    source: str = ""                                      # where it came from (for messages)

    @property
    def pinned_version(self) -> str:
        """The bundle version this site runs: its own setting, else the version of newadj installed here."""
        if self.bundle_version:
            return self.bundle_version
        from importlib.metadata import version

        return version("newadj")


def _defaults() -> dict:
    return yaml.safe_load(DEFAULT_POLICY_YAML.read_text())


def _int(raw: dict, key: str, source: str, minimum: int) -> int:
    v = raw[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise PolicyError(f"{source}: {key} must be an integer, got {v!r}")
    if v < minimum:
        raise PolicyError(f"{source}: {key} must be at least {minimum}, got {v}")
    return v


def _keys(value, schema) -> frozenset:
    """A whitelist of reply keys (fnmatch patterns); null means the project's reply schema."""
    return frozenset(str(k) for k in (schema if value is None else value))


def key_listed(key: str, patterns) -> bool:
    """Whether a reply key is on a whitelist of keys / fnmatch patterns."""
    return key in patterns or any(fnmatch.fnmatchcase(key, p) for p in patterns if any(c in p for c in "*?["))


def _build(raw: dict, source: str) -> Policy:
    known = ({f.name for f in fields(Policy)} - {"source"}) | {"allowed_run_keys_extra"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise PolicyError(f"{source}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    try:
        mtypes = tuple(str(t) for t in raw["message_types"])
        bad = [t for t in mtypes if t not in MESSAGE_TYPES]
        if bad:
            raise PolicyError(f"{source}: message_types {bad} not among {list(MESSAGE_TYPES)}")
        records = {str(k): str(v) for k, v in dict(raw["reply_records"]).items()}
        bad = {k: v for k, v in records.items() if v not in RECORD_KINDS}
        if bad:
            raise PolicyError(f"{source}: reply_records kinds {bad} not among {list(RECORD_KINDS)}")
        zero_ok = ("max_local_epochs", "max_server_round", "runtime_max_rss_mb", "max_cv_folds")
        ints = {k: _int(raw, k, source, 0 if k in zero_ok else 1)
                for k in ("max_local_epochs", "max_server_round", "min_cohort_size", "min_cell_count",
                          "max_histogram_bins", "max_thresholds", "runtime_max_rss_mb", "max_cv_folds")}
        floors = raw["min_patients"]
        if not isinstance(floors, dict) or set(floors) - set(ENDPOINTS):
            raise PolicyError(f"{source}: min_patients must be a table with keys {list(ENDPOINTS)}, got {floors!r}")
        floors = {e: _int(floors, e, f"{source}: min_patients", 1) for e in ENDPOINTS}
        for flag in ("release_round_metrics", "newton_rounds"):
            if not isinstance(raw[flag], bool):
                raise PolicyError(f"{source}: {flag} must be true or false, got {raw[flag]!r}")
        patterns, extra = raw["allowed_run_keys"], raw.get("allowed_run_keys_extra") or []
        for name, value in (("allowed_run_keys", patterns), ("allowed_run_keys_extra", extra)):
            if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                raise PolicyError(f"{source}: {name} must be a list of key patterns")
        patterns = [*patterns, *extra]
        config = raw.get("config") or {}
        if not isinstance(config, dict):
            raise PolicyError(f"{source}: [config] must be a table of config keys")
        audit_dir = raw.get("audit_dir")
        bundle = {k: raw[k] for k in ("bundle_publisher", "bundle_name")}
        if not all(isinstance(v, str) and v for v in bundle.values()):
            raise PolicyError(f"{source}: bundle_publisher and bundle_name must be non-empty strings")
        if raw["bundle_version"] is not None and not isinstance(raw["bundle_version"], str):
            raise PolicyError(f"{source}: bundle_version must be a version string or null")
        approved = raw["approved_bundles"]
        if not isinstance(approved, list) or not all(isinstance(h, str) and _SHA256.fullmatch(h) for h in approved):
            raise PolicyError(f"{source}: approved_bundles must be a list of SHA-256 hex digests "
                              "(`newadj site approve` adds them)")
        return Policy(**bundle, bundle_version=raw["bundle_version"], approved_bundles=tuple(approved),
                      message_types=mtypes, reply_records=records, min_patients=floors,
                      release_round_metrics=raw["release_round_metrics"], newton_rounds=raw["newton_rounds"],
                      allowed_run_keys=tuple(patterns),
                      config=config, metric_keys=_keys(raw["metric_keys"], W.METRIC_KEY_PATTERNS),
                      info_keys=_keys(raw["info_keys"], W.INFO_KEYS),
                      audit_dir=None if audit_dir in (None, "") else str(audit_dir), source=source, **ints)
    except (KeyError, TypeError) as exc:
        raise PolicyError(f"{source}: invalid policy ({exc!r})") from exc


def _content(path: Path | None) -> bytes | None:
    try:
        return path.read_bytes()
    except (OSError, AttributeError):
        return None


_POLICIES: dict = {}


def load_policy(site_dir: Path | None) -> Policy:
    """The defaults of conf/policy/default.yaml, overridden by ``<site_dir>/policy.toml`` if present.

    Both files are read every time and parsed again when their bytes changed: an edit takes effect at the next
    message; between edits the parsed policy is reused (the mods ask several times a message)."""
    path = Path(site_dir) / POLICY_FILE if site_dir is not None else None
    key = (str(path), _content(path), _content(DEFAULT_POLICY_YAML))
    if key not in _POLICIES:
        if len(_POLICIES) > 256:
            _POLICIES.clear()
        _POLICIES[key] = _read_policy(path, key[1], key[2])
    return _POLICIES[key]


def _read_policy(path: Path | None, site_text: bytes | None, default_text: bytes | None) -> Policy:
    raw = yaml.safe_load(default_text) if default_text is not None else _defaults()
    source = str(DEFAULT_POLICY_YAML)
    if site_text is not None:
        try:
            site = tomllib.loads(site_text.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise PolicyError(f"{path}: cannot read ({exc})") from exc
        unknown = sorted(set(site) - set(raw))
        if unknown:
            raise PolicyError(f"{path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(raw))})")
        if isinstance(site.get("min_patients"), dict):   # a site may set one endpoint's floor only
            site["min_patients"] = {**raw["min_patients"], **site["min_patients"]}
        raw.update(site)
        source = str(path)
    return _build(raw, source)


# --------------------------------------------------------------------------- what a run may change


def key_allowed(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def config_groups() -> dict[str, set[str]]:
    """The installed configuration's groups and their options (``model``: linear, newadjnet, small ...)."""
    return {d.name: {f.stem for f in d.glob("*.yaml")} for d in CONF_DIR.iterdir()
            if d.is_dir() and d.name != "policy" and any(d.glob("*.yaml"))}


def _interpolates(value) -> bool:
    if isinstance(value, str):
        return "${" in value
    if isinstance(value, dict):
        return any(_interpolates(k) or _interpolates(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_interpolates(v) for v in value)
    return False


def _fits(value, default) -> bool:
    """Whether a run's value has the kind of the setting it replaces (a number for a number, a list for a list...)."""
    from omegaconf import DictConfig, ListConfig

    scalar = (bool, int, float, str)
    if value is None:        # null switches a setting off (update_checks.max_norm_ratio=null); it names nothing
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, ListConfig):
        return isinstance(value, list)
    if isinstance(default, DictConfig):
        return isinstance(value, dict)
    return isinstance(value, (*scalar, list))   # a null default


def override_refusals(overrides: Iterable[str], policy: Policy) -> list[str]:
    """(cached by overrides and allow-list: the policy mod asks on every message)"""
    return list(_refusals(tuple(str(o) for o in overrides), tuple(policy.allowed_run_keys)))


@functools.lru_cache(maxsize=64)
def _refusals(overrides: tuple[str, ...], allowed: tuple[str, ...]) -> tuple[str, ...]:
    """The run overrides this site refuses, each named by its key and why, never by its value.

    Every override is read with Hydra's own grammar.  Refused: an override that is not a plain ``key=value``
    (``+``, ``++``, ``~``, the ``@package`` syntax, sweeps), a key outside the site's ``allowed_run_keys``, an
    interpolation (``${...}`` anywhere in the value: it would resolve at the site), a config group option the
    installed configuration does not have (``model=../../elsewhere``), a key the configuration does not have,
    and a value of another kind than the setting's (a string for a number...)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType, ValueType

    parser, groups = OverridesParser.create(), config_groups()
    bad, values = [], {}
    for i, text in enumerate(overrides, 1):
        try:
            o = parser.parse_override(str(text))
        except Exception:  # noqa: BLE001 - Hydra's grammar errors come in several types
            bad.append(f"override {i} (not a Hydra key=value)")
            continue
        key = o.key_or_group
        if o.package is not None:
            bad.append(f"{key}@{o.package} (a @package override)")
        elif o.type != OverrideType.CHANGE:
            bad.append(f"{key} (a {'~' if o.type == OverrideType.DEL else '+'} override)")
        elif o.value_type != ValueType.ELEMENT or o.is_sweep_override():
            bad.append(f"{key} (a sweep)")
        elif not key_allowed(key, allowed):
            bad.append(key)
        elif _interpolates(o.value()):
            bad.append(f"{key} (an interpolation)")
        elif key in groups and o.value() not in groups[key]:
            bad.append(f"{key} (not one of the installed {key} configurations)")
        else:
            values[key] = o.value()
    if bad:
        return tuple(bad)
    cfg = load_config([f"{k}={v}" for k, v in values.items() if k in groups])   # the group choices, checked above
    from omegaconf import OmegaConf

    missing = object()
    for key, value in values.items():
        if key in groups:
            continue
        default = OmegaConf.select(cfg, key, default=missing, throw_on_missing=False)
        if default is missing:
            bad.append(f"{key} (no such setting)")
        elif not _fits(value, default):
            bad.append(f"{key} (a value of another kind than the setting's)")
    return tuple(bad)


def site_config(site_dir: Path | None, run_overrides: Iterable[str] = (), package: dict | None = None,
                policy: Policy | None = None):
    """The configuration: the installed defaults + the accepted run overrides, or a model package's architecture and
    schema (``common.federation.model_io``), + the site's own ``[config]``.

    ``run_overrides`` the site refuses raise :class:`PolicyError` naming each key (the ClientApp refuses such a
    run).  A ``package`` (already checked to be weights and numbers) brings its ``model`` node and its feature
    lists and scaling, nothing else: data, preprocessing, encoders, floors stay the site's.
    """
    policy = policy or load_policy(site_dir)
    overrides = list(run_overrides)
    bad = override_refusals(overrides, policy)
    if bad:
        raise PolicyError(f"run override(s) refused by this site: {', '.join(bad)} "
                          f"(the site's policy.toml `allowed_run_keys` lists what a run may change)")
    cfg = load_config(overrides)
    if package is not None:
        OmegaConf.set_struct(cfg, False)
        cfg.model = OmegaConf.create(dict(package["model"]))
        for key, value in package["schema"].items():
            OmegaConf.update(cfg, f"data.{key}", value, merge=False, force_add=True)
    return with_site_config(cfg, site_dir, policy)


def with_site_config(cfg, site_dir: Path | None, policy: Policy | None = None):
    """``cfg`` with the site's own [config] applied (what preprocessing always uses)."""
    policy = policy or load_policy(site_dir)
    if not policy.config:
        return cfg
    try:
        return OmegaConf.merge(cfg, OmegaConf.create(policy.config))
    except Exception as exc:  # noqa: BLE001 - OmegaConf's key/validation errors
        raise PolicyError(f"{policy.source}: [config] does not fit the project's config ({exc})") from exc
