"""Stage 6, label map: working-grid class probabilities -> the target's own grid, one label per voxel."""
from __future__ import annotations

import numpy as np
import torch

from .geometry import WorkingGrid

SLAB_VALUES = 1 << 20  # probabilities resampled to the target grid at a time (4 MiB of float32)


def to_label_map(probs: torch.Tensor, grid: WorkingGrid, labels: list[int], threshold: float) -> np.ndarray:
    """On the target grid, the label of the most probable class (the first on ties) where its probability
    is >= threshold, else 0. Streamed: the probabilities are resampled a slab of target rows at a time
    (about SLAB_VALUES floats), so no target-sized float array is made; the label map is filled in place."""
    dtype = np.uint8 if max(labels) < 256 else np.uint16 if max(labels) < 65536 else np.int32
    out = np.zeros(grid.shape, dtype)
    rows = grid.reoriented_view(out)  # writing rows of this view writes `out`
    values = torch.tensor(labels, dtype=torch.int32)
    n, ny, nz = rows.shape
    step = max(1, SLAB_VALUES // (probs.shape[0] * ny * nz))
    for start in range(0, n, step):
        best, arg = grid.from_working_rows(probs, start, min(n, start + step)).max(0)
        rows[start : start + step] = values[arg].masked_fill_(~(best >= threshold), 0).numpy()
    return out


def paste(values: np.ndarray, box: tuple[slice, ...], shape) -> np.ndarray:
    """`values` computed on `image[box]` placed into zeros of the whole image's `shape` (itself where box is whole)."""
    if tuple(values.shape) == tuple(shape):
        return values
    out = np.zeros(shape, values.dtype)
    out[box] = values
    return out
