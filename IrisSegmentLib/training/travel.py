"""Travel cache: the packed cache made small enough to carry to the GPU machine (64 MiB upload,
of which the project itself takes ~16 MiB), read by `data.load` like the packed cache.

Choices, measured on this project's packed cache (464 MiB, 555 cases; `iris-segment pack --travel`):
- Images: uint8 with a per-case offset (the minimum, so crop padding keeps its value) and step
  ((max - min) / 255). The error is at most half a step plus float16 rounding on decoding:
  measured max 0.0137, RMS 0.0047 in z-score units, below the noise augmentation adds (<= 0.02).
- Compression: xz (lzma) with a byte-delta filter: ~0.33 bytes/voxel on BTCV and ACDC, against
  ~0.55 for the deflate of .npz at the same uint8; label maps xz too. A LOCO-I predictor or bzip2
  was worse on BTCV and ACDC and ~10 % better only on the small LA and hippocampus crops.
  Encoding takes ~10 s per BTCV case; loading the whole cache ~7 s on one core.
- Crops: the label's bounding box +- 24 voxels (36 mm: a 48³ crop centred on any labelled voxel
  stays inside), not the packed 32; BTCV shrinks by 13 %, ACDC by 22 %.
- Cases: at most `LIMITS` per split and collection, spread evenly over the subjects (one frame
  per ACDC patient, alternating ED/ES). A BTCV case costs ~3.2 MiB, so BTCV decides the size:
  5 of 20 training patients (15.8 MiB), ACDC 20 of 140 frames, LA 20 of 80, hippocampus 100 of
  190; the label-only collections (brain, kidney) and TotalSegmentator travel whole. Validation:
  ACDC 4, LA 4, all hippocampus and brain, no BTCV (a single subject would be paired with itself).
Result: 31.5 MiB in 222 training and 22 validation cases (docs/DESIGN.md has the table).
"""
from __future__ import annotations

import itertools
import json
import lzma
from pathlib import Path

import numpy as np
from tqdm import tqdm

MARGIN = 24  # voxels around the label's bounding box
LIMITS: dict[str, dict[str, int]] = {  # collections not named travel whole
    "train": {"btcv": 5, "acdc": 20, "la2018": 20, "hippocampus": 100},
    "val": {"btcv": 0, "acdc": 4, "la2018": 4},  # one BTCV subject would be paired with itself
}
_IMAGE_FILTERS = [{"id": lzma.FILTER_DELTA, "dist": 1}, {"id": lzma.FILTER_LZMA2, "preset": 6}]
_LABEL_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6}]


def _xz(array: np.ndarray, filters) -> np.ndarray:
    return np.frombuffer(lzma.compress(np.ascontiguousarray(array).tobytes(), format=lzma.FORMAT_RAW, filters=filters), np.uint8)


def _unxz(blob: np.ndarray, filters, shape) -> np.ndarray:
    return np.frombuffer(lzma.decompress(blob.tobytes(), format=lzma.FORMAT_RAW, filters=filters), np.uint8).reshape(shape)


def encode(label: np.ndarray, values: np.ndarray, image: np.ndarray | None) -> dict[str, np.ndarray]:
    """Arrays of one travel case: xz label, and the image as xz uint8 with its offset and step."""
    arrays = {"shape": np.asarray(label.shape, np.int64), "values": values, "label_xz": _xz(label, _LABEL_FILTERS)}
    if image is not None:
        x = image.astype(np.float32)
        lo, hi = float(x.min()), float(x.max())
        step = (hi - lo) / 255 or 1.0
        arrays["image_xz"] = _xz(np.rint((x - lo) / step).astype(np.uint8), _IMAGE_FILTERS)
        arrays["image_offset_step"] = np.array([lo, step])
    return arrays


def is_travel(arrays) -> bool:
    return "label_xz" in arrays


