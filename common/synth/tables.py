"""The synthetic cohort's tables: latent factors, benefit, DFS, clinical covariates, the gene panel."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from common.config import deep_merge
from common.synth._config import _S_TABLE, _rng, _sigmoid  # noqa: F401


# --------------------------------------------------------------------------- tables
def _site_tables(cfg: dict, site: dict, site_idx: int, n: int, seed: int):
    """Latents, labels, clinical, genomics and missingness for one site (main process)."""
    lat = cfg["latent"]
    rng = _rng(seed, site_idx, -1, _S_TABLE)
    z = rng.standard_normal((n, 4))
    z_mri, z_path, z_gen, z_clin = z.T
    logit = (lat["b0"] + site.get("b0_offset", 0.0) + lat["a_mri"] * z_mri
             + lat["a_path"] * z_path + lat["a_gen"] * z_gen + lat["a_clin"] * z_clin)
    prob = _sigmoid(logit)
    benefit = (rng.random(n) < prob).astype(int)

    # DFS -----------------------------------------------------------------
    d = cfg["dfs"]
    lp = (d["hr_benefit"] * benefit + d["hr_latent"] * (z_mri + z_path + z_gen) / math.sqrt(3)
          + d["hr_clin"] * z_clin)
    u = rng.random(n)
    t_event = d["weibull_scale_months"] * (-np.log(1 - u) / np.exp(lp)) ** (1 / d["weibull_shape"])
    follow = rng.uniform(d["followup_min_months"], d["followup_max_months"], n)
    dfs = np.maximum(np.minimum(t_event, follow), d["min_months"])
    event = (t_event <= follow).astype(int)

    # clinical ------------------------------------------------------------
    c = cfg["clinical"]
    age = np.clip(rng.normal(c["age_mean"], c["age_sd"], n), 18, 75).round(0)
    cp = rng.choice(c["child_pugh_values"], size=n, p=_norm_p(c["child_pugh_probs"]))
    ecog = rng.choice(c["ecog_values"], size=n, p=_norm_p(c["ecog_probs"]))
    log_afp = c["log10_afp_mean"] + c["log10_afp_clin_coef"] * z_clin + rng.normal(0, c["log10_afp_noise_sd"], n)
    afp = np.round(10 ** log_afp, 1)
    tcount = 1 + rng.poisson(c["tumor_count_poisson"], n)
    diam = np.clip(np.exp(rng.normal(c["max_diameter_log_mean"], c["max_diameter_log_sd"], n)), 1, 20).round(1)
    prior = (rng.random(n) < c["p_prior_treatment"]).astype(int)
    bclc_b = ((tcount >= 2) | (diam > 5)).astype(int)
    flip = rng.random(n) < c["p_bclc_b_flip"]
    bclc_b = np.where(flip, 1 - bclc_b, bclc_b)
    oor = rng.random(n) < c["p_out_of_range"]
    which = rng.integers(0, 3, n)
    oor_cp = rng.integers(8, 10, n)
    oor_age = rng.integers(76, 89, n)
    cp = np.where(oor & (which == 0), oor_cp, cp)
    ecog = np.where(oor & (which == 1), 2, ecog)
    age = np.where(oor & (which == 2), oor_age, age)

    # missingness ---------------------------------------------------------
    m = deep_merge(cfg["missing"], site.get("missing") or {})
    no_mri = rng.random(n) < m["p_no_mri"]
    incomplete = (rng.random(n) < m["p_incomplete_phases"]) & ~no_mri
    drop_phase = rng.integers(0, len(cfg["phases"]), n)
    no_mask = rng.random(n) < m["p_no_mask"]
    no_slide = rng.random(n) < m["p_no_slide"]
    no_gen = rng.random(n) < m["p_no_genomics"]
    restore = rng.integers(0, 3, n)
    unlabeled = rng.random(n) < m.get("p_unlabeled", 0.0)
    # "has MRI" for the all-missing rule means a complete, usable phase set
    all_missing = (no_mri | incomplete) & no_slide & no_gen
    for i in np.flatnonzero(all_missing):
        if restore[i] == 0:
            no_mri[i] = False
            incomplete[i] = False
        elif restore[i] == 1:
            no_slide[i] = False
        else:
            no_gen[i] = False

    pids = [f"{site.get('pid_prefix', site['name'][:2].upper())}{i + 1:04d}" for i in range(n)]
    clinical = pd.DataFrame({
        "patient_id": pids,
        "benefit": pd.array(np.where(unlabeled, pd.NA, benefit), dtype="Int64"),
        "dfs_months": np.where(unlabeled, np.nan, np.round(dfs, 1)),
        "dfs_event": pd.array(np.where(unlabeled, pd.NA, event), dtype="Int64"),
        "split": [""] * n,
        "age": age.astype(int),
        "child_pugh": cp.astype(int),
        "ecog": ecog.astype(int),
        "afp_ng_ml": afp,
        "tumor_count": tcount.astype(int),
        "max_diameter_cm": diam,
        "prior_treatment": prior,
        "bclc_b": bclc_b.astype(int),
    })

    genomics = _genomics(cfg, site, rng, z_gen, pids)
    genomics = genomics.loc[~no_gen].reset_index(drop=True)

    truth = pd.DataFrame({
        "site": site["name"], "role": site.get("role", "train"), "patient_id": pids,
        "true_prob": np.round(prob, 6), "z_mri": np.round(z_mri, 6), "z_path": np.round(z_path, 6),
        "z_gen": np.round(z_gen, 6), "z_clin": np.round(z_clin, 6), "benefit": benefit,
    })
    flags = dict(no_mri=no_mri, incomplete=incomplete, drop_phase=drop_phase, no_mask=no_mask,
                 no_slide=no_slide, no_gen=no_gen)
    return pids, clinical, genomics, truth, flags, (z_mri, z_path)


def _norm_p(p):
    p = np.asarray(p, float)
    return p / p.sum()


def _genomics(cfg, site, rng, z_gen, pids) -> pd.DataFrame:
    g = cfg["genomics"]
    n = len(pids)
    feats = cfg["genomic_features"]
    cols: dict[str, np.ndarray] = {}
    amp_shared = rng.random(n) < g["cnv_amp_rate"]
    amp_size = rng.uniform(0.8, 2.0, n)
    for f in feats:
        inf = g["informative"].get(f)
        if f.endswith("_mut"):
            if inf is not None:
                p = _sigmoid(inf["logit0"] + inf["coef"] * z_gen)
            else:
                p = np.full(n, g["mutation_rates"].get(f, g["default_mutation_rate"]))
            v = (rng.random(n) < p).astype(float)
        elif f.endswith("_cnv"):
            v = rng.normal(0, g["cnv_noise_sd"], n)
            if f in g.get("cnv_co_amplified", []):
                v = v + np.where(amp_shared, amp_size, 0.0)
            else:
                amp = rng.random(n) < g["cnv_amp_rate"]
                v = v + np.where(amp, rng.uniform(0.8, 2.0, n), 0.0)
            if inf is not None:
                v = v + inf.get("coef", 0.0) * z_gen
        else:  # expression z-score (or any other numeric feature)
            if inf is not None:
                v = inf["coef"] * z_gen + rng.normal(0, inf.get("noise_sd", 1.0), n)
            else:
                v = rng.normal(0, g["expr_noise_sd"], n)
        cols[f] = np.round(v, g["decimals"])
    df = pd.DataFrame({"patient_id": pids, **cols})
    for f in site.get("genomics_untested_empty") or []:
        if f in df:
            df[f] = np.nan
    absent = [f for f in site.get("genomics_untested_absent") or [] if f in df]
    return df.drop(columns=absent)
