"""High-resolution foreground pooling without materialising upsampled features.

Trilinear upsampling U is linear and separable, so for features F and mask y
    sum(U(F) * y) / sum(y) = <F, U^T(y)> / sum(y).
U^T(y) is computed per axis with the transposed 1D interpolation matrices: the cost
is that of the low-resolution features, not C x the full-resolution volume.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def interpolation_matrix(n_out: int, n_in: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(n_out, n_in) matrix of 1D linear interpolation, align_corners=False, as F.interpolate."""
    eye = torch.eye(n_in, device=device, dtype=dtype).unsqueeze(0)  # (1, n_in, n_in)
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].T


def upsample_adjoint(mask: torch.Tensor, low_shape: tuple[int, int, int]) -> torch.Tensor:
    """U^T applied to (B, K, D, H, W) masks -> (B, K, d, h, w)."""
    D, H, W = mask.shape[-3:]
    mz, my, mx = (
        interpolation_matrix(n, m, mask.device, mask.dtype) for n, m in zip((D, H, W), low_shape)
    )
    return torch.einsum("bkZYX,Zz,Yy,Xx->bkzyx", mask, mz, my, mx)


def foreground_pool(features: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Masked average of upsampled features, exactly: (B, C, d, h, w), (B, K, D, H, W) -> (B, K, C)."""
    adj = upsample_adjoint(mask.to(features.dtype), tuple(features.shape[-3:]))
    num = torch.einsum("bczyx,bkzyx->bkc", features, adj)
    den = mask.flatten(2).sum(-1).to(features.dtype).clamp_min(eps)
    return num / den.unsqueeze(-1)


def upsample_then_pool(features: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Ablation: the same average with the upsampled features materialised (C x full resolution per
    sample, as the seed proposes); equal to `foreground_pool` up to rounding, at full-resolution cost."""
    up = F.interpolate(features, size=tuple(mask.shape[-3:]), mode="trilinear", align_corners=False)
    num = torch.einsum("bcZYX,bkZYX->bkc", up, mask.to(features.dtype))
    den = mask.flatten(2).sum(-1).to(features.dtype).clamp_min(eps)
    return num / den.unsqueeze(-1)


def downsampled_pool(features: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Ablation: the mask area-averaged down to the feature grid, then a weighted average there (cheap,
    NOT equal to the full-resolution average: each fine voxel goes to the one cell holding it)."""
    low = F.adaptive_avg_pool3d(mask.to(features.dtype), tuple(features.shape[-3:]))
    num = torch.einsum("bczyx,bkzyx->bkc", features, low)
    return num / low.flatten(2).sum(-1).clamp_min(eps).unsqueeze(-1)
