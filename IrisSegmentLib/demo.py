"""`iris-segment demo`: one subject's labels segment another subject's scan; result, overlay, Dice."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import io
from .atomic import write_atomic
from .inference.segmenter import Segmenter
from .png import overlay, write_png
from .resources import sample_data_dir

REFERENCE = "hippocampus_001"
TARGET = "hippocampus_003"
NAMES = {1: "anterior hippocampus", 2: "posterior hippocampus"}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def run_demo(out_dir: Path, device: str = "auto", model: str | None = None) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    data = sample_data_dir()
    ref, ref_aff, _ = io.read_image(data / f"{REFERENCE}_image.nii.gz")
    ref_lab, _, _ = io.read_image(data / f"{REFERENCE}_label.nii.gz")
    tgt, tgt_aff, tgt_hdr = io.read_image(data / f"{TARGET}_image.nii.gz")
    truth, _, _ = io.read_image(data / f"{TARGET}_label.nii.gz")
    seg = Segmenter.load(model, device)
    task = seg.encode(ref, ref_aff, ref_lab, labels=[1, 2], names=[NAMES[1], NAMES[2]])
    result = seg.segment(tgt, tgt_aff, task)
    io.write_label_map(out_dir / f"{TARGET}_iris.nii.gz", result.label_map, tgt_aff, tgt_hdr, overwrite=True)
    truth = np.rint(np.asarray(truth)).astype(int)
    scores = {NAMES[v]: round(dice(result.label_map == v, truth == v), 4) for v in (1, 2)}
    scores["whole hippocampus"] = round(dice(result.label_map > 0, truth > 0), 4)
    z = int(np.argmax((truth > 0).sum((0, 1))))
    colours = dict(zip(result.labels, result.colours))
    pic = np.concatenate([
        overlay(np.asarray(tgt, dtype=float)[:, :, z], truth[:, :, z], colours),
        overlay(np.asarray(tgt, dtype=float)[:, :, z], result.label_map[:, :, z], colours, truth=truth[:, :, z]),
    ], axis=1)
    write_png(out_dir / "overlay.png", pic)
    summary = {
        "reference": REFERENCE, "target": TARGET, "dice": scores,
        "estimated_dice": {NAMES[v]: result.confidence.get(v) for v in (1, 2)},  # what the model says without the truth
        "seconds": round(result.seconds, 2),
        "device": result.device, "model": seg.model_id,
        "files": [str(out_dir / f"{TARGET}_iris.nii.gz"), str(out_dir / "overlay.png")],
        "overlay": "left: expert labels; right: IrisSegment (white outline: expert)",
    }
    write_atomic(out_dir / "summary.json", json.dumps(summary, indent=1))
    return summary
