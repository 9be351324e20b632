"""Stage 2, localise: register each reference onto the target and carry its masks across as a prior.

The reference travels in the task as an `Atlas`: its working image and soft masks cropped to its body and
block-averaged to the registration grid. `localise` crops the target to its body (the non-background box),
block-averages it the same way, and registers every atlas onto it with Greedy (picsl-greedy, the engine of
ITK-SNAP): from the images' centres of mass, or, where one field of view is much smaller than the other (a crop,
`search_fov_ratio`), from the translation that best aligns them (`search.py`); rigid, then affine, then
deformable, multi-resolution, NCC where both images share a modality and NMI where they do not. The warped
masks, blurred by `prior_sigma_mm`, averaged over atlases (multi-atlas), are the per-class prior on the working
grid (the network's prior input); windows run only within `margin_mm` of it. The merge mixes the network with
the same masks blurred in proportion to each structure's thickness (`Localisation.merge_prior`). A registration that
fails its checks (an error, low image similarity after it, a prior that leaves the target, a time-out) is tried
again as a similarity transform, then from the image edges (`RETRIES`), and else dropped with a warning; when
every one fails the engine falls back to the whole field of view.

Greedy runs in a child process (`greedy.py`)."""
from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..config import LocaliseConfig
from ..errors import Cancelled
from ..progress import Cancel, Progress
from .body import foreground_box, grown_box
from .greedy import run_greedy
from .prepare import Prepared


PRIOR_FLOOR = 0.05  # a class can be where its blurred prior exceeds this (before the margin)


@dataclass
class Atlas:
    """A reference for registration: image (X, Y, Z) and soft masks (K, X, Y, Z) on a coarse grid, RAS affine."""

    image: np.ndarray
    masks: np.ndarray
    affine: np.ndarray
    labels: list[int]
    modality: str

    def select(self, labels: list[int]) -> "Atlas":
        idx = [self.labels.index(v) for v in labels]
        return Atlas(self.image, self.masks[idx], self.affine, list(labels), self.modality)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """For a safetensors file (float16 image, uint8 masks)."""
        return {f"{prefix}image": torch.from_numpy(self.image.astype(np.float16)),
                f"{prefix}masks": torch.from_numpy(np.rint(self.masks * 255).astype(np.uint8)),
                f"{prefix}affine": torch.from_numpy(self.affine.astype(np.float64))}

    def meta(self) -> dict:
        return {"labels": self.labels, "modality": self.modality}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], prefix: str, meta: dict) -> "Atlas":
        return cls(t[f"{prefix}image"].float().numpy(), t[f"{prefix}masks"].float().numpy() / 255.0,
                   t[f"{prefix}affine"].numpy(), [int(v) for v in meta["labels"]], meta["modality"])


@dataclass
class Localisation:
    """Where the structures can be: `prior` (K, X, Y, Z) in [0, 1] and `region` (X, Y, Z) bool on the working
    grid, or both None (no localisation: the whole field of view). Per atlas: similarity and inside fraction.
    `warped`: the warped masks before blurring (mean over atlases) on the registration grid, in `box`, block `factor`."""

    prior: torch.Tensor | None
    region: torch.Tensor | None
    method: str  # "registration" or "none"
    warnings: list[str]
    similarity: list[float]
    inside: list[float]
    seconds: float
    warped: np.ndarray | None = None
    box: tuple[slice, ...] = ()
    factor: int = 1

    def region_of(self, classes: list[int], margin_mm: float, spacing: float) -> torch.Tensor:
        """Where these classes (indices) can be: their prior, dilated by `margin_mm`, as `region` is for all."""
        if len(classes) == self.prior.shape[0]:
            return self.region
        if not classes:
            return torch.zeros_like(self.region)
        return prior_region(self.prior[classes], margin_mm, spacing, self.box)

    def merge_prior(self, cfg: LocaliseConfig, spacing: float, classes: list[int] | None = None) -> torch.Tensor:
        """The prior that the merge mixes with the network (K, X, Y, Z): each class's warped masks blurred by
        `merge_sigma_depth` x its mean depth (`mean_depth_mm`), at least one working voxel (`spacing`) and at most
        `merge_sigma_max_mm`, for `classes` (indices; default all; the others 0); with `merge_sigma_depth` 0, `prior`
        (blurred by `prior_sigma_mm`, the network's input)."""
        if not cfg.merge_sigma_depth or self.warped is None:
            return self.prior
        classes = list(range(len(self.warped))) if classes is None else classes
        vox = spacing * self.factor
        out = torch.zeros_like(self.prior)
        if not classes:
            return out
        blurred = [blur(self.warped[k : k + 1], min(max(cfg.merge_sigma_depth * depth, spacing), cfg.merge_sigma_max_mm) / vox)[0]
                   for k, depth in zip(classes, mean_depth_mm(self.warped[classes], vox))]
        out[classes] = to_working(np.stack(blurred), self.box, self.factor, self.prior.shape[1:])
        return out

    def warped_masks(self, classes: list[int] | None = None) -> torch.Tensor:
        """The reference masks carried onto the working grid, not blurred: registration alone (atlas segmentation);
        `classes`: only these (indices)."""
        coarse = self.warped if classes is None else self.warped[classes]
        return to_working(coarse, self.box, self.factor, self.prior.shape[1:])


