"""Training data: pack the shared collections into small arrays on the working grid, and load them.

A packed case is one .npz: `label` (uint8 indices into `values`), `values` (original label ids),
and `image` (float16, normalised) for real pairs; label-only collections have no image and are
rendered synthetically at training time. Cases are cropped around their labels. `load` also reads
the smaller travel cache made from a packed cache by `travel.py`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..config import InferenceConfig
from ..inference.geometry import WorkingGrid
from ..inference.intensity import normalise
from ..io import read_image
from . import travel

MARGIN_MM = 48.0

# Validation subjects, never trained on (see docs/DESIGN.md).
BTCV_VAL = ("SABS_0", "SABS_1", "SABS_10", "SABS_11")
HIPPO_VAL_SUBJECTS = 10  # hippocampus_001..020 (10 subjects, both hemispheres); 001 and 003 are the demo
BRAIN_VAL = ("training_seg_17", "training_seg_18", "training_seg_19", "training_seg_20")
KITS_CASES = 60


@dataclass
class Case:
    dataset: str
    case_id: str
    group: str  # patient/subject: a pair never shares one
    label: np.ndarray  # uint8 indices
    values: np.ndarray  # original label value per index
    image: np.ndarray | None = None  # float16 normalised, or None (render synthetically)


def _sources(root: Path, split: str) -> list[tuple[str, str, str, Path | None, Path]]:
    """(dataset, id, group, image path or None, label path) for a split ('train' or 'val')."""
    out = []
    for p in sorted((root / "btcv").glob("*_label.nii.gz")):
        cid = p.name[: -len("_label.nii.gz")]
        if (cid in BTCV_VAL) == (split == "val"):
            out.append(("btcv", cid, cid, p.with_name(cid + "_image.nii.gz"), p))
    for p in sorted((root / "acdc" / split).glob("*_label.nii.gz")):
        cid = p.name[: -len("_label.nii.gz")]
        out.append(("acdc", cid, cid.split("_")[0], p.with_name(cid + "_image.nii.gz"), p))
    for p in sorted((root / "la2018" / split).glob("*_label.nii.gz")):
        cid = p.name[: -len("_label.nii.gz")]
        out.append(("la2018", cid, cid, p.with_name(cid + "_image.nii.gz"), p))
    for p in sorted((root / "msd_hippocampus").glob("*_label.nii.gz")):
        cid = p.name[: -len("_label.nii.gz")]
        n = int(re.findall(r"\d+", cid)[0])
        subject = (n + 1) // 2
        if (subject <= HIPPO_VAL_SUBJECTS) == (split == "val"):
            out.append(("hippocampus", cid, f"hippo{subject}", p.with_name(cid + "_image.nii.gz"), p))
    for p in sorted((root / "synthseg_brain_labels").glob("training_seg_*.nii.gz")):
        cid = p.name[: -len(".nii.gz")]
        if (cid in BRAIN_VAL) == (split == "val"):
            out.append(("brain", cid, cid, None, p))
    if split == "train":
        for p in sorted((root / "kits19_labels").glob("case_*.nii.gz"))[:KITS_CASES]:
            cid = p.name[: -len(".nii.gz")]
            out.append(("kidney", cid, cid, None, p))
        ts = root / "totalseg_ct"
        if (ts / "example_seg.nii.gz").is_file():  # optional, like every other collection
            out.append(("totalseg", "example", "totalseg", ts / "example_ct.nii.gz", ts / "example_seg.nii.gz"))
    return out


def pack_case(image_path: Path | None, label_path: Path, spacing, intensity: InferenceConfig = InferenceConfig()) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    lab, affine, _ = read_image(label_path)
    lab = np.rint(np.asarray(lab, dtype=np.float32)).astype(np.int32)
    grid = WorkingGrid.create(lab.shape, affine, spacing)
    values, inverse = np.unique(lab, return_inverse=True)
    if len(values) > 255:
        raise ValueError(f"{label_path}: more than 255 labels")
    idx = torch.from_numpy(inverse.reshape(lab.shape).astype(np.float32))[None]
    label = grid.to_working(idx, mode="nearest")[0].numpy().astype(np.uint8)
    image = None
    if image_path is not None:
        img, iaff, _ = read_image(image_path)
        img = normalise(np.asarray(img, dtype=np.float32), cfg=intensity)
        image = grid.to_working(torch.from_numpy(img)[None])[0].numpy()
    fg = np.argwhere(label > 0)
    margin = int(round(MARGIN_MM / float(np.min(spacing))))
    lo = np.maximum(fg.min(0) - margin, 0)
    hi = np.minimum(fg.max(0) + margin + 1, label.shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    label = label[sl]
    if image is not None:
        image = image[sl].astype(np.float16)
    return image, label, values.astype(np.int32)


def pack(root: str | Path, out: str | Path, spacing=(1.5, 1.5, 1.5), intensity: InferenceConfig = InferenceConfig()) -> Path:
    """Packs train and val splits of the shared data under `out`; returns `out`."""
    root, out = Path(root), Path(out)
    index = []
    for split in ("train", "val"):
        for dataset, cid, group, ipath, lpath in tqdm(_sources(root, split), desc=f"pack {split}"):
            dest = out / split / dataset / f"{cid}.npz"
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not dest.exists():
                image, label, values = pack_case(ipath, lpath, spacing, intensity)
                arrays = {"label": label, "values": values}
                if image is not None:
                    arrays["image"] = image
                np.savez_compressed(dest, **arrays)
            index.append({"split": split, "dataset": dataset, "id": cid, "group": group, "file": str(dest.relative_to(out))})
    (out / "index.json").write_text(json.dumps({"spacing": list(spacing), "cases": index}, indent=1))
    return out


def load(packed: str | Path, split: str) -> list[Case]:
    """The cases of one split of a packed or travel cache."""
    packed = Path(packed)
    meta = json.loads((packed / "index.json").read_text())
    cases = []
    for e in meta["cases"]:
        if e["split"] != split:
            continue
        z = np.load(packed / e["file"])
        if travel.is_travel(z.files):
            label, values, image = travel.decode(z)
        else:
            label, values, image = z["label"], z["values"], z["image"] if "image" in z.files else None
        cases.append(Case(e["dataset"], e["id"], e["group"], label, values, image))
    return cases


def without(cases: list[Case], holdout: dict[str, list[int]]) -> list[Case]:
    """The cases with the held-out label values of their collection set to background (value 0)."""
    out = []
    for c in cases:
        drop = set(holdout.get(c.dataset, ())) & {int(v) for v in c.values}
        if not drop:
            out.append(c)
            continue
        if c.values[0] != 0:
            raise ValueError(f"{c.dataset}/{c.case_id}: no background label to hold structures out into")
        lut = np.array([0 if int(v) in drop else i for i, v in enumerate(c.values)], dtype=np.uint8)
        out.append(replace(c, label=lut[c.label]))
    return out
