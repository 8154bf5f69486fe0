"""Tests for common/learn/model.py (New-adj-Net)."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from common.learn.losses import multitask_loss
from common.learn.model import DEFAULTS, NewAdjNet, build_model

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
C, SP, N, FEAT, G = 3, (16, 16, 8), 10, 12, 6


def small_cfg(**over):
    cfg = OmegaConf.load(CONF / "small.yaml")
    return OmegaConf.merge(cfg, over)


def make_batch(B=6, K=0, seed=0, n_tiles=None):
    g = torch.Generator().manual_seed(seed)
    lens = n_tiles if n_tiles is not None else torch.randint(1, N + 1, (B,), generator=g).tolist()
    n = max(lens)
    path_mask = torch.zeros(B, n, dtype=torch.bool)
    for i, L in enumerate(lens):
        path_mask[i, :L] = True
    feats = torch.randn(B, n, FEAT, generator=g) * path_mask.unsqueeze(-1)
    gm = torch.rand(B, G, generator=g) > 0.3
    return {
        "mri": torch.randn(B, C, *SP, generator=g),
        "has_mri": torch.ones(B, dtype=torch.bool),
        "path_feats": feats,
        "path_mask": path_mask,
        "has_path": torch.ones(B, dtype=torch.bool),
        "genomics": torch.randn(B, G, generator=g) * gm,
        "genomics_mask": gm,
        "has_genomics": torch.ones(B, dtype=torch.bool),
        "clinical": torch.randn(B, K, generator=g),
        "clinical_mask": torch.ones(B, K, dtype=torch.bool),
        "benefit": torch.randint(0, 2, (B,), generator=g).float(),
        "dfs_time": torch.rand(B, generator=g) * 60 + 1,
        "dfs_event": torch.randint(0, 2, (B,), generator=g).float(),
    }


def build(cfg=None, K=0):
    return build_model(cfg if cfg is not None else small_cfg(), in_channels=C, path_dim=FEAT, n_genes=G, n_clinical=K)


def assert_finite_outputs(out, B, n):
    assert out["logit"].shape == (B,) and out["risk"].shape == (B,)
    assert out["attention"].shape == (B, n)
    assert torch.isfinite(out["logit"]).all() and torch.isfinite(out["risk"]).all()
    assert torch.isfinite(out["attention"]).all()
    for e in out["embeddings"].values():
        assert e.shape[0] == B and torch.isfinite(e).all()


@pytest.mark.parametrize("mods", [["mri"], ["pathology"], ["genomics"]])
def test_each_branch_alone(mods):
    torch.manual_seed(0)
    model = build(small_cfg(modalities=mods)).eval()
    assert list(model.branches.keys()) == mods
    batch = make_batch()
    out = model(batch)
    assert_finite_outputs(out, 6, batch["path_mask"].shape[1])
    assert list(out["embeddings"]) == mods
    assert out["embeddings"][mods[0]].shape == (6, model.embed_dim)
    # inputs of branches that are not built are ignored (may even be absent)
    drop = {"mri": ["path_feats", "path_mask", "has_path", "genomics", "genomics_mask", "has_genomics"],
            "pathology": ["mri", "has_mri", "genomics", "genomics_mask", "has_genomics"],
            "genomics": ["mri", "has_mri", "path_feats", "path_mask", "has_path"]}[mods[0]]
    slim = {k: v for k, v in batch.items() if k not in drop}
    out2 = model(slim)
    assert torch.equal(out2["logit"], out["logit"]) and torch.equal(out2["risk"], out["risk"])
    out["logit"].sum().backward()


def test_bimodal_ablation_and_full_model_shapes():
    torch.manual_seed(0)
    m2 = build(small_cfg(modalities=["pathology", "mri"])).eval()
    assert list(m2.branches.keys()) == ["mri", "pathology"]  # canonical order
    full = build().eval()
    assert set(full.branches.keys()) == {"mri", "pathology", "genomics"}
    b = make_batch()
    assert_finite_outputs(m2(b), 6, b["path_mask"].shape[1])
    assert_finite_outputs(full(b), 6, b["path_mask"].shape[1])


def test_missing_modalities_cannot_leak():
    torch.manual_seed(0)
    model = build(small_cfg(), K=2).eval()
    b = make_batch(K=2)
    # sample 0: pathology only (MRI, genomics and clinical missing, zero-filled)
    b["has_mri"][0] = False
    b["mri"][0] = 0
    b["has_genomics"][0] = False
    b["genomics"][0] = 0
    b["genomics_mask"][0] = False
    b["clinical"][0] = 0
    b["clinical_mask"][0] = False
    ref = model(b)
    g = {k: v.clone() for k, v in b.items()}
    g["mri"][0] = torch.randn_like(g["mri"][0]) * 1e6
    g["mri"][0, 0, 0, 0, 0] = float("nan")
    g["genomics"][0] = float("nan")
    g["clinical"][0] = 1e9
    out = model(g)
    for k in ("logit", "risk", "attention", "fused"):
        assert torch.equal(out[k], ref[k]), k  # not only sample 0: nothing leaks anywhere
    assert out["present"]["mri"][0].item() is False and out["present"]["pathology"][0].item() is True
    assert torch.equal(out["embeddings"]["mri"][0], torch.zeros(model.embed_dim))
    # gradients stay finite even with NaN garbage in a masked input
    model.train()
    model.modality_dropout = 0.0
    loss, _ = multitask_loss(model(g), g, {"benefit_weight": 1.0, "dfs_weight": 0.5})
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_late_fusion_adds_one_term_per_modality():
    """fusion=late: the benefit logit and the log-hazard are sums of per-modality terms, so changing one
    modality's input moves a patient's logit by the same amount whatever the other modalities hold, and a
    missing modality adds its learned constant (its garbage input is never read)."""
    torch.manual_seed(0)
    model = build(small_cfg(fusion="late", head={"dropout": 0.0}), K=2).eval()
    assert not hasattr(model, "benefit_head")
    with torch.no_grad():
        model.absent_terms.copy_(torch.randn_like(model.absent_terms))
    b = make_batch(K=2)
    base = model(b)
    new_gen = {k: v.clone() for k, v in b.items()}
    new_gen["genomics"] = torch.randn_like(b["genomics"]) * new_gen["genomics_mask"]
    other_mri = {k: v.clone() for k, v in b.items()}
    other_mri["mri"] = torch.randn_like(b["mri"]) * 3
    both = {k: v.clone() for k, v in other_mri.items()}
    both["genomics"] = new_gen["genomics"]
    for key in ("logit", "risk"):
        d1 = model(new_gen)[key] - base[key]
        d2 = model(both)[key] - model(other_mri)[key]
        assert d1.abs().max() > 1e-3  # genomics does move the output ...
        torch.testing.assert_close(d1, d2, atol=1e-5, rtol=0)  # ... by the same amount whatever the MRI
    # a missing modality adds exactly its absent constant
    gone = {k: v.clone() for k, v in b.items()}
    gone["has_mri"][0] = False
    j = model.modalities.index("mri")
    with torch.no_grad():
        h = model.post["mri"](model.branches["mri"](b["mri"][:1]))
        term = model.benefit_terms["mri"](h).squeeze()
    out = model(gone)
    torch.testing.assert_close(out["logit"][0], base["logit"][0] - term + model.absent_terms[0, j], atol=1e-5,
                               rtol=0)
    gone["mri"][0] = float("nan")
    assert torch.equal(model(gone)["logit"], out["logit"])
    model.train()
    loss, _ = multitask_loss(model(b), b, {"benefit_weight": 1.0, "dfs_weight": 0.5})
    loss.backward()
    assert model.absent_terms.grad is not None and torch.isfinite(model.absent_terms.grad).all()


def test_all_missing_sample_gets_no_data_embedding():
    torch.manual_seed(0)
    model = build().eval()
    b = make_batch()
    for i in (1, 3):
        b["has_mri"][i] = b["has_path"][i] = b["has_genomics"][i] = False
        b["mri"][i] = torch.randn_like(b["mri"][i]) * (i + 5)
    out = model(b)
    assert_finite_outputs(out, 6, b["path_mask"].shape[1])
    assert torch.equal(out["fused"][1], model.no_data.detach()) and torch.equal(out["fused"][1], out["fused"][3])
    assert out["logit"][1] == out["logit"][3]
    assert out["attention"][1].abs().sum() == 0
    # an entirely empty batch also works
    for k in ("has_mri", "has_path", "has_genomics"):
        b[k][:] = False
    assert_finite_outputs(model(b), 6, b["path_mask"].shape[1])


def test_attention_masked_softmax():
    torch.manual_seed(0)
    model = build(small_cfg(modalities=["pathology"])).eval()
    lens = [1, 4, 10, 7, 2, 10]
    b = make_batch(n_tiles=lens)
    b["has_path"][4] = False
    out = model(b)
    a = out["attention"]
    mask = b["path_mask"].clone()
    mask[4] = False
    assert torch.allclose(a.sum(1)[mask.any(1)], torch.ones(5), atol=1e-6)
    assert (a[~mask] == 0).all() and (a[mask] > 0).all()
    assert a[0, 0].item() == pytest.approx(1.0)
    # garbage in padded tiles does not change anything
    g = {k: v.clone() for k, v in b.items()}
    g["path_feats"][~b["path_mask"]] = float("nan")
    out2 = model(g)
    assert torch.equal(out2["attention"], a) and torch.equal(out2["logit"], out["logit"])


def test_mean_pooling_weighs_every_real_tile_the_same():
    torch.manual_seed(0)
    model = build(small_cfg(modalities=["pathology"], pathology={"pool": "mean"})).eval()
    lens = [1, 4, 10, 7]
    b = make_batch(B=4, n_tiles=lens)
    out = model(b)
    a = out["attention"]
    for i, L in enumerate(lens):
        assert torch.allclose(a[i, :L], torch.full((L,), 1.0 / L)) and (a[i, L:] == 0).all()
    # the bag's order does not matter, padding garbage does not leak, and a tile's value does
    g = {k: v.clone() for k, v in b.items()}
    g["path_feats"][2, :10] = g["path_feats"][2, :10].flip(0)
    g["path_feats"][~b["path_mask"]] = float("nan")
    assert torch.allclose(model(g)["logit"], out["logit"], atol=1e-6)
    g["path_feats"][3, 0] += 5.0
    assert not torch.allclose(model(g)["logit"][3], out["logit"][3])
    def attention_layers(m):
        return {x for n, _ in m.named_parameters() for x in ("V", "U", "w") if f".{x}." in f".{n}"}
    assert attention_layers(model) == set()   # mean pooling builds no attention layers
    assert attention_layers(build(small_cfg(modalities=["pathology"]))) == {"V", "U", "w"}
    with pytest.raises(ValueError, match="pool"):
        build(small_cfg(pathology={"pool": "max"}))


def test_modality_dropout_train_only_and_never_all():
    torch.manual_seed(0)
    model = build(small_cfg(modality_dropout=0.8), K=2)
    gen = torch.Generator().manual_seed(1)
    present = torch.rand(4000, 4, generator=gen) > 0.4
    model.eval()
    assert torch.equal(model.drop_modalities(present), present)
    model.train()
    kept = model.drop_modalities(present)
    assert not (kept & ~present).any()  # only drops, never adds
    assert torch.equal(kept.any(1), present.any(1))  # never drops all present modalities
    frac = (present & ~kept).sum() / present.sum()
    assert 0.5 < float(frac) < 0.85  # dropout actually happens

    b = make_batch(B=32, K=2)
    model.eval()
    e1, e2 = model(b), model(b)
    assert torch.equal(e1["logit"], e2["logit"])
    assert all(p.all() for p in e1["present"].values())
    model.train()
    out = model(b)
    pres = torch.stack(list(out["present"].values()), 1)
    assert pres.any(1).all() and not pres.all()


def test_no_batchnorm_anywhere():
    cfgs = [small_cfg(), small_cfg(mri={"norm": "instance"}), small_cfg(fusion="attention"),
            small_cfg(mri={"arch": "resnet", "widths": [8, 8, 16, 16], "norm": "group"}),
            small_cfg(mri={"arch": "resnet", "widths": [8, 8, 16, 16], "norm": "instance"}),
            OmegaConf.load(CONF / "newadjnet.yaml")]
    for cfg in cfgs:
        model = build(cfg, K=3)
        kinds = {type(m).__name__ for m in model.modules()}
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
        assert not any("BatchNorm" in k for k in kinds)
        assert kinds & {"GroupNorm", "InstanceNorm3d"}
    with pytest.raises(ValueError):
        build(small_cfg(mri={"norm": "batch"}))


def test_resnet_arch_and_attention_fusion_run():
    torch.manual_seed(0)
    b = make_batch(K=3)
    for cfg in (small_cfg(mri={"arch": "resnet", "widths": [8, 8, 16, 16]}), small_cfg(fusion="attention")):
        model = build(cfg, K=3).train()
        out = model(b)
        assert "clinical" in out["embeddings"]
        assert_finite_outputs(out, 6, b["path_mask"].shape[1])
        loss, _ = multitask_loss(out, b, cfg.loss)
        loss.backward()


def test_clinical_branch_only_with_features():
    assert "clinical" not in build(K=0).branches
    assert "clinical" in build(K=3).branches
    assert "clinical" not in build(small_cfg(clinical={"enabled": False}), K=3).branches


def test_overfits_tiny_batch():
    torch.manual_seed(0)
    cfg = small_cfg(modality_dropout=0.0)
    model = build(cfg).train()
    b = make_batch(B=8, seed=3)
    b["dfs_event"][:4] = 1.0
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss, _ = multitask_loss(model(b), b, cfg.loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def _train_run(seed):
    torch.manual_seed(seed)
    cfg = small_cfg()
    model = build(cfg).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    b = make_batch(seed=7)
    for _ in range(3):
        loss, _ = multitask_loss(model(b), b, cfg.loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model(b)["logit"].detach(), loss.detach()


def test_deterministic_with_fixed_seed():
    l1, s1 = _train_run(123)
    l2, s2 = _train_run(123)
    assert torch.equal(l1, l2) and torch.equal(s1, s2)
    l3, _ = _train_run(124)
    assert not torch.equal(l1, l3)


def test_configs_match_defaults_and_dict_input():
    full = OmegaConf.to_container(OmegaConf.load(CONF / "newadjnet.yaml"))
    assert full == DEFAULTS

    def keys(d, prefix=""):
        return {prefix + k for k in d} | {x for k, v in d.items() if isinstance(v, dict) for x in keys(v, prefix + k + ".")}

    small = OmegaConf.to_container(OmegaConf.load(CONF / "small.yaml"))
    assert keys(small) == keys(DEFAULTS)
    from common.config import load_config   # linear.yaml extends newadjnet.yaml (Hydra defaults list)

    assert keys(OmegaConf.to_container(load_config(["model=linear"]).model)) == keys(DEFAULTS)
    # plain (partial) dicts are merged over the defaults
    m = build_model({"modalities": ["genomics"], "embed_dim": 16}, in_channels=C, path_dim=FEAT, n_genes=G, n_clinical=0)
    assert isinstance(m, NewAdjNet) and m.embed_dim == 16 and list(m.branches) == ["genomics"]
    with pytest.raises(ValueError):
        build_model({"modalities": ["ct"]}, C, FEAT, G, 0)


# --- tile thumbnails and the tile CNN (model.pathology.tile_net=cnn) ------------------------------------

SIDE = 16


def _thumb_model(**path):
    cfg = small_cfg(pathology={"tile_net": "cnn", **path})
    return build_model(cfg, in_channels=C, path_dim=3 * SIDE * SIDE, n_genes=G, n_clinical=0)


def _thumb_batch(seed=0, n_tiles=(3, 1, 5, 2)):
    b = make_batch(B=len(n_tiles), seed=seed, n_tiles=list(n_tiles))
    g = torch.Generator().manual_seed(seed + 1)
    b["path_feats"] = torch.rand(len(n_tiles), max(n_tiles), 3 * SIDE * SIDE, generator=g) * b["path_mask"].unsqueeze(-1)
    return b


def test_tile_cnn_sees_only_real_tiles_and_learns():
    torch.manual_seed(0)
    model = _thumb_model().eval()
    b = _thumb_batch()
    ref = model(b)
    garbage = dict(b)
    garbage["path_feats"] = torch.where(b["path_mask"].unsqueeze(-1), b["path_feats"], torch.full_like(b["path_feats"], 1e6))
    out = model(garbage)
    assert torch.allclose(ref["logit"], out["logit"]) and torch.equal(ref["attention"] == 0, ~b["path_mask"])
    # a real tile does move the output, and the CNN's first convolution gets a gradient
    moved = dict(b)
    moved["path_feats"] = b["path_feats"].clone()
    moved["path_feats"][0, 0] += 1.0
    assert not torch.allclose(model(moved)["logit"][0], ref["logit"][0])
    model.train()
    model(b)["logit"].sum().backward()
    conv = next(p for n, p in model.named_parameters() if "tile_proj.features" in n)
    assert conv.grad is not None and conv.grad.abs().sum() > 0


def test_tile_augmentation_is_train_only_and_keeps_each_tile_whole():
    torch.manual_seed(0)
    cnn = _thumb_model().branches["pathology"].tile_proj
    x = torch.arange(2 * 3 * SIDE * SIDE, dtype=torch.float32).reshape(2, 3, SIDE, SIDE)
    y = cnn._dihedral(x)
    # each output tile is one of the 8 flips / quarter turns of its own input tile
    for i in range(2):
        views = [torch.rot90(v, k, dims=(-2, -1)) for v in (x[i], x[i].flip(-1)) for k in range(4)]
        assert any(torch.equal(y[i], v) for v in views)
    cnn.eval()
    flat = x.reshape(2, -1)
    assert torch.equal(cnn(flat), cnn(flat))  # eval: no random turn
    cnn.train()
    torch.manual_seed(1)
    outs = {tuple(cnn.features(cnn._dihedral(x)).flatten().tolist()[:4]) for _ in range(6)}
    assert len(outs) > 1


def test_tile_cnn_refuses_embeddings_with_a_named_setting():
    with pytest.raises(ValueError, match="tile_net=cnn needs tile thumbnails.*encoder.name=thumbnail.*got 12 values"):
        build_model(small_cfg(pathology={"tile_net": "cnn"}), in_channels=C, path_dim=FEAT, n_genes=G)
    with pytest.raises(ValueError, match="tile_net must be auto, mlp, cnn or linear"):
        build_model(small_cfg(pathology={"tile_net": "vit"}), in_channels=C, path_dim=FEAT, n_genes=G)


@pytest.mark.parametrize("encoder,expected", [("stats", "mlp"), ("thumbnail", "cnn")])
def test_tile_net_auto_follows_the_encoder(encoder, expected):
    from common.config import load_config
    from common.learn.task import model_config

    cfg = load_config(["model=newadjnet", f"preprocess.pathology.encoder.name={encoder}"])   # the CNN network
    assert model_config(cfg)["pathology"]["tile_net"] == expected
    cfg = load_config(["model=newadjnet", f"preprocess.pathology.encoder.name={encoder}", "model.pathology.tile_net=mlp"])
    assert model_config(cfg)["pathology"]["tile_net"] == "mlp"


def test_tile_colour_jitter_is_train_only():
    torch.manual_seed(0)
    cnn = _thumb_model(tile_augment=False, tile_jitter=0.2).branches["pathology"].tile_proj
    flat = torch.rand(4, 3 * SIDE * SIDE)
    cnn.eval()
    assert torch.equal(cnn(flat), cnn(flat))
    cnn.train()
    cnn.out[-1].p = 0.0                      # no dropout: what differs is the jitter
    assert not torch.allclose(cnn(flat), cnn(flat))
    with pytest.raises(ValueError, match="tile_jitter must be >= 0"):
        _thumb_model(tile_jitter=-1.0)


def _only(batch, keep):
    """The batch as if each sample had only the modality ``keep``."""
    b = {k: v.clone() for k, v in batch.items()}
    for m, flag in (("mri", "has_mri"), ("pathology", "has_path"), ("genomics", "has_genomics")):
        if m != keep:
            b[flag] = torch.zeros_like(b[flag])
    if keep != "clinical":
        b["clinical_mask"] = torch.zeros_like(b["clinical_mask"])
    return b


@pytest.mark.parametrize("fusion", ["late", "mean", "attention"])
def test_unimodal_outputs_are_the_model_with_that_modality_alone(fusion):
    """model.loss.unimodal_weight > 0: in training the model also returns, for every modality, its output had
    the sample only that modality; the per-modality loss is the mean of those outputs' losses."""
    torch.manual_seed(0)
    quiet = {"modality_dropout": 0.0, "head": {"dropout": 0.0}, "pathology": {"dropout": 0.0},
             "genomics": {"dropout": 0.0}, "clinical": {"dropout": 0.0}}
    model = build(small_cfg(fusion=fusion, loss={"unimodal_weight": 0.5}, **quiet), K=2)
    if fusion == "late":
        with torch.no_grad():
            model.absent_terms.copy_(torch.randn_like(model.absent_terms))
    b = make_batch(K=2)
    b["has_genomics"][1] = False            # a modality a sample lacks has no unimodal loss there
    uni = model.train()(b)["unimodal"]
    assert uni["logit"].shape == (6, len(model.modalities)) and not bool(uni["present"][1, 2])
    model.eval()
    assert "unimodal" not in model(b)       # training only: prediction and validation are unchanged
    for j, m in enumerate(model.modalities):
        alone = model(_only(b, m))
        sel = uni["present"][:, j]
        torch.testing.assert_close(uni["logit"][sel, j], alone["logit"][sel], atol=1e-5, rtol=0)
        torch.testing.assert_close(uni["risk"][sel, j], alone["risk"][sel], atol=1e-5, rtol=0)
    cfg = {"benefit_weight": 1.0, "dfs_weight": 0.5, "unimodal_weight": 0.5}
    total, parts = multitask_loss({**model(b), "unimodal": uni}, b, cfg)
    each = [multitask_loss({"logit": uni["logit"][uni["present"][:, j], j],
                            "risk": uni["risk"][uni["present"][:, j], j]},
                           {k: b[k][uni["present"][:, j]] for k in ("benefit", "dfs_time", "dfs_event")}, cfg)[0]
            for j in range(len(model.modalities))]
    torch.testing.assert_close(parts["unimodal"], torch.stack(each).mean().detach())
    torch.testing.assert_close(total.detach(), parts["benefit"] + 0.5 * parts["dfs"] + 0.5 * parts["unimodal"])


