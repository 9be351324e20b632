"""World-correct geometry: reorientation, working grid, resampling round trips, and an oracle
segmentation of an oblique, anisotropic, flipped target whose answer is known in world space."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import (
    OracleModel, dice, ellipsoid_mask, make_affine, rot_x, rot_y, rot_z, voxel_world,
)
from IrisSegmentLib.inference.geometry import WorkingGrid, check_affine, nearest_ras, spacing_of
from IrisSegmentLib.inference.intensity import normalise
from IrisSegmentLib.inference.segmenter import Segmenter

WORK = (1.5, 1.5, 1.5)
LPS = np.diag([-1.0, -1.0, 1.0])  # DICOM/ITK (LPS) world axes seen from RAS


def oriented(directions: np.ndarray, perm, spacing, origin) -> np.ndarray:
    """Affine whose array axis i runs along directions[:, perm[i]] with spacing[i]."""
    cols = np.asarray(directions)[:, list(perm)] * np.asarray(spacing, dtype=float)[None]
    return make_affine(cols, origin)


def world_field(shape, affine, dtype=torch.float64) -> torch.Tensor:
    """(3, I, J, K) tensor of the world coordinates of every voxel centre."""
    return torch.from_numpy(np.moveaxis(voxel_world(shape, affine), -1, 0).copy()).to(dtype)


# -- orientation --------------------------------------------------------------------------------
def test_nearest_ras_known_cases():
    assert nearest_ras(np.diag([1.0, 1, 1, 1])) == ((0, 1, 2), (False, False, False))
    assert nearest_ras(make_affine(LPS * 0.7, [0, 0, 0])) == ((0, 1, 2), (True, True, False))
    # array axis 0 runs inferior, axis 1 right, axis 2 posterior
    a = make_affine(np.array([[0, 2.0, 0], [0, 0, -1.0], [-3.0, 0, 0]]), [5, 6, 7])
    assert nearest_ras(a) == ((1, 2, 0), (False, True, True))
    assert np.allclose(spacing_of(a), [3.0, 2.0, 1.0])


def test_check_affine_refuses_bad_matrices():
    with pytest.raises(ValueError, match="4x4"):
        check_affine(np.eye(3))
    bad = np.eye(4)
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        check_affine(bad)
    with pytest.raises(ValueError, match="singular"):
        check_affine(np.diag([1.0, 0.0, 1.0, 1.0]))


@pytest.mark.parametrize("perm", list(itertools.permutations(range(3))))
def test_reorient_unreorient_exact_all_orientations(perm):
    x = torch.randn(2, 5, 6, 7)
    for signs in itertools.product([1.0, -1.0], repeat=3):
        aff = oriented(np.diag(signs) @ rot_z(10), perm, (1.0, 2.0, 3.0), (1, 2, 3))
        grid = WorkingGrid.create((5, 6, 7), aff, WORK)
        r = grid.reorient(x)
        assert tuple(r.shape[1:]) == grid.reoriented_shape
        assert torch.equal(grid.unreorient(r), x)
        # reoriented array axis w runs along +world axis w: neighbours' world step is RAS-positive
        wf = grid.reorient(world_field((5, 6, 7), aff))
        for w in range(3):
            step = (wf.narrow(w + 1, 1, 1) - wf.narrow(w + 1, 0, 1)).flatten(1)[:, 0]
            assert int(torch.argmax(step.abs())) == w and float(step[w]) > 0


# -- working grid -------------------------------------------------------------------------------
def test_working_affine_identity_scale_exact():
    """Spacing equal to the working spacing: the working grid is a pure reorientation and every
    working voxel centre is the world point of the original voxel it came from."""
    directions = LPS @ rot_x(25) @ rot_y(-20)
    aff = oriented(directions, (2, 0, 1), WORK, (-31.5, 12.25, 40.0))
    shape = (11, 7, 9)
    grid = WorkingGrid.create(shape, aff, WORK)
    assert grid.working_shape == grid.reoriented_shape
    work = grid.to_working(world_field(shape, aff))
    expected = world_field(grid.working_shape, grid.working_affine)
    torch.testing.assert_close(work, expected, rtol=0, atol=1e-9)
    assert torch.equal(grid.from_working(work), world_field(shape, aff))


@pytest.mark.parametrize("spacing,shape", [((0.8, 1.1, 3.0), (30, 22, 9)), ((0.5, 2.3, 1.0), (25, 13, 17))])
def test_working_affine_matches_interpolated_positions(spacing, shape):
    """A linear field (world coordinates) is interpolated exactly away from the clamped border: the
    working grid's values are the world points that working_affine gives its voxel centres."""
    aff = oriented(LPS @ rot_x(-22) @ rot_z(28), (1, 2, 0), spacing, (10.0, -20.0, 35.0))
    grid = WorkingGrid.create(shape, aff, WORK)
    work = grid.to_working(world_field(shape, aff))
    wa = grid.working_affine
    expected = world_field(grid.working_shape, wa)
    # original voxel coordinates of each working voxel centre; interior = no clamping
    idx = np.moveaxis(voxel_world(grid.working_shape, np.linalg.inv(aff) @ wa), -1, 0)
    interior = np.all((idx >= -1e-9) & (idx <= np.array(shape)[:, None, None, None] - 1 + 1e-9), axis=0)
    assert interior.mean() > 0.5
    diff = (work - expected).abs().amax(0).numpy()
    assert float(diff[interior].max()) < 1e-9
    # working spacing is the model spacing up to rounding of the shape
    sp = spacing_of(wa)
    assert np.all(np.abs(sp - 1.5) <= 1.5 * 0.5 / np.array(grid.working_shape) + 1e-12)
    # the field of view is preserved: outer voxel faces coincide
    for corner in itertools.product(*[(-0.5, n - 0.5) for n in grid.working_shape]):
        o = (np.linalg.inv(aff) @ wa @ np.array([*corner, 1.0]))[:3]
        for i in range(3):
            assert min(abs(o[i] + 0.5), abs(o[i] - (shape[i] - 0.5))) < 1e-9


