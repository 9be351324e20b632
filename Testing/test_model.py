"""The network: exact foreground pooling, pixel (un)shuffle, output shapes, padded class slots,
parameter budgets and the architecture fingerprint."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from conftest import PRODUCT_CONFIG, make_tiny_model
from IrisSegmentLib.config import BundleConfig, ModelConfig
from IrisSegmentLib.model import build_iris
from IrisSegmentLib.model.foreground_pooling import foreground_pool, interpolation_matrix
from IrisSegmentLib.model.pixel_shuffle import pixel_shuffle_3d, pixel_unshuffle_3d


def naive_pool(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Upsample the features to the mask size (trilinear, align_corners=False), then masked mean."""
    up = F.interpolate(features, size=tuple(mask.shape[-3:]), mode="trilinear", align_corners=False)
    num = torch.einsum("bcdhw,bkdhw->bkc", up, mask.to(up.dtype))
    return num / mask.flatten(2).sum(-1).to(up.dtype).clamp_min(1e-6)[..., None]


# (low-res feature size, full-res mask size): cubic, non-cubic, odd low-res, non-integer ratios
POOL_SHAPES = [
    ((4, 4, 4), (32, 32, 32)),
    ((3, 5, 7), (24, 40, 56)),
    ((5, 3, 2), (17, 11, 9)),
    ((7, 2, 3), (28, 16, 13)),
    ((1, 4, 3), (8, 32, 24)),
]


@pytest.mark.parametrize("low,full", POOL_SHAPES)
def test_interpolation_matrix_is_linear_upsampling(low, full):
    for n_in, n_out in zip(low, full):
        m = interpolation_matrix(n_out, n_in, dtype=torch.float64)
        x = torch.randn(n_in, dtype=torch.float64)
        ref = F.interpolate(x[None, None], size=n_out, mode="linear", align_corners=False)[0, 0]
        torch.testing.assert_close(m @ x, ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(m.sum(1), torch.ones(n_out, dtype=torch.float64))  # rows are convex weights


@pytest.mark.parametrize("low,full", POOL_SHAPES)
def test_foreground_pool_equals_upsample_then_pool(low, full):
    g = torch.Generator().manual_seed(0)
    b, c, k = 2, 5, 3
    feats = torch.randn(b, c, *low, generator=g, dtype=torch.float64)
    mask = (torch.rand(b, k, *full, generator=g) < 0.3).double()
    mask[:, 2] = torch.rand(b, *full, generator=g, dtype=torch.float64)  # soft masks too
    fast = foreground_pool(feats, mask)
    slow = naive_pool(feats, mask)
    assert fast.shape == (b, k, c)
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-9)
    # float32, as used in the network
    torch.testing.assert_close(foreground_pool(feats.float(), mask.float()), slow.float(), rtol=1e-5, atol=1e-5)


def test_foreground_pool_empty_mask_gives_zero_not_nan():
    feats = torch.randn(1, 4, 2, 2, 2)
    mask = torch.zeros(1, 2, 16, 16, 16)
    out = foreground_pool(feats, mask)
    assert torch.isfinite(out).all() and float(out.abs().max()) == 0.0


def test_downsampled_mask_pooling_is_not_equal():
    """Pooling at low resolution with a downsampled mask is the approximation IRIS avoids."""
    g = torch.Generator().manual_seed(1)
    low, full = (4, 5, 3), (32, 40, 24)
    feats = torch.randn(1, 6, *low, generator=g, dtype=torch.float64)
    mask = torch.zeros(1, 1, *full, dtype=torch.float64)
    mask[:, :, 5:19, 3:29, 9:22] = 1.0  # box with edges that do not fall on the 8-voxel grid
    exact = naive_pool(feats, mask)
    torch.testing.assert_close(foreground_pool(feats, mask), exact, rtol=1e-9, atol=1e-9)
    for how in ("trilinear", "area"):
        kw = {"align_corners": False} if how == "trilinear" else {}
        small = F.interpolate(mask, size=low, mode=how, **kw)
        approx = (feats[:, None] * small[:, :, None]).flatten(3).sum(-1) / small.flatten(2).sum(-1)[..., None]
        assert float((approx - exact).abs().max()) > 1e-2, how


@pytest.mark.parametrize("r", [2, 4])
@pytest.mark.parametrize("shape", [(1, 3, 2, 3, 4), (2, 1, 1, 1, 1), (1, 2, 3, 1, 2)])
def test_pixel_shuffle_inverse_both_ways(r, shape):
    b, c, d, h, w = shape
    x = torch.randn(b, c * r**3, d, h, w)
    y = pixel_shuffle_3d(x, r)
    assert y.shape == (b, c, d * r, h * r, w * r)
    assert torch.equal(pixel_unshuffle_3d(y, r), x)
    z = torch.randn(b, c, d * r, h * r, w * r)
    assert torch.equal(pixel_shuffle_3d(pixel_unshuffle_3d(z, r), r), z)


def test_pixel_shuffle_layout_and_errors():
    # channel (i, j, k) of an r^3 group goes to sub-voxel offset (i, j, k)
    r = 2
    x = torch.arange(8.0).view(1, 8, 1, 1, 1)
    y = pixel_shuffle_3d(x, r)[0, 0]
    for i in range(2):
        for j in range(2):
            for k in range(2):
                assert float(y[i, j, k]) == 4 * i + 2 * j + k
    with pytest.raises(ValueError):
        pixel_shuffle_3d(torch.zeros(1, 7, 2, 2, 2), 2)
    with pytest.raises(ValueError):
        pixel_unshuffle_3d(torch.zeros(1, 1, 4, 3, 4), 2)


