"""A trained model as one file of weights and numbers: what a site may be handed to evaluate or screen.

``save_model_package`` writes ``<name>.pt`` and ``<name>.json`` (metadata with the SHA-256 of the .pt
file, for the coordinator's own records).  The .pt file holds, and may hold, only:

* ``state_dict``: the weights (tensors);
* ``model``: the architecture, the ``model`` node of the configuration (names of layers and branches,
  sizes, flags: short words and numbers);
* ``schema``: the federation's feature lists and their scaling (column names and numbers);
* ``inputs``: the input sizes the weights were trained for (MRI channels, tile feature size, genes,
  clinical covariates);
* ``threshold``, and ``card``: the model card with its calibration and survival tables (numbers).

Nothing in it names a file, an encoder or code: the site builds the model from the architecture the
package declares and prepares its data with its own installed configuration and its own ``policy.toml``
(``common.data.policy.site_config``); a package whose declared inputs do not fit what the site's own
preprocessing produces is refused.  ``load_model_package`` refuses a package with anything else in it
(a whole configuration, as packages of earlier versions carried, a path, an interpolation), naming the
key, before anything is built.

It never runs code from the file: it is read with ``torch.load(weights_only=True)``, which refuses any
pickled object other than tensors and plain containers.  Its integrity is checked against
``expected_sha256``, a hash the evaluator got by another channel (the run's final log, ``metrics.json``
sent by the coordinator); the ``.json`` beside a package comes from the same sender and proves nothing.
"""
from __future__ import annotations

import functools
import io
import json
import math
import os
import re
from pathlib import Path

import torch
from omegaconf import OmegaConf

from common.hashing import sha256_file

FORMAT = "newadj-model-2"
PACKAGE_KEYS = ("format", "state_dict", "model", "schema", "inputs", "threshold", "card")
SCHEMA_KEYS = ("genomic_features", "clinical_features", "scaling")
INPUT_KEYS = ("in_channels", "path_dim", "n_genes", "n_clinical")
SCALING_KEYS = ("name", "log", "center", "scale")
# a word of the architecture (a layer kind, a fusion, a modality): no path, no interpolation
WORD = re.compile(r"[A-Za-z0-9_.+-]{0,64}")
# a feature name as sites' tables spell columns: no path separator, no interpolation, no control character
NAME = re.compile(r"[^/\\${}\x00-\x1f]{1,128}")


class ModelPackageError(Exception):
    pass


def save_model_package(path: Path, state_dict: dict, cfg, threshold: float, card: dict | None = None) -> dict:
    """Write the package of a model trained with ``cfg`` (only its architecture, schema and input sizes go in)."""
    from common.learn.task import input_dims, model_config

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pkg = {"format": FORMAT, "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
           "model": model_config(cfg),
           "schema": {k: OmegaConf.to_container(cfg.data[k], resolve=True) if OmegaConf.is_config(cfg.data[k])
                      else cfg.data[k] for k in SCHEMA_KEYS},
           "inputs": input_dims(cfg), "threshold": float(threshold), "card": json.loads(json.dumps(card or {}))}
    problems = package_problems(pkg)
    if problems:    # the coordinator must not hand out what a site would refuse
        raise ModelPackageError(f"{path}: not written: {', '.join(problems)}")
    buf = io.BytesIO()
    torch.save(pkg, buf)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    meta = {"file": path.name, "sha256": sha256_file(path), "threshold": float(threshold), "card": card or {}}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1, default=str))
    return meta