def test_unimodal_loss_off_by_default_and_refuses_a_negative_weight():
    model = build(small_cfg(), K=2).train()
    assert "unimodal" not in model(make_batch(K=2))
    with pytest.raises(ValueError, match="unimodal_weight"):
        build(small_cfg(loss={"unimodal_weight": -1.0}), K=2)


def test_a_linear_configuration_is_a_linear_model_of_the_summary_features():
    """model.mri.arch=stats (no CNN: the central box's mean and SD per phase) and tile_net=linear with mean
    pooling, linear genomics/clinical branches and no LayerNorm, under late fusion: the benefit logit is affine
    in the tile features and the genes, and the MRI enters only through its central box."""
    torch.manual_seed(0)
    cfg = small_cfg(fusion="late", branch_layernorm=False, modality_dropout=0.0, head={"dropout": 0.0},
                    mri={"arch": "stats", "center_frac": 0.5},
                    pathology={"tile_net": "linear", "pool": "mean", "dropout": 0.0},
                    genomics={"hidden": []}, clinical={"hidden": []})
    model = build(cfg, K=2).eval()
    assert model.branches["mri"].features is None
    a, b = make_batch(K=2, seed=1, n_tiles=[3] * 6), make_batch(K=2, seed=2, n_tiles=[3] * 6)
    mid = {k: v.clone() for k, v in a.items()}
    for k in ("path_feats", "genomics"):
        b[k] = torch.randn_like(a[k]) * (a["path_mask"].unsqueeze(-1) if k == "path_feats" else a["genomics_mask"])
        mid[k] = (a[k] + b[k]) / 2
    for k in ("mri", "clinical"):
        b[k] = a[k]
    with torch.no_grad():
        fa, fb, fm = model(a)["logit"], model({**a, "path_feats": b["path_feats"], "genomics": b["genomics"]})["logit"], model(mid)["logit"]
    torch.testing.assert_close(fm, (fa + fb) / 2, atol=1e-5, rtol=0)
    assert (fa - fb).abs().max() > 1e-3
    outside = {k: v.clone() for k, v in a.items()}
    outside["mri"][:, :, :4] = torch.randn_like(outside["mri"][:, :, :4]) * 5   # outside the central half
    with torch.no_grad():
        assert torch.equal(model(outside)["logit"], fa)
    with pytest.raises(ValueError, match="center_frac"):
        build(small_cfg(mri={"arch": "stats", "center_frac": 0.0}))
    with pytest.raises(ValueError, match="tile_net"):
        build(small_cfg(pathology={"tile_net": "affine"}))


