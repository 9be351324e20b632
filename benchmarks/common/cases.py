"""The validation cases of the accuracy benchmarks: which cases, in which query order, with which references, loaded
(label-only brains rendered with one synthetic contrast), and Dice per structure."""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from IrisSegmentLib.io import read_image
from IrisSegmentLib.training import synth
from IrisSegmentLib.training.data import BRAIN_VAL, BTCV_VAL, HIPPO_VAL_SUBJECTS

BRAIN_STRUCTURES = {2: "L cerebral WM", 3: "L cortex", 4: "L lateral ventricle", 10: "L thalamus",
                    16: "brain-stem", 17: "L hippocampus", 41: "R cerebral WM", 49: "R thalamus"}
LABELS = {
    "hippocampus": {1: "anterior", 2: "posterior"},
    "la2018": {1: "left atrium"},
    "acdc": {1: "RV cavity", 2: "LV myocardium", 3: "LV cavity"},
    "btcv": {1: "spleen", 2: "R kidney", 3: "L kidney", 4: "gallbladder", 5: "esophagus", 6: "liver",
             7: "stomach", 8: "aorta", 9: "IVC", 10: "portal/splenic vein"},
    "brain": BRAIN_STRUCTURES,
}
MODALITY_SEED = 7  # the one synthetic contrast of every rendered brain
BRAIN_MARGIN = 8  # background voxels kept around a brain's labels

Volume = tuple[np.ndarray, np.ndarray, np.ndarray]  # image, affine, label map
Log = Callable[[str], None]


@dataclass(frozen=True)
class Case:
    id: str
    subject: str
    image: Path | None  # None: label map only, rendered synthetically
    label: Path


def cases(root: Path, dataset: str) -> list[Case]:
    """The validation cases of a dataset, in file order."""
    if dataset in ("la2018", "acdc"):
        out = []
        for p in sorted((root / dataset / "val").glob("*_label.nii.gz")):
            cid = p.name[: -len("_label.nii.gz")]
            out.append(Case(cid, cid.split("_")[0], p.with_name(cid + "_image.nii.gz"), p))
        return out
    if dataset == "btcv":
        return [Case(c, c, root / "btcv" / f"{c}_image.nii.gz", root / "btcv" / f"{c}_label.nii.gz") for c in BTCV_VAL]
    if dataset == "hippocampus":
        out = []
        for n in range(1, 2 * HIPPO_VAL_SUBJECTS + 1):
            img = root / "msd_hippocampus" / f"hippocampus_{n:03d}_image.nii.gz"
            if img.exists():
                out.append(Case(f"hippocampus_{n:03d}", str((n + 1) // 2), img, img.with_name(f"hippocampus_{n:03d}_label.nii.gz")))
        return out
    if dataset == "brain":
        return [Case(c, c, None, root / "synthseg_brain_labels" / f"{c}.nii.gz") for c in BRAIN_VAL]
    raise ValueError(f"unknown dataset {dataset!r}; use {', '.join(LABELS)}")


def query_order(items: list[Case]) -> list[int]:
    """Case indices with each subject's first case before any subject's second: a cut list spans subjects."""
    seen: dict[str, int] = {}
    rank = []
    for c in items:
        rank.append(seen.get(c.subject, 0))
        seen[c.subject] = rank[-1] + 1
    return sorted(range(len(items)), key=lambda i: (rank[i], i))


def reference_indices(items: list[Case], qi: int, n: int) -> list[int]:
    """The next `n` cases after `qi` (cyclically) of other subjects."""
    after = [(qi + d) % len(items) for d in range(1, len(items))]
    return [i for i in after if items[i].subject != items[qi].subject][:n]


def render_seed(case_id: str) -> int:
    """Noise seed of a rendered case: the same in every process (unlike hash())."""
    return zlib.crc32(case_id.encode())


def crop_to_labels(label: np.ndarray, affine: np.ndarray, margin: int) -> tuple[tuple[slice, ...], np.ndarray]:
    """The box of the non-zero labels plus `margin` voxels, and the affine of that box."""
    nz = np.argwhere(label > 0)
    lo = np.maximum(nz.min(0) - margin, 0)
    hi = np.minimum(nz.max(0) + margin + 1, label.shape)
    out = np.array(affine, dtype=np.float64)
    out[:3, 3] = out[:3, :3] @ lo + out[:3, 3]
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi)), out


def render(label: np.ndarray, case_id: str) -> np.ndarray:
    """Synthetic image of a label map: contrast MODALITY_SEED, noise seeded by the case id."""
    means, stds = synth.random_modality(int(label.max()) + 1, torch.Generator().manual_seed(MODALITY_SEED))
    noise = torch.Generator().manual_seed(render_seed(case_id))
    return synth.render(torch.from_numpy(label), means, stds, noise).numpy()


def load_case(case: Case) -> Volume:
    """(image, affine, integer label map); a label-only case is cropped to its labels and rendered."""
    lab, aff, _ = read_image(case.label)
    lab = np.rint(np.asarray(lab, dtype=np.float32)).astype(np.int32)
    if case.image is None:
        box, aff = crop_to_labels(lab, aff, BRAIN_MARGIN)
        lab = np.ascontiguousarray(lab[box])
        return render(lab, case.id), aff, lab
    img, _, _ = read_image(case.image)
    return np.asarray(img, dtype=np.float32), aff, lab


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two masks; NaN where the truth is empty (the structure is not in the query)."""
    t = int(truth.sum())
    return float("nan") if t == 0 else 2.0 * int(np.logical_and(pred, truth).sum()) / (int(pred.sum()) + t)


def scores(label_map: np.ndarray, truth: np.ndarray, labels: list[int]) -> dict[int, float]:
    """Dice per label present in the query."""
    out = {v: dice(label_map == v, truth == v) for v in labels}
    return {v: d for v, d in out.items() if not np.isnan(d)}
