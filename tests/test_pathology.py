"""Whole-slide tiling and tile encoders on real pyramidal JPEG TIFFs written to tmp_path."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from omegaconf import OmegaConf

from common.preprocess.encoders import STATS_FEATURES, build_encoder
from common.preprocess.pathology import (
    iter_tile_batches,
    level0_mpp,
    open_slide,
    read_level,
    slide_to_bag,
    tile_grid,
    tissue_mask,
)

CONF = Path(__file__).resolve().parents[1] / "conf" / "preprocess" / "default.yaml"
W, H, MPP, TISSUE_W = 4096, 2048, 0.5, 1792  # tissue in x < 1792 (exactly 4 tile columns at 1 mpp / 224 px)


def he_texture(h: int, w: int, rng: np.random.Generator, nuclei_per_mpx: float = 2500, radius: int = 3) -> np.ndarray:
    """Pink eosin stroma with purple haematoxylin nuclei (disks), uint8 RGB."""
    img = np.empty((h, w, 3), np.float32)
    img[...] = (235, 160, 200)
    img += rng.normal(0, 6, (h, w, 1))
    n = int(nuclei_per_mpx * h * w / 1e6)
    ys, xs = rng.integers(0, h, n), rng.integers(0, w, n)
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    disk = (yy ** 2 + xx ** 2) <= radius ** 2
    for y, x in zip(ys, xs):
        y0, x0 = max(0, y - radius), max(0, x - radius)
        y1, x1 = min(h, y + radius + 1), min(w, x + radius + 1)
        d = disk[y0 - (y - radius):y1 - (y - radius), x0 - (x - radius):x1 - (x - radius)]
        img[y0:y1, x0:x1][d] = (70, 40, 140)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_pyramid(path: Path, img: np.ndarray, mpp: float | None, levels: int = 4, tile: int = 256) -> Path:
    """Tiled JPEG pyramid (SubIFDs), level i downsampled 2**i, resolution tags in px/cm."""
    kw = dict(tile=(tile, tile), compression="jpeg", compressionargs={"level": 90}, photometric="rgb")
    if mpp is not None:
        kw.update(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(str(path), bigtiff=False) as tw:
        tw.write(img, subifds=levels - 1, **kw)
        cur = img
        for lvl in range(1, levels):
            h, w = cur.shape[0] // 2 * 2, cur.shape[1] // 2 * 2
            cur = cur[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).astype(np.uint8)
            k = dict(kw)
            if mpp is not None:
                k["resolution"] = (1e4 / (mpp * 2 ** lvl),) * 2
            tw.write(cur, subfiletype=1, **k)
    return path


@pytest.fixture(scope="module")
def pcfg():
    c = OmegaConf.to_container(OmegaConf.load(CONF).pathology, resolve=True)
    c["thumbnail_min_dim"] = 512
    c["batch_size"] = 16
    return c


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    img = np.full((H, W, 3), 245, np.uint8)
    img += rng.integers(0, 6, (H, W, 1), dtype=np.uint8)  # slightly noisy glass
    img[:, :TISSUE_W] = he_texture(H, TISSUE_W, rng)
    return write_pyramid(tmp_path_factory.mktemp("slides") / "half.tif", img, MPP)


def test_slide_metadata(slide_path, pcfg):
    s = open_slide(slide_path)
    assert s.level_count == 4 and s.level_dimensions[0] == (W, H)
    assert level0_mpp(s, pcfg) == pytest.approx(MPP, rel=1e-3)
    lvl, ds, side = read_level(s, pcfg)  # 1 mpp from 0.5 mpp: level 1, exact, no resize
    assert (lvl, ds, side) == (1, 2.0, 224)


def test_tissue_detection(slide_path, pcfg):
    s = open_slide(slide_path)
    mask, lvl, ds = tissue_mask(s, pcfg)
    assert lvl == 3 and ds == pytest.approx(8.0) and mask.shape == (H // 8, W // 8)
    edge = TISSUE_W // 8
    assert mask[:, : edge - 2].mean() > 0.95  # tissue found
    assert mask[:, edge + 2:].mean() < 0.01  # background not


def test_tissue_morphology_is_scipys():
    """The fast cross-shaped opening / closing gives scipy.ndimage's result, borders included."""
    from scipy import ndimage

    from common.preprocess.pathology import binary_open_close

    rng = np.random.default_rng(5)
    for shape, p_on in (((64, 80), 0.5), ((33, 17), 0.8), ((50, 50), 0.2), ((1, 9), 0.9)):
        m = ndimage.uniform_filter(rng.random(shape), 3) > (1 - p_on) * 0.9 if min(shape) > 2 else rng.random(shape) < p_on
        for o, c in ((1, 2), (0, 1), (2, 0), (0, 0)):
            want = m
            if o:
                want = ndimage.binary_opening(want, iterations=o)
            if c:
                want = ndimage.binary_closing(want, iterations=c, border_value=0)
            assert np.array_equal(binary_open_close(m, o, c), want), (shape, o, c)


