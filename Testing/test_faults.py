"""The engine under faults and awkward input: CUDA out of memory, cancel in the middle, single-slice and
smaller-than-a-window volumes, scans stored in another axis order, and the streamed (slab by slab)
resampling of the result onto a large target.

Out-of-memory errors are raised by TEST DOUBLES of the network (no GPU is needed): they compute what
the OracleModel computes, and raise torch.cuda.OutOfMemoryError where a full GPU would.
"""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch

from conftest import OracleModel, dice, ellipsoid_mask, make_affine, make_tiny_model, rot_x, rot_z, voxel_world
from IrisSegmentLib.errors import Cancelled
from IrisSegmentLib.inference import labelmap as labelmap_module
from IrisSegmentLib.inference.geometry import WorkingGrid
from IrisSegmentLib.inference.segmenter import Segmenter
from benchmarks.memory import full_volume_label_map  # the previous full-volume path, the benchmark's baseline

LPS = np.diag([-1.0, -1.0, 1.0])


def _scene(shape, aff, radii=(9.0, 8.0, 7.0), seed=0):
    """A bright ellipsoid at the grid's centre (world), on a noisy background: (image, mask)."""
    centre = aff[:3, :3] @ ((np.array(shape) - 1) / 2) + aff[:3, 3]
    mask = ellipsoid_mask(shape, aff, centre, radii)
    rng = np.random.default_rng(seed)
    return (100 + 800 * mask + rng.normal(0, 5, shape)).astype(np.float32), mask


OBLIQUE = make_affine(LPS @ rot_z(25) @ rot_x(-15) @ np.diag([1.1, 0.9, 2.6]), [40.0, -12.0, 7.5])


# -- CUDA out of memory --------------------------------------------------------------------------
class OomOracle(OracleModel):
    """TEST DOUBLE: the oracle, but raises torch.cuda.OutOfMemoryError for a batch of more than `max_batch`
    windows, and for any batch while its input is not on the CPU (a GPU too full for even one window)."""

    def __init__(self, max_batch: int = 64, gpu_full: bool = False):
        super().__init__()
        self.max_batch, self.gpu_full, self.batches = max_batch, gpu_full, []

    def segment(self, image, tokens):
        self.batches.append(image.shape[0])
        if image.shape[0] > self.max_batch or (self.gpu_full and image.device.type != "cpu"):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (test double)")
        return super().segment(image, tokens)

    def encode_task(self, ref_image, ref_masks):
        if self.gpu_full and ref_image.device.type != "cpu":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test double)")
        return super().encode_task(ref_image, ref_masks)


@pytest.fixture()
def many_windows_cfg(tiny_cfg):
    """16-voxel windows (the oracle is not a network), 8 per batch: a small target needs many batches."""
    return dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, window=(16, 16, 16)),
                               inference=dataclasses.replace(tiny_cfg.inference, batch_size=8))


def test_oom_halves_the_batch_and_gives_the_same_result(many_windows_cfg):
    image, mask = _scene((40, 36, 14), OBLIQUE)
    clean = Segmenter(OracleModel(), many_windows_cfg, "cpu")
    task = clean.encode(image, OBLIQUE, mask.astype(np.uint8))
    expected = clean.segment(image, OBLIQUE, task, localise="none")
    seg = Segmenter(OomOracle(max_batch=2), many_windows_cfg, "cpu")
    with pytest.warns(UserWarning) as record:
        result = seg.segment(image, OBLIQUE, task, localise="none")
    messages = [str(w.message) for w in record]
    assert messages == ["GPU out of memory: retrying with 4 window(s) per batch",
                        "GPU out of memory: retrying with 2 window(s) per batch"]
    assert seg.batch_size == 2 and max(b for b in seg.model.batches if b <= 2) == 2
    assert result.windows == expected.windows > 8
    np.testing.assert_array_equal(result.label_map, expected.label_map)
    assert dice(result.label_map == 1, mask) > 0.85