def test_smooth_field_round_trip():
    shape = (40, 30, 12)
    aff = oriented(LPS @ rot_y(20) @ rot_x(15), (0, 1, 2), (0.9, 1.2, 3.0), (0, 0, 0))
    grid = WorkingGrid.create(shape, aff, WORK)
    pts = voxel_world(shape, aff)
    field = np.sin(pts[..., 0] / 9.0) * np.cos(pts[..., 1] / 11.0) + 0.02 * pts[..., 2]
    x = torch.from_numpy(field)[None]
    back = grid.from_working(grid.to_working(x))[0].numpy()
    assert back.shape == shape
    inner = (slice(2, -2), slice(2, -2), slice(1, -1))
    assert np.abs(back - field)[inner].max() < 0.02
    assert np.abs(back - field).max() < 0.08


# -- oracle ------------------------------------------------------------------------------------
def _scene(shape, aff, centre, radii, rotation, fg, bg, noise, seed):
    rng = np.random.default_rng(seed)
    mask = ellipsoid_mask(shape, aff, centre, radii, rotation)
    img = np.where(mask, fg, bg) + noise * rng.standard_normal(shape)
    return img.astype(np.float32), mask


TARGETS = {
    # oblique (25 deg about x, -20 deg about y), LPS-like flips, permuted axes, anisotropic, off origin
    "oblique-lps": (LPS @ rot_x(25) @ rot_y(-20), (2, 0, 1), (0.8, 1.1, 3.0), (72, 52, 20), (-48.0, 110.0, -23.5)),
    "oblique-ras": (rot_z(30) @ rot_x(-22), (0, 1, 2), (3.0, 0.8, 1.1), (20, 72, 52), (15.0, -60.0, 80.0)),
}