def test_strip_reads_give_the_tiles_of_single_reads(slide_path, pcfg):
    """Tiles cut from one read per run of adjacent tiles equal tiles read one by one (exact level, a level
    that needs resizing, runs broken by rows, gaps and batch ends)."""
    with open_slide(slide_path) as s:
        mask, _, ds = tissue_mask(s, pcfg)
        for cfg in (pcfg, dict(pcfg, target_mpp=1.5), dict(pcfg, target_mpp=0.5, max_tiles=0, batch_size=7)):
            coords = tile_grid(s, mask, cfg, mask_downsample=ds)
            coords = np.concatenate([coords[:5], coords[6:]])  # a gap inside a row
            lvl, _, side = read_level(s, cfg)
            got = np.concatenate(list(iter_tile_batches(s, coords, cfg)))
            for k in (0, 4, 5, len(coords) - 1):
                x, y = map(int, coords[k])
                one = np.asarray(s.read_region((x, y), lvl, (side, side), as_array=True))[..., :3]
                if side != cfg["tile_size"]:
                    from PIL import Image
                    one = np.asarray(Image.fromarray(np.ascontiguousarray(one)).resize(
                        (cfg["tile_size"],) * 2, Image.Resampling.BOX if side > cfg["tile_size"] else Image.Resampling.BILINEAR))
                assert np.array_equal(got[k], one), (cfg["target_mpp"], k)