def unlocalised(warnings: list[str] | None = None, seconds: float = 0.0) -> Localisation:
    return Localisation(None, None, "none", list(warnings or []), [], [], seconds)


def to_working(coarse: np.ndarray, box, f: int, shape) -> torch.Tensor:
    """(K, ...) values on the registration grid of `box` and block `f` -> (K, *shape) on the working grid, 0 outside."""
    out = torch.zeros((coarse.shape[0], *shape))
    c = torch.from_numpy(np.clip(coarse, 0, 1).astype(np.float32))
    up = F.interpolate(c[None], scale_factor=f, mode="trilinear", align_corners=False)[0] if f > 1 else c
    out[(slice(None), *box)] = up[(slice(None), *(slice(0, b.stop - b.start) for b in box))]
    return out


def greedy_available() -> bool:
    return importlib.util.find_spec("picsl_greedy") is not None and importlib.util.find_spec("SimpleITK") is not None


# -- grids ------------------------------------------------------------------------------------------
def body_box(work: torch.Tensor, spacing: float, margin_mm: float) -> tuple[slice, slice, slice]:
    """The box of what is not background (`body.foreground_box` on a 4x coarser copy), plus `margin_mm`. An
    image with no background is its own box."""
    f = 4
    whole = tuple(slice(0, n) for n in work.shape[1:])
    found = foreground_box(coarsen(work[:1], whole, f)[0].numpy())
    if found is None:
        return whole
    return grown_box(found, f, int(math.ceil(margin_mm / spacing)), work.shape[1:])


def block_factor(shape, max_voxels: int) -> int:
    """The smallest integer block size that brings `shape` to at most `max_voxels` voxels."""
    f = 1
    while np.prod([-(-n // f) for n in shape]) > max_voxels:
        f += 1
    return f


def coarsen(volume: torch.Tensor, box, f: int) -> torch.Tensor:
    """(C, X, Y, Z) cropped to `box` and block-averaged by `f` (the far edge padded by replication)."""
    x = volume[(slice(None), *box)].float()[None]
    pad = [(-n) % f for n in x.shape[2:]]
    if any(pad):
        x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]), mode="replicate")
    return F.avg_pool3d(x, f)[0] if f > 1 else x[0]


def coarse_affine(working_affine: np.ndarray, box, f: int) -> np.ndarray:
    """Voxel-to-world of `coarsen(volume, box, f)`: coarse voxel c is the centre of working voxels lo + f*c .. + f - 1."""
    m = np.eye(4)
    m[:3, :3] *= f
    m[:3, 3] = [s.start + (f - 1) / 2 for s in box]
    return working_affine @ m


def make_atlas(ref: Prepared, masks: torch.Tensor, labels: list[int], cfg: LocaliseConfig, spacing: float) -> Atlas:
    """The reference as registration needs it: its body box (grown to hold every mask), block-averaged."""
    box = body_box(ref.work, spacing, cfg.body_margin_mm)
    nz = torch.nonzero(masks.amax(0) > 0)
    m = int(math.ceil(cfg.body_margin_mm / spacing))
    box = tuple(slice(max(min(b.start, int(lo) - m), 0), min(max(b.stop, int(hi) + 1 + m), n))
                for b, lo, hi, n in zip(box, nz.min(0).values, nz.max(0).values, ref.work.shape[1:]))
    f = block_factor([b.stop - b.start for b in box], cfg.max_voxels)
    return Atlas(coarsen(ref.work, box, f)[0].numpy(), coarsen(masks, box, f).clamp(0, 1).numpy(),
                 coarse_affine(ref.grid.working_affine, box, f), list(labels), ref.modality)


