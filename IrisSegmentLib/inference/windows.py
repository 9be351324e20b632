"""Sliding windows: tiling that covers every voxel, Gaussian blending weights, batching."""
from __future__ import annotations

import itertools

import numpy as np
import torch


def starts(size: int, window: int, overlap: float) -> list[int]:
    """Window starts along one axis: stride window*(1-overlap), last window flush with the end."""
    if size <= window:
        return [0]
    stride = max(1, int(round(window * (1 - overlap))))
    s = list(range(0, size - window, stride))
    return s + [size - window]


def tile(shape, window, overlap: float) -> list[tuple[int, int, int]]:
    """All window origins for a volume of `shape` (already padded to at least `window`)."""
    return list(itertools.product(*(starts(n, w, overlap) for n, w in zip(shape, window))))


def coarse_starts(size: int, window: int, overlap: float) -> list[int]:
    """The fewest of `starts(size, window, overlap)` that still cover the axis: greedily, the furthest
    start that leaves no gap after the previous window."""
    fine = starts(size, window, overlap)
    out = [fine[0]]
    while out[-1] + window < size:
        out.append(max(s for s in fine if s <= out[-1] + window))
    return out


def coarse_tile(shape, window, overlap: float) -> list[tuple[int, int, int]]:
    """Window origins of the coarse pass: a subset of `tile(shape, window, overlap)` covering every voxel."""
    return list(itertools.product(*(coarse_starts(n, w, overlap) for n, w in zip(shape, window))))


def gaussian_weights(window, sigma_scale: float = 0.125, floor: float = 1e-3) -> torch.Tensor:
    """Separable Gaussian importance map, peak 1, sigma = window * sigma_scale, floored above 0."""
    axes = []
    for w in window:
        x = np.arange(w) - (w - 1) / 2
        axes.append(np.exp(-0.5 * (x / (w * sigma_scale)) ** 2))
    g = np.einsum("i,j,k->ijk", *axes)
    g = np.maximum(g / g.max(), floor)
    return torch.from_numpy(g.astype(np.float32))


def pad_to_window(volume: torch.Tensor, window) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Pads (C, X, Y, Z) at the far end so each axis is at least the window; returns original shape."""
    shape = tuple(volume.shape[-3:])
    pad = [max(0, w - n) for n, w in zip(shape, window)]
    if any(pad):
        mode_value = float(volume.min())
        volume = torch.nn.functional.pad(volume, (0, pad[2], 0, pad[1], 0, pad[0]), value=mode_value)
    return volume, shape



def plan(shape, window, overlap: float, region: torch.Tensor | None = None, margin: int = 0,
         exclude=()) -> list[tuple[int, int, int]]:
    """Origins of `tile(shape, window, overlap)` not in `exclude` whose window, grown by `margin` voxels,
    touches `region` (bool, `shape`); every origin when `region` is None."""
    skip = set(exclude)
    out = [o for o in tile(shape, window, overlap) if o not in skip]
    if region is None:
        return out
    return [o for o in out if bool(region[tuple(slice(max(a - margin, 0), a + w + margin) for a, w in zip(o, window))].any())]