def test_oom_with_one_window_continues_on_the_cpu(many_windows_cfg):
    """The 'meta' device stands in for a GPU (tensors move there without one); the double fails there."""
    image, mask = _scene((40, 36, 14), OBLIQUE)
    clean = Segmenter(OracleModel(), many_windows_cfg, "cpu")
    task = clean.encode(image, OBLIQUE, mask.astype(np.uint8))
    expected = clean.segment(image, OBLIQUE, task, localise="none").label_map
    seg = Segmenter(OomOracle(gpu_full=True), many_windows_cfg, "cpu")
    seg.runtime = dataclasses.replace(seg.runtime, device=torch.device("meta"))
    with pytest.warns(UserWarning) as record:
        result = seg.segment(image, OBLIQUE, task, localise="none")
    messages = [str(w.message) for w in record]
    assert messages[-1] == "GPU out of memory even with one window: continuing on the CPU (slower)"
    assert messages[:-1] == [f"GPU out of memory: retrying with {n} window(s) per batch" for n in (4, 2, 1)]
    assert seg.device.type == "cpu" and result.device == "cpu"
    np.testing.assert_array_equal(result.label_map, expected)
    # encoding a reference (one window at a time) goes straight to the CPU
    seg.runtime = dataclasses.replace(seg.runtime, device=torch.device("meta"))
    with pytest.warns(UserWarning, match="continuing on the CPU"):
        again = seg.encode(image, OBLIQUE, mask.astype(np.uint8))
    assert seg.device.type == "cpu" and torch.equal(again.tokens, task.tokens)


# -- cancel ----------------------------------------------------------------------------------------
def test_cancel_in_the_middle_raises_and_leaves_no_state(many_windows_cfg):
    image, mask = _scene((40, 36, 14), OBLIQUE)
    seg = Segmenter(OracleModel(), many_windows_cfg, "cpu")
    task = seg.encode(image, OBLIQUE, mask.astype(np.uint8))
    expected = seg.segment(image, OBLIQUE, task, overlap=0.75, localise="none")
    reports = []
    with pytest.raises(Cancelled):
        seg.segment(image, OBLIQUE, task, overlap=0.75, progress=lambda f, m: reports.append(m),
                    cancel=lambda: any(m.startswith("window ") for m in reports), strategy="full", localise="none")
    done, total = map(int, reports[-1].split()[1].split("/"))
    assert 0 < done < total  # cancelled between two batches of windows
    result = seg.segment(image, OBLIQUE, task, overlap=0.75, localise="none")  # the next run is unaffected
    np.testing.assert_array_equal(result.label_map, expected.label_map)


# -- single slices and volumes smaller than one window --------------------------------------------
@pytest.mark.parametrize("shape,spacing", [
    ((64, 64, 1), (0.8, 0.8, 3.0)),  # one slice
    ((1, 48, 40), (5.0, 0.9, 1.0)),  # one sagittal slice, 5 mm thick
    ((20, 18, 9), (1.0, 1.1, 1.3)),  # smaller than one 32-voxel window at 1.5 mm
    ((3, 3, 3), (2.0, 2.0, 2.0)),  # a few voxels
])
def test_single_slice_and_tiny_volumes_are_segmented_in_place(tiny_cfg, shape, spacing):
    aff = make_affine(LPS @ np.diag(spacing), [12.0, -30.0, 4.0])
    centre = aff[:3, :3] @ ((np.array(shape) - 1) / 2) + aff[:3, 3]
    extent = np.array(shape) * np.array(spacing)
    radii = np.where(np.array(shape) == 1, 100.0, np.maximum(0.3 * extent, 1.5))  # a disc through a single slice
    world = voxel_world(shape, aff)
    truth = (((world - centre) / radii) ** 2).sum(-1) <= 1
    assert 0 < truth.sum() < truth.size
    image = np.where(truth, 900.0, 100.0).astype(np.float32)
    seg = Segmenter(OracleModel(), tiny_cfg, "cpu")
    task = seg.encode(image, aff, truth.astype(np.uint8))
    result = seg.segment(image, aff, task)
    assert result.label_map.shape == shape and result.windows >= 1
    assert dice(result.label_map == 1, truth) > (0.8 if min(shape) > 3 else 0.6)
    # the segmented voxels sit where the structure is, in world space
    got = voxel_world(shape, aff)[result.label_map == 1].mean(0)
    assert np.linalg.norm(got - world[truth].mean(0)) < max(spacing)