@pytest.mark.parametrize("name", list(TARGETS))
def test_oracle_segmentation_lands_at_known_world_position(tiny_cfg, oracle, name):
    # reference: a different geometry (plain RAS, other spacing and rotation), label value 5
    r_aff = oriented(rot_z(-15), (0, 1, 2), (1.0, 1.25, 1.6), (-30.0, 40.0, -10.0))
    r_shape = (50, 44, 30)
    r_centre = r_aff[:3, :3] @ ((np.array(r_shape) - 1) / 2) + r_aff[:3, 3] + np.array([-6.0, 4.0, 3.0])
    ref, ref_mask = _scene(r_shape, r_aff, r_centre, (11, 9, 8), rot_y(40), 900.0, 80.0, 5.0, 0)
    ref_label = np.where(ref_mask, 5, 0).astype(np.int16)

    directions, perm, spacing, t_shape, origin = TARGETS[name]
    t_aff = oriented(directions, perm, spacing, origin)
    centre = t_aff[:3, :3] @ ((np.array(t_shape) - 1) / 2) + t_aff[:3, 3] + np.array([7.0, -6.0, 5.0])
    radii, rot = (13.0, 10.0, 8.0), rot_z(30)
    target, truth = _scene(t_shape, t_aff, centre, radii, rot, 1000.0, 100.0, 10.0, 1)
    assert 1000 < truth.sum() < 0.1 * truth.size

    seg = Segmenter(oracle, tiny_cfg, "cpu")
    task = seg.encode(ref, r_aff, ref_label)
    assert task.labels == [5] and task.tokens.shape == (1, 1, 1)
    # the mask reached the model aligned with the image: its mean normalised intensity is the structure's
    z_ref = normalise(ref, "mr", tiny_cfg.inference)
    z_fg = float(z_ref[ref_mask].mean())
    assert 0.8 * z_fg < float(task.tokens[0, 0, 0]) <= 1.02 * z_fg

    result = seg.segment(target, t_aff, task)
    lab = result.label_map
    assert lab.shape == t_shape
    assert set(np.unique(lab).tolist()) == {0, 5}
    assert result.windows > 1 and oracle.segment_calls >= 1
    d = dice(lab == 5, truth)
    assert d > 0.85, f"Dice {d:.3f}"
    # centroid in world coordinates (via the target affine) within a voxel of the known centre
    idx = np.argwhere(lab == 5).mean(0)
    world = t_aff[:3, :3] @ idx + t_aff[:3, 3]
    off_vox = np.linalg.solve(t_aff[:3, :3], world - centre)
    assert np.all(np.abs(off_vox) < 1.0), (off_vox, np.linalg.norm(world - centre))
    assert np.linalg.norm(world - centre) < 2.0


def test_oracle_mirror_would_be_caught(tiny_cfg, oracle):
    """The oracle check is sensitive: a mirrored truth scores badly against the same result."""
    directions, perm, spacing, t_shape, origin = TARGETS["oblique-lps"]
    t_aff = oriented(directions, perm, spacing, origin)
    centre = t_aff[:3, :3] @ ((np.array(t_shape) - 1) / 2) + t_aff[:3, 3] + np.array([7.0, -6.0, 5.0])
    target, truth = _scene(t_shape, t_aff, centre, (13.0, 10.0, 8.0), rot_z(30), 1000.0, 100.0, 10.0, 1)
    seg = Segmenter(oracle, tiny_cfg, "cpu")
    task = seg.encode(target, t_aff, truth.astype(np.uint8))
    lab = seg.segment(target, t_aff, task).label_map
    assert dice(lab == 1, truth) > 0.85
    for axis in range(3):
        assert dice(lab == 1, np.flip(truth, axis)) < 0.6


# -- property: world-space boxes survive the working grid ---------------------------------------
def _rotation(q) -> np.ndarray:
    w, x, y, z = np.asarray(q) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


