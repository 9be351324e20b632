"""The search start of registration (`search.py`): the translation that aligns a target within the reference."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from conftest import make_affine, rot_z
from IrisSegmentLib.inference.search import masked_ncc, translation_start


def textured(shape, seed: int = 0) -> np.ndarray:
    return ndimage.gaussian_filter(np.random.default_rng(seed).random(shape).astype(np.float32), 3.0)


def crop_of(image: np.ndarray, affine: np.ndarray, lo) -> tuple[np.ndarray, np.ndarray]:
    """A 30^3 crop at voxel `lo` and its voxel-to-world affine: the same world positions as in `image`."""
    crop = image[tuple(slice(a, a + 30) for a in lo)]
    out = affine.copy()
    out[:3, 3] = affine[:3, :3] @ np.asarray(lo, float) + affine[:3, 3]
    return crop.copy(), out


def test_a_crop_is_found_where_it_was_cut_whatever_the_grids_orientation():
    big = textured((80, 70, 90))
    affine = make_affine(np.diag([2.0, 2.0, 2.0]), [-50.0, 20.0, 7.0])
    crop, crop_affine = crop_of(big, affine, (30, 10, 50))
    assert np.abs(translation_start(crop, crop_affine, big, affine)[:3, 3]).max() <= 3.0  # half a 6 mm search step
    # the same reference stored mirrored along x and rotated in-plane: the world is unchanged, so is the answer
    flipped = make_affine(np.diag([-2.0, 2.0, 2.0]), affine[:3, 3] + [2.0 * 79, 0.0, 0.0])
    assert np.abs(translation_start(crop, crop_affine, big[::-1].copy(), flipped)[:3, 3]).max() <= 3.0
    # the target's scanner coordinates moved by (33, -12, 5) mm: the start maps them back (fixed -> moving)
    moved = crop_affine.copy()
    moved[:3, 3] += [33.0, -12.0, 5.0]
    t = translation_start(crop, moved, big, affine)
    assert np.allclose(t[:3, :3], np.eye(3)) and np.abs(t[:3, 3] - [-33.0, 12.0, -5.0]).max() <= 3.0


def test_an_oblique_target_is_found_within_one_search_step():
    big = textured((80, 70, 90), seed=1)
    affine = make_affine(np.diag([2.0, 2.0, 2.0]), [0.0, 0.0, 0.0])
    world = make_affine(rot_z(10) @ np.diag([2.0, 2.0, 2.0]), [60.0, 40.0, 90.0])  # a target grid tilted 10 degrees
    grid = np.stack(np.meshgrid(*[np.arange(30)] * 3, indexing="ij"), -1).reshape(-1, 3)
    w = grid @ world[:3, :3].T + world[:3, 3]
    target = ndimage.map_coordinates(big, (w / 2.0).T, order=1).reshape(30, 30, 30)
    assert np.abs(translation_start(target, world, big, affine)[:3, 3]).max() <= 6.0


def test_offsets_with_too_little_overlap_are_left_out():
    a, b = textured((10, 10, 10)), textured((10, 10, 10), seed=2)
    ones = np.ones_like(a)
    ncc, first = masked_ncc(a, ones, b, ones, min_overlap=0.5)
    assert ncc.shape == (19, 19, 19) and tuple(first) == (-9, -9, -9)
    overlap = np.prod(10 - np.abs(np.stack(np.meshgrid(*[np.arange(-9, 10)] * 3, indexing="ij"))), axis=0)
    assert np.isneginf(ncc[overlap < 500]).all() and np.isfinite(ncc[overlap >= 500]).all()
    assert np.isclose(masked_ncc(a, ones, a, ones, 0.5)[0][9, 9, 9], 1.0, atol=1e-4)  # itself, unshifted
