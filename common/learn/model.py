"""New-adj-Net: multimodal (MRI + pathology + genomics [+ clinical]) model.

Architecture
------------
* **MRI branch** — a small 3-D residual CNN over the stacked contrast phases
  ``[B, C, D, H, W]`` built from MONAI blocks (``arch: resunit``, default) or
  MONAI's ``ResNet`` (``arch: resnet``, resnet10-like).  Normalisation is
  GroupNorm or InstanceNorm (never BatchNorm: federated clients have tiny,
  non-IID batches and BatchNorm running statistics do not average well).
* **Pathology branch** — gated attention MIL (Ilse et al., 2018) over tile
  embeddings ``[B, N, F]``: ``a = softmax_masked(w^T (tanh(V h) * sigmoid(U h)))``
  where padding tiles get exactly zero attention.
* **Genomics branch** — self-normalising MLP (SELU + AlphaDropout, LeCun-normal
  init) over ``[values, mask]`` so that missingness is an input.
* **Clinical branch** (only when ``n_clinical > 0`` and ``clinical.enabled``) —
  the same SNN over ``[values, mask]``; it is an extra fusion token.
* **Fusion** — every branch projects to a common dim ``d``; tokens of the
  modalities present for a sample are fused by masked mean (``fusion: mean``)
  or masked attention (``fusion: attention``).  A sample with no modality gets a
  learned "no data" embedding.  In train mode whole modalities are dropped per
  sample with probability ``modality_dropout`` (never all present ones).
* **Heads** — benefit logit (small MLP) and DFS risk (linear log-hazard) on the
  fused embedding; or, with ``fusion: late``, one linear benefit term and one
  log-hazard term per modality, summed, where an absent (or dropped) modality
  adds a learned constant instead of its term (late fusion: the logit is
  additive over modalities, as in a multivariable logistic / Cox model).
* **Unimodal outputs** (train mode, only when ``loss.unimodal_weight`` > 0) —
  for every modality, what the model would output if that modality were the
  sample's only one (its term plus the other modalities' absent constants under
  late fusion; the heads on its embedding alone under mean / attention fusion),
  for the per-modality loss in ``common/learn/losses.py``.

Branches are evaluated only on the samples where the modality is present (and
not dropped), so absent inputs (zero-filled, or garbage/NaN) can never leak
into the output or the gradients.

``forward(batch)`` returns a dict with ``logit [B]``, ``risk [B]``,
``attention [B, N]`` (zeros where there is no tile / no pathology branch),
``embeddings`` (modality -> ``[B, d]``, zero rows where the modality is not
used), ``fused [B, d]`` and ``present`` (modality -> bool ``[B]``, after
modality dropout).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.config import deep_merge, to_plain

__all__ = ["DEFAULTS", "MODALITIES", "NewAdjNet", "build_model", "resolve_model_cfg"]

MODALITIES = ("mri", "pathology", "genomics")

# Mirrors conf/model/newadjnet.yaml (tests check that the two agree; the default run composes
# conf/model/linear.yaml, which extends it).  A partial
# config passed to build_model is deep-merged over these defaults.
DEFAULTS: dict[str, Any] = {
    "name": "newadjnet",
    "kind": "network",      # network (New-adj-Net, trained by the engine) | cox (CoxModel, fitted by Newton-Raphson)
    "modalities": ["mri", "pathology", "genomics"],
    "embed_dim": 128,
    "fusion": "late",
    "modality_dropout": 0.25,
    "branch_layernorm": True,
    "mri": {
        "arch": "resunit",
        "widths": [8, 16],
        "subunits": 1,
        "resnet_layers": [1, 1, 1, 1],
        "norm": "group",
        "num_groups": 8,
        "dropout": 0.1,
        "center_frac": 0.25,
    },
    "pathology": {
        "proj_dim": 128,
        "attn_dim": 64,
        "pool": "attention",
        "dropout": 0.25,
        "tile_net": "auto",
        "cnn_widths": [16, 32, 64],
        "tile_augment": True,
        "tile_jitter": 0.1,
    },
    "genomics": {
        "hidden": [128, 64],
        "dropout": 0.1,
    },
    "clinical": {
        "enabled": True,
        "hidden": [32],
        "dropout": 0.1,
    },
    "head": {
        "hidden": 64,
        "dropout": 0.2,
        "zero_init": False,
        "fixed_terms": False,
    },
    "loss": {
        "benefit_weight": 1.0,
        "dfs_weight": 0.5,
        "ties": "efron",
        "pos_weight": None,
        "unimodal_weight": 0.0,
    },
}


# --------------------------------------------------------------------------- #
# config helpers
# --------------------------------------------------------------------------- #
def resolve_model_cfg(cfg: Any = None) -> dict:
    """Return a plain dict: ``cfg`` (DictConfig, dict or None) merged over DEFAULTS."""
    cfg = to_plain(cfg) if cfg is not None else {}
    if not isinstance(cfg, Mapping):
        raise TypeError(f"model config must be a mapping, got {type(cfg).__name__}")
    merged = deep_merge(DEFAULTS, cfg)
    mods = [str(m) for m in merged["modalities"]]
    bad = [m for m in mods if m not in MODALITIES]
    if bad:
        raise ValueError(f"unknown modalities {bad}; choose from {list(MODALITIES)}")
    merged["modalities"] = [m for m in MODALITIES if m in mods]  # canonical order
    if merged["fusion"] not in ("mean", "attention", "late"):
        raise ValueError(f"model.fusion must be 'mean', 'attention' or 'late', got {merged['fusion']!r}")
    if merged["head"].get("fixed_terms") and (merged["fusion"] != "late" or int(merged["embed_dim"]) < 2
                                              or merged["head"].get("zero_init")):
        raise ValueError("model.head.fixed_terms needs fusion 'late', embed_dim >= 2 and zero_init false, got "
                         f"fusion {merged['fusion']!r}, embed_dim {merged['embed_dim']}, "
                         f"zero_init {merged['head'].get('zero_init')}")
    if float(merged["loss"].get("unimodal_weight") or 0.0) < 0:
        raise ValueError(f"model.loss.unimodal_weight must be >= 0, got {merged['loss']['unimodal_weight']!r}")
    return merged


def _norm_spec(kind: str, channels: int, num_groups: int):
    kind = str(kind).lower()
    if kind == "group":
        return ("group", {"num_groups": math.gcd(int(num_groups), int(channels)) or 1})
    if kind == "instance":
        return ("instance", {"affine": True})
    raise ValueError(f"model.mri.norm must be 'group' or 'instance' (no BatchNorm), got {kind!r}")


def _replace_batchnorm(module: nn.Module, kind: str, num_groups: int) -> None:
    """Recursively replace BatchNorm layers by GroupNorm / InstanceNorm (affine)."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            c = child.num_features
            if str(kind).lower() == "group":
                new: nn.Module = nn.GroupNorm(math.gcd(int(num_groups), c) or 1, c)
            else:
                new = nn.InstanceNorm3d(c, affine=True)
            setattr(module, name, new)
        else:
            _replace_batchnorm(child, kind, num_groups)


