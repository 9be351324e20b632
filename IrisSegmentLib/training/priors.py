"""Simulated localisation priors for training (issue 17): what registration of another subject's reference
would carry onto the query. The query's own truth is moved by a random affine and a smooth elastic warp (a
registration's global and local errors), each class is eroded or dilated, loses a part or gains a spurious
blob (a neighbour registered into it), and the result is blurred as the engine blurs a warped mask
(`localise.prior_sigma_mm`). One severity per episode scales every error, so priors range from nearly
right to clearly off. Torch ops on (K, D, H, W) masks."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .augment import rotation
from .synth import gaussian_blur

PRIOR_ERRORS = ("affine", "elastic", "morph", "missing", "spurious")


def _u(g: torch.Generator, lo: float, hi: float) -> float:
    return float(torch.empty(1).uniform_(lo, hi, generator=g))


def warp_field(shape, g: torch.Generator, severity: float, affine: bool = True, elastic: bool = True) -> torch.Tensor:
    """A sampling grid (1, D, H, W, 3) for grid_sample: a random affine (shift up to 6 voxels, rotation up to
    10 degrees, scale 0.85-1.15 per axis, all times `severity`) and a smooth displacement (up to 4 voxels)."""
    n = torch.tensor(shape, dtype=torch.float32)
    theta, shift = torch.eye(3), torch.zeros(3)
    if affine:
        a = [math.radians(_u(g, -10, 10) * severity) for _ in range(3)]
        theta = rotation(*a) * torch.tensor([1.0 + _u(g, -0.15, 0.15) * severity for _ in range(3)])[None, :]
        shift = torch.tensor([_u(g, -6, 6) * severity for _ in range(3)]) * 2 / n  # voxels -> normalised
    grid = F.affine_grid(torch.cat([theta, shift.flip(0)[:, None]], 1)[None], (1, 1, *shape), align_corners=False)
    if not elastic:
        return grid
    coarse = torch.randn(1, 3, 4, 4, 4, generator=g) * (4.0 * severity)
    disp = F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)[0]  # voxels, (x, y, z) order of grid
    return grid + (disp.permute(1, 2, 3, 0) * 2 / n.flip(0))[None]


def _morph(mask: torch.Tensor, r: int) -> torch.Tensor:
    """(1, D, H, W) dilated (r > 0) or eroded (r < 0) by a (2|r|+1)^3 cube."""
    if r == 0:
        return mask
    k = 2 * abs(r) + 1
    x = mask[None] if r > 0 else -mask[None]
    y = F.max_pool3d(x, k, stride=1, padding=abs(r))[0]
    return y if r > 0 else -y


def _half_space(shape, g: torch.Generator, centre: torch.Tensor) -> torch.Tensor:
    """(D, H, W) bool: one side of a random plane through `centre` (voxel coordinates)."""
    normal = torch.randn(3, generator=g)
    idx = torch.stack(torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in shape), indexing="ij"), -1)
    return ((idx - centre) @ normal) > 0


def _blob(shape, g: torch.Generator, centre: torch.Tensor, radius: float) -> torch.Tensor:
    """(D, H, W) bool ellipsoid at `centre` with semi-axes around `radius` voxels."""
    axes = torch.tensor([radius * _u(g, 0.5, 1.5) for _ in range(3)])
    idx = torch.stack(torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in shape), indexing="ij"), -1)
    return (((idx - centre) / axes) ** 2).sum(-1) <= 1.0


def simulate_prior(masks: torch.Tensor, g: torch.Generator, sigma_vox: float, severity: float | None = None,
                   errors: tuple[str, ...] = PRIOR_ERRORS) -> torch.Tensor:
    """A registration-like prior (K, D, H, W) in [0, 1] from the true masks (K, D, H, W) of the query.
    `severity` in [0, 1] (default: drawn uniformly): how far the prior is off; `errors`: which of PRIOR_ERRORS
    are simulated (the others left out: an ablation)."""
    if severity is None:
        severity = _u(g, 0.0, 1.0)
    shape = tuple(masks.shape[1:])
    moved = masks.float()
    if "affine" in errors or "elastic" in errors:
        grid = warp_field(shape, g, severity, "affine" in errors, "elastic" in errors)
        moved = F.grid_sample(moved[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    out = []
    for k in range(masks.shape[0]):
        m = (moved[k : k + 1] > 0.5).float()
        r = int(round(_u(g, -3, 3) * severity))
        m = _morph(m, r) if m.sum() > 0 and "morph" in errors else m
        fg = torch.nonzero(m[0] > 0)
        if len(fg) and torch.rand(1, generator=g) < 0.25 * severity and "missing" in errors:  # a part missing
            m[0][_half_space(shape, g, fg[torch.randint(len(fg), (1,), generator=g)][0].float())] = 0
        if torch.rand(1, generator=g) < 0.25 * severity and "spurious" in errors:  # a blob near the structure
            base = fg[torch.randint(len(fg), (1,), generator=g)][0].float() if len(fg) else torch.tensor(shape) / 2
            centre = base + torch.randn(3, generator=g) * 8
            m[0][_blob(shape, g, centre, _u(g, 2, 6))] = 1
        out.append(m)
    return gaussian_blur(torch.cat(out), sigma_vox).clamp(0, 1)
