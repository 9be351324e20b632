"""Stage 1, prepare: a checked 3D volume, normalised intensities, on the model's working grid."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..config import InferenceConfig
from ..errors import IrisInputError
from .geometry import WorkingGrid
from .intensity import detect_modality, normalise_


def check_volume(image: np.ndarray, what: str) -> np.ndarray:
    """A 3D scalar volume, or a message that says what it is and what to do."""
    a = np.asarray(image)
    if a.ndim == 4 and a.shape[3] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        raise IrisInputError(f"{what} is 2D {a.shape}; IrisSegment needs a 3D volume (stack the slices into one volume)")
    if a.ndim == 4:
        raise IrisInputError(f"{what} has 4 dimensions {a.shape} (a time series or multi-component image); extract one 3D volume or one component first")
    if a.ndim == 5 and a.shape[3] == 1:  # NIfTI keeps vector components in the 5th dimension
        raise IrisInputError(f"{what} is a multi-component (vector) image {a.shape} with {a.shape[4]} components; extract one component first")
    if a.ndim != 3:
        raise IrisInputError(f"{what} has {a.ndim} dimensions {a.shape}; a 3D volume is needed: extract one first")
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise IrisInputError(f"{what} has data type {a.dtype} (e.g. colour or complex); a real-valued scalar image is needed: "
                             "convert it to a grey-level volume first")
    return a


def finite(image: np.ndarray, what: str) -> np.ndarray:
    """A C-ordered float32 copy (the caller's array is never changed), NaN/Inf replaced by the minimum, with a warning."""
    x = np.array(image, dtype=np.float32, order="C")
    if np.issubdtype(np.asarray(image).dtype, np.floating):
        bad = ~np.isfinite(x)
        if bad.any():
            fill = float(np.min(x[~bad])) if (~bad).any() else 0.0
            warnings.warn(f"{what}: {int(bad.sum())} NaN/Inf voxels replaced by {fill:g}")
            x[bad] = fill
    return x


@dataclass(frozen=True)
class Prepared:
    """One image ready for the model: `work` (1, X, Y, Z) normalised on the working grid `grid`."""

    work: torch.Tensor
    grid: WorkingGrid
    constant: bool  # the image holds one value: nothing to see
    modality: str  # "ct" or "mr", as detected or given


def prepare(image, affine, modality: str, spacing, cfg: InferenceConfig, what: str) -> Prepared:
    """Check, reorient to nearest RAS, normalise (on the image's own grid, as in training) and resample to `spacing`.
    The same scan stored in another axis order or direction gets exactly the same working image."""
    img = check_volume(image, what)
    grid = WorkingGrid.create(img.shape, affine, spacing)
    x = finite(grid.reoriented_view(img), what)
    constant = float(x.max() - x.min()) == 0.0
    found = detect_modality(x) if modality == "auto" else modality
    normalise_(x, found, cfg)
    return Prepared(grid.to_working(torch.from_numpy(x)[None], reoriented=True), grid, constant, found)
