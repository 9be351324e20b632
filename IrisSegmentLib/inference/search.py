"""A registration's start found by search: the translation that best aligns the target within the reference.

Greedy's moments start matches the images' centres of mass. Where the target shows only part of what the reference
shows (a crop, a short field of view), those centres are different anatomy and the affine runs off. Here both
images are resampled onto world-axis grids of `spacing_mm` and the masked normalised cross-correlation of every
translation is computed at once with FFTs (Padfield, "Masked object registration in the Fourier domain", IEEE TIP
2012); translations where the images overlap on less than `min_overlap` of the smaller field of view are left out.
Rotations are left to the rigid stage that starts from it."""
from __future__ import annotations

import numpy as np
from scipy import ndimage, signal


def world_grid(image: np.ndarray, affine: np.ndarray, spacing_mm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`image` (voxel-to-world RAS `affine`) resampled linearly onto a world-axis grid of `spacing_mm` around its
    field of view: (values, field-of-view mask, world position of voxel 0)."""
    corners = np.array([[c * (n - 1) for c, n in zip(bits, image.shape)] for bits in np.ndindex(2, 2, 2)], np.float64)
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    lo, hi = world.min(0), world.max(0)
    shape = tuple(int(n) for n in np.floor((hi - lo) / spacing_mm).astype(int) + 1)
    inv = np.linalg.inv(affine)
    matrix, offset = inv[:3, :3] * spacing_mm, inv[:3, :3] @ lo + inv[:3, 3]
    values = ndimage.affine_transform(np.asarray(image, np.float32), matrix, offset, shape, order=1, cval=0.0)
    inside = ndimage.affine_transform(np.ones(image.shape, np.float32), matrix, offset, shape, order=1, cval=0.0) > 0.5
    return values * inside, inside.astype(np.float32), lo


def masked_ncc(fixed: np.ndarray, fixed_mask: np.ndarray, moving: np.ndarray, moving_mask: np.ndarray,
               min_overlap: float) -> tuple[np.ndarray, np.ndarray]:
    """Masked NCC of `fixed` against `moving` shifted by every integer offset u (fixed voxel i against moving voxel
    i + u), as a "full" correlation array, and the offsets of its first element; offsets whose overlap holds fewer
    than `min_overlap` of the smaller mask are -inf."""
    def corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # sum_i a(i) b(i + u)
        return signal.fftconvolve(b, a[::-1, ::-1, ::-1], mode="full")

    f, r = fixed * fixed_mask, moving * moving_mask
    n = corr(fixed_mask, moving_mask)
    sf, sr = corr(f, moving_mask), corr(fixed_mask, r)
    sff, srr, sfr = corr(f * f, moving_mask), corr(fixed_mask, r * r), corr(f, r)
    need = max(min_overlap * min(fixed_mask.sum(), moving_mask.sum()), 1.0)
    ok = n >= need
    nn = np.where(ok, n, 1.0)
    num = sfr - sf * sr / nn
    den = np.sqrt(np.clip(sff - sf * sf / nn, 0, None) * np.clip(srr - sr * sr / nn, 0, None))
    ncc = np.where(ok & (den > 1e-6 * max(float(den.max()), 1e-12)), num / np.where(den > 0, den, 1.0), -np.inf)
    return ncc, -(np.array(fixed.shape) - 1)


def translation_start(fixed: np.ndarray, fixed_affine: np.ndarray, moving: np.ndarray, moving_affine: np.ndarray,
                      spacing_mm: float = 6.0, min_overlap: float = 0.5) -> np.ndarray:
    """Greedy's initial matrix (4, 4; fixed RAS point -> moving RAS point): the translation of best masked NCC."""
    f, fm, f0 = world_grid(fixed, fixed_affine, spacing_mm)
    m, mm, m0 = world_grid(moving, moving_affine, spacing_mm)
    ncc, first = masked_ncc(f, fm, m, mm, min_overlap)
    u = np.array(np.unravel_index(int(np.argmax(ncc)), ncc.shape)) + first
    matrix = np.eye(4)
    matrix[:3, 3] = spacing_mm * u + m0 - f0  # fixed world w = f0 + s i  <->  moving world m0 + s (i + u)
    return matrix
