"""The one builder: a ModelConfig -> an IrisModel. It owns every size; the parts take them as keyword arguments.

The parts are the design's (docs/DESIGN.md section 2); a config with an ablation switch off its default (issue 11)
takes that part from `variants.py`, which nothing else in the library imports."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..config import ABLATION_CHOICES, ModelConfig
from .attention import TaskBlock, TwoWayBlock
from .decoder import Decoder
from .encoder import Encoder
from .foreground_pooling import foreground_pool
from .iris import IrisModel
from .task_encoder import Pool, TaskEncoder


@dataclass(frozen=True)
class Parts:
    """What the builder assembles: the design's classes and functions, or an ablation's (`variants.parts`)."""

    task_block: Callable[[int, int, int], nn.Module] = TaskBlock  # (dim, heads, mlp_ratio)
    pool: Pool = foreground_pool  # the foreground token
    task_encoder: type[TaskEncoder] = TaskEncoder
    fusion_block: Callable[[int, int, int], nn.Module] = TwoWayBlock  # (dim, heads, mlp_ratio)
    decoder: type[Decoder] = Decoder


def is_design(cfg: ModelConfig) -> bool:
    """Whether every ablation switch is at the design's choice."""
    return all(getattr(cfg, name) == choices[0] for name, choices in ABLATION_CHOICES.items())


def build_iris(cfg: ModelConfig) -> IrisModel:
    """The network `cfg` describes, randomly initialised (the parts are made in the order that fixes the
    initialisation from torch's seed: encoder, task encoder, decoder)."""
    cfg.validate()
    if is_design(cfg):
        parts = Parts()
    else:
        from .variants import parts as variant_parts

        parts = variant_parts(cfg)
    c, heads, ratio = cfg.token_dim, cfg.heads, cfg.mlp_ratio
    encoder = Encoder(cfg.in_channels, cfg.widths, cfg.blocks_per_stage)
    task_encoder = parts.task_encoder(dim=c, downsampling=cfg.downsampling, shuffle_channels=cfg.shuffle_channels,
                                      num_queries=cfg.num_queries, depth=cfg.task_attention_depth,
                                      block=lambda: parts.task_block(c, heads, ratio), pool=parts.pool)
    decoder = parts.decoder(widths=cfg.widths, heads=heads, mlp_ratio=ratio, fusion_depth=cfg.bottleneck_fusion_depth,
                            fusion_block=lambda: parts.fusion_block(c, heads, ratio), second_fusion=cfg.second_fusion,
                            head_channels=cfg.head_channels, prior_channels=cfg.prior_channels)
    return IrisModel(encoder=encoder, task_encoder=task_encoder, decoder=decoder)
