"""Modality detection and intensity normalisation (identical in training and inference)."""
from __future__ import annotations

import numpy as np

from ..config import InferenceConfig

MODALITIES = ("auto", "ct", "mr")


def detect_modality(image: np.ndarray) -> str:
    """'ct' when the values look like Hounsfield units (air near -1000, tissue and bone above), else 'mr'."""
    sample = image.reshape(-1)[:: max(1, image.size // 200_000)]
    lo, hi = np.percentile(sample, [1, 99])
    return "ct" if lo < -500 and hi > 0 else "mr"


def normalise(image: np.ndarray, modality: str = "auto", cfg: InferenceConfig = InferenceConfig()) -> np.ndarray:
    """CT: clip to cfg.ct_clip; MR and anything else: clip to percentiles; then z-score. float32."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, not {modality!r}")
    x = np.asarray(image, dtype=np.float32)
    if modality == "auto":
        modality = detect_modality(x)
    if modality == "ct":
        lo, hi = cfg.ct_clip
    else:
        sample = x.reshape(-1)[:: max(1, x.size // 1_000_000)]
        lo, hi = np.percentile(sample, cfg.mr_clip_percentiles)
    x = np.clip(x, np.float32(lo), np.float32(hi))
    std = float(x.std())
    if std < 1e-6:
        return np.zeros_like(x)
    return ((x - float(x.mean())) / std).astype(np.float32, copy=False)