@functools.lru_cache(maxsize=1)
def architecture_keys() -> frozenset[str]:
    """Every setting of the installed model configurations (``model=linear``, ``newadjnet``, ``small``), dotted."""
    from common.config import load_config
    from common.data.policy import config_groups

    keys: set[str] = set()

    def walk(node, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            keys.add(f"{prefix}{k}")

    for option in sorted(config_groups().get("model", ())):
        walk(OmegaConf.to_container(load_config([f"model={option}"]).model, resolve=True), "")
    return frozenset(keys)


def _words(value) -> bool:
    if isinstance(value, str):
        return WORD.fullmatch(value) is not None
    if isinstance(value, (list, tuple)):
        return all(_words(v) for v in value)
    return value is None or isinstance(value, (bool, int, float))


def _plain(value) -> bool:
    """Numbers, short strings, lists and tables of them (a card, a calibration, a survival table)."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, str):
        return "${" not in value and len(value) <= 4096
    return value is None or isinstance(value, (bool, int, float))


def package_problems(pkg) -> list[str]:
    """What makes ``pkg`` more than weights and numbers, each named by its key (empty: a usable package)."""
    if not isinstance(pkg, dict):
        return ["(not a table of weights and numbers)"]
    problems = [f"{k} (not part of a model package)" for k in pkg if k not in PACKAGE_KEYS]
    if "config" in pkg:
        problems.append("config (a whole configuration, with paths and encoders, as packages before "
                        f"{FORMAT} carried)")
    missing = [k for k in PACKAGE_KEYS if k not in pkg]
    problems += [f"{k} (missing)" for k in missing]
    if problems:
        return problems
    if pkg["format"] != FORMAT:
        problems.append(f"format (not {FORMAT})")
    sd = pkg["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        problems.append("state_dict (not named tensors)")
    model = pkg["model"]
    if not isinstance(model, dict):
        problems.append("model (not a table)")
    else:
        known = architecture_keys()

        def walk(node, prefix: str) -> None:
            for k, v in node.items():
                key = f"{prefix}{k}"
                if key not in known:
                    problems.append(f"model.{key} (not a setting of the installed model configurations)")
                elif isinstance(v, dict):
                    walk(v, f"{key}.")
                elif not _words(v):
                    problems.append(f"model.{key} (not a word or a number)")

        walk(model, "")
    schema = pkg["schema"]
    if not isinstance(schema, dict) or set(schema) != set(SCHEMA_KEYS):
        problems.append(f"schema (needs exactly {', '.join(SCHEMA_KEYS)})")
    else:
        for k in ("genomic_features", "clinical_features"):
            if not isinstance(schema[k], list) or not all(isinstance(n, str) and NAME.fullmatch(n) for n in schema[k]):
                problems.append(f"schema.{k} (not a list of column names)")
        rules = schema["scaling"]
        if not isinstance(rules, list) or not all(
                isinstance(r, dict) and set(r) <= set(SCALING_KEYS) and isinstance(r.get("name"), str)
                and NAME.fullmatch(r["name"]) and all(isinstance(r.get(x, 0), (int, float)) for x in ("center", "scale"))
                for r in rules):
            problems.append("schema.scaling (not a list of {name, log, center, scale})")
    inputs = pkg["inputs"]
    if not isinstance(inputs, dict) or set(inputs) != set(INPUT_KEYS) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in inputs.values()):
        problems.append(f"inputs (needs the sizes {', '.join(INPUT_KEYS)})")
    t = pkg["threshold"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(float(t)):
        problems.append("threshold (not a number)")
    if not isinstance(pkg["card"], dict) or not _plain(pkg["card"]):
        problems.append("card (not a table of numbers and text)")
    return problems


def load_model_package(path: Path, expected_sha256: str | None = None):
    """(model in eval mode, package dict with model/schema/inputs/threshold/card/sha256).

    ``expected_sha256``: the package's hash as the evaluator received it from the coordinator by another
    channel; a mismatch is refused before the file is read.  The model is built from the architecture and
    input sizes the package declares; :func:`package_site_config` gives the configuration a site prepares
    its data with.
    """
    from common.learn.model import build_model

    path = Path(path)
    if not path.exists():
        raise ModelPackageError(f"{path}: no such model file")
    digest = sha256_file(path)
    if expected_sha256 is not None:
        want = str(expected_sha256).strip().lower()
        if want != digest:
            raise ModelPackageError(f"{path}: SHA-256 {digest[:16]}... is not the expected {want[:16]}...; "
                                    "the file is not the model the coordinator announced (refused, not loaded)")
    try:
        pkg = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError names the refused global
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelPackageError(f"{path}: refused: not a package of tensors and plain data, nothing in it was run "
                                f"({first[:200]})") from exc
    problems = package_problems(pkg)
    if problems:
        raise ModelPackageError(f"{path}: refused, nothing in it was built or run: {', '.join(problems)}; a model "
                                "package carries weights, the threshold, calibration and survival tables, nothing "
                                "that names a file or code")
    try:
        model = build_model(dict(pkg["model"]), **pkg["inputs"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelPackageError(f"{path}: its architecture does not build a model of this version of newadj "
                                f"({type(exc).__name__})") from exc
    try:
        missing, unexpected = model.load_state_dict(pkg["state_dict"], strict=False)
    except RuntimeError as exc:   # a tensor of another shape
        raise ModelPackageError(f"{path}: weights do not fit the model its architecture describes "
                                "(size mismatch)") from exc
    if missing or unexpected:
        raise ModelPackageError(f"{path}: weights do not fit the model its architecture describes "
                                f"(missing {len(missing)}, unexpected {len(unexpected)} tensors)")
    model.eval()
    pkg["sha256"] = digest
    return model, pkg


def package_site_config(pkg: dict, site_dir: Path | None = None):
    """The configuration a site scores ``pkg`` with: its own (installed defaults, its policy's ``[config]``) with
    the package's architecture and schema; refused when the site's preprocessing gives other input sizes than
    the weights were trained for (another tile encoder, other features)."""
    from common.data.policy import site_config
    from common.learn.task import input_dims

    cfg = site_config(site_dir, package=pkg)
    dims = input_dims(cfg)
    if dims != pkg["inputs"]:
        diff = ", ".join(f"{k} {pkg['inputs'][k]} (this site: {dims[k]})" for k in INPUT_KEYS
                         if dims[k] != pkg["inputs"][k])
        raise ModelPackageError(f"the model was trained for inputs this site's configuration does not produce: {diff}")
    return cfg