def similarity(a: np.ndarray, b: np.ndarray, where: np.ndarray, metric: str) -> float:
    """Pearson correlation (ncc) or NMI - 1 (nmi, in [0, 1]) of two images over `where`."""
    x, y = a[where].astype(np.float64), b[where].astype(np.float64)
    if x.size < 10 or x.std() < 1e-9 or y.std() < 1e-9:
        return 0.0
    if metric == "ncc":
        return float(np.corrcoef(x, y)[0, 1])
    h = np.histogram2d(x, y, bins=32)[0]
    p = h / h.sum()

    def entropy(q):
        q = q[q > 0]
        return -float((q * np.log(q)).sum())

    hx, hy, hxy = entropy(p.sum(1)), entropy(p.sum(0)), entropy(p)
    return (hx + hy) / hxy - 1.0 if hxy > 0 else 0.0


def mean_depth_mm(masks: np.ndarray, voxel_mm: float) -> list[float]:
    """Per class of (K, ...) soft masks, how thick the structure (mask > 0.5) is: the mean distance (mm) from its voxels
    to the nearest voxel outside it; 0 for an empty mask."""
    from scipy.ndimage import distance_transform_edt

    depths = []
    for m in masks:
        inside = m > 0.5
        depths.append(float(distance_transform_edt(inside)[inside].mean()) * voxel_mm if inside.any() else 0.0)
    return depths


