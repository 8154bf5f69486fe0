"""Development checks on real, public multi-center survival data, every number by leave-one-center-out CV.

Issue 36, item 5.  Each cohort is written as a federation in the data contract's layout (one site
folder per center, ``split`` left empty so that the contract's hash rule splits train / validation),
the product's own ``newadj schema`` (a Flower run) proposes the features and their scaling, and every
arm is scored by **leave-one-center-out CV over the training centers**: in fold ``h`` the other
training centers train and Harrell's C is read on *all* patients of ``h``.  The external center is
scored too (reported, "not ruled on"): no choice anywhere reads it.

Cohorts (both ship with installed packages, so this runs offline):

* ``lung``: NCCTG advanced lung cancer (``lifelines.datasets.load_lung``, 228 patients, overall
  survival).  The column ``inst`` is the institution: the 6 largest (inst 1, 12, 13, 3, 11, 22:
  36/23/20/19/18/17 patients) are the training centers ``center_inst01`` ...; the other 12
  institutions' patients and the one without an institution form the external center.  Event:
  death (lifelines codes ``status`` 1 = dead, 0 = censored; R's ``survival::lung`` codes 2 / 1 --
  both are recognised).  Covariates age, sex, ph_ecog, ph_karno, pat_karno, meal_cal, wt_loss, with
  their missing values left as empty cells.
* ``gbsg2``: as ``benchmarks/bench_survival.py`` (four grade-driven pseudo-centers and a seeded
  uniform 20 % external center, the same draws for the same seed) but without a local ``test``
  split: leave-one-center-out holds whole centers out instead.

Arms, in each fold (training centers = the training centers other than ``h``):

* ``pooled_engine``: the project's one training engine (``common.learn.baseline.train_arm``,
  seeded before the model is built) on the pooled train splits, early-stopped on the pooled
  validation splits.
* ``pooled_cox``: lifelines ``CoxPHFitter(penalizer=lambda)`` stratified by center on every patient
  (train + validation) of the fold's training centers; its design matrix is what the engine's
  clinical / genomic branches read (the scaled values, 0 where missing; the engine also gets the
  missingness masks, the Cox model does not).  lambda is chosen from 1e-3, 1e-2, 1e-1, 1 by
  5-fold CV inside the fold's training data -- our own loop, not lifelines' ``k_fold_cross_validation``
  (which pools pairs across strata): folds are stratified by center and event, and each lambda is
  scored by the center-and-fold-stratified Harrell's C of its out-of-fold risks
  (``common.metrics.pooled_c_index`` over the (fold, center) pair counts); ties go to the larger
  lambda.  Then refit on all of the fold's training data.
* ``local_cox:<c>`` (lambda fixed at 0.1) and ``local_engine:<c>`` (its own train / validation
  splits): each fold-training center alone.  Reported per center, as the best per fold (the max over
  the fold's centers of the held-out C: an oracle choice, made on the held-out center) and as the
  mean over the fold's centers.
* ``fed_engine``: the real federation (a Flower simulation, ``run_simulation``) with the project's
  defaults and ``federation.holdout_center=h``, as ``newadj simulate --loco`` runs it: ``h`` never
  trains and is scored at the end (its site's own report: ``metrics["external"]["centers"][h]``); the
  external center is sealed in the run and scored here from the selected model.  ``--fed-arm
  NAME=OVERRIDES`` adds a federated arm ``fed:NAME`` with more overrides (e.g. ``--fed-arm
  cv5=federation.cv_folds=5``); ``--fed-overrides`` go to every federated arm.

The features and their scaling come from one ``newadj schema`` over every site (the external center
listed but deciding nothing), as ``newadj simulate --loco`` uses one feature file for all its folds:
the held-out center's covariate moments (never its outcomes) are part of the pooled standardisation.

    .venv/bin/python benchmarks/bench_real_cohorts.py --cohort lung            # -> benchmarks/results/real_lung.json
    .venv/bin/python benchmarks/bench_real_cohorts.py --cohort lung --skip-fed --quick
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_survival as bs  # noqa: E402  (the GBSG2 pseudo-centers, the engine's scoring)

# a development site: runs set their seed and bootstrap size; the default floors (10 patients, 5 events)
POLICY = ('allowed_run_keys_extra = ["seed", "train.n_boot"]\n'
          "min_patients = { benefit = 10, dfs = 10 }\nmin_cell_count = 5\n")
LUNG_INSTITUTIONS = (1, 12, 13, 3, 11, 22)          # the 6 largest institutions of NCCTG lung, largest first
LUNG_COVARIATES = {"age": "age", "sex": "sex", "ph.ecog": "ph_ecog", "ph.karno": "ph_karno",
                   "pat.karno": "pat_karno", "meal.cal": "meal_cal", "wt.loss": "wt_loss"}
LAMBDA_GRID = (1e-3, 1e-2, 1e-1, 1.0)
LOCAL_LAMBDA = 0.1
CV_FOLDS = 5
DAYS_PER_MONTH = 30.4375
EXTERNAL = "external"


# --------------------------------------------------------------------------- cohorts

def _write_site(out: Path, name: str, part) -> None:
    site = out / name
    site.mkdir(parents=True, exist_ok=True)
    part.to_csv(site / "clinical.csv", index=False)          # NaN -> empty cell: missing in the contract
    role = "external" if name == EXTERNAL else "train"
    (site / "site.toml").write_text(f'center_id = "{name}"\nrole = "{role}"\n')
    (site / "policy.toml").write_text(POLICY)


def lung_event(status) -> np.ndarray:
    """Death indicator of NCCTG lung's ``status``: lifelines codes 1 = dead / 0 = censored, R 2 = dead / 1."""
    s = np.asarray(status, int)
    codes = set(np.unique(s).tolist())
    if codes <= {0, 1}:
        return (s == 1).astype(int)
    if codes <= {1, 2}:
        return (s == 2).astype(int)
    raise ValueError(f"lung: unexpected status codes {sorted(codes)}")


