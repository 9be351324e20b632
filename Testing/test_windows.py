"""Sliding windows: tiling covers every voxel, Gaussian blending normalises, windows land where
they were cut from (checked through the engine's own sliding-window loop); coarse-to-fine equals
the full blend where it matters and runs fewer windows."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from IrisSegmentLib.inference.segmenter import Segmenter
from IrisSegmentLib.errors import IrisInputError
from IrisSegmentLib.inference.windows import coarse_starts, gaussian_weights, pad_to_window, starts, tile

WINDOW = (32, 32, 32)
SIZES = [1, 5, 31, 32, 33, 40, 63, 64, 65, 97]
OVERLAPS = [0.0, 0.25, 0.5, 0.75, 0.9]


@pytest.mark.parametrize("overlap", OVERLAPS)
def test_starts_cover_every_index(overlap):
    for w in (8, 16, 32, 48):
        for n in list(range(w, 3 * w + 2)) + [5 * w - 1]:
            s = starts(n, w, overlap)
            assert s[0] == 0 and s[-1] == n - w, (n, w)
            assert s == sorted(set(s))
            covered = np.zeros(n, int)
            for a in s:
                assert 0 <= a and a + w <= n
                covered[a : a + w] += 1
            assert covered.min() >= 1, (n, w, overlap)
            if n > w and overlap > 0:  # consecutive windows overlap by about the asked fraction
                stride = max(1, int(round(w * (1 - overlap))))
                assert all(b - a <= stride for a, b in zip(s, s[1:]))


@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.8])
def test_tile_covers_every_voxel_after_padding(overlap):
    shapes = list(itertools.product([5, 31, 32, 33], [32, 45], [1, 64, 70])) + [(97, 33, 65)]
    for shape in shapes:
        vol = torch.randn(1, *shape)
        padded, orig = pad_to_window(vol, WINDOW)
        assert orig == shape
        assert tuple(padded.shape[1:]) == tuple(max(n, w) for n, w in zip(shape, WINDOW))
        assert torch.equal(padded[(slice(None), *(slice(0, n) for n in shape))], vol)  # data untouched
        if padded.shape[1:] != vol.shape[1:]:
            assert float(padded.min()) == float(vol.min())  # padding is the volume minimum
        cover = torch.zeros(padded.shape[1:], dtype=torch.int32)
        origins = tile(padded.shape[1:], WINDOW, overlap)
        assert len(origins) == len(set(origins))
        for o in origins:
            assert all(0 <= a and a + w <= n for a, w, n in zip(o, WINDOW, padded.shape[1:]))
            cover[tuple(slice(a, a + w) for a, w in zip(o, WINDOW))] += 1
        assert int(cover.min()) >= 1, shape


def test_tile_count_matches_axes():
    assert tile((32, 32, 32), WINDOW, 0.5) == [(0, 0, 0)]
    assert tile((33, 32, 32), WINDOW, 0.5) == [(0, 0, 0), (1, 0, 0)]
    assert len(tile((64, 64, 64), WINDOW, 0.5)) == 27  # starts 0, 16, 32 per axis
    assert len(tile((64, 64, 64), WINDOW, 0.0)) == 8


def test_gaussian_weights_shape_and_values():
    g = gaussian_weights((16, 24, 8), 0.125)
    assert g.shape == (16, 24, 8) and g.dtype == torch.float32
    assert float(g.max()) == pytest.approx(1.0)
    assert float(g.min()) >= 1e-3  # floored: edge voxels still count
    assert torch.equal(g, g.flip(0)) and torch.equal(g, g.flip(1)) and torch.equal(g, g.flip(2))
    # centre (8 and 7 along an even axis) is the peak; corners are the minimum
    assert float(g[7, 11, 3]) == float(g.max())
    assert float(g[0, 0, 0]) == float(g.min())


@pytest.mark.parametrize("shape,overlap", [((40, 33, 64), 0.5), ((70, 32, 50), 0.25), ((33, 65, 47), 0.75)])
def test_blended_weights_normalise_to_one(shape, overlap):
    w = gaussian_weights(WINDOW)
    acc_w = torch.zeros(shape, dtype=torch.float64)
    acc_c = torch.zeros(shape, dtype=torch.float64)
    c = 0.3712
    for o in tile(shape, WINDOW, overlap):
        sl = tuple(slice(a, a + n) for a, n in zip(o, WINDOW))
        acc_w[sl] += w.double()
        acc_c[sl] += c * w.double()
    assert float(acc_w.min()) > 0
    torch.testing.assert_close(acc_w / acc_w, torch.ones(shape, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(acc_c / acc_w, torch.full(shape, c, dtype=torch.float64), rtol=0, atol=1e-12)


class ConstantModel:
    def __init__(self, value: float):
        self.value = value

    def segment(self, image, tokens):
        return torch.full((image.shape[0], tokens.shape[1], *image.shape[2:]), self.value)


class EchoModel:
    """Logits = the window itself (shifted per class), so blending must reassemble the image."""

    def segment(self, image, tokens):
        k = tokens.shape[1]
        return image.expand(-1, k, -1, -1, -1) + torch.arange(k, dtype=image.dtype)[None, :, None, None, None]


@pytest.mark.parametrize("shape", [(20, 45, 33), (64, 32, 70), (32, 32, 32)])
def test_engine_blending_of_constant_is_constant(tiny_cfg, shape):
    seg = Segmenter(ConstantModel(0.7), tiny_cfg, "cpu")
    work = torch.randn(1, *shape)
    probs, _, n = seg.probabilities(work, torch.zeros(2, 1, 1), 0.5, lambda f, m: None, None, "full")
    assert probs.shape == (2, *shape)
    assert n == len(tile(tuple(max(a, b) for a, b in zip(shape, WINDOW)), WINDOW, 0.5))
    expected = torch.sigmoid(torch.tensor(0.7)).item()
    torch.testing.assert_close(probs, torch.full_like(probs, expected), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape,overlap", [((20, 45, 33), 0.5), ((70, 40, 33), 0.25), ((50, 50, 50), 0.0)])
def test_engine_windows_land_where_they_were_cut(tiny_cfg, shape, overlap):
    seg = Segmenter(EchoModel(), tiny_cfg, "cpu")
    work = torch.randn(1, *shape)
    progress = []
    probs, _, n = seg.probabilities(work, torch.zeros(3, 1, 1), overlap, lambda f, m: progress.append(f), None, "full")
    assert probs.shape == (3, *shape)
    for k in range(3):
        torch.testing.assert_close(probs[k], torch.sigmoid(work[0] + k), rtol=0, atol=1e-5)
    assert len(progress) == math.ceil(n / tiny_cfg.inference.batch_size)
    assert progress == sorted(progress) and progress[-1] == pytest.approx(0.9)



@pytest.mark.parametrize("overlap", OVERLAPS)
def test_coarse_starts_are_a_covering_subset(overlap):
    for w in (8, 32, 64):
        for n in list(range(1, 3 * w + 2)) + [5 * w - 1, 273, 300]:
            fine, coarse = starts(n, w, overlap), coarse_starts(n, w, overlap)
            assert set(coarse) <= set(fine) and coarse == sorted(set(coarse))
            covered = np.zeros(max(n, w), int)
            for a in coarse:
                covered[a : a + w] += 1
            assert covered[:n].min() >= 1, (n, w, overlap)
            if overlap >= 0.5 and n > 2 * w:  # the point of it: clearly fewer windows
                assert len(coarse) <= (len(fine) + 1) // 2 + 1


class BlobModel:
    """Logits high only where the window's image is bright: a structure found only where it is."""

    def __init__(self):
        self.calls = 0

    def segment(self, image, tokens):
        self.calls += image.shape[0]
        k = tokens.shape[1]
        return (12 * image - 6).expand(-1, k, -1, -1, -1)