def test_tile_count_known_geometry(slide_path, pcfg):
    s = open_slide(slide_path)
    mask, _, ds = tissue_mask(s, pcfg)
    coords = tile_grid(s, mask, pcfg, mask_downsample=ds)
    t0 = 224 * pcfg["target_mpp"] / MPP  # 448 level-0 px per tile
    assert len(coords) == (TISSUE_W // t0) * (H // t0) == 16
    assert coords[:, 0].max() + t0 <= TISSUE_W
    # max_tiles caps deterministically
    c2 = dict(pcfg, max_tiles=5)
    a, b = tile_grid(s, mask, c2, mask_downsample=ds), tile_grid(s, mask, c2, mask_downsample=ds)
    assert len(a) == 5 and np.array_equal(a, b) and set(map(tuple, a)) <= set(map(tuple, coords))
    # 0.5 mpp -> 4x as many tiles, read from level 0
    c3 = dict(pcfg, target_mpp=0.5, max_tiles=0)
    assert len(tile_grid(s, mask, c3, mask_downsample=ds)) == (TISSUE_W // 224) * (H // 224)
    # a target between pyramid levels: read the finer level and resize
    c4 = dict(pcfg, target_mpp=1.5)
    lvl, ds4, side = read_level(s, c4)
    assert lvl == 1 and side == round(224 * 1.5 / MPP / 2)
    batch = next(iter_tile_batches(s, tile_grid(s, mask, c4, mask_downsample=ds)[:3], c4))
    assert batch.shape == (3, 224, 224, 3) and batch.dtype == np.uint8


def test_slide_to_bag(slide_path, pcfg):
    calls = []
    bag = slide_to_bag(slide_path, pcfg, progress_callback=lambda d, t: calls.append((d, t)))
    assert bag["n_tiles"] == 16 and bag["features"].shape == (16, len(STATS_FEATURES))
    assert bag["coords"].dtype == np.int32 and bag["coords"].shape == (16, 2)
    assert bag["mpp"] == pytest.approx(MPP) and bag["level"] == 1
    assert calls[-1] == (16, 16) and len(calls) == 1 + (16 - 1) // pcfg["batch_size"]
    assert np.isfinite(bag["features"]).all()
    bag2 = slide_to_bag(slide_path, pcfg)
    assert np.array_equal(bag["features"], bag2["features"])  # deterministic


def test_stats_encoder_separates_nuclei_density(pcfg):
    enc = build_encoder(pcfg["encoder"])
    assert enc.name == "stats" and enc.dim == len(STATS_FEATURES)
    rng = np.random.default_rng(1)
    dense = np.stack([he_texture(224, 224, rng, nuclei_per_mpx=6000) for _ in range(3)])
    sparse = np.stack([he_texture(224, 224, rng, nuclei_per_mpx=400) for _ in range(3)])
    fd, fs = enc(dense), enc(sparse)
    assert fd.shape == (3, enc.dim) and fd.dtype == np.float32
    assert np.array_equal(fd, enc(dense))  # deterministic
    i = {n: k for k, n in enumerate(STATS_FEATURES)}
    for name in ("nuclei_frac", "nuclei_per_kpx", "H_mean"):
        assert fd[:, i[name]].min() > 2 * fs[:, i[name]].max(), name
    # a uniform stain-intensity shift (paler centre) keeps the nuclei-density ranking
    pale = (255 - (255 - dense.astype(np.float32)) * 0.75).astype(np.uint8)
    fp = enc(pale)
    assert fp[:, i["nuclei_frac_rel"]].min() > fs[:, i["nuclei_frac_rel"]].max()
    # fingerprint follows the configuration
    other = build_encoder({"name": "stats", "stats": {"nuclei_od": 0.5}})
    assert other.fingerprint != enc.fingerprint and build_encoder(None).fingerprint == enc.fingerprint


def reference_stats(enc, tile: np.ndarray) -> np.ndarray:
    """The stats encoder's features of one tile, written plainly, one tile at a time: the definition
    that the encoder's chunked implementation must reproduce."""
    from scipy import ndimage

    rgb = tile.astype(np.float32) / 255.0
    od_sum = -np.log10((tile.astype(np.float32) + 1.0) / 256.0).sum(axis=-1)
    conc = enc.deconvolve(tile)
    H, E, D = conc[..., 0], conc[..., 1], conc[..., 2]
    tissue = od_sum > enc.background_od
    f = [tissue.mean(), od_sum.mean()]
    t = tissue if tissue.sum() >= 16 else np.ones_like(tissue)
    Ht, Et = H[t], E[t]
    for v in (Ht, Et):
        f += [v.mean(), v.std(), *np.percentile(v, (10, 50, 90, 99))]
    f += [D[t].mean(), D[t].std(), Ht.mean() / (Et.mean() + 1e-3)]
    f.append(float(np.corrcoef(Ht, Et)[0, 1]) if Ht.std() > 1e-6 and Et.std() > 1e-6 else 0.0)
    for v in (Ht, Et):
        vn = v / (np.percentile(v, 99) + 1e-3)
        f += [vn.mean(), vn.std(), np.median(vn)]
    hist, _ = np.histogram(np.clip(Ht, 0, 2.0), bins=4, range=(0.0, 2.0))
    f += list(hist / max(len(Ht), 1))
    nuc = H > enc.nuclei_od
    nuc_rel = H > max(0.5 * enc.nuclei_od, 0.6 * np.percentile(H, 99))
    lab, k = ndimage.label(nuc, structure=ndimage.generate_binary_structure(2, 1))
    sizes = np.bincount(lab.ravel())[1:] if k else np.zeros(0)
    sizes = sizes[sizes >= enc.min_nucleus_px]
    f += [nuc.mean(), nuc_rel.mean(), 1000.0 * len(sizes) / tissue.size,
          sizes.mean() if len(sizes) else 0.0, sizes.std() if len(sizes) else 0.0, (nuc & (E < np.median(Et))).mean()]
    grey = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    gy, gx = np.gradient(grey)
    hy, hx = np.gradient(H)
    m, mh = ndimage.uniform_filter(grey, 7), ndimage.uniform_filter(H, 7)
    lv, lvh = ndimage.uniform_filter(grey * grey, 7) - m * m, ndimage.uniform_filter(H * H, 7) - mh * mh
    f += [(gx * gx + gy * gy).mean(), (hx * hx + hy * hy).mean(), ndimage.laplace(grey).var(),
          np.maximum(lv, 0).mean(), np.maximum(lvh, 0).mean()]
    mx, mn = rgb.max(axis=-1), rgb.min(axis=-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    f += [*rgb.mean(axis=(0, 1), dtype=np.float64), *rgb.std(axis=(0, 1), dtype=np.float64), grey.mean(), grey.std(),
          sat.mean()]
    return np.nan_to_num(np.asarray(f, np.float32), nan=0.0, posinf=0.0, neginf=0.0)


def test_stats_encoder_matches_its_per_tile_definition(slide_path, pcfg):
    """The chunked stats encoder gives each tile's features as the plain per-tile definition does, whatever
    the chunk holds (tissue, glass, a blank tile with < 16 tissue pixels, nuclei touching a chunk's border)."""
    enc = build_encoder(pcfg["encoder"])
    rng = np.random.default_rng(3)
    tiles = [he_texture(224, 224, rng, nuclei_per_mpx=d) for d in (300, 2500, 8000)]
    tiles += [np.full((224, 224, 3), 250, np.uint8), np.zeros((224, 224, 3), np.uint8) + 255]
    with open_slide(slide_path) as s:
        coords = tile_grid(s, tissue_mask(s, pcfg)[0], pcfg)
        tiles += list(np.concatenate(list(iter_tile_batches(s, coords[:20], pcfg))))
    tiles = np.stack(tiles + [np.ascontiguousarray(t[::-1]) for t in tiles[:3]])  # > one chunk of 16
    got = enc(tiles)
    want = np.stack([reference_stats(enc, t) for t in tiles])
    assert got.shape == want.shape == (len(tiles), len(STATS_FEATURES))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg="stats encoder vs its definition")
    assert np.array_equal(enc(tiles[5:9]), got[5:9])  # a tile's features do not depend on its chunk


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_encoder(tmp_path):
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
            self.head = torch.nn.Linear(8, 5)

        def forward(self, x):
            return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))

    torch.manual_seed(0)
    p = tmp_path / "tiny.pt"
    torch.jit.script(Tiny()).save(str(p))
    enc = build_encoder({"name": "torchscript", "path": str(p), "input_size": 64})
    assert enc.dim == 5
    batch = np.random.default_rng(0).integers(0, 255, (4, 96, 96, 3), dtype=np.uint8)
    out = enc(batch)
    assert out.shape == (4, 5) and out.dtype == np.float32 and np.isfinite(out).all()
    # other weights -> other fingerprint
    torch.manual_seed(1)
    p2 = tmp_path / "tiny2.pt"
    torch.jit.script(Tiny()).save(str(p2))
    assert build_encoder({"name": "torchscript", "path": str(p2)}).fingerprint != enc.fingerprint
    with pytest.raises(ValueError, match="path"):
        build_encoder({"name": "torchscript"})
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    with pytest.raises(ValueError, match="bad.pt"):
        build_encoder({"name": "torchscript", "path": str(bad)})