def _lecun_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 1.0 / math.sqrt(m.in_features))
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- #
# branches
# --------------------------------------------------------------------------- #
def center_box_stats(x: torch.Tensor, frac: float) -> torch.Tensor:
    """Per-channel mean and SD of the central box of ``x [B, C, *spatial]`` (``frac`` of every spatial side,
    at least one voxel) -> ``[B, 2C]`` (means, then SDs)."""
    sl = [slice(None), slice(None)]
    for n in x.shape[2:]:
        k = max(1, int(round(n * frac)))
        a = (n - k) // 2
        sl.append(slice(a, a + k))
    c = x[tuple(sl)].flatten(2).float()
    return torch.cat([c.mean(-1), c.std(-1, unbiased=False)], dim=1).to(x.dtype)


class MRIEncoder(nn.Module):
    """3-D CNN over stacked phases -> [B, out_dim]; spatial size is free."""

    def __init__(self, in_channels: int, out_dim: int, cfg: Mapping):
        super().__init__()
        from monai.networks.blocks import Convolution, ResidualUnit

        arch = str(cfg.get("arch", "resunit")).lower()
        widths = [int(w) for w in cfg["widths"]]
        norm, groups = cfg.get("norm", "group"), int(cfg.get("num_groups", 8))
        dropout = float(cfg.get("dropout", 0.0))
        if arch == "resunit":
            layers: list[nn.Module] = [
                Convolution(3, in_channels, widths[0], strides=1, kernel_size=3, act="PRELU",
                            norm=_norm_spec(norm, widths[0], groups))
            ]
            for c_in, c_out in zip(widths[:-1], widths[1:]):
                layers.append(
                    ResidualUnit(3, c_in, c_out, strides=2, kernel_size=3,
                                 subunits=int(cfg.get("subunits", 2)), act="PRELU",
                                 norm=_norm_spec(norm, c_out, groups), dropout=dropout or None)
                )
            self.features = nn.Sequential(*layers)
            feat_dim = widths[-1]
        elif arch == "resnet":
            from monai.networks.nets import ResNet

            if len(widths) != 4:
                raise ValueError("model.mri.widths needs 4 entries for arch=resnet")
            if norm == "group" and any(w % groups for w in widths):
                raise ValueError("arch=resnet with GroupNorm needs widths divisible by num_groups")
            self.features = ResNet(
                block="basic", layers=[int(x) for x in cfg.get("resnet_layers", [1, 1, 1, 1])],
                block_inplanes=widths, spatial_dims=3, n_input_channels=in_channels,
                conv1_t_size=3, conv1_t_stride=1, no_max_pool=True, feed_forward=False,
                norm=_norm_spec(norm, widths[0], groups),
            )
            # monai 1.6.1's ResNet does not forward `norm` to _make_layer, so its residual
            # blocks still get BatchNorm3d: swap every BatchNorm for the configured norm.
            _replace_batchnorm(self.features, norm, groups)
            feat_dim = widths[-1]
        elif arch == "stats":   # no CNN: the central box's statistics only (a linear model's MRI features)
            if not float(cfg.get("center_frac", 0.0) or 0.0) > 0:
                raise ValueError("model.mri.arch=stats reads the central box: set model.mri.center_frac > 0")
            self.features = None
            feat_dim = 0
        else:
            raise ValueError(f"model.mri.arch must be 'resunit', 'resnet' or 'stats', got {arch!r}")
        self.arch = arch
        # center_frac > 0: the per-channel mean and std of the input's central box
        # (this fraction of every spatial side; the ROI is centred on the tumor) are
        # concatenated to the pooled CNN features.  They keep the tumor's absolute
        # (z-scored) intensity per phase, which GroupNorm/InstanceNorm and global
        # average pooling over the whole crop wash out.
        self.center_frac = float(cfg.get("center_frac", 0.0) or 0.0)
        if not 0.0 <= self.center_frac <= 1.0:
            raise ValueError(f"model.mri.center_frac must be in [0, 1], got {self.center_frac}")
        n_stats = 2 * in_channels if self.center_frac > 0 else 0
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(feat_dim + n_stats, out_dim)

    def _center_stats(self, x: torch.Tensor) -> torch.Tensor:
        return center_box_stats(x, self.center_frac)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.features is None:   # arch=stats
            return self.proj(self._center_stats(x))
        h = self.features(x)
        if h.dim() > 2:  # resunit: global average pool
            h = h.flatten(2).mean(-1)
        h = self.drop(h)
        if self.center_frac > 0:
            h = torch.cat([h, self._center_stats(x)], dim=1)
        return self.proj(h)