def lung_center_name(inst) -> str:
    return f"center_inst{int(inst):02d}"


def write_lung(out: Path, seed: int = 0) -> dict:
    """NCCTG lung as 6 training site folders (one per large institution) and the external center.
    ``seed`` is not used: the split into centers is the institutions'."""
    import pandas as pd
    from lifelines.datasets import load_lung

    raw = load_lung()
    df = pd.DataFrame({"patient_id": [f"L{i:03d}" for i in range(len(raw))],
                       "dfs_months": np.round(raw["time"].to_numpy(float) / DAYS_PER_MONTH, 2),
                       "dfs_event": lung_event(raw["status"]), "split": ""})
    for src, dst in LUNG_COVARIATES.items():
        df[dst] = raw[src].to_numpy(float)
    inst = raw["inst"].to_numpy(float)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for i in LUNG_INSTITUTIONS:
        name = lung_center_name(i)
        part = df[inst == i]
        _write_site(out, name, part)
        counts[name] = len(part)
    part = df[~np.isin(inst, LUNG_INSTITUTIONS)]            # NaN (unknown institution) is not in the list
    _write_site(out, EXTERNAL, part)
    counts[EXTERNAL] = len(part)
    return counts


def write_gbsg2(out: Path, seed: int = 0) -> dict:
    """GBSG2 as bench_survival's four grade-driven pseudo-centers and external center, no local test split."""
    import pandas as pd
    from sksurv.datasets import load_gbsg2

    X, y = load_gbsg2()
    df = pd.DataFrame({
        "dfs_months": np.round(y["time"] / DAYS_PER_MONTH, 2), "dfs_event": y["cens"].astype(int),
        "age": X["age"], "estrec": X["estrec"], "progrec": X["progrec"], "pnodes": X["pnodes"], "tsize": X["tsize"],
        "horTh": (X["horTh"] == "yes").astype(int), "menostat": (X["menostat"] == "Post").astype(int),
        "tgrade": X["tgrade"].map({"I": 1, "II": 2, "III": 3}).astype(int),
    })
    df.insert(0, "patient_id", [f"G{i:04d}" for i in range(len(df))])
    df.insert(3, "split", "")
    rng = np.random.default_rng(seed)                       # the same draws as bench_survival.write_cohort
    external = rng.random(len(df)) < 0.2
    center = np.array([rng.choice(4, p=bs.GRADE_P[g]) for g in X["tgrade"].astype(str)])
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for k, name in enumerate(bs.CENTERS + (EXTERNAL,)):
        part = df[external] if name == EXTERNAL else df[~external & (center == k)]
        _write_site(out, name, part)
        counts[name] = len(part)
    return counts