def test_model_linear_is_the_linear_configuration():
    """`model=linear` (conf/model/linear.yaml) is the configuration the linear test above checks."""
    from common.config import load_config

    m = load_config(["model=linear"]).model
    assert (m.mri.arch, m.pathology.tile_net, m.pathology.pool, m.branch_layernorm, list(m.genomics.hidden),
            list(m.clinical.hidden), m.fusion) == ("stats", "linear", "mean", False, [], [], "late")
    model = build_model(OmegaConf.to_container(m), in_channels=C, path_dim=FEAT, n_genes=G, n_clinical=2)
    assert model.branches["mri"].features is None and isinstance(model.branches["pathology"].tile_proj, torch.nn.Linear)
    assert all(isinstance(layer, torch.nn.Linear) for b in ("genomics", "clinical") for layer in model.branches[b].net)


@pytest.mark.parametrize("fusion", ["late", "mean"])
def test_zero_init_starts_from_a_constant_prediction_that_still_learns(fusion):
    """model.head.zero_init: the benefit and DFS output layers start at zero, so the untrained model gives every
    patient the same logit and risk; a few optimiser steps move them apart."""
    torch.manual_seed(0)
    model = build(small_cfg(fusion=fusion, modality_dropout=0.0, head={"zero_init": True, "dropout": 0.0}))
    batch = make_batch(seed=3)
    out = model.eval()(batch)
    assert torch.equal(out["logit"], out["logit"][:1].expand_as(out["logit"]))
    assert torch.equal(out["risk"], torch.zeros_like(out["risk"]))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        multitask_loss(model.train()(batch), batch, OmegaConf.create(DEFAULTS["loss"]))[0].backward()
        opt.step()
    assert model.eval()(batch)["logit"].std() > 1e-4
    assert build(small_cfg(fusion=fusion)).eval()(batch)["logit"].std() > 1e-4   # off: random output layers