class TileCNN(nn.Module):
    """A small 2-D CNN over tile thumbnails ``[K, 3, s, s]`` -> ``[K, out_dim]`` (MONAI convolution blocks,
    GroupNorm, stride 2 per stage, global average pooling).  The per-channel mean and std of the tile are
    concatenated to the pooled features: GroupNorm and average pooling wash out a tile's absolute optical
    density, which carries stain amount.  In train mode with ``augment`` every tile gets a random quarter
    turn and flip (tissue has no orientation); with ``jitter`` > 0 also a random gain ``1 + jitter * N(0, 1)``
    and offset ``jitter * N(0, 1)`` per colour plane (stain strength and scanner colour vary)."""

    def __init__(self, in_dim: int, out_dim: int, widths: list[int], dropout: float, augment: bool, jitter: float):
        super().__init__()
        from monai.networks.blocks import Convolution

        side = math.isqrt(max(in_dim // 3, 0))
        if side < 8 or 3 * side * side != in_dim:
            raise ValueError(f"model.pathology.tile_net=cnn needs tile thumbnails (3 x s x s values, "
                             f"preprocess.pathology.encoder.name=thumbnail); got {in_dim} values per tile")
        self.side = side
        self.augment = bool(augment)
        self.jitter = float(jitter)
        if self.jitter < 0:
            raise ValueError(f"model.pathology.tile_jitter must be >= 0, got {self.jitter}")
        layers: list[nn.Module] = []
        c_in = 3
        for w in [int(x) for x in widths]:
            layers.append(Convolution(2, c_in, w, strides=2, kernel_size=3, act="RELU", norm=_norm_spec("group", w, 8)))
            c_in = w
        self.features = nn.Sequential(*layers)
        self.out = nn.Sequential(nn.Linear(c_in + 6, out_dim), nn.ReLU(), nn.Dropout(float(dropout)))

    def _dihedral(self, x: torch.Tensor) -> torch.Tensor:
        flip = torch.rand(x.shape[0], device=x.device) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        turns = torch.randint(0, 4, (x.shape[0],), device=x.device)
        out = x.clone()
        for k in (1, 2, 3):
            sel = turns == k
            if bool(sel.any()):
                out[sel] = torch.rot90(x[sel], k, dims=(-2, -1))
        return out

    def forward(self, flat: torch.Tensor) -> torch.Tensor:
        x = flat.reshape(-1, 3, self.side, self.side)
        if self.training and self.augment:
            x = self._dihedral(x)
        if self.training and self.jitter > 0:
            gain = 1.0 + self.jitter * torch.randn(x.shape[0], 3, 1, 1, device=x.device, dtype=x.dtype)
            x = x * gain + self.jitter * torch.randn(x.shape[0], 3, 1, 1, device=x.device, dtype=x.dtype)
        stats = torch.cat([x.mean((-2, -1)), x.std((-2, -1), unbiased=False)], dim=1)
        h = self.features(x).mean((-2, -1))
        return self.out(torch.cat([h, stats], dim=1))


class GatedAttentionMIL(nn.Module):
    """Gated attention MIL pooling (Ilse et al., 2018) with a tile mask.  Tiles enter as embeddings
    (``tile_net: mlp``, a linear projection) or as thumbnails (``tile_net: cnn``, :class:`TileCNN`, run
    on the real tiles only)."""

    def __init__(self, in_dim: int, out_dim: int, cfg: Mapping):
        super().__init__()
        proj, attn, p = int(cfg["proj_dim"]), int(cfg["attn_dim"]), float(cfg.get("dropout", 0.0))
        tile_net = str(cfg["tile_net"]).lower()
        if tile_net not in ("auto", "mlp", "cnn", "linear"):
            raise ValueError(f"model.pathology.tile_net must be auto, mlp, cnn or linear, got {tile_net!r}")
        self.cnn = tile_net == "cnn"
        if self.cnn:
            # cfg is merged over DEFAULTS (resolve_model_cfg): every key is there
            self.tile_proj = TileCNN(in_dim, proj, list(cfg["cnn_widths"]), p, bool(cfg["tile_augment"]),
                                     float(cfg["tile_jitter"]))
        elif tile_net == "linear":   # a linear map of each tile's embedding (with mean pooling: of the bag's mean)
            self.tile_proj = nn.Linear(in_dim, proj)
        else:
            self.tile_proj = nn.Sequential(nn.Linear(in_dim, proj), nn.ReLU(), nn.Dropout(p))
        self.proj_dim = proj
        self.pool = str(cfg.get("pool", "attention")).lower()
        if self.pool not in ("attention", "mean"):
            raise ValueError(f"model.pathology.pool must be attention or mean, got {self.pool!r}")
        if self.pool == "attention":   # mean pooling has no attention layers to train or send
            self.V = nn.Linear(proj, attn)
            self.U = nn.Linear(proj, attn)
            self.w = nn.Linear(attn, 1)
            self.attn_drop = nn.Dropout(p)
        self.out = nn.Linear(proj, out_dim)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feats [B, N, F], mask [B, N] bool (each row needs >= 1 True) -> ([B, d], attn [B, N])."""
        if self.cnn:  # only the real tiles go through the CNN
            h = feats.new_zeros((*mask.shape, self.proj_dim))
            h[mask] = self.tile_proj(feats[mask]).to(h.dtype)
        else:
            feats = torch.where(mask.unsqueeze(-1), feats, torch.zeros((), dtype=feats.dtype, device=feats.device))
            h = self.tile_proj(feats)  # [B, N, P]
        if self.pool == "mean":  # every real tile weighs the same (the bag's mean embedding)
            attn = mask.to(h.dtype) / mask.sum(-1, keepdim=True).clamp(min=1).to(h.dtype)
            return self.out(torch.bmm(attn.unsqueeze(1), h).squeeze(1)), attn
        g = self.attn_drop(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h)))
        scores = self.w(g).squeeze(-1)  # [B, N]
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        attn = torch.softmax(scores, dim=-1) * mask  # padding -> exactly 0
        pooled = torch.bmm(attn.unsqueeze(1), h).squeeze(1)  # [B, P]
        return self.out(pooled), attn


class SNN(nn.Module):
    """Self-normalising MLP (SELU + AlphaDropout, LeCun normal init) over [values, mask]."""

    def __init__(self, n_features: int, out_dim: int, hidden: list[int], dropout: float):
        super().__init__()
        layers: list[nn.Module] = []
        d_in = 2 * n_features
        for h in hidden:
            layers += [nn.Linear(d_in, int(h)), nn.SELU(), nn.AlphaDropout(float(dropout))]
            d_in = int(h)
        layers.append(nn.Linear(d_in, out_dim))
        self.net = nn.Sequential(*layers)
        _lecun_init(self)

    def forward(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        values = torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        values = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
        return self.net(torch.cat([values, mask.to(values.dtype)], dim=-1))


# --------------------------------------------------------------------------- #
# full model
# --------------------------------------------------------------------------- #
class NewAdjNet(nn.Module):
    def __init__(self, cfg: Any, in_channels: int, path_dim: int, n_genes: int, n_clinical: int = 0):
        super().__init__()
        cfg = resolve_model_cfg(cfg)
        self.cfg = cfg
        d = int(cfg["embed_dim"])
        self.embed_dim = d
        self.fusion = cfg["fusion"]
        self.modality_dropout = float(cfg["modality_dropout"])
        # the unimodal outputs are computed only when a loss uses them (their dropout draws would otherwise
        # change the random stream, hence the training, of a run that does not)
        self.unimodal = float((cfg.get("loss") or {}).get("unimodal_weight") or 0.0) > 0
        self.branches = nn.ModuleDict()
        self.post = nn.ModuleDict()
        mods = list(cfg["modalities"])
        if "mri" in mods:
            if in_channels <= 0:
                raise ValueError("modality 'mri' requested but in_channels <= 0")
            self.branches["mri"] = MRIEncoder(int(in_channels), d, cfg["mri"])
        if "pathology" in mods:
            if path_dim <= 0:
                raise ValueError("modality 'pathology' requested but path_dim <= 0")
            self.branches["pathology"] = GatedAttentionMIL(int(path_dim), d, cfg["pathology"])
        if "genomics" in mods:
            if n_genes <= 0:
                raise ValueError("modality 'genomics' requested but n_genes <= 0")
            self.branches["genomics"] = SNN(int(n_genes), d, list(cfg["genomics"]["hidden"]),
                                            cfg["genomics"]["dropout"])
        if n_clinical > 0 and bool(cfg["clinical"].get("enabled", True)):
            self.branches["clinical"] = SNN(int(n_clinical), d, list(cfg["clinical"]["hidden"]),
                                            cfg["clinical"]["dropout"])
        self.modalities: list[str] = list(self.branches.keys())
        if not self.modalities:
            raise ValueError("the model has no input: model.modalities is empty and there is no clinical feature "
                             "(data.clinical_features) with model.clinical.enabled")
        for m in self.modalities:
            self.post[m] = nn.LayerNorm(d) if cfg["branch_layernorm"] else nn.Identity()
        self.no_data = nn.Parameter(torch.zeros(d))
        if self.fusion == "attention":
            self.fusion_attn = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, 1))
        h, p = int(cfg["head"]["hidden"]), float(cfg["head"]["dropout"])
        self.head_drop = nn.Dropout(p)
        self.fixed_terms = self.fusion == "late" and bool(cfg["head"].get("fixed_terms"))
        if self.fusion == "late":
            # late fusion: every modality adds its own benefit logit and log-hazard term; a modality that
            # is absent (or dropped) adds a learned constant instead
            if self.fixed_terms:
                # fixed terms, not parameters (nothing to train, exchange or perturb): each modality's benefit
                # term is coordinate 0 of its embedding plus a trained bias, its log-hazard term coordinate 1. The
                # branch's last linear map then carries the modality's coefficients itself, so with linear branches
                # (model=linear) train.l2 on it is ridge on those coefficients, not a penalty on the factors of a
                # product of two trained matrices
                self.benefit_bias = nn.Parameter(torch.zeros(len(self.modalities)))
            else:
                self.benefit_terms = nn.ModuleDict({m: nn.Linear(d, 1) for m in self.modalities})
                self.risk_terms = nn.ModuleDict({m: nn.Linear(d, 1, bias=False) for m in self.modalities})
            self.absent_terms = nn.Parameter(torch.zeros(2, len(self.modalities)))  # [benefit, risk] x modality
        else:
            self.benefit_head = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Dropout(p), nn.Linear(h, 1))
            self.risk_head = nn.Linear(d, 1, bias=False)  # Cox log-hazard: bias is not identifiable
        if cfg["head"].get("zero_init"):
            # the output layers start at zero: the initial model predicts a constant, and with linear branches
            # (model=linear) the initial coefficients of the features are zero, as a logistic regression's fit
            # starts, instead of the product of two random matrices
            last = ([*self.benefit_terms.values(), *self.risk_terms.values()] if self.fusion == "late"
                    else [self.benefit_head[-1], self.risk_head])
            for layer in last:
                nn.init.zeros_(layer.weight)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)

    # ---------------- presence / dropout ----------------
    @staticmethod
    def _batch_size(batch: Mapping[str, torch.Tensor]) -> int:
        for k in ("benefit", "has_mri", "has_path", "has_genomics", "dfs_time", "mri", "genomics"):
            if k in batch:
                return int(batch[k].shape[0])
        raise KeyError("cannot infer batch size from batch")

    def _presence(self, batch: Mapping[str, torch.Tensor], B: int, device) -> torch.Tensor:
        cols = []
        for m in self.modalities:
            if m == "mri":
                p = batch["has_mri"].bool()
            elif m == "pathology":
                p = batch["has_path"].bool() & batch["path_mask"].bool().any(dim=1)
            elif m == "genomics":
                p = batch["has_genomics"].bool() & batch["genomics_mask"].bool().any(dim=1)
            else:  # clinical
                p = batch["clinical_mask"].bool().any(dim=1)
            cols.append(p.to(device).reshape(B))
        if not cols:
            return torch.zeros(B, 0, dtype=torch.bool, device=device)
        return torch.stack(cols, dim=1)

    def drop_modalities(self, present: torch.Tensor) -> torch.Tensor:
        """Per-sample modality dropout on a [B, M] presence mask (train mode only).

        Each present modality is dropped with probability ``modality_dropout``;
        a sample that would lose all its present modalities keeps one of them
        (chosen uniformly at random)."""
        p = self.modality_dropout
        if not self.training or p <= 0 or present.shape[1] < 2:
            return present
        keep = torch.rand(present.shape, device=present.device) >= p
        kept = present & keep
        lost_all = present.any(1) & ~kept.any(1)
        if bool(lost_all.any()):
            score = torch.rand(present.shape, device=present.device).masked_fill(~present, -1.0)
            one = F.one_hot(score.argmax(1), present.shape[1]).bool() & present
            kept = torch.where(lost_all.unsqueeze(1), one, kept)
        return kept

    # ---------------- forward ----------------
    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        device = self.no_data.device
        dtype = self.no_data.dtype
        B = self._batch_size(batch)
        present = self.drop_modalities(self._presence(batch, B, device))  # [B, M]
        d = self.embed_dim

        if "path_mask" in batch:
            attention = torch.zeros(batch["path_mask"].shape, dtype=dtype, device=device)
        else:
            attention = torch.zeros(B, 0, dtype=dtype, device=device)

        embeddings: dict[str, torch.Tensor] = {}
        for j, m in enumerate(self.modalities):
            idx = present[:, j].nonzero(as_tuple=True)[0]
            emb = torch.zeros(B, d, dtype=dtype, device=device)
            if idx.numel() > 0:
                if m == "mri":
                    z = self.branches[m](batch["mri"].to(device, dtype).index_select(0, idx))
                elif m == "pathology":
                    feats = batch["path_feats"].to(device, dtype).index_select(0, idx)
                    mask = batch["path_mask"].to(device).bool().index_select(0, idx)
                    z, a = self.branches[m](feats, mask)
                    attention = attention.index_copy(0, idx, a)
                elif m == "genomics":
                    z = self.branches[m](batch["genomics"].to(device, dtype).index_select(0, idx),
                                         batch["genomics_mask"].to(device).bool().index_select(0, idx))
                else:
                    z = self.branches[m](batch["clinical"].to(device, dtype).index_select(0, idx),
                                         batch["clinical_mask"].to(device).bool().index_select(0, idx))
                emb = emb.index_copy(0, idx, self.post[m](z))
            embeddings[m] = emb

        fused = self._fuse(embeddings, present)
        unimodal = self.training and self.unimodal and len(self.modalities) > 1
        if self.fusion == "late":
            logit, risk, terms = self._late_terms(embeddings, present)
        else:
            h = self.head_drop(fused)
            logit, risk = self.benefit_head(h).squeeze(-1), self.risk_head(h).squeeze(-1)
        extra = {}
        if unimodal:
            if self.fusion == "late":
                # modality m alone: its term plus every other modality's absent constant
                absent = self.absent_terms.sum(1)                       # [2]
                uni_logit = terms[0] + (absent[0] - self.absent_terms[0]).unsqueeze(0)
                uni_risk = terms[1] + (absent[1] - self.absent_terms[1]).unsqueeze(0)
            else:   # the fused embedding of a sample with one modality is that modality's embedding
                hs = [self.head_drop(embeddings[m]) for m in self.modalities]
                uni_logit = torch.stack([self.benefit_head(h).squeeze(-1) for h in hs], dim=1)
                uni_risk = torch.stack([self.risk_head(h).squeeze(-1) for h in hs], dim=1)
            extra["unimodal"] = {"logit": uni_logit, "risk": uni_risk, "present": present}
        return {
            **extra,
            "logit": logit,
            "risk": risk,
            "attention": attention,
            "embeddings": embeddings,
            "fused": fused,
            "present": {m: present[:, j] for j, m in enumerate(self.modalities)},
        }

    def _late_terms(self, embeddings: dict[str, torch.Tensor], present: torch.Tensor):
        """Late fusion: sum over modalities of each one's own term (its head on its embedding where present,
        its learned absent constant where not) -> (benefit logit [B], log-hazard [B], (benefit terms [B, M],
        log-hazard terms [B, M]))."""
        logit = torch.zeros(present.shape[0], dtype=self.no_data.dtype, device=present.device)
        risk = torch.zeros_like(logit)
        benefit_terms, risk_terms = [], []
        for j, m in enumerate(self.modalities):
            h = self.head_drop(embeddings[m])
            if self.fixed_terms:
                b, r = h[:, 0] + self.benefit_bias[j], h[:, 1]
            else:
                b, r = self.benefit_terms[m](h).squeeze(-1), self.risk_terms[m](h).squeeze(-1)
            benefit_terms.append(torch.where(present[:, j], b, self.absent_terms[0, j]))
            risk_terms.append(torch.where(present[:, j], r, self.absent_terms[1, j]))
            logit, risk = logit + benefit_terms[-1], risk + risk_terms[-1]
        return logit, risk, (torch.stack(benefit_terms, dim=1), torch.stack(risk_terms, dim=1))

    def _fuse(self, embeddings: dict[str, torch.Tensor], present: torch.Tensor) -> torch.Tensor:
        B, d = present.shape[0], self.embed_dim
        no_data = self.no_data.unsqueeze(0).expand(B, d)
        if not embeddings:
            return no_data
        E = torch.stack([embeddings[m] for m in self.modalities], dim=1)  # [B, M, d]
        pm = present.to(E.dtype)
        any_present = present.any(1, keepdim=True)
        if self.fusion in ("mean", "late"):  # late: the mean embedding is only reported
            fused = (E * pm.unsqueeze(-1)).sum(1) / pm.sum(1, keepdim=True).clamp_min(1.0)
        else:
            s = self.fusion_attn(E).squeeze(-1).masked_fill(~present, torch.finfo(E.dtype).min)
            w = torch.softmax(s, dim=1) * pm
            fused = torch.bmm(w.unsqueeze(1), E).squeeze(1)
        return torch.where(any_present, fused, no_data)


NORM_LAYERS = (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def norm_parameter_names(model: nn.Module) -> list[str]:
    """The state-dict keys of the model's normalisation layers (GroupNorm, LayerNorm, InstanceNorm affine
    parameters): what a center keeps local under ``federation.local_norm`` (FedBN-style)."""
    return [f"{name}.{p}" if name else p for name, mod in model.named_modules() if isinstance(mod, NORM_LAYERS)
            for p, _ in mod.named_parameters(recurse=False)]


class CoxModel(nn.Module):
    """A Cox proportional-hazards model on the tabular inputs (``model=cox``): log-hazard = [genomics, clinical] . beta.

    Missing inputs are 0 in scaled units, the pooled mean of the feature file's moments (imputation, not a
    value).  No benefit output: ``logit`` is 0.  Its coefficients are fitted by the federation's Newton-Raphson
    (``server/cox.py``, ``common/learn/cox.py``), not by gradient steps; the engine's ``predict``, the disclosure
    rules, reports and packages treat it as any model.
    """

    def __init__(self, n_genes: int, n_clinical: int):
        super().__init__()
        if n_genes + n_clinical <= 0:
            raise ValueError("model=cox needs tabular features: data.genomic_features or data.clinical_features "
                             "(run `newadj schema` and pass its feature file)")
        self.beta = nn.Parameter(torch.zeros(n_genes + n_clinical))   # fp32 as every weight record; the fit is float64
        self.modalities = ["tabular"]

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        x = torch.cat([batch["genomics"], batch["clinical"]], dim=1).to(self.beta.device, self.beta.dtype)
        risk = x @ self.beta
        zero = torch.zeros_like(risk)
        return {"logit": zero, "risk": risk, "attention": torch.zeros(x.shape[0], 0, device=x.device),
                "embeddings": {}, "fused": risk.unsqueeze(1), "present": {}}


def build_model(cfg: Any, in_channels: int, path_dim: int, n_genes: int, n_clinical: int = 0) -> nn.Module:
    """Build the model of the ``model`` config node (DictConfig or dict; partial configs are merged over
    :data:`DEFAULTS`): New-adj-Net, whose branches not listed in ``cfg.modalities`` are not built and their
    inputs ignored, or with ``kind: cox`` the Cox model on the tabular features."""
    if str(resolve_model_cfg(cfg).get("kind", "network")) == "cox":
        return CoxModel(n_genes, n_clinical)
    return NewAdjNet(cfg, in_channels=in_channels, path_dim=path_dim, n_genes=n_genes, n_clinical=n_clinical)
