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

    def to_working(self, array: torch.Tensor, mode: str = "trilinear") -> torch.Tensor:
        """(C, I, J, K) float -> (C, X', Y', Z') on the working grid."""
        x = self.reorient(array)
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
