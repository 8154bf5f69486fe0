"""Harder synthetic cohorts: widen one center's site effects (``synth.shift``) and move the latent signal to
image / gene features the model was not designed around (``synth.signal``).  Both act on the resolved
generator config before any patient is drawn, so the defaults leave the cohort byte-identical."""
from __future__ import annotations

import copy
import math

MRI_SIGNALS = ("enhancement", "morphology")
PATH_SIGNALS = ("lymphocytes", "nuclear_size")
GEN_SIGNALS = ("immune", "alternate")


def apply_shift_and_signal(cfg: dict) -> dict:
    """A copy of the resolved config with ``shift`` applied to its center and ``signal`` checked; raises
    ``ValueError`` naming the key for an unknown center or signal."""
    cfg = copy.deepcopy(cfg)
    sig = cfg.setdefault("signal", {})
    for key, known, default in (("mri", MRI_SIGNALS, "enhancement"), ("pathology", PATH_SIGNALS, "lymphocytes"),
                                ("genomics", GEN_SIGNALS, "immune")):
        sig.setdefault(key, default)
        if sig[key] not in known:
            raise ValueError(f"synth.signal.{key}: unknown {sig[key]!r} (choose from {', '.join(known)})")
    if sig["genomics"] == "alternate":
        alt = (cfg.get("genomics") or {}).get("alternate_informative")
        if not alt:
            raise ValueError("synth.signal.genomics=alternate needs synth.genomics.alternate_informative")
        cfg["genomics"]["informative"] = copy.deepcopy(alt)

    sh = cfg.get("shift") or {}
    center = sh.get("center")
    if center in (None, "", "null"):
        return cfg
    names = [s["name"] for s in cfg["sites"]]
    if center not in names:
        raise ValueError(f"synth.shift.center: no site {center!r} (sites: {', '.join(names)})")
    site = next(s for s in cfg["sites"] if s["name"] == center)
    for key in ("scanner", "contrast", "stain"):
        if not float(sh.get(key, 1.0)) > 0:
            raise ValueError(f"synth.shift.{key}: must be > 0 (got {sh.get(key)})")
    f_scan, f_stain = float(sh.get("scanner", 1.0)), float(sh.get("stain", 1.0))
    mri = dict(site["mri"])
    mri["noise_sd"] = float(mri["noise_sd"]) * f_scan
    mri["bias"] = float(mri.get("bias", 0.0)) * f_scan
    mri["contrast_gamma"] = float(mri.get("contrast_gamma", 1.0)) * float(sh.get("contrast", 1.0))
    site["mri"] = mri
    st = dict(site.get("stain") or {})
    for k in ("h_shift", "e_shift"):
        st[k] = [float(v) * f_stain for v in (st.get(k) or [0.0, 0.0, 0.0])]
    for k in ("h_scale", "e_scale"):
        st[k] = math.exp(math.log(float(st.get(k, 1.0))) * f_stain)
    bg = float(st.get("background", 245))
    st["background"] = float(min(max(245 - (245 - bg) * f_stain, 180.0), 255.0))
    site["stain"] = st
    drop = [str(g) for g in (sh.get("panel_drop") or [])]
    unknown = [g for g in drop if g not in cfg["genomic_features"]]
    if unknown:
        raise ValueError(f"synth.shift.panel_drop: {', '.join(unknown)} not in the gene panel")
    site["genomics_untested_empty"] = sorted(set(site.get("genomics_untested_empty") or []) | set(drop))
    site["b0_offset"] = float(site.get("b0_offset", 0.0)) + float(sh.get("prevalence", 0.0))
    return cfg


def describe(cfg: dict) -> dict:
    """What ``_cohort.json`` records about the shift and the signal."""
    sh = cfg.get("shift") or {}
    out = {"signal": {k: cfg["signal"][k] for k in ("mri", "pathology", "genomics")}}
    if sh.get("center") not in (None, "", "null"):
        out["shift"] = {k: sh.get(k) for k in ("center", "scanner", "contrast", "stain", "panel_drop", "prevalence")}
    return out
