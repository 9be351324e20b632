"""Stage 4, merge: Gaussian-weighted blending of overlapping window probabilities, and the prior combined in."""
from __future__ import annotations

import torch

from .windows import gaussian_weights


class GaussianBlend:
    """Accumulates window probabilities (K, *window) into class probabilities (K, X, Y, Z) on a padded grid.

    With `spread`, also the weighted standard deviation of the overlapping windows' probabilities (a
    confidence feature). The accumulators stay float32: float16 would move probabilities near the 0.5
    threshold by up to 2.4e-4 and so change results."""

    def __init__(self, classes: int, shape, window, sigma_scale: float, spread: bool = False):
        self.window = tuple(window)
        self.weight = gaussian_weights(window, sigma_scale)
        self.acc = torch.zeros((classes, *shape), dtype=torch.float32)
        self.acc2 = torch.zeros_like(self.acc) if spread else None
        self.wsum = torch.zeros(tuple(shape), dtype=torch.float32)

    def _place(self, origin) -> tuple[slice, ...]:
        return tuple(slice(a, a + w) for a, w in zip(origin, self.window))

    def add(self, origin, probs: torch.Tensor | None) -> None:
        """One window's probabilities; None for a window not run (a constant image: probability 0)."""
        sl = self._place(origin)
        if probs is not None:
            self.acc[(slice(None), *sl)] += probs * self.weight
            if self.acc2 is not None:
                self.acc2[(slice(None), *sl)] += probs.square() * self.weight
        self.wsum[sl] += self.weight

    def found(self, threshold: float) -> torch.Tensor:
        """Where any class's blended probability so far reaches `threshold` (X, Y, Z) bool."""
        return (self.acc > threshold * self.wsum).any(0)

    def result(self, shape) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Probabilities (K, *shape) (0 where no window ran) and the spread (or None); consumes the accumulators."""
        acc = self.acc
        acc /= self.wsum.clamp_min_(1e-12)
        inner = (slice(None), *(slice(0, s) for s in shape))
        if self.acc2 is None:
            return acc[inner], None
        acc2 = self.acc2
        acc2 /= self.wsum  # E[p^2] - E[p]^2, in place
        acc2.addcmul_(acc, acc, value=-1).clamp_(min=0).sqrt_()
        return acc[inner], acc2[inner]


def combine_prior(probs: torch.Tensor, prior: torch.Tensor, region: torch.Tensor, weight: float | torch.Tensor) -> torch.Tensor:
    """In place: p = w * prior + (1 - w) * network inside `region`, 0 outside (`localise.py`); `weight`: one
    w, or one per class (K,)."""
    w = torch.as_tensor(weight, dtype=probs.dtype).reshape(-1, 1, 1, 1)
    for k in range(probs.shape[0]):  # class by class: no second (K, X, Y, Z) temporary
        wk = w[k if w.shape[0] > 1 else 0]
        probs[k].mul_(1.0 - wk).add_(prior[k] * wk)
        probs[k].mul_(region)
    return probs