def test_forward_shape_all_classes_in_one_pass(tiny_cfg, tiny_model):
    torch.manual_seed(0)
    b, k = 2, 3
    shape = (16, 32, 24)  # non-cubic, divisible by 8
    q = torch.randn(b, 1, *shape)
    ref = torch.randn(b, 1, *shape)
    masks = (torch.rand(b, k, *shape) > 0.7).float()
    with torch.no_grad():
        tokens = tiny_model.encode_task(ref, masks)
        assert tokens.shape == (b, k, tiny_cfg.model.num_queries + 1, tiny_cfg.model.token_dim)
        out = tiny_model(q, ref, masks)
        # one task (batch 1) broadcast over a batch of windows
        out_bcast = tiny_model.segment(q, tokens[:1])
    assert out.shape == (b, k, *shape)
    assert torch.isfinite(out).all()
    assert out_bcast.shape == (b, k, *shape)
    with torch.no_grad():
        torch.testing.assert_close(out_bcast[0], tiny_model.segment(q[:1], tokens[:1])[0], rtol=1e-5, atol=1e-5)
    # the classes are different outputs, not one copied K times
    assert float((out[:, 0] - out[:, 1]).abs().max()) > 1e-4


def test_padded_class_slot_does_not_change_valid_classes(tiny_model):
    torch.manual_seed(0)
    b, k, shape = 2, 3, (32, 32, 32)
    q = torch.randn(b, 1, *shape)
    ref = torch.randn(b, 1, *shape)
    masks = (torch.rand(b, k, *shape) > 0.8).float()
    valid = torch.tensor([[True, True, False], [True, False, False]])
    zeros = masks * valid[:, :, None, None, None]
    garbage = zeros.clone()
    garbage[~valid] = (torch.rand(int((~valid).sum()), *shape) > 0.3).float()
    with torch.no_grad():
        a = tiny_model(q, ref, zeros, valid)
        g = tiny_model(q, ref, garbage, valid)
        a_nomask = tiny_model(q, ref, zeros)
        g_nomask = tiny_model(q, ref, garbage)
    for i in range(b):
        for j in range(k):
            if valid[i, j]:
                torch.testing.assert_close(a[i, j], g[i, j], rtol=1e-5, atol=1e-5)
    # the check is not vacuous: without class_valid the padded slot does leak into valid classes
    assert float((a_nomask[0, 0] - g_nomask[0, 0]).abs().max()) > 1e-4


def test_tiny_config_under_one_million_parameters(tiny_cfg, tiny_model):
    n = sum(p.numel() for p in tiny_model.parameters())
    assert 10_000 < n < 1_000_000


def test_product_config_fits_16_mib_in_fp16():
    cfg = BundleConfig.load(PRODUCT_CONFIG)
    assert cfg.model.name == "iris-small"
    with torch.device("meta"):
        model = build_iris(cfg.model)
    n = sum(p.numel() for p in model.parameters())
    assert n * 2 <= 16 * 2**20, f"{n} parameters = {n * 2 / 2**20:.2f} MiB in fp16"
    assert n > 1_000_000  # and it is the real network, not the tiny one


def test_fingerprint_tracks_architecture(tiny_cfg):
    m = tiny_cfg.model
    fp = m.fingerprint()
    assert len(fp) == 12 and fp == ModelConfig(**dataclasses.asdict(m)).fingerprint()  # stable
    changed = {
        "heads": 4, "widths": (8, 16, 16, 64), "num_queries": 5, "head_channels": 16,
        "second_fusion": False, "task_attention_depth": 2, "mlp_ratio": 4, "blocks_per_stage": 2,
    }
    for key, value in changed.items():
        assert dataclasses.replace(m, **{key: value}).fingerprint() != fp, key
    assert dataclasses.replace(m, name="renamed").fingerprint() == fp  # the name is not architecture


def test_config_yaml_round_trip(tmp_path, tiny_cfg):
    cfg = dataclasses.replace(
        tiny_cfg,
        inference=dataclasses.replace(tiny_cfg.inference, overlap=0.25, ct_clip=(-500.0, 300.0)),
        training=dataclasses.replace(tiny_cfg.training, dataset_weights={"btcv": 2.0}),
    )
    cfg.save(tmp_path / "c.yaml")
    back = BundleConfig.load(tmp_path / "c.yaml")
    assert back == cfg
    assert isinstance(back.model.window, tuple) and back.model.window == (32, 32, 32)
    assert back.model.fingerprint() == cfg.model.fingerprint()
    assert tiny_cfg.model.name == "tiny" and tiny_cfg.training.max_classes == 3


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="divisible"):
        BundleConfig.from_dict({"model": {"widths": [8, 16, 32], "window": [30, 32, 32]}})
    with pytest.raises(ValueError, match="heads"):
        BundleConfig.from_dict({"model": {"widths": [8, 16, 30], "heads": 4}})
    with pytest.raises(ValueError, match="unknown"):
        BundleConfig.from_dict({"model": {"depth": 3}})
    (tmp_path / "bad.yaml").write_text("- a list\n- not a mapping\n")
    with pytest.raises(ValueError, match="mapping"):
        BundleConfig.load(tmp_path / "bad.yaml")


def test_seeded_tiny_model_is_reproducible(tiny_cfg):
    a, b = make_tiny_model(tiny_cfg), make_tiny_model(tiny_cfg)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
