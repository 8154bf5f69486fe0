"""Synthetic multi-center HCC cohort generator.

``generate_cohort(out_dir, seed, scale, cfg)`` writes a cohort folder with one
sub-folder per center in exactly the layout of the site data contract
(``shared/data-contract.md``)::

    out_dir/
      _truth.csv            # ground truth, OUTSIDE every site folder
      _cohort.json          # summary + seed + scale
      center_a/ ... center_f/ external/
        site.toml           # center_id, display_name, role (train | external)
        clinical.csv        # patient_id, benefit, dfs_months, dfs_event, split (empty), covariates
        genomics.csv        # patient_id + federation gene features (some untested per site)
        mri/<pid>/<phase>.nii.gz          # NIfTI (nibabel) ...
        mri/<pid>/<phase>/IM0001.dcm ...  # ... or a DICOM MR series (pydicom) for one center
        mri/<pid>/tumor_mask.nii.gz       # present for most patients
        pathology/<pid>.tiff              # pyramidal tiled JPEG TIFF with mpp metadata

Every tunable number is in ``conf/synth/default.yaml``.

Latent model (the ground truth)
-------------------------------
Each patient has independent latent factors ``z_mri, z_path, z_gen, z_clin ~ N(0,1)``::

    logit     = b0 + site.b0_offset + a_mri*z_mri + a_path*z_path + a_gen*z_gen + a_clin*z_clin
    true_prob = sigmoid(logit)
    benefit   ~ Bernoulli(true_prob)

With the default ``a_mri = a_path = a_gen = 1.3``, ``a_clin = 0.4`` the oracle AUC of
``true_prob`` is about 0.88, each single latent alone gives about 0.71 and any two
about 0.80, so a multimodal model can beat every single-modality model.

How each latent shows in the data:

* ``z_mri`` (MRI): the tumor's arterial-phase enhancement relative to liver
  (``1 + enh0 + enh_z*z_mri``), its portal/delayed washout (``wash0 + wash_z*z_mri``)
  and its texture heterogeneity (noise sd ``tex0*exp(tex_z*z_mri)``). All are ratios
  to the surrounding liver, so they survive per-volume intensity normalisation and a
  crop around the tumor. Tumor size/position, necrosis, bias field, gain and the
  scanner scale/offset/noise/grid/orientation are nuisances.
* ``z_path`` (pathology): density of small, dark, clustered lymphocyte nuclei
  within tissue (``lymph_density0*exp(lymph_z*z_path)`` per 1000 um^2). Tumor nuclei
  density, tissue fraction and the per-center stain colour shift (stain vectors,
  concentrations, background) are nuisances.
* ``z_gen`` (genomics): P(CTNNB1_mut) = sigmoid(-1.3 - 1.0*z_gen); CXCL9_expr,
  IFNG_expr, CD274_expr = coef*z_gen + noise. All other genes are noise.
* ``z_clin`` (clinical): log10(AFP) = mean - 0.6*z_clin + noise; small weight.

DFS (months) is Weibull with proportional hazards,
``log HR = hr_benefit*benefit + hr_latent*(z_mri+z_path+z_gen)/sqrt(3) + hr_clin*z_clin``
(lower hazard for benefit = 1), censored administratively at a follow-up time
~ U(followup_min, followup_max) (about 30 % censored).

Missing modalities are drawn per patient (no MRI, one phase missing, no tumor mask,
no slide, no genomics row) with configurable rates; never all three at once.

Determinism: every random draw comes from ``numpy.random.default_rng`` seeded with
``(seed, site index, patient index, stream)``, so the same seed and scale give
byte-identical files whatever the number of workers.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import pandas as pd

from common.config import deep_merge
from common.synth._config import DATA_CONFIG, DEFAULT_CONFIG, load_config  # noqa: F401
from common.synth.mri import _mri_volumes, _write_mri  # noqa: F401
from common.synth.pathology import _slide_rgb, _write_slide  # noqa: F401
from common.synth.shift import apply_shift_and_signal, describe
from common.synth.tables import _genomics, _site_tables  # noqa: F401

TRUTH_FILE = "_truth.csv"
COHORT_FILE = "_cohort.json"


# --------------------------------------------------------------------------- worker
def _patient_job(task: dict) -> dict:
    out = {"site": task["site_name"], "pid": task["pid"], "mri": None, "slide": False}
    if task["do_mri"]:
        out["mri"] = _write_mri(task)
    if task["do_slide"]:
        rgb, mpp = _slide_rgb(task)
        _write_slide(Path(task["site_dir"]) / "pathology" / f"{task['pid']}.tiff", rgb, mpp, task["path_cfg"])
        out["slide"] = True
    return out


def _write_site_toml(path: Path, site: dict, site_idx: int):
    def q(s):
        return json.dumps(str(s))  # TOML basic strings are JSON-compatible for plain text

    lines = [
        f"center_id = {q(site.get('center_id', site['name']))}",
        f"display_name = {q(site.get('display_name', site['name']))}",
        f"role = {q(site.get('role', 'train'))}",
        f"notes = {q('synthetic cohort (common/synth.py); scanner ' + str(site['mri'].get('format', 'nifti')))}",
    ]
    path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- main entry
# every synthetic site's own policy: the default rules, and runs may set the seed and the bootstrap count
# (development: `bench_quality.py --seeds`, the tests' short bootstraps); a real site's default refuses both
DEVELOPMENT_POLICY = """# a synthetic development site (`newadj synth`): the default rules (conf/policy/default.yaml); runs may
# also set the training seed and the bootstrap count, which a real site's defaults refuse
allowed_run_keys_extra = ["seed", "train.n_boot"]
"""


def generate_cohort(out_dir: Path, seed: int = 0, scale: float = 1.0, cfg: dict | None = None,
                    progress: bool = True, workers: int | None = None) -> dict:
    """Write a synthetic multi-center cohort to ``out_dir``; returns the summary dict.

    ``cfg`` is (part of) ``conf/synth/default.yaml`` as a plain dict, merged over the
    default. ``workers``: processes for the image writing (default: CPU count;
    1 = in-process). Existing site folders of the same names are replaced.
    """
    t0 = time.perf_counter()
    cfg = apply_shift_and_signal(load_config(cfg))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    phases = list(cfg["phases"])
    endpoints = set(cfg.get("endpoints") or ())
    modalities = set(cfg.get("modalities") or ())
    for what, got, known in (("endpoints", endpoints, {"benefit", "dfs"}),
                             ("modalities", modalities, {"mri", "pathology", "genomics"})):
        if got - known:
            raise ValueError(f"synth.{what}: unknown {sorted(got - known)} (choose from {sorted(known)})")

    sites = cfg["sites"]
    tasks: list[dict] = []
    truths, summary_sites = [], {}
    for si, site in enumerate(sites):
        n = max(int(cfg.get("min_site_patients", 8)), int(round(float(site["n"]) * float(scale))))
        sdir = out_dir / site["name"]
        if sdir.exists():
            shutil.rmtree(sdir)
        sdir.mkdir(parents=True)
        pids, clinical, genomics, truth, fl, (z_mri, z_path) = _site_tables(cfg, site, si, n, seed)
        _write_site_toml(sdir / "site.toml", site, si)
        (sdir / "policy.toml").write_text(DEVELOPMENT_POLICY)
        keep = ["patient_id", *(["benefit"] if "benefit" in endpoints else []),
                *(["dfs_months", "dfs_event"] if "dfs" in endpoints else []), "split"]
        if cfg.get("clinical_covariates", True):
            keep += [c for c in clinical.columns if c not in ("patient_id", "benefit", "dfs_months", "dfs_event",
                                                              "split")]
        clinical[keep].to_csv(sdir / "clinical.csv", index=False)
        if "genomics" in modalities:
            genomics.to_csv(sdir / "genomics.csv", index=False)
        fl["no_mri"] |= "mri" not in modalities
        fl["no_slide"] |= "pathology" not in modalities
        truths.append(truth)
        path_cfg = deep_merge(cfg["pathology"], site.get("pathology") or {})
        scanner = dict(site["mri"])
        if scanner.get("format", "nifti") == "dicom":
            ax = scanner.get("axcodes", "LPS").upper()
            if ax[:2] != "LP":
                raise ValueError(f"{site['name']}: DICOM sites need axcodes starting with 'LP' (got {ax})")
        for i, pid in enumerate(pids):
            do_mri = not fl["no_mri"][i]
            do_slide = not fl["no_slide"][i]
            if not (do_mri or do_slide):
                continue
            tasks.append(dict(
                seed=int(seed), site_idx=si, pidx=i, pid=pid, site_name=site["name"], site_dir=str(sdir),
                phases=phases, mri_cfg=cfg["mri"], scanner=scanner, path_cfg=path_cfg,
                stain=site.get("stain") or {}, z_mri=float(z_mri[i]), z_path=float(z_path[i]),
                signal=cfg["signal"],
                do_mri=do_mri, do_slide=do_slide, incomplete=bool(fl["incomplete"][i]),
                drop_phase=int(fl["drop_phase"][i]), no_mask=bool(fl["no_mask"][i]),
            ))
        n_mri_complete = int((~fl["no_mri"] & ~fl["incomplete"]).sum())
        summary_sites[site["name"]] = {
            "role": site.get("role", "train"),
            "display_name": site.get("display_name", site["name"]),
            "n_patients": n,
            "n_mri": int((~fl["no_mri"]).sum()),
            "n_mri_complete": n_mri_complete,
            "n_tumor_mask": int((~fl["no_mri"] & ~fl["no_mask"]).sum()),
            "n_pathology": int((~fl["no_slide"]).sum()),
            "n_genomics": int((~fl["no_gen"]).sum()) if "genomics" in modalities else 0,
            "n_labeled": int(clinical["benefit"].notna().sum()) if "benefit" in endpoints else 0,
            "n_benefit": int(truth["benefit"].sum()),
            "mri_format": scanner.get("format", "nifti"),
            "mri_shape": [int(s) for s in scanner["shape"]],
            "mri_spacing": [float(s) for s in scanner["spacing"]],
            "mri_axcodes": scanner.get("axcodes", "RAS"),
            "slide_mpp": float(path_cfg["mpp"]),
            "slide_size_px": [int(s) for s in path_cfg["size_px"]],
        }

    truth_df = pd.concat(truths, ignore_index=True)
    truth_df.to_csv(out_dir / TRUTH_FILE, index=False)

    # ---- images (the expensive part) ----
    if workers is None:
        workers = os.cpu_count() or 1
    workers = max(1, min(int(workers), len(tasks) or 1))
    # slides dominate the cost: schedule slide jobs first for better load balance
    order = sorted(range(len(tasks)), key=lambda k: (not tasks[k]["do_slide"], k))
    _run_jobs([tasks[k] for k in order], workers, progress)

    summary = {
        "seed": int(seed),
        "scale": float(scale),
        "phases": phases,
        "genomic_features": list(cfg["genomic_features"]),
        "n_patients": int(sum(s["n_patients"] for s in summary_sites.values())),
        "n_train_patients": int(sum(s["n_patients"] for s in summary_sites.values() if s["role"] != "external")),
        "sites": summary_sites,
        "oracle_auc_external": _safe_auc(truth_df[truth_df["role"] == "external"]),
        "oracle_auc_all": _safe_auc(truth_df),
        "truth_csv": TRUTH_FILE,
        **describe(cfg),
    }
    (out_dir / COHORT_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    summary = dict(summary, elapsed_s=round(time.perf_counter() - t0, 2), out_dir=str(out_dir))
    return summary


def _run_jobs(tasks: list[dict], workers: int, progress: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    cols = (TextColumn("[bold]synth[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*cols, disable=not progress, transient=False) as bar:
        tid = bar.add_task("patients", total=len(tasks))
        if workers <= 1:
            for t in tasks:
                _patient_job(t)
                bar.advance(tid)
            return
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                                 initializer=_worker_init) as ex:
            futs = [ex.submit(_patient_job, t) for t in tasks]
            for f in as_completed(futs):
                f.result()
                bar.advance(tid)


def _worker_init():  # keep every worker single-threaded (we parallelise over patients)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(k, "1")


# --------------------------------------------------------------------------- oracle
def _safe_auc(df: pd.DataFrame) -> float | None:
    from sklearn.metrics import roc_auc_score

    if len(df) == 0 or df["benefit"].nunique() < 2:
        return None
    return float(roc_auc_score(df["benefit"], df["true_prob"]))


def oracle_auc(truth_csv, site: str | None = None) -> float | None:
    """AUC of the true benefit probability vs the drawn benefit label.

    ``site=None``: the external site(s) (``role == "external"``; falls back to the site
    named ``external``); ``site="all"``: every patient; otherwise that site's name.
    Returns None when the selection has a single class.
    """
    df = pd.read_csv(truth_csv)
    if site is None:
        sel = df[df["role"] == "external"] if "role" in df else df[df["site"] == "external"]
    elif site == "all":
        sel = df
    else:
        sel = df[df["site"] == site]
    return _safe_auc(sel)
