"""Synthetic images for label-only data, SynthSeg-style, and procedural shapes. Torch ops."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (C, D, H, W) in voxels."""
    if sigma <= 0.1:
        return x
    r = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    y = x[None]
    c = x.shape[0]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = -1
        w = k.view(shape).expand(c, 1, *[k.numel() if i == axis else 1 for i in range(3)])
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        y = F.conv3d(F.pad(y, pad, mode="replicate"), w, groups=c)
    return y[0]


def bias_field(shape, g: torch.Generator, strength: float) -> torch.Tensor:
    """Smooth multiplicative field exp(N(0, strength)) from a 4^3 random grid."""
    coarse = torch.randn(1, 1, 4, 4, 4, generator=g) * strength
    return torch.exp(F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)[0, 0])


def render(label: torch.Tensor, means: torch.Tensor, stds: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Image from a label map (indices) and per-index intensity mean/std (one synthetic 'modality')."""
    lab = label.long()
    img = means[lab] + stds[lab] * torch.randn(lab.shape, generator=g)
    img = gaussian_blur(img[None], float(torch.empty(1).uniform_(0.3, 1.5, generator=g)))[0]
    img = img * bias_field(lab.shape, g, float(torch.empty(1).uniform_(0.0, 0.4, generator=g)))
    img = img + 0.03 * torch.randn(lab.shape, generator=g)
    if torch.rand(1, generator=g) < 0.3:  # partial-volume / low-resolution look
        f = float(torch.empty(1).uniform_(1.5, 3.0, generator=g))
        small = [max(4, int(s / f)) for s in lab.shape]
        img = F.interpolate(F.interpolate(img[None, None], size=small, mode="trilinear"), size=lab.shape, mode="trilinear")[0, 0]
    return (img - img.mean()) / img.std().clamp_min(1e-6)


def random_modality(n_labels: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random intensity table: one mean and one std per label index (index 0 = background)."""
    means = torch.rand(n_labels, generator=g)
    stds = torch.rand(n_labels, generator=g) * 0.08
    return means, stds


def random_shapes(shape, n_shapes: int, g: torch.Generator) -> torch.Tensor:
    """Label map of n_shapes random deformed ellipsoids (index 1..n), later ones drawn on top."""
    d, h, w = shape
    zz, yy, xx = torch.meshgrid(*(torch.linspace(-1, 1, s) for s in shape), indexing="ij")
    lab = torch.zeros(shape, dtype=torch.uint8)
    noise = F.interpolate(torch.randn(1, 1, 6, 6, 6, generator=g), size=shape, mode="trilinear", align_corners=True)[0, 0]
    for i in range(1, n_shapes + 1):
        c = torch.empty(3).uniform_(-0.5, 0.5, generator=g)
        r = torch.empty(3).uniform_(0.08, 0.4, generator=g)
        q = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2
        lab[q + 0.3 * noise < 1] = i
    return lab