def blur(volume: np.ndarray, sigma_vox: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return volume if sigma_vox <= 0 else np.stack([gaussian_filter(v, sigma_vox, mode="constant") for v in volume])


def prior_region(prior: torch.Tensor, margin_mm: float, spacing: float, box) -> torch.Tensor:
    """Where any class of `prior` (K, X, Y, Z), zero outside `box`, can be: above PRIOR_FLOOR, dilated by `margin_mm`."""
    return dilate(prior.amax(0) > PRIOR_FLOOR, int(math.ceil(margin_mm / spacing)), box)


def dilate(mask: torch.Tensor, m: int, box) -> torch.Tensor:
    """`mask` (X, Y, Z), zero outside `box`, dilated by a (2m+1)^3 cube: separable max pooling within box + m."""
    out = torch.zeros_like(mask)
    grown = tuple(slice(max(b.start - m, 0), min(b.stop + m, n)) for b, n in zip(box, mask.shape))
    x = mask[grown].float()[None, None]
    for axis in range(3):
        k = [1, 1, 1]
        k[axis] = 2 * m + 1
        pad = [0, 0, 0]
        pad[axis] = m
        x = F.max_pool3d(x, tuple(k), stride=1, padding=tuple(pad))
    out[grown] = x[0, 0] > 0
    return out


RETRIES = (  # (affine dof, start, progress note), tried in turn while the registration fails the checks
    (7, "intensity", "again with a similarity transform, "),  # a 12-dof affine can collapse on thick-slice or small scans
    (12, "edges", "again from the image edges, "),  # an intensity-weighted start runs off on an inverted contrast
)


def fov_ratio(fixed: tuple[np.ndarray, np.ndarray], atlas: Atlas) -> float:
    """The smaller field of view's volume over the larger's, of the target's registration grid and the atlas's."""
    volumes = [float(np.prod(img.shape) * abs(np.linalg.det(aff[:3, :3]))) for img, aff in (fixed, (atlas.image, atlas.affine))]
    return min(volumes) / max(volumes)


def register(fixed: tuple[np.ndarray, np.ndarray], atlas: Atlas, cfg: LocaliseConfig, metric: str, threads: int,
             report: Progress, cancel: Cancel | None, dof: int = 12,
             start: str = "intensity") -> tuple[np.ndarray, float, float, str | None]:
    """One registration (`run_greedy`) and its checks: (warped masks, image similarity near them, fraction of them
    inside the target, what is wrong with it or None). A target that shows a small part of the reference (the search
    start) also passes the inside check when one structure lies whole in it (`min_inside_whole`): a crop around it."""
    image, warped, matrix, inside, each = run_greedy(fixed, atlas, cfg, metric, threads, report, cancel, dof, start)
    # a share above 1.1 is an interpolation artefact of a structure almost wholly outside both grids
    whole = start == "search" and any(cfg.min_inside_whole <= e <= 1.1 for e in each)
    near = blur(warped.max(0, keepdims=True), 2.0)[0] > 0.05
    sim = similarity(image, fixed[0], near if near.sum() > 100 else np.ones_like(near), metric)
    det = float(np.linalg.det(matrix[:3, :3]))
    problem = None
    if not 1.0 / cfg.max_scale <= det <= cfg.max_scale:
        problem = (f"registration {'mirrored' if det <= 0 else 'scaled volumes by %.2g' % (1 / det)} "
                   "(another body region, or a failed registration)")
    elif inside < cfg.min_inside and not whole:
        problem = (f"registration carried only {inside:.0%} of the reference structures into the target's field of view "
                   "(another body region or field of view?)")
    elif sim < cfg.min_similarity:
        problem = (f"after registration the images look alike only {sim:.2f} (< {cfg.min_similarity:g}): a reference of "
                   "another body region or contrast, or a failed registration")
    return warped, sim, inside, problem


def localise(target: Prepared, atlases: list[Atlas], labels: list[int], cfg: LocaliseConfig, spacing: float, threads: int = 2,
             progress: Progress | None = None, cancel: Cancel | None = None) -> Localisation:
    """The prior of `labels` on the target's working grid from every atlas that registers; see the module docstring."""
    t0 = time.perf_counter()
    report = progress or (lambda f, m: None)
    if not atlases:
        return unlocalised(["the task carries no reference image to register (a memory-bank task, or one saved before "
                            "localisation existed): segmenting the whole field of view"])
    box = body_box(target.work, spacing, cfg.body_margin_mm)
    f = block_factor([b.stop - b.start for b in box], cfg.max_voxels)
    fixed_img = coarsen(target.work, box, f)[0].numpy()
    fixed = (fixed_img, coarse_affine(target.grid.working_affine, box, f))
    total = np.zeros((len(labels), *fixed_img.shape), np.float32)
    counts = np.zeros(len(labels), np.float32)
    notes, sims, insides = [], [], []
    for i, atlas in enumerate(atlases):
        have = [v for v in labels if v in atlas.labels]
        if not have:
            continue
        atlas = atlas.select(have)
        metric = cfg.metric if cfg.metric != "auto" else ("ncc" if atlas.modality == target.modality else "nmi")
        def step(fr: float, msg: str, i: int = i, lo: float = 0.0, hi: float = 0.6, again: str = "") -> None:
            report((i + lo + (hi - lo) * fr) / len(atlases), f"registering reference {i + 1}/{len(atlases)}: {again}{msg}")

        start = "search" if fov_ratio(fixed, atlas) < cfg.search_fov_ratio else "intensity"
        try:
            warped, sim, inside, problem = register(fixed, atlas, cfg, metric, threads, step, cancel, start=start)
            for n, (dof, again_from, again) in enumerate(RETRIES):  # until one passes the checks; else the first problem is said
                if problem is None:
                    break
                lo, hi = 0.6 + 0.4 * n / len(RETRIES), 0.6 + 0.4 * (n + 1) / len(RETRIES)
                retry = register(fixed, atlas, cfg, metric, threads,
                                 lambda fr, msg, lo=lo, hi=hi, again=again: step(fr, msg, lo=lo, hi=hi, again=again),
                                 cancel, dof=dof, start=again_from)
                if retry[3] is None:
                    warped, sim, inside, problem = retry
        except Cancelled:
            raise
        except RuntimeError as e:
            notes.append(f"reference {i + 1}: {e}")
            continue
        sims.append(sim)
        insides.append(inside)
        if problem is not None:
            notes.append(f"reference {i + 1}: {problem}")
            continue
        for k, v in enumerate(have):
            total[labels.index(v)] += warped[k]
            counts[labels.index(v)] += 1
    if not counts.any():
        return Localisation(None, None, "none", notes + ["registration failed for every reference: segmenting the whole field "
                                                          "of view without a prior (check that the reference shows the same body region)"],
                            sims, insides, time.perf_counter() - t0)
    mean = total / np.maximum(counts, 1)[:, None, None, None]
    prior = to_working(blur(mean, cfg.prior_sigma_mm / (spacing * f)), box, f, target.work.shape[1:])
    region = prior_region(prior, cfg.margin_mm, spacing, box)
    missing = [v for v, c in zip(labels, counts) if c == 0]
    if missing:
        notes.append(f"label(s) {missing}: no reference registered for them; they get no prior")
    return Localisation(prior, region, "registration", notes, sims, insides, time.perf_counter() - t0, mean, box, f)
