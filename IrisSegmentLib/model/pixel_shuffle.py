"""3D pixel shuffle (sub-pixel convolution) and its inverse."""
from __future__ import annotations

import torch


def pixel_shuffle_3d(x: torch.Tensor, r: int) -> torch.Tensor:
    """(B, C*r^3, D, H, W) -> (B, C, D*r, H*r, W*r)."""
    b, c, d, h, w = x.shape
    if c % r**3:
        raise ValueError(f"channels {c} not divisible by r^3 = {r**3}")
    oc = c // r**3
    x = x.reshape(b, oc, r, r, r, d, h, w)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, oc, d * r, h * r, w * r)


def pixel_unshuffle_3d(x: torch.Tensor, r: int) -> torch.Tensor:
    """(B, C, D*r, H*r, W*r) -> (B, C*r^3, D, H, W); the exact inverse of pixel_shuffle_3d."""
    b, c, dd, hh, ww = x.shape
    if dd % r or hh % r or ww % r:
        raise ValueError(f"spatial size {(dd, hh, ww)} not divisible by {r}")
    d, h, w = dd // r, hh // r, ww // r
    x = x.reshape(b, c, d, r, h, r, w, r)
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * r**3, d, h, w)
