"""What every participant agrees on: the model built from the config alone.

The server must build the initial model without seeing any data, so every
input dimension comes from the configuration: MRI channels = phases, tile
feature size = the pathology encoder's output size, genes and clinical
covariates = the federation's feature lists.
"""
from __future__ import annotations

from omegaconf import OmegaConf

from common.learn.model import build_model


def input_dims(cfg) -> dict:
    from common.preprocess.encoders import build_encoder

    enc = build_encoder(OmegaConf.to_container(cfg.preprocess.pathology.encoder, resolve=True))
    return {"in_channels": len(cfg.data.phases), "path_dim": int(enc.dim),
            "n_genes": len(cfg.data.genomic_features), "n_clinical": len(cfg.data.clinical_features)}


def model_config(cfg) -> dict:
    """The ``model`` node as a plain dict, with ``pathology.tile_net: auto`` resolved from the encoder
    (tile thumbnails get the tile CNN, embeddings the linear projection)."""
    mcfg = OmegaConf.to_container(cfg.model, resolve=True)
    path = mcfg.setdefault("pathology", {})
    if str(path.get("tile_net", "auto")).lower() == "auto":
        enc = str(OmegaConf.select(cfg, "preprocess.pathology.encoder.name", default="stats") or "stats")
        path["tile_net"] = "cnn" if enc.lower() == "thumbnail" else "mlp"
    return mcfg


def model_from_config(cfg, modalities=None, dims: dict | None = None):
    mcfg = model_config(cfg)
    if modalities is not None:
        mcfg["modalities"] = list(modalities)
    return build_model(mcfg, **(dims or input_dims(cfg)))


def check_dataset_matches(ds, dims: dict) -> None:
    """A cache built with another config cannot feed this model: say so plainly."""
    got = {"in_channels": ds.mri_shape[0], "path_dim": ds.path_dim, "n_genes": ds.n_genes, "n_clinical": ds.n_clinical}
    bad = {k: (got[k], dims[k]) for k in dims if got[k] != dims[k]}
    if bad:
        detail = ", ".join(f"{k}: cache has {a}, config expects {b}" for k, (a, b) in bad.items())
        raise ValueError(f"{ds.cache_dir}: preprocessed cache does not match the run config ({detail}); "
                         "re-run `newadj preprocess` with the same config")
