"""Episodic sampler: a reference and a query from two different subjects showing the same classes."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from ..config import TrainingConfig
from . import augment, synth
from .data import Case

DEFAULT_WEIGHTS = {
    "btcv": 1.0, "acdc": 1.0, "la2018": 1.0, "hippocampus": 1.0,
    "brain": 1.0, "kidney": 0.5, "totalseg": 0.5, "shapes": 0.7,
}
MIN_REF_VOXELS = 8


@dataclass
class Episode:
    ref_image: torch.Tensor  # (1, D, H, W)
    ref_masks: torch.Tensor  # (K, D, H, W) float
    query_image: torch.Tensor
    query_masks: torch.Tensor
    valid: torch.Tensor  # (K,) bool
    names: list[str]  # class name per slot ('' for padding)


def crop(array: np.ndarray, centre, size, fill) -> np.ndarray:
    """Crop of `size` centred at `centre`, padded with `fill` outside the array."""
    lo = np.asarray(centre, dtype=int) - np.asarray(size) // 2
    out = np.full(size, fill, dtype=array.dtype)
    src = tuple(slice(max(l, 0), min(l + s, n)) for l, s, n in zip(lo, size, array.shape))
    dst = tuple(slice(s.start - l, s.stop - l) for s, l in zip(src, lo))
    out[dst] = array[src]
    return out


class EpisodeSampler:
    def __init__(self, cases: list[Case], cfg: TrainingConfig, seed: int, augment_images: bool = True):
        self.cfg = cfg
        self.by_dataset: dict[str, list[Case]] = {}
        for c in cases:
            self.by_dataset.setdefault(c.dataset, []).append(c)
        weights = {**DEFAULT_WEIGHTS, **cfg.dataset_weights}
        self.names = [d for d in [*self.by_dataset, "shapes"] if weights.get(d, 0) > 0]
        w = np.array([weights[d] for d in self.names])
        self.p = w / w.sum()
        self.rng = np.random.default_rng(seed)
        self.g = torch.Generator().manual_seed(seed)
        self.augment = augment_images
        self._coords: dict[tuple[int, int], np.ndarray] = {}

    def _voxels(self, case: Case, index: int) -> np.ndarray:
        key = (id(case), index)
        if key not in self._coords:
            pts = np.argwhere(case.label == index)
            if len(pts) > 4000:
                pts = pts[self.rng.choice(len(pts), 4000, replace=False)]
            self._coords[key] = pts
        return self._coords[key]

    def present(self, case: Case) -> set[int]:
        """Label values present in the case (0 included)."""
        key = (id(case), -1)
        if key not in self._coords:
            self._coords[key] = case.values[np.nonzero(np.bincount(case.label.ravel(), minlength=len(case.values)))[0]]
        return {int(v) for v in self._coords[key]}

    def _pair(self, dataset: str) -> tuple[Case, Case]:
        cases = self.by_dataset[dataset]
        ref = cases[self.rng.integers(len(cases))]
        others = [c for c in cases if c.group != ref.group] or [ref]
        return ref, others[self.rng.integers(len(others))]

    def _centre(self, case: Case, index: int, jitter: int) -> np.ndarray:
        pts = self._voxels(case, index)
        return pts[self.rng.integers(len(pts))] + self.rng.integers(-jitter, jitter + 1, 3)

    def _shapes_episode(self, size) -> tuple:
        n = int(self.rng.integers(1, self.cfg.max_classes + 1))
        means, stds = synth.random_modality(n + 1, self.g)
        labs = [synth.random_shapes(size, n, self.g) for _ in range(2)]
        imgs = [synth.render(l, means, stds, self.g) for l in labs]
        return imgs, labs, [[i] for i in range(1, n + 1)], [f"shape{i}" for i in range(1, n + 1)]

    def _image(self, case: Case, lab: torch.Tensor, centre, table) -> torch.Tensor:
        """The image crop under label crop `lab`: the case's own, or rendered with `table` (means, stds)."""
        if case.image is None:
            return synth.render(torch.from_numpy(case.values[lab.numpy()]), *table, self.g)
        return torch.from_numpy(crop(case.image, centre, lab.shape, case.image.min()).astype(np.float32))

    def reference(self, case: Case, value: int) -> tuple[torch.Tensor, torch.Tensor]:
        """An unaugmented (1, D, H, W) crop centred on a voxel of label `value`, and that class's mask."""
        index = int(np.searchsorted(case.values, value))
        centre = self._centre(case, index, self.cfg.crop[0] // 8)
        lab = torch.from_numpy(crop(case.label, centre, tuple(self.cfg.crop), 0))
        table = synth.random_modality(int(case.values.max()) + 1, self.g) if case.image is None else None
        return self._image(case, lab, centre, table)[None], (lab == index).float()[None]

    def sample(self) -> Episode:
        while True:
            ep = self._try()
            if ep is not None:
                return ep

    def _try(self) -> Episode | None:
        size = tuple(self.cfg.crop)
        k_max = self.cfg.max_classes
        dataset = self.names[self.rng.choice(len(self.names), p=self.p)]
        if dataset == "shapes":
            imgs, labs, classes, names = self._shapes_episode(size)
        else:
            ref, qry = self._pair(dataset)
            common = sorted((self.present(ref) & self.present(qry)) - {0})
            if not common:
                return None
            k = int(self.rng.integers(1, min(k_max, len(common)) + 1))
            values = [int(v) for v in self.rng.choice(common, k, replace=False)]
            groups = [[v] for v in values]
            rest = [v for v in common if v not in values]
            if rest and self.rng.random() < self.cfg.merge_prob:  # one class = the union of 2-3 labels
                extra = self.rng.choice(rest, min(len(rest), int(self.rng.integers(1, 3))), replace=False)
                groups[0] += [int(v) for v in extra]
            anchor_value = groups[self.rng.integers(k)][0]
            q_index = {int(np.searchsorted(ref.values, v)): int(np.searchsorted(qry.values, v)) for g in groups for v in g}
            anchor = int(np.searchsorted(ref.values, anchor_value))
            rc = self._centre(ref, anchor, size[0] // 8)
            if self.rng.random() < self.cfg.empty_query_prob:
                qc = np.array([self.rng.integers(0, s) for s in qry.label.shape])
            else:
                qc = self._centre(qry, q_index[anchor], size[0] // 4)
            lab_r = torch.from_numpy(crop(ref.label, rc, size, 0))
            lab_q = torch.from_numpy(crop(qry.label, qc, size, 0))
            table = synth.random_modality(int(max(ref.values.max(), qry.values.max())) + 1, self.g) if ref.image is None else None
            imgs = [self._image(ref, lab_r, rc, table), self._image(qry, lab_q, qc, table)]
            labs = [lab_r, _remap(lab_q, q_index)]
            names = [f"{dataset}:{'+'.join(map(str, g))}" for g in groups]
            classes = [[int(np.searchsorted(ref.values, v)) for v in g] for g in groups]
        masks = [torch.stack([torch.isin(l, torch.tensor(c, dtype=l.dtype)) for c in classes]).float() for l in labs]
        if self.augment:
            if torch.rand(1, generator=self.g) < self.cfg.lut_prob:
                imgs = augment.random_curve(imgs, self.g)
            if torch.rand(1, generator=self.g) < self.cfg.thick_slice_prob:
                imgs[1] = augment.thick_slices(imgs[1], self.g)
            for i in range(2):
                imgs[i], masks[i] = augment.spatial(imgs[i], masks[i], self.g)
                imgs[i] = augment.intensity(imgs[i], self.g)
            masks = [(m > 0.5).float() for m in masks]
        valid = masks[0].flatten(1).sum(1) >= MIN_REF_VOXELS
        if not valid.any():
            return None
        pad = k_max - len(classes)
        masks = [F.pad(m, (0, 0, 0, 0, 0, 0, 0, pad)) for m in masks]
        valid = F.pad(valid, (0, pad))
        return Episode(imgs[0][None], masks[0], imgs[1][None], masks[1], valid, names + [""] * pad)


def _remap(lab_q: torch.Tensor, q_index: dict[int, int]) -> torch.Tensor:
    """Query label indices -> reference label indices for the chosen classes (others -> 0)."""
    out = torch.zeros_like(lab_q)
    for ref_idx, q_idx in q_index.items():
        out[lab_q == q_idx] = ref_idx
    return out


def collate(episodes: list[Episode]) -> dict:
    return {
        "ref_image": torch.stack([e.ref_image for e in episodes]),
        "ref_masks": torch.stack([e.ref_masks for e in episodes]),
        "query_image": torch.stack([e.query_image for e in episodes]),
        "query_masks": torch.stack([e.query_masks for e in episodes]),
        "valid": torch.stack([e.valid for e in episodes]),
        "names": [e.names for e in episodes],
    }


def episodes(sampler: EpisodeSampler, n: int, batch_size: int) -> list[dict]:
    """n episodes from `sampler`, collated in batches of at most batch_size."""
    eps = [sampler.sample() for _ in range(n)]
    return [collate(eps[i : i + batch_size]) for i in range(0, n, batch_size)]


def real_only(cfg: TrainingConfig) -> TrainingConfig:
    """The recipe without procedural shapes: episodes from the collections only."""
    return replace(cfg, dataset_weights={**cfg.dataset_weights, "shapes": 0.0})
