"""Minimal PNG writer (RGB, 8-bit), so the demo overlay needs no plotting library."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from .atomic import write_atomic


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    """rgb: (H, W, 3) uint8."""
    a = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = a.shape
    raw = b"".join(b"\x00" + a[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    write_atomic(path, png)


def overlay(image: np.ndarray, labels: np.ndarray, colours: dict[int, tuple[float, float, float]], truth: np.ndarray | None = None,
            alpha: float = 0.45, zoom: int = 4) -> np.ndarray:
    """RGB picture of a 2D slice with the label map blended in; `truth` outlines in white if given."""
    lo, hi = np.percentile(image, [1, 99])
    g = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)
    rgb = np.repeat(g[..., None], 3, -1)
    for v, c in colours.items():
        m = labels == v
        rgb[m] = (1 - alpha) * rgb[m] + alpha * np.asarray(c)
    if truth is not None:
        t = truth > 0
        edge = t & ~(np.roll(t, 1, 0) & np.roll(t, -1, 0) & np.roll(t, 1, 1) & np.roll(t, -1, 1))
        rgb[edge] = 1.0
    rgb = np.rot90(rgb)  # RAS array: show with anterior/superior up
    rgb = rgb.repeat(zoom, 0).repeat(zoom, 1)
    return (rgb * 255).round().astype(np.uint8)
