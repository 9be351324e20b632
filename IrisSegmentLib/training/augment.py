"""Spatial and intensity augmentation as in the paper (scale, rotation; brightness, gamma, contrast,
blur, noise), applied jointly to an image and its masks. Torch ops. Translation comes from the
sampler's crop jitter; no flips, since a flip would swap left and right structures."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .synth import gaussian_blur


def _u(g, lo, hi) -> float:
    return float(torch.empty(1).uniform_(lo, hi, generator=g))


def rotation(ax: float, ay: float, az: float) -> torch.Tensor:
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return (rz @ ry @ rx).float()


def spatial(image: torch.Tensor, masks: torch.Tensor, g: torch.Generator, max_deg: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rotation (+-max_deg) and scale 0.9-1.1: (D,H,W) image, (K,D,H,W) masks."""
    a = [math.radians(_u(g, -max_deg, max_deg)) for _ in range(3)]
    theta = rotation(*a) / _u(g, 0.9, 1.1)
    grid = F.affine_grid(torch.cat([theta, torch.zeros(3, 1)], 1)[None], (1, 1, *image.shape), align_corners=False)
    stack = torch.cat([image[None], masks.float()], 0)[None]
    out = F.grid_sample(stack, grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    return out[0], out[1:]


def intensity(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Brightness x0.9-1.1 and +N(0, 0.1), gamma 0.8-1.2, contrast 0.8-1.2, blur, noise <= 0.02 (on z-scores)."""
    x = image * _u(g, 0.9, 1.1) + 0.1 * float(torch.randn(1, generator=g))
    if torch.rand(1, generator=g) < 0.5:  # gamma on the [0, 1]-rescaled image
        lo, hi = x.min(), x.max()
        r = (hi - lo).clamp_min(1e-6)
        x = ((x - lo) / r) ** _u(g, 0.8, 1.2) * r + lo
    m = x.mean()
    x = (x - m) * _u(g, 0.8, 1.2) + m
    if torch.rand(1, generator=g) < 0.2:
        x = gaussian_blur(x[None], _u(g, 0.7, 1.3))[0]
    return x + _u(g, 0.0, 0.02) * torch.randn(x.shape, generator=g)


def random_curve(images: list[torch.Tensor], g: torch.Generator, knots: int = 5) -> list[torch.Tensor]:
    """One random piecewise-linear intensity curve (knots at random levels, any order, so it may
    invert or fold the contrast) applied to every image, each then z-scored: one new 'modality'."""
    lo = min(float(i.min()) for i in images)
    hi = max(float(i.max()) for i in images)
    ys = torch.rand(knots, generator=g)
    out = []
    for img in images:
        pos = ((img - lo) / (hi + 1e-6 - lo) * (knots - 1)).clamp(0, knots - 1 - 1e-6)
        i = pos.floor().long()
        f = pos - i
        y = ys[i] * (1 - f) + ys[i + 1] * f
        out.append((y - y.mean()) / y.std().clamp_min(1e-6))
    return out


def thick_slices(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """(D, H, W) image as if acquired with 2-5x thicker slices along a random axis (slab average,
    then linear interpolation back): the look of a thick-slice or other-orientation scan."""
    axis = int(torch.randint(0, 3, (1,), generator=g))
    f = int(torch.randint(2, 6, (1,), generator=g))
    size = list(image.shape)
    small = size.copy()
    small[axis] = max(2, size[axis] // f)
    x = F.adaptive_avg_pool3d(image[None, None], small)
    return F.interpolate(x, size=size, mode="trilinear", align_corners=False)[0, 0]
