"""Episodic sampler: a reference and a query from two different subjects showing the same classes."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from ..config import TrainingConfig
from . import augment, synth
from .data import Case
from .priors import simulate_prior
from .registrations import Registration

DEFAULT_WEIGHTS = {
    "btcv": 1.0, "acdc": 1.0, "la2018": 1.0, "hippocampus": 1.0,
    "brain": 1.0, "kidney": 0.5, "totalseg": 0.5, "shapes": 0.7,
}
MIN_REF_VOXELS = 8
PRIOR_PAD = 8  # voxels simulated around a query crop, so that a warped prior can move in from outside it


@dataclass
class Episode:
    ref_image: torch.Tensor  # (1, D, H, W)
    ref_masks: torch.Tensor  # (K, D, H, W) float
    query_image: torch.Tensor
    query_masks: torch.Tensor
    query_prior: torch.Tensor  # (K, D, H, W) in [0, 1]: a simulated localisation prior of the query
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
    def __init__(self, cases: list[Case], cfg: TrainingConfig, seed: int, augment_images: bool = True,
                 registrations: dict[str, list[Registration]] | None = None):
        self.cfg = cfg
        self.registrations = registrations or {}  # real registration priors by "collection/case id" (registrations.py)
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

    def _query_centre(self, case: Case, index: int) -> np.ndarray:
        """Where the engine runs windows: anywhere within `query_margin` voxels of the structure's box."""
        pts = self._voxels(case, index)
        m = self.cfg.query_margin
        lo, hi = pts.min(0) - m, pts.max(0) + m
        return np.array([self.rng.integers(a, b + 1) for a, b in zip(lo, hi)])

    def _registered(self, case: Case, groups: list[list[int]], centre, size) -> dict[int, torch.Tensor] | None:
        """With probability `real_prior_prob`, where `case` has packed registrations: one of them, as the prior crop of
        `size` at `centre` of each class (a union of label values) that it registered; None otherwise."""
        regs = self.registrations.get(f"{case.dataset}/{case.case_id}")
        if not regs or self.rng.random() >= self.cfg.real_prior_prob:
            return None
        reg = regs[self.rng.integers(len(regs))]
        out = {}
        for k, values in enumerate(groups):
            if any(v in reg.values for v in values):
                out[k] = torch.from_numpy(crop(reg.on_case(values, case.label.shape).numpy(), centre, size, 0.0))
        return out

    def _whole(self, case: Case, size, table) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole case shrunk (never enlarged) to fit `size` at one scale, centred: (label indices, image)."""
        s = min(1.0, *(t / n for t, n in zip(size, case.label.shape)))
        new = [max(1, int(n * s)) for n in case.label.shape]
        at = [(t - n) // 2 for t, n in zip(size, new)]
        box = tuple(slice(a, a + n) for a, n in zip(at, new))
        lab = torch.zeros(size, dtype=torch.uint8)
        lab[box] = F.interpolate(torch.from_numpy(case.label)[None, None].float(), size=new, mode="nearest")[0, 0].to(torch.uint8)
        if case.image is None:
            return lab, synth.render(torch.from_numpy(case.values[lab.numpy()]), *table, self.g)
        img = torch.full(size, float(case.image.min()))
        img[box] = F.interpolate(torch.from_numpy(case.image.astype(np.float32))[None, None], size=new, mode="area")[0, 0]
        return lab, img

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
        pad, real = 0, None
        if dataset == "shapes":
            imgs, labs, classes, names = self._shapes_episode(size)
            prior_lab = labs[1]
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
            table = synth.random_modality(int(max(ref.values.max(), qry.values.max())) + 1, self.g) if ref.image is None else None
            if self.rng.random() < self.cfg.whole_volume_prob:  # global context: both whole, shrunk to the crop
                (lab_r, img_r), (lab_q, img_q) = self._whole(ref, size, table), self._whole(qry, size, table)
                imgs, prior_lab = [img_r, img_q], _remap(lab_q, q_index)
            else:
                rc = self._centre(ref, anchor, size[0] // 8)
                if self.rng.random() < self.cfg.empty_query_prob:
                    qc = np.array([self.rng.integers(0, s) for s in qry.label.shape])
                else:
                    qc = self._query_centre(qry, q_index[anchor])
                pad = PRIOR_PAD
                lab_r = torch.from_numpy(crop(ref.label, rc, size, 0))
                big = torch.from_numpy(crop(qry.label, qc, tuple(s + 2 * pad for s in size), 0))
                lab_q = big[pad:-pad, pad:-pad, pad:-pad]
                imgs, prior_lab = [self._image(ref, lab_r, rc, table), self._image(qry, lab_q, qc, table)], _remap(big, q_index)
                real = self._registered(qry, groups, qc, big.shape)
            labs = [lab_r, _remap(lab_q, q_index)]
            names = [f"{dataset}:{'+'.join(map(str, g))}" for g in groups]
            classes = [[int(np.searchsorted(ref.values, v)) for v in g] for g in groups]
        masks = [torch.stack([torch.isin(l, torch.tensor(c, dtype=l.dtype)) for c in classes]).float() for l in labs]
        truth = torch.stack([torch.isin(prior_lab, torch.tensor(c, dtype=prior_lab.dtype)) for c in classes]).float()
        prior = simulate_prior(truth, self.g, self.cfg.prior_sigma, errors=tuple(self.cfg.prior_errors))
        for k, p in (real or {}).items():  # a real registration's prior where the query case has one
            prior[k] = p
        if pad:
            prior = prior[:, pad:-pad, pad:-pad, pad:-pad]
        if self.augment:
            if torch.rand(1, generator=self.g) < self.cfg.lut_prob:
                imgs = augment.random_curve(imgs, self.g)
            if torch.rand(1, generator=self.g) < self.cfg.thick_slice_prob:
                imgs[1] = augment.thick_slices(imgs[1], self.g)
            imgs[0], masks[0] = augment.spatial(imgs[0], masks[0], self.g)
            imgs[1], moved = augment.spatial(imgs[1], torch.cat([masks[1], prior]), self.g)
            masks[1], prior = moved[: len(classes)], moved[len(classes) :].clamp(0, 1)
            imgs = [augment.intensity(i, self.g) for i in imgs]
            masks = [(m > 0.5).float() for m in masks]
        valid = masks[0].flatten(1).sum(1) >= MIN_REF_VOXELS
        if not valid.any():
            return None
        n = k_max - len(classes)
        masks, prior = [F.pad(m, (0, 0, 0, 0, 0, 0, 0, n)) for m in masks], F.pad(prior, (0, 0, 0, 0, 0, 0, 0, n))
        valid = F.pad(valid, (0, n))
        return Episode(imgs[0][None], masks[0], imgs[1][None], masks[1], prior, valid, names + [""] * n)

    def batch(self, n: int) -> dict:
        """`n` episodes collated; with probability `prior_dropout` without their priors (`query_prior` None), so
        that the network keeps segmenting from the task alone (no localisation, memory-bank retrieval)."""
        out = collate([self.sample() for _ in range(n)])
        if self.rng.random() < self.cfg.prior_dropout:
            out["query_prior"] = None
        return out


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
        "query_prior": torch.stack([e.query_prior for e in episodes]),
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
