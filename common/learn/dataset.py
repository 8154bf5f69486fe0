"""Training data: one site's preprocessed cache as a torch Dataset.

Reads only ``<cache>/manifest[-<key>].json`` and the arrays it points to (never the raw
site files).  ``collate`` pads pathology bags and yields the batch dict the
model consumes: ``mri``/``has_mri``, ``path_feats``/``path_mask``/``has_path``,
``genomics``/``genomics_mask``/``has_genomics``, ``clinical``/``clinical_mask``,
``benefit``/``dfs_time``/``dfs_event`` (NaN where unknown).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from common.preprocess.cache import load_manifest, manifest_path

log = logging.getLogger(__name__)
_SITE_TILE_STATS: dict = {}  # (stats file, mtime) -> (mean, std) of the site's tile features


def _nan(v) -> float:
    return float("nan") if v is None else float(v)


class SiteDataset(Dataset):
    """Patients of one site (optionally one or more splits), all arrays held in memory."""

    def __init__(self, cache_dir: Path, splits: Iterable[str] | None = None, max_tiles: int | None = None,
                 path_norm: str = "site", scaling: dict | None = None, mri_shape: Sequence[int] | None = None):
        # a cache folder (its latest manifest) or one configuration's manifest-<key>.json in it
        self.cache_dir = manifest_path(cache_dir)[0]
        self.manifest = load_manifest(cache_dir)
        self.center_id = self.manifest["center_id"]
        self.role = self.manifest["role"]
        wanted = set(splits) if splits else None
        patients = [p for p in self.manifest["patients"] if wanted is None or p["split"] in wanted]
        n_phases = len(self.manifest["phases"])
        # a site without any MRI still batches with those that have one: the run's shape, not a guess
        self.has_mri_shape = bool(self.manifest["mri_shape"])
        self.mri_shape = tuple(self.manifest["mri_shape"] or mri_shape or (n_phases, 8, 8, 8))
        self.has_path_dim = bool(self.manifest["path_dim"])
        self.path_dim = int(self.manifest["path_dim"] or 1)
        self.n_genes = len(self.manifest["genomic_features"])
        self.n_clinical = len(self.manifest["clinical_features"])
        self.skipped: list[dict] = []  # samples whose cached array could not be read
        self.items: list[dict] = []
        gscale = feature_scaling(self.manifest["genomic_features"], scaling)
        cscale = feature_scaling(self.manifest["clinical_features"], scaling)
        for p in patients:
            item = {
                "patient_id": p["patient_id"], "split": p["split"],
                "benefit": _nan(p["benefit"]), "dfs_time": _nan(p["dfs_months"]), "dfs_event": _nan(p["dfs_event"]),
                "genomics": gscale(p["genomics"]), "genomics_mask": np.array(p["genomics_observed"], bool),
                "clinical": cscale(p["clinical"]), "clinical_mask": np.array(p["clinical_observed"], bool),
                "mri": None, "path": None,
            }
            if p.get("mri"):
                item["mri"] = self._load(p, "mri", lambda f: np.load(f).astype(np.float32))
            if p.get("pathology"):
                def _bag(f):
                    with np.load(f) as z:
                        feats = z["features"].astype(np.float32)
                    return feats[:max_tiles] if max_tiles else feats
                item["path"] = self._load(p, "pathology", _bag)
                if item["path"] is not None and len(item["path"]) == 0:
                    item["path"] = None
            self.items.append(item)
        if path_norm == "site":
            self._standardise_bags()
        elif path_norm not in ("none", None):
            raise ValueError(f"path_norm={path_norm!r}: choose site or none")

    def _standardise_bags(self) -> None:
        """Per-feature z-score of tile embeddings with this site's own statistics (:func:`tile_stats`)."""
        stats = tile_stats(self.cache_dir, self.manifest)
        if stats is None:
            return
        mean, std = stats
        for it in self.items:
            if it["path"] is not None:
                it["path"] = np.clip((it["path"] - mean) / std, -10, 10).astype(np.float32)

    def _load(self, p: dict, modality: str, reader):
        f = self.cache_dir / p[modality]
        try:
            arr = reader(f)
            if not np.all(np.isfinite(arr)):
                raise ValueError("non-finite values")
            return arr
        except Exception as exc:  # a corrupt cached file: skip this modality of this patient, count it
            log.warning("%s: %s of %s skipped: %s", f, modality, p["patient_id"], exc)
            self.skipped.append({"patient_id": p["patient_id"], "modality": modality, "file": str(f), "error": str(exc)})
            return None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]

    @property
    def labels(self) -> np.ndarray:
        return np.array([it["benefit"] for it in self.items], float)

    def modality_counts(self) -> dict:
        return {
            "mri": sum(it["mri"] is not None for it in self.items),
            "pathology": sum(it["path"] is not None for it in self.items),
            "genomics": sum(bool(it["genomics_mask"].any()) for it in self.items),
        }


