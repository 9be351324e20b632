"""Where the body is: the box of what is not background, on a working image or on a raw scan (before its
intensities are normalised, so that a small scan inside a large empty field is not drowned by it)."""
from __future__ import annotations

import math

import numpy as np

from .geometry import spacing_of

RAW_SAMPLE_VOXELS = 2_000_000  # a raw scan is looked at through a strided sample of at most this many voxels


def foreground_box(small: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(lo, hi) voxel bounds (hi exclusive) of what is not background in a small image, or None where it finds
    no background (or nothing but background): background is the dark part (below Otsu's threshold) connected to
    the image's faces."""
    import SimpleITK as sitk
    from scipy.ndimage import label

    if float(small.max() - small.min()) == 0.0:
        return None
    dark = sitk.GetArrayFromImage(sitk.OtsuThreshold(sitk.GetImageFromArray(small.astype(np.float32)), 1, 0)).astype(bool)
    comps = label(dark)[0]  # 6-connected
    faces = np.unique(np.concatenate([comps[[0, -1]].ravel(), comps[:, [0, -1]].ravel(), comps[:, :, [0, -1]].ravel()]))
    body = ~np.isin(comps, faces[faces > 0])
    if not body.any() or body.all():
        return None
    nz = np.argwhere(body)
    return nz.min(0), nz.max(0) + 1


def raw_body_box(image: np.ndarray, affine: np.ndarray, margin_mm: float) -> tuple[slice, slice, slice]:
    """The body box of a raw 3D scan in its own voxel indices, grown by `margin_mm` (the whole scan where it has
    no background), from a strided sample of at most RAW_SAMPLE_VOXELS voxels."""
    whole = tuple(slice(0, n) for n in image.shape)
    s = max(1, math.ceil((image.size / RAW_SAMPLE_VOXELS) ** (1 / 3)))
    sample = np.asarray(image[::s, ::s, ::s], dtype=np.float32)
    ok = np.isfinite(sample)
    if not ok.any():
        return whole
    found = foreground_box(np.where(ok, sample, sample[ok].min()))
    if found is None:
        return whole
    return grown_box(found, s, np.ceil(margin_mm / spacing_of(affine)).astype(int), image.shape, slack=s)


def grown_box(found: tuple[np.ndarray, np.ndarray], factor: int, margin, shape, slack: int = 0) -> tuple[slice, slice, slice]:
    """The box in voxels of a grid of `shape` of (lo, hi) bounds found on a copy `factor` times coarser, widened by
    `slack` voxels (what a strided sample can miss between its samples) and `margin` (one per axis, or one for all)."""
    lo = np.maximum(found[0] * factor - slack - margin, 0)
    hi = np.minimum(found[1] * factor + slack + margin, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def crop_affine(affine: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """Voxel-to-world of `image[box]`."""
    out = np.array(affine, dtype=np.float64)
    out[:3, 3] = out[:3, :3] @ np.array([b.start for b in box], dtype=np.float64) + out[:3, 3]
    return out