def test_unavailable_encoders_fail_clearly(tmp_path):
    import importlib.util

    if importlib.util.find_spec("timm") is None:
        with pytest.raises(ImportError, match="needs the `timm` package and a local path; nothing is downloaded"):
            build_encoder({"name": "timm", "path": str(tmp_path)})
    if importlib.util.find_spec("transformers") is None:
        with pytest.raises(ImportError, match="needs the `transformers` package"):
            build_encoder({"name": "hf", "path": str(tmp_path)})
    with pytest.raises(ValueError, match="unknown"):
        build_encoder({"name": "resnet9000"})


def test_non_slide_and_missing_mpp(tmp_path, pcfg):
    junk = tmp_path / "P001.svs"
    junk.write_bytes(b"this is not a slide" * 100)
    with pytest.raises(ValueError, match="P001.svs"):
        slide_to_bag(junk, pcfg)
    with pytest.raises(FileNotFoundError, match="nope.tif"):
        slide_to_bag(tmp_path / "nope.tif", pcfg)
    rng = np.random.default_rng(2)
    img = np.full((512, 1024, 3), 245, np.uint8)
    img[:, :512] = he_texture(512, 512, rng)
    nompp = write_pyramid(tmp_path / "nompp.tif", img, None, levels=2)
    with pytest.raises(ValueError, match="nompp.tif.*microns-per-pixel"):
        slide_to_bag(nompp, pcfg)
    c = dict(pcfg, default_mpp=0.5)
    with pytest.warns(UserWarning, match="default_mpp"):
        bag = slide_to_bag(nompp, c)
    assert bag["n_tiles"] == 1 and bag["mpp"] == 0.5  # 2 grid columns of 448 px; only the first is tissue