TILE_STATS = "tile_stats.npz"   # <cache>/tile_stats-<pathology config>.npz


def tile_stats(cache_dir: Path, manifest: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean, std) of every tile embedding of the site, frozen in ``<cache>/tile_stats.npz`` the first time.

    Label-free and the site's own, so the external center does the same at evaluation
    time; it removes the site's stain/scanner offset and puts hand-crafted features of
    very different scales on one footing.  Frozen: a patient screened later, or added to
    the site, is scored with the same statistics (delete the file to recompute them).
    """
    # one file per pathology configuration (another encoder makes other embeddings)
    enc = str((manifest.get("config") or {}).get("pathology", ""))[:12]
    path = Path(cache_dir) / (TILE_STATS.replace(".npz", f"-{enc}.npz") if enc else TILE_STATS)
    key = (str(path), path.stat().st_mtime_ns if path.exists() else None)
    if key in _SITE_TILE_STATS:
        return _SITE_TILE_STATS[key]
    if path.exists():
        with np.load(path) as z:
            stats = (z["mean"], z["std"])
    else:
        bags = []
        for p in manifest["patients"]:
            if p.get("pathology"):
                try:
                    with np.load(Path(cache_dir) / p["pathology"]) as z:
                        bags.append(z["features"].astype(np.float64))
                except Exception:  # unreadable bags are reported when loaded
                    continue
        if not any(len(b) for b in bags):
            return None
        tiles = np.concatenate([b for b in bags if len(b)])
        stats = (tiles.mean(0), np.maximum(tiles.std(0), 1e-6))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, mean=stats[0], std=stats[1], n_tiles=len(tiles), n_patients=len(bags))
        os.replace(tmp, path)
        key = (str(path), path.stat().st_mtime_ns)
    _SITE_TILE_STATS[key] = stats
    return stats


def feature_scaling(names: Sequence[str], scaling: dict | None):
    """A function from one patient's tabular values (None or NaN = missing) to the model's inputs.

    ``scaling`` (``data.scaling``, written by ``newadj schema`` from the training centers' pooled
    moments) is a list of ``{name, log, center, scale}``: ``((log1p(x) if log else x) - center) / scale``.
    A missing value enters as 0.  For a feature with a rule, 0 in the scaled space is the pooled mean
    (``center``): the value is imputed from the training centers' pooled moments, never entered as a raw 0,
    also at a center that lacks the feature (``missing_by_site`` of the feature file).  A feature the list
    does not name is passed as it is, and a missing value of it enters as a raw 0.
    """
    from common.config import to_plain

    spec = {str(r["name"]): r for r in (to_plain(scaling) or [])}
    rules = [spec.get(n) for n in names]

    def apply(values) -> np.ndarray:
        out = np.zeros(len(values), np.float32)
        for j, (v, r) in enumerate(zip(values, rules)):
            if v is None or (isinstance(v, float) and np.isnan(v)):
                continue
            x = float(v)
            if r:
                x = (np.log1p(max(x, 0.0)) if r.get("log") else x) - float(r.get("center", 0.0))
                x /= float(r.get("scale", 1.0)) or 1.0
            out[j] = x
        return out

    return apply


def site_dataset(cache_dir: Path, splits: Iterable[str] | None, cfg) -> SiteDataset:
    """A site's dataset with the run config's loading options (the one way the code opens one)."""
    roi = [int(v) for v in cfg.preprocess.mri.roi_size]
    return SiteDataset(cache_dir, splits, max_tiles=cfg.train.max_tiles, path_norm=str(cfg.train.path_norm),
                       scaling=cfg.data.get("scaling"), mri_shape=(len(cfg.data.phases), *roi))


class _Items(Dataset):
    """A dataset that is a list of patient items (``self.items``)."""

    items: list

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    @property
    def labels(self) -> np.ndarray:
        return np.array([it["benefit"] for it in self.items], float)


class ConcatSites(_Items):
    """Several sites' datasets as one (pooled baseline)."""

    def __init__(self, datasets: Sequence[SiteDataset]):
        self.datasets = list(datasets)
        self.items = [it for d in self.datasets for it in d.items]
        first = self.datasets[0]
        # the MRI shape of a site that has MRI (an MRI-less site's shape is only the config's fallback)
        self.has_mri_shape = any(d.has_mri_shape for d in self.datasets)
        self.mri_shape = next((d.mri_shape for d in self.datasets if d.has_mri_shape), first.mri_shape)
        self.has_path_dim = any(d.has_path_dim for d in self.datasets)
        self.path_dim = next((d.path_dim for d in self.datasets if d.has_path_dim), first.path_dim)
        self.n_genes, self.n_clinical = first.n_genes, first.n_clinical
        self.center_id = "+".join(d.center_id for d in self.datasets)


