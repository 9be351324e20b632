"""Where and how window forward passes run: device, window batch, CPU precision, and the out-of-memory policy."""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import IrisInputError

log = logging.getLogger("IrisSegmentLib")


def resolve_device(device: str = "auto") -> torch.device:
    if device in ("auto", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "gpu":
        device = "cuda"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise IrisInputError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise IrisInputError(f"unknown device {device!r}; use auto, cpu or cuda") from None


def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises native bfloat16 arithmetic (AVX512-BF16 or AMX, Linux /proc/cpuinfo);
    elsewhere bf16 would be emulated and slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def cpu_autocast(precision: str) -> bool:
    """Whether window forward passes on the CPU run under bfloat16 autocast."""
    if precision not in ("auto", "bf16", "fp32"):
        raise IrisInputError(f"cpu_precision must be auto, bf16 or fp32, not {precision!r}")
    return precision == "bf16" or precision == "auto" and cpu_has_native_bf16()


@dataclass(frozen=True)
class Runtime:
    """Immutable: the out-of-memory policy returns a new Runtime (`after_oom`) rather than changing this one."""

    device: torch.device
    batch_size: int
    cpu_bf16: bool

    def autocast(self):
        if self.device.type == "cuda":
            half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=half)
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cpu_bf16 and self.device.type == "cpu")

    def forward(self, model, crops: list[torch.Tensor], tokens: torch.Tensor, priors: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Class probabilities (N, K, *window) of a batch of (1, *window) crops, on the CPU; `priors`: the
        localisation prior (K, *window) of each crop, for a network that takes one (else ignored)."""
        x = torch.stack(crops).to(self.device)
        extra = {}
        if priors is not None and getattr(model, "takes_prior", False):
            extra["prior"] = torch.stack(priors).to(self.device)
        with torch.inference_mode(), self.autocast():
            logits = model.segment(x, tokens.to(self.device)[None], **extra)
        return torch.sigmoid(logits.float()).cpu()

    def after_oom(self, batch: int) -> "Runtime":
        """CUDA out of memory with a batch of `batch` windows: half the batch, else the CPU; said as a warning.
        The caller moves the model to the new device and retries the same windows."""
        torch.cuda.empty_cache()
        if batch > 1:
            new, msg = replace(self, batch_size=batch // 2), f"GPU out of memory: retrying with {batch // 2} window(s) per batch"
        elif self.device.type != "cpu":
            new, msg = replace(self, device=torch.device("cpu")), "GPU out of memory even with one window: continuing on the CPU (slower)"
        else:  # cannot happen with a real model; never loop
            raise IrisInputError("out of memory on the CPU as well: close other programs or segment a smaller (cropped) volume")
        warnings.warn(msg)
        log.warning(msg)
        return new