def decode(arrays) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(label uint8, values, image float16 or None) of a travel case."""
    shape = tuple(int(s) for s in arrays["shape"])
    label = _unxz(arrays["label_xz"], _LABEL_FILTERS, shape)
    image = None
    if "image_xz" in arrays:
        lo, step = arrays["image_offset_step"]
        image = (lo + step * _unxz(arrays["image_xz"], _IMAGE_FILTERS, shape).astype(np.float32)).astype(np.float16)
    return label, arrays["values"], image


def tighten(label: np.ndarray, margin: int) -> tuple[slice, ...]:
    """The label's bounding box +- margin voxels, inside the array."""
    fg = np.argwhere(label > 0)
    lo = np.maximum(fg.min(0) - margin, 0)
    hi = np.minimum(fg.max(0) + margin + 1, label.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def spread(entries: list[dict], n: int | None) -> list[dict]:
    """At most n entries spread evenly over the subjects (groups), one per subject first; index order kept."""
    groups: dict[str, list[dict]] = {}
    for e in entries:
        groups.setdefault(e["group"], []).append(e)
    rotated = [g[i % len(g):] + g[: i % len(g)] for i, g in enumerate(groups.values())]  # alternate frames
    n = len(entries) if n is None else n
    chosen: list[dict] = []
    for rnd in itertools.zip_longest(*rotated):
        rnd = [e for e in rnd if e is not None]
        k = min(len(rnd), n - len(chosen))
        if k <= 0:
            break
        chosen += [rnd[i] for i in np.linspace(0, len(rnd) - 1, k).round().astype(int)]
    ids = {id(c) for c in chosen}
    return [e for e in entries if id(e) in ids]


def make_travel(packed: str | Path, out: str | Path, limits: dict[str, dict[str, int]] = LIMITS, margin: int = MARGIN) -> dict:
    """Writes the travel cache of a packed cache under `out`; returns its summary (also in index.json)."""
    packed, out = Path(packed), Path(out)
    meta = json.loads((packed / "index.json").read_text())
    keys = sorted({(e["split"], e["dataset"]) for e in meta["cases"]})
    kept = set()
    for split, dataset in keys:
        entries = [e for e in meta["cases"] if (e["split"], e["dataset"]) == (split, dataset)]
        kept |= {id(e) for e in spread(entries, limits.get(split, {}).get(dataset))}
    chosen = [e for e in meta["cases"] if id(e) in kept]  # index order kept
    err_max, err_sq, n_vox, sizes = 0.0, 0.0, 0, {f"{s}/{d}": 0 for s, d in keys}
    for e in tqdm(chosen, desc="travel"):
        z = np.load(packed / e["file"])
        if is_travel(z.files):
            raise ValueError(f"{packed} is already a travel cache")
        sl = tighten(z["label"], margin)
        image = z["image"][sl] if "image" in z.files else None
        arrays = encode(z["label"][sl], z["values"], image)
        if image is not None:
            d = decode(arrays)[2].astype(np.float32) - image.astype(np.float32)
            err_max, err_sq, n_vox = max(err_max, float(np.abs(d).max())), err_sq + float((d * d).sum()), n_vox + d.size
        dest = out / e["file"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        np.savez(dest, **arrays)
        sizes[f"{e['split']}/{e['dataset']}"] += dest.stat().st_size
    counts = {f"{s}/{d}": [sum((e["split"], e["dataset"]) == (s, d) for e in chosen),
                           sum((e["split"], e["dataset"]) == (s, d) for e in meta["cases"])] for s, d in keys}
    summary = {"from": str(packed), "margin": margin, "cases_kept_of": counts, "bytes": sizes,
               "image_max_abs_error": err_max, "image_rms_error": (err_sq / max(n_vox, 1)) ** 0.5}
    (out / "index.json").write_text(json.dumps({"spacing": meta["spacing"], "travel": summary, "cases": chosen}, indent=1))
    return summary
