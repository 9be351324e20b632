"""Modality detection and intensity normalisation (identical in training and inference)."""
from __future__ import annotations

import math

import numpy as np

from ..config import InferenceConfig

MODALITIES = ("auto", "ct", "mr")


def detect_modality(image: np.ndarray) -> str:
    """'ct' when the values look like Hounsfield units (air near -1000, tissue and bone above), else 'mr'."""
    sample = image.reshape(-1)[:: max(1, image.size // 200_000)]
    lo, hi = np.percentile(sample, [1, 99])
    return "ct" if lo < -500 and hi > 0 else "mr"


def normalise(image: np.ndarray, modality: str = "auto", cfg: InferenceConfig = InferenceConfig()) -> np.ndarray:
    """CT: clip to cfg.ct_clip; MR and anything else: clip to percentiles; then z-score. A new float32 array."""
    return normalise_(np.array(image, dtype=np.float32), modality, cfg)


def normalise_(x: np.ndarray, modality: str = "auto", cfg: InferenceConfig = InferenceConfig()) -> np.ndarray:
    """`normalise` in place on a float32 array (no full-size copy); returns it."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, not {modality!r}")
    if x.dtype != np.float32:
        raise TypeError(f"normalise_ works in place on float32 arrays, not {x.dtype}")
    if modality == "auto":
        modality = detect_modality(x)
    if modality == "ct":
        lo, hi = cfg.ct_clip
    else:
        sample = x.reshape(-1)[:: max(1, x.size // 1_000_000)]
        lo, hi = np.percentile(sample, cfg.mr_clip_percentiles)
    np.clip(x, np.float32(lo), np.float32(hi), out=x)
    mean = float(x.mean())
    std = _std(x, mean)
    if std < 1e-6:
        x[...] = 0
        return x
    x -= mean
    x /= std
    return x


def _std(x: np.ndarray, mean: float, chunk: int = 1 << 20) -> float:
    """Standard deviation about `mean`, summed in float64 a chunk at a time: np.std would make a
    full-size temporary copy (4 bytes per voxel) of a volume that may hold a billion voxels."""
    flat = x.reshape(-1)
    total = 0.0
    for i in range(0, flat.size, chunk):
        d = flat[i : i + chunk].astype(np.float64) - mean
        total += float(np.dot(d, d))
    return math.sqrt(total / max(flat.size, 1))