@st.composite
def scenes(draw):
    q = draw(st.tuples(*[st.floats(-1, 1, allow_nan=False)] * 4))
    assume(np.linalg.norm(q) > 0.2)
    spacing = draw(st.tuples(*[st.floats(0.5, 5.0)] * 3))
    signs = draw(st.tuples(*[st.sampled_from([1.0, -1.0])] * 3))
    perm = draw(st.permutations([0, 1, 2]))
    origin = draw(st.tuples(*[st.floats(-300, 300)] * 3))
    shape = draw(st.tuples(*[st.integers(8, 40)] * 3))
    centre_frac = draw(st.tuples(*[st.floats(0.2, 0.8)] * 3))
    size_frac = draw(st.tuples(*[st.floats(0.05, 0.7)] * 3))
    aff = oriented(_rotation(q) @ np.diag(signs), perm, spacing, origin)
    return aff, shape, centre_frac, size_frac


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenes())
def test_world_box_survives_working_grid(scene):
    aff, shape, centre_frac, size_frac = scene
    grid = WorkingGrid.create(shape, aff, WORK)
    A = aff[:3, :3]
    n = np.array(shape)
    # support of trilinear resampling, in original voxels along each array axis
    ratio = n / np.array(grid.working_shape)[np.argsort(grid.perm)]  # original voxels per working voxel
    r_trip = 1.0 + ratio + 1e-6  # to_working then from_working
    r_work = np.ones(3) + 1e-6  # to_working alone
    m_trip = np.abs(A) @ r_trip  # world half-extent of that support along each world axis
    m_work = np.abs(A) @ r_work
    # world-axis-aligned box centred on a voxel, larger than the support so it has a core
    centre = A @ np.round(np.array(centre_frac) * (n - 1)) + aff[:3, 3]
    half_fov = 0.5 * np.abs(A) @ (n - 1)
    half = m_trip + np.array(size_frac) * half_fov

    pts = voxel_world(shape, aff)
    field = torch.from_numpy(np.all(np.abs(pts - centre) <= half, axis=-1).astype(np.float64))[None]
    work = grid.to_working(field)
    assert tuple(work.shape[1:]) == grid.working_shape
    back = grid.from_working(work)[0].numpy()
    assert back.shape == tuple(shape)

    dist = np.abs(pts - centre)
    deep_in = np.all(dist + m_trip <= half, axis=-1)
    deep_out = np.any(dist - m_trip > half, axis=-1)
    assert deep_in.any()  # the voxel at the box centre
    assert np.all(np.abs(back[deep_in] - 1.0) < 1e-6)
    assert np.all(np.abs(back[deep_out]) < 1e-6)

    # on the working grid, at the world points working_affine gives, the box is where it was
    wpts = voxel_world(grid.working_shape, grid.working_affine)
    wdist = np.abs(wpts - centre)
    w_in = np.all(wdist + m_work <= half, axis=-1)
    w_out = np.any(wdist - m_work > half, axis=-1)
    wv = work[0].numpy()
    assert w_in.any()
    assert np.all(np.abs(wv[w_in] - 1.0) < 1e-6)
    assert np.all(np.abs(wv[w_out]) < 1e-6)
    # working axis w is an original axis, flipped so that it runs towards +world axis w (for an
    # oblique grid its largest component need not be w: the assignment is greedy, as in nibabel)
    wa = grid.working_affine[:3, :3]
    cols = A / spacing_of(aff)
    for w in range(3):
        unit = wa[:, w] / np.linalg.norm(wa[:, w])
        assert np.allclose(unit, cols[:, grid.perm[w]] * (-1 if grid.flips[w] else 1))
        assert wa[w, w] >= 0
    assert sorted(grid.perm) == [0, 1, 2]
    assert np.allclose(spacing_of(grid.working_affine), 1.5, rtol=0.5 / min(grid.working_shape) + 1e-9)
    # and the box's world centroid is kept to within a working voxel
    c_orig = (pts * field[0].numpy()[..., None]).sum((0, 1, 2)) / field.sum().item()
    c_work = (wpts * wv[..., None]).sum((0, 1, 2)) / wv.sum()
    assert np.linalg.norm(c_orig - c_work) < math.sqrt(3) * max(1.5, spacing_of(aff).max())


# -- slab-wise resampling back to the target grid ------------------------------------------------
@pytest.mark.parametrize("name", list(TARGETS))
@pytest.mark.parametrize("step", [1, 4, 1000])
def test_from_working_rows_matches_from_working(name, step):
    directions, perm, spacing, shape, origin = TARGETS[name]
    grid = WorkingGrid.create(shape, oriented(directions, perm, spacing, origin), WORK)
    g = torch.Generator().manual_seed(0)
    # a non-contiguous view, as the segmenter passes (the unpadded part of its accumulator)
    padded = torch.rand(3, *(n + 5 for n in grid.working_shape), generator=g)
    work = padded[(slice(None), *(slice(0, n) for n in grid.working_shape))]
    full = grid.reorient(grid.from_working(work))
    n = grid.reoriented_shape[0]
    rows = torch.cat([grid.from_working_rows(work, s, min(n, s + step)) for s in range(0, n, step)], 1)
    assert rows.shape == full.shape
    torch.testing.assert_close(rows, full, rtol=0, atol=1e-6)  # float32 rounding only
    # the view helper writes where `unreorient` puts values
    out = np.zeros(shape, np.float32)
    grid.reoriented_view(out)[...] = rows[0].numpy()
    np.testing.assert_allclose(out, grid.from_working(work)[0].numpy(), rtol=0, atol=1e-6)