def test_resnet_encoder_from_a_local_weights_file_and_a_cache_hit(site, tmp_path):
    """A CNN tile encoder (MONAI's 2-D ResNet-18) built from a weights file the site supplies: features of the
    encoder's size, and a second preprocessing run finds every bag in the cache."""
    import torch
    from monai.networks.nets import ResNet

    from common.config import load_config
    from common.preprocess.cache import preprocess_site
    from common.preprocess.encoders import build_encoder

    weights = tmp_path / "resnet18.pt"
    net = ResNet(block="basic", layers=[2, 2, 2, 2], block_inplanes=[64, 128, 256, 512], spatial_dims=2,
                 n_input_channels=3, num_classes=1000)
    torch.save(net.state_dict(), weights)
    enc_cfg = {"name": "resnet", "path": str(weights), "depth": 18, "input_size": 64}
    enc = build_encoder(enc_cfg)
    feats = enc(np.zeros((3, 96, 96, 3), np.uint8))
    assert enc.dim == 512 and feats.shape == (3, 512) and np.isfinite(feats).all()
    cfg = load_config(["preprocess.pathology.encoder.name=resnet", f"preprocess.pathology.encoder.path={weights}",
                       "preprocess.pathology.encoder.input_size=64", "preprocess.pathology.max_tiles=6"])
    first = preprocess_site(site, cfg, progress=False)
    assert first.pathology["built"] >= 1 and first.failures == []
    second = preprocess_site(site, cfg, progress=False)
    assert second.pathology["built"] == 0 and second.pathology["cached"] == first.pathology["built"]
    import json

    manifest = json.loads((first.cache_dir / "manifest.json").read_text())
    assert manifest["path_dim"] == 512 and manifest["encoder"].startswith("resnet-")
    torch.save({"not": torch.zeros(2)}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="wrong.pt: weights do not fit a ResNet-18"):
        build_encoder({**enc_cfg, "path": str(tmp_path / "wrong.pt")})


def test_macenko_stain_normalisation_brings_two_stainings_together(tmp_path, pcfg):
    """The same tissue stained at two centers (the generator's stain vectors and strengths): after the
    per-slide Macenko normalisation the tiles' colour features are much closer; none leaves them apart."""
    from common import synth
    from common.config import deep_merge

    cfg = synth.load_config()
    pc = deep_merge(cfg["pathology"], {"size_px": [1536, 1536]})
    stains = [{"background": 245},
              {"h_shift": [0.16, -0.1, 0.2], "e_shift": [0.1, -0.1, 0.0], "h_scale": 1.45, "e_scale": 0.7,
               "background": 232}]
    paths = []
    for k, st in enumerate(stains):
        rgb, mpp = synth._slide_rgb(dict(seed=3, site_idx=0, pidx=0, path_cfg=pc, stain=st, z_path=0.0))
        paths.append(tmp_path / f"s{k}.tiff")
        synth._write_slide(paths[-1], rgb, mpp, pc)
    colour = [STATS_FEATURES.index(f) for f in ("R_mean", "G_mean", "B_mean", "H_mean", "E_mean")]
    nuclear = [STATS_FEATURES.index(f) for f in ("H_mean", "nuclei_frac")]

    def gap(method, cols):
        c = OmegaConf.merge(pcfg, {"stain_norm": method})
        bags = [slide_to_bag(p, c) for p in paths]
        assert bags[0]["n_tiles"] == bags[1]["n_tiles"] >= 3
        assert bags[0]["stain"]["method"] == method
        means = [b["features"][:, cols].mean(axis=0) for b in bags]
        return np.abs(means[0] - means[1]).sum(), bags
    raw, _ = gap("none", colour)
    normed, bags = gap("macenko", colour)
    assert normed < 0.85 * raw, (raw, normed)
    raw, _ = gap("none", nuclear)             # haematoxylin: what the nuclei features read
    normed, _ = gap("macenko", nuclear)
    assert normed < 0.25 * raw, (raw, normed)
    assert np.array_equal(bags[0]["features"], slide_to_bag(paths[0], OmegaConf.merge(pcfg, {"stain_norm": "macenko"}))["features"])
    with pytest.raises(ValueError, match="stain_norm"):
        slide_to_bag(paths[0], OmegaConf.merge(pcfg, {"stain_norm": "reinhardt"}))