def _blob_volume(shape=(160, 160, 128), centre=(40, 90, 70), radius=6.0) -> torch.Tensor:
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1)
    blob = (np.linalg.norm(grid - np.array(centre), axis=-1) < radius).astype(np.float32)
    noise = np.random.default_rng(0).normal(0, 0.01, shape).astype(np.float32)
    return torch.from_numpy(blob + noise)[None]


def test_coarse_to_fine_equals_full_and_runs_fewer_windows(tiny_cfg):
    work = _blob_volume()
    full_model, c2f_model = BlobModel(), BlobModel()
    full, _, n_full = Segmenter(full_model, tiny_cfg, "cpu").probabilities(work, torch.zeros(2, 1, 1), 0.5, lambda f, m: None, None, "full")
    progress = []
    c2f, _, n_c2f = Segmenter(c2f_model, tiny_cfg, "cpu").probabilities(work, torch.zeros(2, 1, 1), 0.5,
                                                                        lambda f, m: progress.append(f), None, "coarse-to-fine")
    assert (n_full, n_c2f) == (full_model.calls, c2f_model.calls)
    assert n_c2f < n_full / 3
    inside = full > 0.05
    assert inside.any()
    torch.testing.assert_close(c2f[inside], full[inside], rtol=0, atol=1e-6)  # exactly the full blend there
    assert torch.equal(c2f > 0.5, full > 0.5)
    assert progress == sorted(progress) and progress[-1] == pytest.approx(0.9)