def test_from_working_rows_exact_when_sizes_match():
    aff = oriented(LPS @ rot_z(10), (1, 0, 2), WORK, (0, 0, 0))
    grid = WorkingGrid.create((9, 8, 7), aff, WORK)
    assert grid.working_shape == grid.reoriented_shape
    work = torch.rand(2, *grid.working_shape)
    assert torch.equal(torch.cat([grid.from_working_rows(work, s, min(9, s + 2)) for s in range(0, 9, 2)], 1), work)


# -- property: the full segmentation path puts a world-space box back where it was ---------------
@st.composite
def targets(draw):
    q = draw(st.tuples(*[st.floats(-1, 1, allow_nan=False)] * 4))
    assume(np.linalg.norm(q) > 0.2)
    spacing = draw(st.tuples(*[st.floats(0.6, 5.0)] * 3))
    signs = draw(st.tuples(*[st.sampled_from([1.0, -1.0])] * 3))
    perm = draw(st.permutations([0, 1, 2]))
    origin = draw(st.tuples(*[st.floats(-300, 300)] * 3))
    shape = draw(st.tuples(*[st.integers(1, 26)] * 3))
    centre_frac = draw(st.tuples(*[st.floats(0.3, 0.7)] * 3))
    size_frac = draw(st.tuples(*[st.floats(0.15, 0.5)] * 3))
    return oriented(_rotation(q) @ np.diag(signs), perm, spacing, origin), shape, centre_frac, size_frac


def _box_scene(scene):
    """A bright world-axis-aligned box on the scene's grid: (image, box, voxels well inside, voxels well outside)."""
    aff, shape, centre_frac, size_frac = scene
    grid = WorkingGrid.create(shape, aff, WORK)
    A = aff[:3, :3]
    n = np.array(shape)
    ratio = n / np.array(grid.working_shape)[np.argsort(grid.perm)]
    m_trip = np.abs(A) @ (1.0 + ratio + 1e-6)  # world reach of the resampling there and back
    centre = A @ np.round(np.array(centre_frac) * (n - 1)) + aff[:3, 3]
    half = m_trip + np.array(size_frac) * 0.5 * np.abs(A) @ n
    dist = np.abs(voxel_world(shape, aff) - centre)
    box = np.all(dist <= half, axis=-1)
    deep_in = np.all(dist + m_trip <= half, axis=-1)
    deep_out = np.any(dist - m_trip > half, axis=-1)
    return np.where(box, 1000.0, 100.0).astype(np.float32), box, deep_in, deep_out


def _z(fraction: float) -> tuple[float, float]:
    """z-scores of the box and of the background of a two-valued image whose box fills `fraction`."""
    return math.sqrt((1 - fraction) / fraction), -math.sqrt(fraction / (1 - fraction))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(targets(), targets())
def test_segmentation_puts_a_world_box_back_in_place(tiny_cfg, reference, target):
    """Random affines (rotation, flips, axis order), spacings 0.6-5 mm and shapes (single slices included) for a
    reference and a target, each with a bright world-axis-aligned box. Through Segmenter.encode and
    Segmenter.segment with the oracle (reorientation, resampling to the working grid, padding, windows,
    resampling back slab by slab): the reference mask reaches the model on the reference's own voxels, and
    every target voxel well inside the box is labelled, none well outside it."""
    r_image, r_box, r_in, _ = _box_scene(reference)
    image, box, deep_in, deep_out = _box_scene(target)
    # boxes above MR percentile clipping (0.5%), with a core
    assume(r_in.any() and deep_in.any() and 0.02 < r_box.mean() < 0.6 and 0.02 < box.mean() < 0.6)
    seg = Segmenter(OracleModel(), tiny_cfg, "cpu")
    task = seg.encode(r_image, reference[0], r_box.astype(np.uint8))
    token = float(task.tokens[0, 0, 0])  # the mean normalised intensity under the mask, on the working grid
    z_fg, z_bg = _z(float(r_box.mean()))
    assert (z_fg + z_bg) / 2 - 1e-3 <= token <= z_fg + 1e-3  # where the mask is >= 0.5, so is the box
    t_fg, t_bg = _z(float(box.mean()))
    assume(t_bg + 0.2 < 0.5 * token < t_fg - 0.2)  # the oracle's threshold separates the target's box
    lab = seg.segment(image, target[0], task).label_map
    assert lab.shape == image.shape
    assert np.all(lab[deep_in] == 1)
    assert np.all(lab[deep_out] == 0)