def test_stain_normaliser_refuses_a_blank_sample():
    from common.preprocess.stain import SlideStainNormalizer

    with pytest.raises(ValueError, match="stained pixels"):
        SlideStainNormalizer(np.full((4, 32, 32, 3), 250, np.uint8))


def test_thumbnail_encoder_is_the_tile_in_optical_density_box_averaged(slide_path, pcfg):
    """The thumbnail encoder keeps the tile itself (for the model's tile CNN): OD per colour plane,
    channel-first, each output pixel the mean of its 4 x 4 block of a 224-px tile."""
    enc = build_encoder({"name": "thumbnail", "thumbnail": {"side": 56}})
    assert enc.name == "thumbnail" and enc.dim == 3 * 56 * 56 and enc.tile_shape == (3, 56, 56)
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    tiles[1] = 255                                             # glass
    out = enc(tiles).reshape(2, 3, 56, 56)
    od = -np.log10((tiles[0].astype(np.float64) + 1) / 256)
    blocks = od.reshape(56, 4, 56, 4, 3).mean(axis=(1, 3))     # H x W x C
    assert np.allclose(out[0], blocks.transpose(2, 0, 1), atol=1e-5)
    assert np.allclose(out[1], 0.0, atol=1e-6)
    assert build_encoder({"name": "thumbnail", "thumbnail": {"side": 32}}).fingerprint != enc.fingerprint
    with pytest.raises(ValueError, match="side 4 outside"):
        build_encoder({"name": "thumbnail", "thumbnail": {"side": 4}})
    bag = slide_to_bag(slide_path, {**pcfg, "encoder": {"name": "thumbnail", "thumbnail": {"side": 28}}})
    assert bag["features"].shape == (16, 3 * 28 * 28) and np.isfinite(bag["features"]).all()


def test_runs_with_two_encoders_share_a_cache_each_reading_its_own_manifest(site):
    """Preprocessing with another encoder (another run, at the same time) must not change what a run that
    already preprocessed reads: each configuration has its own manifest in the shared cache."""
    from common.config import load_config
    from common.learn.dataset import site_dataset
    from common.preprocess.cache import preprocess_site

    stats_cfg = load_config(["preprocess.pathology.max_tiles=4"])
    thumb_cfg = load_config(["preprocess.pathology.max_tiles=4", "preprocess.pathology.encoder.name=thumbnail",
                             "preprocess.pathology.encoder.thumbnail.side=16"])
    a = preprocess_site(site, stats_cfg, progress=False)
    b = preprocess_site(site, thumb_cfg, progress=False)      # the other run: manifest.json is now its
    assert a.cache_dir == b.cache_dir and a.manifest != b.manifest
    assert site_dataset(a.manifest, None, stats_cfg).path_dim == len(STATS_FEATURES)
    assert site_dataset(b.manifest, None, thumb_cfg).path_dim == 3 * 16 * 16
    assert site_dataset(a.cache_dir, None, thumb_cfg).path_dim == 3 * 16 * 16   # the folder: the latest run's