def test_fixed_terms_make_the_branches_carry_the_coefficients():
    """model.head.fixed_terms: late fusion's benefit term is coordinate 0 of each modality's embedding plus a trained
    bias, and its log-hazard term coordinate 1; they are not parameters (nothing to train, send or perturb). In the
    linear configuration the genomics branch's last linear map then holds the modality's coefficients, and
    train.l2 penalises that map (ridge on them)."""
    from common.config import load_config
    from common.learn.engine import l2_penalised

    m = OmegaConf.to_container(load_config(["model=linear", "model.head.fixed_terms=true",
                                            "model.head.dropout=0.0", "model.modality_dropout=0.0"]).model)
    torch.manual_seed(0)
    model = build(m)
    batch = make_batch(seed=4)
    names = [n for n, _ in model.named_parameters()]
    assert "benefit_bias" in names and not any(n.startswith(("benefit_terms.", "risk_terms.")) for n in names)
    with torch.no_grad():
        model.benefit_bias.copy_(torch.arange(len(model.modalities), dtype=torch.float32) / 10)
    out = model.eval()(batch)
    emb = out["embeddings"]
    want = sum(emb[mo][:, 0] + model.benefit_bias[j] for j, mo in enumerate(model.modalities))
    torch.testing.assert_close(out["logit"], want)
    torch.testing.assert_close(out["risk"], sum(emb[mo][:, 1] for mo in model.modalities))
    # the genomics term is affine in the genes with the first row of the branch's only linear map as coefficients
    lin = model.branches["genomics"].net[-1]
    coef = lin.weight[0].detach().clone()
    torch.testing.assert_close(emb["genomics"][:, 0],
                               torch.cat([batch["genomics"], batch["genomics_mask"].float()], 1) @ coef + lin.bias[0])
    assert "branches.genomics.net.0.weight" in {n for n, _ in l2_penalised(model)}
    # a missing modality adds its absent constant in place of its term
    gone = {k: v.clone() for k, v in batch.items()}
    gone["has_genomics"][0] = False
    j = model.modalities.index("genomics")
    torch.testing.assert_close(model(gone)["logit"][0],
                               out["logit"][0] - emb["genomics"][0, 0] - model.benefit_bias[j] + model.absent_terms[0, j])
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        multitask_loss(model.train()(batch), batch, OmegaConf.create(DEFAULTS["loss"]))[0].backward()
        opt.step()
    assert not torch.equal(model.branches["genomics"].net[-1].weight[0], coef)    # the coefficients train
    assert not torch.equal(model.benefit_bias, torch.arange(len(model.modalities)) / 10)   # ... and the biases
    for bad in ({"fusion": "mean"}, {"embed_dim": 1}, {"head": {"zero_init": True}}):
        with pytest.raises(ValueError, match="fixed_terms"):
            build(small_cfg(**{"fusion": "late", **bad, "head": {"fixed_terms": True, **bad.get("head", {})}}))
