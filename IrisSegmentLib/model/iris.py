"""The IRIS network: shared encoder, task encoder, query-based decoder (`build.build_iris` makes one from a config)."""
from __future__ import annotations

import torch
from torch import nn


class IrisModel(nn.Module):
    """The three parts, handed in built: `encoder` (image -> features per stage, finest first), `task_encoder`
    (coarsest reference features + masks -> tokens), `decoder` (query features + tokens [+ prior] -> logits)."""

    def __init__(self, *, encoder: nn.Module, task_encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.task_encoder = task_encoder
        self.decoder = decoder

    def encode_task(self, ref_image: torch.Tensor, ref_masks: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) reference, (B, K, D, H, W) masks -> task tokens (B, K, m+1, C)."""
        return self.task_encoder(self.encoder(ref_image)[-1], ref_masks)

    @property
    def takes_prior(self) -> bool:
        """Whether the network refines a localisation prior (`segment(prior=...)`); else a prior is ignored."""
        return self.decoder.prior_fusion is not None

    def segment(
        self, image: torch.Tensor, tokens: torch.Tensor, class_valid: torch.Tensor | None = None,
        prior: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, 1, D, H, W) query, tokens (B or 1, K, m+1, C), prior (B, K, D, H, W) in [0, 1] or None ->
        logits (B, K, D, H, W), all K at once."""
        feats = self.encoder(image)
        if tokens.shape[0] != image.shape[0]:
            tokens = tokens.expand(image.shape[0], -1, -1, -1)
        return self.decoder(feats, tokens, class_valid, prior)

    def forward(self, query, ref_image, ref_masks, class_valid=None, prior=None) -> torch.Tensor:
        return self.segment(query, self.encode_task(ref_image, ref_masks), class_valid, prior)