COHORTS = {"lung": write_lung, "gbsg2": write_gbsg2}


# --------------------------------------------------------------------------- data of a fold

class Cohort:
    """A written cohort's site caches and datasets under one run config ``cfg``."""

    def __init__(self, path: Path, cfg):
        from common.data.cohort import discover_sites
        from common.learn.dataset import site_dataset
        from common.preprocess.cache import ensure_caches

        self.path, self.cfg = Path(path), cfg
        sites = discover_sites(self.path)
        self.centers = [s.name for s in sites if s.role != "external"]
        self.external = next(s.name for s in sites if s.role == "external")
        caches = ensure_caches(sites, cfg, progress=False)
        self.train = {c: site_dataset(caches[c], ["train"], cfg) for c in self.centers}
        self.val = {c: site_dataset(caches[c], ["val"], cfg) for c in self.centers}
        self.all = {c: site_dataset(caches[c], None, cfg) for c in [*self.centers, self.external]}

    def features(self) -> list[str]:
        first = self.all[self.centers[0]].manifest
        return [*first["clinical_features"], *first["genomic_features"]]

    def design(self, centers) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(X, time, event, center index) of every patient of ``centers``: the engine's tabular inputs."""
        items = [(k, it) for k, c in enumerate(centers) for it in self.all[c].items]
        items = [(k, it) for k, it in items if np.isfinite(it["dfs_time"]) and np.isfinite(it["dfs_event"])]
        X = np.array([np.concatenate([it["clinical"], it["genomics"]]) for _, it in items], float)
        t = np.array([it["dfs_time"] for _, it in items], float)
        e = np.array([it["dfs_event"] for _, it in items], float)
        return X.reshape(len(items), -1), t, e, np.array([k for k, _ in items], int)


def harrell(risk, t, e) -> float:
    from common.metrics import concordance_pairs, pooled_c_index

    return pooled_c_index([concordance_pairs(t, e, risk)])[0]


def engine_c(model, ds) -> float:
    from common.metrics import pooled_c_index

    return pooled_c_index([bs.c_counts(model, ds)])[0]


# --------------------------------------------------------------------------- Cox (lifelines)

class CoxFitLog:
    """The warnings lifelines raised while fitting (message -> count) and fits that failed."""

    def __init__(self):
        self.warnings: Counter = Counter()
        self.failures: Counter = Counter()

    def as_dict(self) -> dict:
        return {"warnings": dict(self.warnings), "failures": dict(self.failures)}