def make_collate(mri_shape: Sequence[int], path_dim: int):
    mri_shape = tuple(mri_shape)

    def collate(samples: list[dict]) -> dict:
        b = len(samples)
        n_max = max([len(s["path"]) for s in samples if s["path"] is not None] or [1])
        mri = torch.zeros((b, *mri_shape))
        feats = torch.zeros((b, n_max, path_dim))
        pmask = torch.zeros((b, n_max), dtype=torch.bool)
        for i, s in enumerate(samples):
            if s["mri"] is not None:
                mri[i] = torch.from_numpy(s["mri"])
            if s["path"] is not None:
                n = len(s["path"])
                feats[i, :n] = torch.from_numpy(s["path"])
                pmask[i, :n] = True
        gm = torch.from_numpy(np.stack([s["genomics_mask"] for s in samples]))
        return {
            "mri": mri,
            "has_mri": torch.tensor([s["mri"] is not None for s in samples]),
            "path_feats": feats, "path_mask": pmask,
            "has_path": torch.tensor([s["path"] is not None for s in samples]),
            "genomics": torch.from_numpy(np.stack([s["genomics"] for s in samples])),
            "genomics_mask": gm, "has_genomics": gm.any(dim=1),
            "clinical": torch.from_numpy(np.stack([s["clinical"] for s in samples])),
            "clinical_mask": torch.from_numpy(np.stack([s["clinical_mask"] for s in samples])),
            "benefit": torch.tensor([s["benefit"] for s in samples], dtype=torch.float32),
            "dfs_time": torch.tensor([s["dfs_time"] for s in samples], dtype=torch.float32),
            "dfs_event": torch.tensor([s["dfs_event"] for s in samples], dtype=torch.float32),
        }

    return collate


class Subset(_Items):
    """Some patients of a dataset (a cross-validation fold), with the attributes the engine reads."""

    def __init__(self, base, indices: Sequence[int]):
        self.items = [base.items[i] for i in indices]
        for attr in ("has_mri_shape", "mri_shape", "has_path_dim", "path_dim", "n_genes", "n_clinical", "center_id"):
            setattr(self, attr, getattr(base, attr))
        self.skipped: list[dict] = []
