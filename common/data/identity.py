"""A site's identity: the one parser of ``site.toml`` (center id, display name, role, notes).

The keys may be top-level or inside a ``[site]`` table; both give the same identity
everywhere (the reader, validation, the cohort listing, the ClientApp, the site policy).
A missing file, or a key it does not set, takes the default: the folder's name as center
id, role ``train``.
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from common.data.contract import PATIENT_ID_RE, ROLES, SITE_TOML, SITE_TOML_KEYS, Problem, _err, _warn
from common.data.tables import _decode_csv


@dataclass(frozen=True)
class SiteIdentity:
    center_id: str
    role: str = "train"
    display_name: str | None = None
    notes: str | None = None


def _toml_line(e: Exception) -> int | None:
    m = re.search(r"line (\d+)", str(e))
    return int(m.group(1)) if m else None


def read_identity(site_dir: str | Path) -> tuple[SiteIdentity, list[Problem]]:
    """(identity, problems) of the site at ``site_dir``; never raises on the file's content."""
    root = Path(site_dir)
    problems: list[Problem] = []
    center_id, display_name, role, notes = root.name, None, "train", None
    path = root / SITE_TOML
    default = SiteIdentity(center_id)
    if not path.exists():
        return default, problems
    try:
        raw = path.read_bytes()
    except OSError as e:
        return default, [_err(SITE_TOML, None, None, f"cannot read file: {e.strerror or e}")]
    text, prob = _decode_csv(raw, SITE_TOML)
    if prob is not None:
        return default, [prob]
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        return default, [_err(SITE_TOML, _toml_line(e), None, f"invalid TOML: {e}")]
    if isinstance(doc.get("site"), dict):  # a [site] table, with top-level keys as defaults
        table = dict(doc["site"])
        for k, v in doc.items():
            if k != "site":
                table.setdefault(k, v)
        doc = table
    for key in doc:
        if key not in SITE_TOML_KEYS:
            problems.append(_warn(SITE_TOML, None, key, f"unknown key '{key}' ignored"))

    def get_str(key: str) -> str | None:
        if key not in doc:
            return None
        v = doc[key]
        if not isinstance(v, str):
            problems.append(_err(SITE_TOML, None, key, f"{key} must be a string, got {v!r}"))
            return None
        return v

    cid = get_str("center_id")
    if cid is not None:
        if PATIENT_ID_RE.fullmatch(cid):
            center_id = cid
        else:
            problems.append(_err(SITE_TOML, None, "center_id", f"center_id must match [A-Za-z0-9._-]{{1,64}}, got {cid!r}"))
    display_name = get_str("display_name")
    r = get_str("role")
    if r is not None:
        if r in ROLES:
            role = r
        else:
            problems.append(_err(SITE_TOML, None, "role", f"role must be 'train' or 'external', got {r!r}"))
    notes = get_str("notes")
    return SiteIdentity(center_id, role, display_name, notes), problems


def site_identity(site_dir: str | Path) -> SiteIdentity:
    """The identity alone (problems are validation's business)."""
    return read_identity(site_dir)[0]