def fit_cox(X, t, e, strata, penalizer: float, log: CoxFitLog | None = None) -> np.ndarray | None:
    """Coefficients of a lifelines Cox model (ridge ``penalizer``; stratified by ``strata`` when it has more
    than one level); columns without variance get 0. None if lifelines fails."""
    import pandas as pd
    from lifelines import CoxPHFitter

    keep = np.flatnonzero(X.std(0) > 1e-12)
    beta = np.zeros(X.shape[1])
    if keep.size == 0:
        return beta
    df = pd.DataFrame(X[:, keep], columns=[f"x{j}" for j in keep])
    df["T"], df["E"] = t, e
    multi = strata is not None and len(np.unique(strata)) > 1
    if multi:
        df["S"] = strata
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cph = CoxPHFitter(penalizer=penalizer).fit(df, "T", "E", strata=["S"] if multi else None)
        except Exception as exc:   # noqa: BLE001 - lifelines' ConvergenceError and linear-algebra failures
            if log is not None:
                log.failures[f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"] += 1
            return None
        finally:
            if log is not None:
                for w in caught:
                    log.warnings[f"{w.category.__name__}: {' '.join(str(w.message).split())[:120]}"] += 1
    beta[keep] = cph.params_.reindex([f"x{j}" for j in keep]).to_numpy(float)
    return beta


def cv_folds(strata, e, k: int, seed: int) -> np.ndarray:
    """Fold index of each patient: within each (center, event) group, shuffled and dealt round-robin."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(e), int)
    start = 0
    for key in sorted(set(zip(strata.tolist(), e.astype(int).tolist()))):
        idx = np.flatnonzero((strata == key[0]) & (e.astype(int) == key[1]))
        fold[rng.permutation(idx)] = (start + np.arange(idx.size)) % k
        start += idx.size          # the next group starts where this one stopped: folds stay balanced
    return fold


def choose_lambda(X, t, e, strata, grid=LAMBDA_GRID, k: int = CV_FOLDS, seed: int = 0,
                  log: CoxFitLog | None = None) -> tuple[float, dict]:
    """(lambda, {lambda: CV C}) by ``k``-fold CV: each lambda's center-and-fold-stratified Harrell's C."""
    from common.metrics import concordance_pairs, pooled_c_index

    fold = cv_folds(strata, e, k, seed)
    scores = {}
    for lam in grid:
        pairs = []
        for f in range(k):
            tr, te = fold != f, fold == f
            beta = fit_cox(X[tr], t[tr], e[tr], strata[tr], lam, log)
            if beta is None:
                pairs = None
                break
            risk = X[te] @ beta
            for s in np.unique(strata[te]):
                m = strata[te] == s
                pairs.append(concordance_pairs(t[te][m], e[te][m], risk[m]))
        scores[lam] = pooled_c_index(pairs)[0] if pairs else float("nan")
    ok = {lam: c for lam, c in scores.items() if np.isfinite(c)}
    if not ok:
        return LOCAL_LAMBDA, scores
    best = max(ok.values())
    return max(lam for lam, c in ok.items() if c >= best - 1e-12), scores   # ties: the stronger penalty


def pooled_cox(cohort: Cohort, train_centers, seed: int = 0, log: CoxFitLog | None = None,
               grid=LAMBDA_GRID) -> dict:
    """The pooled stratified Cox arm of one fold: lambda by CV inside ``train_centers``, refit on all of them."""
    X, t, e, s = cohort.design(train_centers)
    lam, scores = choose_lambda(X, t, e, s, grid=tuple(grid), seed=seed, log=log)
    beta = fit_cox(X, t, e, s, lam, log)
    return {"beta": beta, "lambda": lam, "cv_c": scores, "n_train": int(len(t)), "events_train": int(e.sum())}


def local_cox(cohort: Cohort, center: str, log: CoxFitLog | None = None) -> dict:
    X, t, e, _ = cohort.design([center])
    return {"beta": fit_cox(X, t, e, None, LOCAL_LAMBDA, log), "lambda": LOCAL_LAMBDA, "n_train": int(len(t))}


def cox_c(cohort: Cohort, beta, center: str) -> float:
    if beta is None:
        return float("nan")
    X, t, e, _ = cohort.design([center])
    return harrell(X @ beta, t, e)


# --------------------------------------------------------------------------- the benchmark

def prepare(name: str, work: Path, seed: int, console) -> tuple[Cohort, list[str], dict]:
    """Write cohort ``name``, run ``newadj schema`` on it; (cohort, the run's overrides, site counts)."""
    from common.config import feature_overrides, load_config
    from server.ops.simulation import run_simulation
    from server.schema import FEATURES_YAML

    path = work / name / "cohort"
    counts = COHORTS[name](path, seed)
    base = [f"seed={seed}"]
    schema_dir = work / name / "schema"
    run_simulation(path, schema_dir, base, console=console, stream=False, mode="schema")
    overrides = base + feature_overrides(schema_dir / FEATURES_YAML)
    return Cohort(path, load_config(overrides)), overrides, counts


def _mean(vals):
    vals = [v for v in vals if v is not None and np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def run_fold(cohort: Cohort, h: str, seed: int, timing: dict, cox_log: CoxFitLog, grid=LAMBDA_GRID) -> dict:
    """Every non-federated arm of the fold that holds out ``h``."""
    from common.learn.baseline import train_arm
    from common.learn.dataset import ConcatSites

    cfg, ext = cohort.cfg, cohort.external
    others = [c for c in cohort.centers if c != h]
    arms: dict = {}

    def timed(arm, fn):
        t0 = time.perf_counter()
        out = fn()
        timing[arm] = timing.get(arm, 0.0) + time.perf_counter() - t0
        return out

    def engine(trd, vad):
        model, res = train_arm(cfg, trd, vad, seed=seed)   # seeded before the model is built
        return {"loco": engine_c(model, cohort.all[h]), "external": engine_c(model, cohort.all[ext]),
                "best_epoch": res.best_epoch, "n_train": res.n_train, "n_val": res.n_val}

    arms["pooled_engine"] = timed("pooled_engine", lambda: engine(ConcatSites([cohort.train[c] for c in others]),
                                                                   ConcatSites([cohort.val[c] for c in others])))

    def pooled():
        r = pooled_cox(cohort, others, seed, cox_log, grid)
        return {"loco": cox_c(cohort, r["beta"], h), "external": cox_c(cohort, r["beta"], ext),
                "lambda": r["lambda"], "cv_c": {str(k): v for k, v in r["cv_c"].items()},
                "n_train": r["n_train"], "events_train": r["events_train"],
                "coef": dict(zip(cohort.features(), (r["beta"] if r["beta"] is not None else []).tolist()))}

    def local(kind, c):
        if kind == "engine":
            return engine(cohort.train[c], cohort.val[c])
        r = local_cox(cohort, c, cox_log)
        return {"loco": cox_c(cohort, r["beta"], h), "external": cox_c(cohort, r["beta"], ext),
                "lambda": r["lambda"], "n_train": r["n_train"]}

    arms["pooled_cox"] = timed("pooled_cox", pooled)
    for kind in ("cox", "engine"):
        per = {c: timed(f"local_{kind}", lambda: local(kind, c)) for c in others}
        arms.update({f"local_{kind}:{c}": r for c, r in per.items()})
        scored = {c: r for c, r in per.items() if np.isfinite(r["loco"])}
        best = max(scored, key=lambda c: scored[c]["loco"]) if scored else None
        arms[f"local_{kind}:best"] = {"loco": scored[best]["loco"] if best else float("nan"),
                                      "external": scored[best]["external"] if best else float("nan"),
                                      "center": best, "basis": "max over the fold's centers of the held-out C "
                                                               "(an oracle choice on the held-out center)"}
        arms[f"local_{kind}:mean"] = {"loco": _mean(r["loco"] for r in per.values()),
                                      "external": _mean(r["external"] for r in per.values())}
    return arms


def fed_fold(cohort: Cohort, h: str, run_dir: Path, overrides: list[str], console) -> dict:
    """One federated LOCO fold: the held-out center's own report, the external center scored here."""
    from common.federation.model_io import load_model_package
    from server.ops.simulation import RunFailed, run_simulation

    try:
        m = run_simulation(cohort.path, run_dir, [*overrides, f"federation.holdout_center={h}"], console=console,
                           stream=False)
    except RunFailed as exc:
        return {"loco": float("nan"), "external": float("nan"), "failed": str(exc)}
    rep = ((m.get("external") or {}).get("centers") or {}).get(h) or {}
    ci = rep.get("c_index")
    reported = ci.get("value") if isinstance(ci, dict) else ci
    here: dict = {}
    try:   # the selected model scored here: the external center (sealed in the run) and the held-out one again
        model, _ = load_model_package(run_dir / "best_model.pt", m["best_model"]["sha256"])
        here = {"loco_rescored_here": engine_c(model, cohort.all[h]),
                "external": engine_c(model, cohort.all[cohort.external])}
    except Exception as exc:   # noqa: BLE001 - a variant whose package this benchmark cannot score: say so
        here = {"external": float("nan"), "external_error": f"{type(exc).__name__}: {exc}"[:300]}
    if m.get("cox"):
        here["cox_vs_lifelines"] = cox_gap(cohort, m["cox"])
    out = {"loco": float(reported) if reported is not None else float("nan"),
           "loco_ci": [rep.get("c_index_lo"), rep.get("c_index_hi")], **here,
           "n_held_out": rep.get("n_dfs"), "events_held_out": rep.get("n_events"),
           "dfs_abstained": rep.get("dfs_abstained"), "selected_round": m.get("selected_round"),
           "selection": m.get("selection"), "wall_seconds": m.get("wall_seconds"),
           "notices": _notices(run_dir) + [str(n) for n in (m.get("external") or {}).get("notices") or []]}
    return out


def cox_gap(cohort: Cohort, cox: dict) -> dict:
    """The federated Cox model (``model=cox``) against lifelines on the pooled data of the same centers, with the
    penalizer the federation chose (``penalizer / sd**2`` per covariate undoes lifelines' normalisation): the
    largest coefficient difference."""
    import pandas as pd
    from lifelines import CoxPHFitter

    centers = sorted(cox["centers"])
    X, t, e, s = cohort.design(centers)
    names = cohort.features()
    df = pd.DataFrame(X, columns=names)
    df["T"], df["E"], df["S"] = t, e, s
    sd = df[names].std(0).to_numpy()
    cph = CoxPHFitter(penalizer=float(cox["penalizer"]) / sd ** 2, strata=["S"])
    cph.fit(df, "T", "E", fit_options={"precision": 1e-12, "r_precision": 1e-15, "max_steps": 200})
    fed = {r["covariate"]: r["coef"] for r in cox["coefficients"]}
    gap = max(abs(fed[n] - float(cph.params_[n])) for n in names)
    return {"max_abs_coef_diff": float(gap), "penalizer": float(cox["penalizer"]), "rounds": cox["rounds"]}


def _notices(run_dir: Path) -> list[str]:
    """What a federated run said besides its numbers: its notes and warnings, and how many training centers
    abstained from validation in its rounds (a site's floors withhold a split's metrics below them)."""
    from server.progress import EVENTS_FILE

    seen: Counter = Counter()
    abstained = Counter()
    path = run_dir / EVENTS_FILE
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("event") == "round":
            abstained[f"{ev.get('abstained')} of {ev.get('answered')}"] += 1
        elif ev.get("event") in ("note", "log") and ev.get("level", "warning") in ("warning", "error"):
            seen[str(ev.get("text"))[:300]] += 1
    out = [f"{k} (x{v})" if v > 1 else k for k, v in seen.items()]
    out += [f"validation abstained at {k} training centers in {v} rounds" for k, v in abstained.items()]
    return out


def fed_arms_of(specs: list[str]) -> dict[str, list[str]]:
    """``--fed-arm NAME=OVERRIDES`` -> {fed:NAME: [overrides]} (after the default arm ``fed_engine``)."""
    arms = {"fed_engine": []}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if not sep or not name.strip():
            raise SystemExit(f"--fed-arm {spec!r}: write NAME=OVERRIDE [OVERRIDE ...]")
        arms[f"fed:{name.strip()}"] = rest.split()
    return arms


def summarise(folds: dict, timing: dict) -> dict:
    arms = []
    for f in folds.values():
        arms += [a for a in f["arms"] if a not in arms]
    out = {}
    for a in arms:
        row = {}
        for key in ("loco", "external"):
            vals = {h: f["arms"][a][key] for h, f in folds.items() if a in f["arms"]}
            ok = [v for v in vals.values() if v is not None and np.isfinite(v)]
            row[key] = {"mean": float(np.mean(ok)) if ok else None,
                        "sd": float(statistics.stdev(ok)) if len(ok) > 1 else None,
                        "folds": vals, "n_folds": len(ok)}
        base = a.split(":")[0]
        row["seconds"] = timing.get(a, timing.get(base) if base in ("local_cox", "local_engine") else None)
        out[a] = row
    return out


def run_cohort(name: str, args, console) -> dict:
    work = Path(args.work)
    t0 = time.perf_counter()
    cohort, overrides, counts = prepare(name, work, args.seed, console)
    schema_s = time.perf_counter() - t0
    held = cohort.centers[:2] if args.quick else list(cohort.centers)
    timing: dict = {}
    cox_log = CoxFitLog()
    folds: dict = {}
    for h in held:
        X, t, e, _ = cohort.design([h])
        folds[h] = {"n_held_out": int(len(t)), "events_held_out": int(e.sum()),
                    "train_centers": [c for c in cohort.centers if c != h],
                    "arms": run_fold(cohort, h, args.seed, timing, cox_log, args.lambda_grid)}
        print(json.dumps({"cohort": name, "held_out": h,
                          **{a: round(v["loco"], 3) for a, v in folds[h]["arms"].items()
                             if ":" not in a or a.endswith((":best", ":mean"))}}), flush=True)
    fed_arms = {} if args.skip_fed else fed_arms_of(args.fed_arm)
    if getattr(args, "no_default_fed", False):
        fed_arms.pop("fed_engine", None)
    fed_base = overrides + (["federation.num_rounds=3"] if args.quick else []) + list(args.fed_overrides)
    for arm, extra in fed_arms.items():
        for h in held:
            t1 = time.perf_counter()
            r = fed_fold(cohort, h, work / name / arm.replace(":", "-") / h, fed_base + extra, console)
            timing[arm] = timing.get(arm, 0.0) + time.perf_counter() - t1
            folds[h]["arms"][arm] = r
            print(json.dumps({"cohort": name, "held_out": h, arm: round(r["loco"], 3),
                              "external": round(r["external"], 3), "selected_round": r.get("selected_round"),
                              **({"failed": r["failed"][:200]} if "failed" in r else {})}), flush=True)
    return {"cohort": name, "seed": args.seed, "quick": bool(args.quick), "site_patients": counts,
            "features": cohort.features(), "scaling": _plain(cohort.cfg.data.get("scaling")),
            "centers": cohort.centers, "held_out_centers": held, "external": cohort.external,
            "n": {c: {"train": len(cohort.train[c]), "val": len(cohort.val[c])} for c in cohort.centers},
            "overrides": overrides, "fed_overrides": list(args.fed_overrides) + (["federation.num_rounds=3"]
                                                                                if args.quick else []),
            "fed_arms": fed_arms, "lambda_grid": list(args.lambda_grid), "local_lambda": LOCAL_LAMBDA,
            "cox_fits": cox_log.as_dict(), "schema_seconds": schema_s,
            "basis": "leave-one-center-out over the training centers (Harrell's C on all patients of the held-out "
                     "center); the external center is scored, not ruled on",
            "summary": summarise(folds, timing), "folds": folds, "seconds": time.perf_counter() - t0}


def _plain(v):
    from common.config import to_plain

    return to_plain(v)


def _f(v) -> str:
    return "  n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def table(res: dict) -> str:
    held = res["held_out_centers"]
    short = [h.replace("center_", "") for h in held]
    sizes = ", ".join(f"{s} n={res['folds'][h]['n_held_out']}" for s, h in zip(short, held))
    head = "per fold (" + " ".join(short) + ")"
    width = max(len(head), 6 * len(held)) + 1
    lines = [f"{res['cohort']}: leave-one-center-out C over {len(held)} held-out centers ({sizes}); "
             f"external n={res['site_patients'][res['external']]} (not ruled on)",
             f"{'arm':<18}| {'LOCO C mean ± SD':<17}| {head:<{width}}| {'external':<14}| s"]
    for a, row in res["summary"].items():
        if a.startswith(("local_cox:", "local_engine:")) and not a.endswith((":best", ":mean")):
            continue
        lo, ex = row["loco"], row["external"]
        per = " ".join(_f(row["loco"]["folds"].get(h)) for h in held)
        secs = "" if row["seconds"] is None else f"{row['seconds']:.0f}"
        lines.append(f"{a:<18}| {_f(lo['mean'])} ± {_f(lo['sd']):<9}| {per:<{width}}| {_f(ex['mean'])} ± {_f(ex['sd'])}"
                     f" | {secs}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cohort", action="append", default=None,
                    help="lung | gbsg2 (repeatable or comma-separated; default lung)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="runs/bench-real")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"),
                    help="where real_<cohort>.json is written")
    ap.add_argument("--quick", action="store_true",
                    help="only the first 2 held-out centers, federation.num_rounds=3 (for tests)")
    ap.add_argument("--skip-fed", action="store_true", help="no federated arm")
    ap.add_argument("--no-default-fed", action="store_true",
                    help="only the --fed-arm federations (not the project-default fed_engine)")
    ap.add_argument("--fed-overrides", nargs="*", default=[], help="overrides for every federated arm")
    ap.add_argument("--cox-gap", metavar="ARM", default=None,
                    help="no new run: for the finished federated arm ARM (e.g. fed:cox) under --work, compare each "
                         "fold's Cox coefficients with lifelines' (-> real_<cohort>_cox_gap.json)")
    ap.add_argument("--fed-arm", action="append", default=[], metavar="NAME=OVERRIDES",
                    help="one more federated arm fed:NAME with these space-separated overrides (repeatable), "
                         "e.g. --fed-arm 'cv5=federation.cv_folds=5'")
    ap.add_argument("--lambda-grid", type=float, nargs="+", default=list(LAMBDA_GRID),
                    help="the pooled Cox arm's ridge penalties, chosen by 5-fold CV inside each fold")
    ap.add_argument("--verbose", action="store_true", help="the runs' own console lines")
    args = ap.parse_args(argv)
    from rich.console import Console

    from common.hashing import json_safe

    names = [n.strip() for spec in (args.cohort or ["lung"]) for n in spec.split(",") if n.strip()]
    bad = [n for n in names if n not in COHORTS]
    if bad:
        ap.error(f"--cohort {', '.join(bad)}: choose from {', '.join(COHORTS)}")
    console = Console(quiet=not args.verbose)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.cox_gap:
        from common.config import load_config

        for name in names:
            done = json.loads((out_dir / f"real_{name}.json").read_text())
            cohort = Cohort(Path(args.work) / name / "cohort", load_config(done["overrides"]))
            gaps = {h: cox_gap(cohort, json.loads((Path(args.work) / name / args.cox_gap.replace(":", "-") / h /
                                                   "metrics.json").read_text())["cox"]) for h in done["folds"]}
            path = out_dir / f"real_{name}_cox_gap.json"
            path.write_text(json.dumps(gaps, indent=1))
            print(f"{name}: largest coefficient difference {max(g['max_abs_coef_diff'] for g in gaps.values()):.1e} "
                  f"over {len(gaps)} folds -> {path}", flush=True)
        return 0
    for name in names:
        res = run_cohort(name, args, console)
        path = out_dir / f"real_{name}.json"
        path.write_text(json.dumps(json_safe(res), indent=1, allow_nan=False))
        print(table(res), flush=True)
        print(f"-> {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
