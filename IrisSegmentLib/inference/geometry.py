"""World-correct reorientation and resampling between an image's grid and the working grid.

Arrays are indexed in the voxel order of their 4x4 voxel-to-world matrix (i, j, k), world in
RAS millimetres. The working grid keeps the image's own direction cosines (axes permuted and
flipped to the nearest RAS) and has the model's working spacing, so going there and back is a
permutation plus a pure per-axis scaling: no drift, no bounding-box growth for oblique scans.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def check_affine(affine: np.ndarray) -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise ValueError("the voxel-to-world matrix must be a finite 4x4 array")
    if abs(np.linalg.det(a[:3, :3])) < 1e-9:
        raise ValueError("the voxel-to-world matrix is singular (zero spacing or degenerate axes)")
    return a


def spacing_of(affine: np.ndarray) -> np.ndarray:
    """Voxel size along each array axis, in mm."""
    return np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)


def nearest_ras(affine: np.ndarray) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """For each world axis (R, A, S): which array axis runs along it, and whether it runs backwards."""
    cos = np.asarray(affine)[:3, :3] / spacing_of(affine)
    perm, flips = [0, 0, 0], [False] * 3
    worlds, axes = set(), set()
    # Greedy on the largest |cosine| first, as nibabel's io_orientation does.
    for flat in np.argsort(-np.abs(cos), axis=None):
        world, axis = divmod(int(flat), 3)
        if world in worlds or axis in axes:
            continue
        worlds.add(world)
        axes.add(axis)
        perm[world] = axis
        flips[world] = bool(cos[world, axis] < 0)
    return tuple(perm), tuple(flips)


@dataclass(frozen=True)
class WorkingGrid:
    """Maps one image between its own grid and the model's working grid."""

    shape: tuple[int, int, int]  # original array shape
    affine: np.ndarray  # original voxel-to-world
    perm: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    working_shape: tuple[int, int, int]

    @classmethod
    def create(cls, shape, affine, spacing) -> "WorkingGrid":
        affine = check_affine(affine)
        perm, flips = nearest_ras(affine)
        src_sp = spacing_of(affine)[list(perm)]
        src_shape = np.array(shape)[list(perm)]
        work = np.maximum(1, np.round(src_shape * src_sp / np.asarray(spacing, dtype=float))).astype(int)
        return cls(tuple(int(s) for s in shape), affine, perm, flips, tuple(int(s) for s in work))

    @property
    def reoriented_shape(self) -> tuple[int, int, int]:
        return tuple(self.shape[p] for p in self.perm)

    @property
    def working_affine(self) -> np.ndarray:
        """Voxel-to-world matrix of the working grid."""
        m = np.zeros((4, 4))
        m[3, 3] = 1
        for new, (old, flip) in enumerate(zip(self.perm, self.flips)):
            n = self.shape[old]
            scale = n / self.working_shape[new]
            # old index = offset + step * new working index
            step = -scale if flip else scale
            offset = (n - 1) - (0.5 * scale - 0.5) if flip else 0.5 * scale - 0.5
            m[old, new] = step
            m[old, 3] = offset
        return self.affine @ m

    def reorient(self, array: torch.Tensor) -> torch.Tensor:
        """(..., I, J, K) in original axis order -> (..., X, Y, Z) nearest-RAS order (exact)."""
        lead = array.dim() - 3
        x = array.permute(*range(lead), *(lead + p for p in self.perm))
        dims = [lead + i for i, f in enumerate(self.flips) if f]
        return x.flip(dims) if dims else x

    def unreorient(self, array: torch.Tensor) -> torch.Tensor:
        lead = array.dim() - 3
        dims = [lead + i for i, f in enumerate(self.flips) if f]
        x = array.flip(dims) if dims else array
        inv = np.argsort(self.perm)
        return x.permute(*range(lead), *(lead + int(p) for p in inv))

    def reoriented_view(self, array: np.ndarray) -> np.ndarray:
        """A numpy view (no copy) of an (I, J, K) array in nearest-RAS order (X, Y, Z), as `reorient` orders it."""
        x = np.transpose(array, self.perm)
        return x[tuple(slice(None, None, -1) if f else slice(None) for f in self.flips)]

    def to_working(self, array: torch.Tensor, mode: str = "trilinear", reoriented: bool = False) -> torch.Tensor:
        """(C, I, J, K) float -> (C, X', Y', Z') on the working grid (`reoriented`: already (C, X, Y, Z))."""
        x = array if reoriented else self.reorient(array)
        if tuple(x.shape[-3:]) == self.working_shape:
            return x.contiguous()
        kw = {"align_corners": False} if mode == "trilinear" else {}
        return F.interpolate(x[None], size=self.working_shape, mode=mode, **kw)[0]

    def from_working(self, array: torch.Tensor) -> torch.Tensor:
        """(C, X', Y', Z') working-grid values -> (C, I, J, K) on the original grid (trilinear)."""
        target = self.reoriented_shape
        x = array
        if tuple(x.shape[-3:]) != target:
            x = F.interpolate(x[None], size=target, mode="trilinear", align_corners=False)[0]
        return self.unreorient(x)

    def from_working_rows(self, array: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of `reorient(from_working(array))`, i.e. (C, stop - start, Y, Z) in nearest-RAS order,
        read from only the working rows they need: a large target can be resampled slab by slab.

        The same trilinear, align_corners=False mapping as `from_working`, evaluated as torch evaluates it
        (the Y, Z plane of each working row by F.interpolate, then the linear blend along X with torch's
        float32 scale and source coordinates): equal to `from_working` up to float32 rounding."""
        n_out, n_in = self.reoriented_shape[0], array.shape[-3]
        plane = self.reoriented_shape[1:]
        if n_out == n_in:
            i0 = i1 = np.arange(start, stop)
        else:  # output row r sits at working row (r + 0.5) * n_in / n_out - 0.5, clamped to the grid
            scale = float(np.float32(n_in) / np.float32(n_out))
            src = np.maximum(((np.arange(start, stop) + 0.5) * scale - 0.5).astype(np.float32), np.float32(0))
            i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
            i1 = np.minimum(i0 + 1, n_in - 1)
            w1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
        lo, hi = int(i0[0]), int(i1[-1]) + 1
        rows = array[:, lo:hi]
        if tuple(rows.shape[-2:]) != plane:
            rows = F.interpolate(rows[None], size=(hi - lo, *plane), mode="trilinear", align_corners=False)[0]
        if n_out == n_in:
            return rows
        w1 = torch.from_numpy(w1)[None, :, None, None]
        out = rows[:, torch.from_numpy(i0 - lo)]  # copies: safe to scale in place
        out *= 1 - w1
        far = rows[:, torch.from_numpy(i1 - lo)]
        far *= w1
        out += far
        return out
