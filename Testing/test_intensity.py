"""Intensity normalisation and the engine's input checks: NaNs, constant images, wrong
dimensionality, labels missing from the reference."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from conftest import OracleModel, dice, ellipsoid_mask
from IrisSegmentLib.config import InferenceConfig
from IrisSegmentLib.errors import IrisInputError
from IrisSegmentLib.inference.intensity import detect_modality, normalise
from IrisSegmentLib.inference.segmenter import Segmenter, check_volume

CFG = InferenceConfig()


def _ct(rng, shape=(30, 30, 30)):
    """Air around a body of soft tissue with a bone, in Hounsfield units."""
    x = np.full(shape, -1000.0) + rng.normal(0, 5, shape)
    body = ellipsoid_mask(shape, np.eye(4), np.array(shape) / 2, (12, 11, 13))
    x[body] = 40 + rng.normal(0, 20, body.sum())
    bone = ellipsoid_mask(shape, np.eye(4), np.array(shape) / 2 + 3, (3, 3, 3))
    x[bone] = 1500
    return x.astype(np.float32)


def _mr(rng, shape=(30, 30, 30)):
    return (rng.gamma(2.0, 150.0, shape) + 10 * np.arange(shape[0])[:, None, None]).astype(np.float32)


def _zscore(x):
    return (x - x.mean()) / x.std()


def test_detect_modality():
    rng = np.random.default_rng(0)
    assert detect_modality(_ct(rng)) == "ct"
    assert detect_modality(_mr(rng)) == "mr"
    assert detect_modality(_mr(rng) - 50) == "mr"  # a few negative values are not CT
    assert detect_modality(np.zeros((5, 5, 5))) == "mr"


def test_ct_clip_and_zscore():
    rng = np.random.default_rng(1)
    x = _ct(rng)
    lo, hi = CFG.ct_clip
    assert x.min() < lo and x.max() > hi  # the clip does something here
    expected = _zscore(np.clip(x.astype(np.float64), lo, hi))
    for modality in ("auto", "ct"):
        out = normalise(x, modality, CFG)
        assert out.dtype == np.float32 and out.shape == x.shape
        np.testing.assert_allclose(out, expected, atol=1e-4)
    assert abs(float(out.mean())) < 1e-4 and abs(float(out.std()) - 1) < 1e-4
    # bone and tissue above the window map to the same value
    assert np.isclose(out.max(), expected.max()) and (np.isclose(out, out.max())).sum() > 100
    # a different window in the config is honoured
    out2 = normalise(x, "ct", InferenceConfig(ct_clip=(-200.0, 200.0)))
    np.testing.assert_allclose(out2, _zscore(np.clip(x.astype(np.float64), -200, 200)), atol=1e-4)


def test_mr_percentile_zscore():
    rng = np.random.default_rng(2)
    x = _mr(rng)
    x[0, 0, 0] = 1e6  # an outlier the percentile clip removes
    lo, hi = np.percentile(x, CFG.mr_clip_percentiles)
    expected = _zscore(np.clip(x.astype(np.float64), lo, hi))
    for modality in ("auto", "mr"):
        np.testing.assert_allclose(normalise(x, modality, CFG), expected, atol=1e-4)
    assert normalise(x, "mr", CFG).max() < 10  # the outlier did not squash everything else


def test_ct_forced_as_mr_differs():
    x = _ct(np.random.default_rng(3))
    assert not np.allclose(normalise(x, "ct", CFG), normalise(x, "mr", CFG), atol=1e-2)


def test_constant_and_bad_modality():
    for value in (0.0, 7.5, -1000.0):
        out = normalise(np.full((6, 7, 8), value, np.float32))
        assert out.shape == (6, 7, 8) and np.all(out == 0)
    with pytest.raises(ValueError, match="modality"):
        normalise(np.zeros((3, 3, 3)), "pet")


def test_check_volume_messages():
    with pytest.raises(IrisInputError, match="2D .*3D volume"):
        check_volume(np.zeros((10, 10)), "target image")
    with pytest.raises(IrisInputError, match="4 dimensions .*time series") as e:
        check_volume(np.zeros((4, 4, 4, 3)), "target image")
    assert "target image" in str(e.value) and "(4, 4, 4, 3)" in str(e.value)
    with pytest.raises(IrisInputError, match="5 dimensions"):
        check_volume(np.zeros((2, 2, 2, 2, 2)), "x")
    with pytest.raises(IrisInputError, match="data type"):
        check_volume(np.zeros((3, 3, 3), complex), "x")
    assert check_volume(np.zeros((4, 5, 6, 1)), "x").shape == (4, 5, 6)  # singleton 4th axis is fine


def _scene():
    shape = (36, 34, 30)
    aff = np.diag([1.4, 1.5, 1.6, 1.0])
    rng = np.random.default_rng(4)
    lab = np.zeros(shape, np.uint8)
    lab[ellipsoid_mask(shape, aff, (20, 25, 24), (8, 7, 6))] = 3
    lab[ellipsoid_mask(shape, aff, (32, 22, 20), (5, 5, 5))] = 7
    img = (100 + 500 * (lab == 3) + 300 * (lab == 7) + rng.normal(0, 10, shape)).astype(np.float32)
    return img, aff, lab


@pytest.fixture()
def seg(tiny_cfg, tiny_model):
    return Segmenter(tiny_model, tiny_cfg, "cpu")


@pytest.mark.parametrize("use_oracle", [False, True])
def test_nan_target_is_repaired_with_warning(seg, tiny_cfg, use_oracle):
    if use_oracle:  # a pointwise model, so the repaired result can be compared with the clean one
        seg = Segmenter(OracleModel(), tiny_cfg, "cpu")
    img, aff, lab = _scene()
    task = seg.encode(img, aff, lab, labels=[3])
    clean = seg.segment(img, aff, task).label_map
    bad = img.copy()
    bad[0:2, 0:3, 0:4] = np.nan
    bad[5, 5, 5] = np.inf
    with pytest.warns(UserWarning, match=r"target image: 25 NaN/Inf voxels replaced"):
        res = seg.segment(bad, aff, task)
    assert res.label_map.shape == img.shape
    assert set(np.unique(res.label_map).tolist()) <= {0, 3}
    if use_oracle:
        # replaced by the image minimum: the structure is found as in the clean image, nothing in the corner
        assert (clean == 3)[lab == 3].mean() > 0.9  # (the threshold oracle also takes the dimmer label 7)
        assert dice(res.label_map == 3, clean == 3) > 0.97
        assert res.label_map[:6, :6, :6].max() == 0


def test_nan_reference_is_repaired_with_warning(seg):
    img, aff, lab = _scene()
    bad = img.copy()
    bad[0, 0, :3] = np.nan
    with pytest.warns(UserWarning, match="reference image: 3 NaN/Inf"):
        task = seg.encode(bad, aff, lab)
    assert np.isfinite(task.tokens.numpy()).all()


def test_constant_target_gives_empty_map_with_warning(seg):
    img, aff, lab = _scene()
    task = seg.encode(img, aff, lab)
    with pytest.warns(UserWarning, match="constant"):
        res = seg.segment(np.full(img.shape, 42.0, np.float32), aff, task)
    assert res.label_map.shape == img.shape and res.label_map.max() == 0 and res.windows == 0
    with pytest.warns(UserWarning, match="NaN/Inf"), pytest.warns(UserWarning, match="constant"):
        res = seg.segment(np.full(img.shape, np.nan, np.float32), aff, task)
    assert res.label_map.max() == 0


def test_constant_reference_warns(seg):
    img, aff, lab = _scene()
    with pytest.warns(UserWarning, match="reference image is constant"):
        seg.encode(np.ones_like(img), aff, lab)


def test_wrong_dimensions_through_the_engine(seg):
    img, aff, lab = _scene()
    task = seg.encode(img, aff, lab)
    with pytest.raises(IrisInputError, match="2D"):
        seg.segment(img[:, :, 0], aff, task)
    with pytest.raises(IrisInputError, match="4 dimensions"):
        seg.segment(np.stack([img, img], -1), aff, task)
    with pytest.raises(IrisInputError, match="reference image is 2D"):
        seg.encode(img[0], aff, lab[0])
    with pytest.raises(IrisInputError, match="reference label has 4 dimensions"):
        seg.encode(img, aff, np.stack([lab, lab], -1))
    # a singleton 4th axis (common in NIfTI) is accepted
    res = seg.segment(img[..., None], aff, task)
    assert res.label_map.shape == img.shape


def test_reference_label_problems(seg):
    img, aff, lab = _scene()
    with pytest.raises(IrisInputError, match=r"label\(s\) \[5\] not in the reference label map") as e:
        seg.encode(img, aff, lab, labels=[3, 5])
    assert "[3, 7]" in str(e.value)  # and says which labels it does have
    with pytest.raises(IrisInputError, match="empty"):
        seg.encode(img, aff, np.zeros_like(lab))
    with pytest.raises(IrisInputError, match="differ in shape"):
        seg.encode(img, aff, lab[:-1])
    task = seg.encode(img, aff, lab, labels=[7])
    assert task.labels == [7] and task.tokens.shape[0] == 1


def test_no_warning_on_clean_input(seg):
    img, aff, lab = _scene()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        task = seg.encode(img, aff, lab)
        seg.segment(img, aff, task)