def test_windows_of_a_constant_image_are_not_run(tiny_cfg):
    work = torch.full((1, 96, 64, 64), -1.0)
    work[:, :32] = torch.randn(1, 32, 64, 64)
    model = BlobModel()
    probs, _, n = Segmenter(model, tiny_cfg, "cpu").probabilities(work, torch.zeros(1, 1, 1), 0.5, lambda f, m: None, None, "full")
    total = len(tile(work.shape[1:], WINDOW, 0.5))
    assert n == model.calls < total
    assert float(probs[0, 64:].max()) == 0.0  # nothing is found where there is nothing to see


def test_unknown_strategy_is_refused(tiny_cfg):
    with pytest.raises(IrisInputError, match="unknown strategy 'fast'"):
        Segmenter(BlobModel(), tiny_cfg, "cpu").probabilities(torch.zeros(1, 40, 40, 40), torch.zeros(1, 1, 1), 0.5,
                                                              lambda f, m: None, None, "fast")


def test_cpu_bf16_windows_match_float32(tiny_cfg, tiny_model):
    import dataclasses

    work = torch.randn(1, 40, 36, 30)
    tokens = torch.randn(2, tiny_cfg.model.num_queries + 1, tiny_cfg.model.token_dim)
    probs = {}
    for precision in ("fp32", "bf16"):
        cfg = dataclasses.replace(tiny_cfg, inference=dataclasses.replace(tiny_cfg.inference, cpu_precision=precision))
        seg = Segmenter(tiny_model, cfg, "cpu")
        assert seg.cpu_bf16 == (precision == "bf16")
        probs[precision] = seg.probabilities(work, tokens, 0.5, lambda f, m: None, None, "full")[0]
    assert not torch.equal(probs["fp32"], probs["bf16"])  # the bf16 path really ran
    torch.testing.assert_close(probs["bf16"], probs["fp32"], rtol=0, atol=2e-2)


def test_unknown_cpu_precision_is_refused(tiny_cfg, tiny_model):
    import dataclasses

    cfg = dataclasses.replace(tiny_cfg, inference=dataclasses.replace(tiny_cfg.inference, cpu_precision="fp8"))
    with pytest.raises(IrisInputError, match="cpu_precision must be auto, bf16 or fp32"):
        Segmenter(tiny_model, cfg, "cpu")