# -- axis order and direction of the stored array --------------------------------------------------
def test_working_image_is_the_same_for_any_axis_order_of_the_file(tiny_cfg):
    """The same scan stored RAS, LPS (i, j flipped) or sagittally (axes permuted) gives exactly the same
    working image. Large enough (2 million voxels, odd sizes) that normalisation samples every other voxel."""
    shape, spacing = (128, 127, 125), (0.5, 0.45, 0.55)
    ras = make_affine(rot_z(8) @ np.diag(spacing), [-30.0, -28.0, -35.0])
    rng = np.random.default_rng(3)
    image = rng.gamma(2.0, 100.0, shape).astype(np.float32)
    lps_image = np.ascontiguousarray(image[::-1, ::-1, :])
    lps = ras.copy()
    lps[:3, :2] *= -1
    lps[:3, 3] = ras[:3, :3] @ [shape[0] - 1, shape[1] - 1, 0] + ras[:3, 3]
    sag_image = np.ascontiguousarray(image.transpose(2, 0, 1))
    sag = ras[:, [2, 0, 1, 3]]
    np.testing.assert_allclose(voxel_world(shape, ras)[5, 7, 9], voxel_world(lps_image.shape, lps)[shape[0] - 6, shape[1] - 8, 9])
    np.testing.assert_allclose(voxel_world(shape, ras)[5, 7, 9], voxel_world(sag_image.shape, sag)[9, 5, 7])
    seg = Segmenter(OracleModel(), tiny_cfg, "cpu")
    ref = seg.prepare(image, ras, "auto", "target image")
    for other, aff in ((lps_image, lps), (sag_image, sag)):
        p = seg.prepare(other, aff, "auto", "target image")
        assert p.grid.working_shape == ref.grid.working_shape and np.allclose(p.grid.working_affine, ref.grid.working_affine)
        assert torch.equal(p.work, ref.work)


# -- the result is streamed onto the target grid ---------------------------------------------------
@pytest.mark.parametrize("slab_values", [1, 3000, 1 << 22])
def test_streamed_label_map_equals_the_full_volume_one(tiny_cfg, monkeypatch, slab_values):
    """Oblique, LPS, 5 mm slices, three classes, the seeded (untrained) tiny network: the slab-by-slab label map
    of `segment` is the one the previous full-volume resampling gives from the same probabilities (the engine's
    public stages), voxel for voxel, for any slab size."""
    shape = (37, 29, 9)
    aff = make_affine(LPS @ rot_z(20) @ rot_x(10) @ np.diag([0.9, 1.1, 5.0]), [10.0, 20.0, -30.0])
    image, mask = _scene(shape, aff, radii=(12.0, 10.0, 15.0))
    label = mask.astype(np.uint8)
    label[mask & (voxel_world(shape, aff)[..., 0] > aff[0, 3] - 16)] = 2
    label[:4, :4, :] = 9
    seg = Segmenter(make_tiny_model(tiny_cfg), tiny_cfg, "cpu")
    task = seg.encode(image, aff, label)
    monkeypatch.setattr(labelmap_module, "SLAB_VALUES", slab_values)
    streamed = seg.segment(image, aff, task, localise="none", postprocess=False).label_map
    target = seg.prepare(image, aff, "auto", "target image")
    probs, _, _ = seg.probabilities(target.work, task.tokens, tiny_cfg.inference.overlap, lambda f, m: None)
    full = full_volume_label_map(probs, target.grid, task.labels, tiny_cfg.inference.threshold)
    assert np.array_equal(labelmap_module.to_label_map(probs, target.grid, task.labels, tiny_cfg.inference.threshold), streamed)
    assert streamed.dtype == full.dtype == np.uint8
    assert len(np.unique(full)) >= 3  # the untrained network still gives several classes: the arg-max is exercised
    np.testing.assert_array_equal(streamed, full)


def test_no_target_sized_float_array_is_made(tiny_cfg, monkeypatch):
    """The probabilities are resampled a slab at a time: the whole-volume resampling is never called, and no
    slab holds more than SLAB_VALUES values (one row at least)."""
    shape = (60, 50, 40)
    image, mask = _scene(shape, OBLIQUE)
    seg = Segmenter(OracleModel(), tiny_cfg, "cpu")
    task = seg.encode(image, OBLIQUE, mask.astype(np.uint8))
    sizes = []
    rows = WorkingGrid.from_working_rows

    def spy(self, array, start, stop):
        out = rows(self, array, start, stop)
        sizes.append(out.numel())
        return out

    def refuse(self, array):
        raise AssertionError("the whole target was resampled at once")

    monkeypatch.setattr(labelmap_module, "SLAB_VALUES", 20_000)
    monkeypatch.setattr(WorkingGrid, "from_working_rows", spy)
    monkeypatch.setattr(WorkingGrid, "from_working", refuse)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = seg.segment(image, OBLIQUE, task, localise="none")
    assert dice(result.label_map == 1, mask) > 0.85
    row = int(np.prod(WorkingGrid.create(shape, OBLIQUE, tiny_cfg.model.spacing).reoriented_shape[1:]))
    assert len(sizes) > 1 and sum(sizes) == image.size and max(sizes) <= max(20_000, row)
