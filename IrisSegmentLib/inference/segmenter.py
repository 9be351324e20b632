"""The engine: reference encoding, and segmentation of a target as a short story over public stages:

    prepare -> localise -> plan windows -> run windows -> merge (+ prior) -> label map -> post-process

Each stage is a public function of its own module (`prepare.py`, `localise.py`, `windows.py`, `sliding.py`,
`merge.py`, `labelmap.py`, `postprocess.py`); `Segmenter.segment` tells the story, and a benchmark, the batch
runner or Slicer can call any stage on its own. Per-stage seconds come back in the result."""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from ..config import LOCALISE_MODES, BundleConfig
from ..errors import IrisInputError
from ..io import file_sha256
from .confidence import CALIBRATION_FILE, Calibration, features, prior_agreement
from .labelmap import to_label_map
from .localise import Localisation, greedy_available, localise, make_atlas, unlocalised
from .merge import GaussianBlend, combine_prior
from .postprocess import pieces, postprocess
from .prepare import Prepared, check_volume, finite, prepare
from .runtime import Runtime, cpu_autocast, resolve_device
from .sliding import run_windows
from .task import Colour, MemoryBank, TaskEmbedding, tune
from .windows import coarse_tile, pad_to_window, plan

__all__ = ["Segmenter", "SegmentationResult", "check_volume", "resolve_device", "load_calibration"]

BANK_FILE = "memory_bank.safetensors"
STRATEGIES = ("coarse-to-fine", "full")
Progress = Callable[[float, str], None]
Cancel = Callable[[], bool]


class SegmentationModel(Protocol):
    def encode_task(self, ref_image: torch.Tensor, ref_masks: torch.Tensor) -> torch.Tensor: ...
    def segment(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor: ...


@dataclass
class SegmentationResult:
    label_map: np.ndarray  # aligned voxel for voxel with the target; reference label values
    labels: list[int]
    names: list[str]
    colours: list[Colour]
    device: str
    seconds: float
    windows: int
    confidence: dict[int, float] = field(default_factory=dict)  # estimated Dice per label (with a calibration)
    confidence_features: dict[int, dict[str, float]] = field(default_factory=dict)
    localisation: str = "none"  # how the structures were found: "registration" or "none" (whole field of view)
    warnings: list[str] = field(default_factory=list)  # what went wrong on the way (e.g. a failed registration)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # prepare, localise, windows, merge, label map, post-process
    prior: np.ndarray | None = None  # with keep_prior: the localisation prior (K, I, J, K) on the target grid, float16


def load_calibration(folder: Path) -> Calibration | None:
    """The model folder's confidence calibration, if it has one fitted on exactly its weights (else a warning)."""
    from ..weights import WEIGHTS

    path = folder / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        cal = Calibration.load(path)
    except (ValueError, TypeError, KeyError) as e:
        warnings.warn(f"{path}: unreadable confidence calibration ({e}); segments get no estimated Dice")
        return None
    if cal.weights_sha256 != file_sha256(folder / WEIGHTS):
        warnings.warn(f"{path} was fitted on other weights than {folder / WEIGHTS}; segments get no estimated Dice until it is "
                      "refitted (python benchmarks/accuracy.py --tables calibration --fit)")
        return None
    return cal


class Segmenter:
    """Encodes references into task embeddings and segments targets with them."""

    def __init__(self, model: SegmentationModel, config: BundleConfig, device: str = "auto", model_id: str | None = None):
        self.config = config
        self.runtime = Runtime(resolve_device(device), config.inference.batch_size, cpu_autocast(config.inference.cpu_precision))
        self.model = model.to(self.device) if isinstance(model, torch.nn.Module) else model
        if isinstance(self.model, torch.nn.Module):
            self.model.eval().requires_grad_(False)
        self.model_id = model_id or f"{config.model.name}-{config.model.fingerprint()}"
        self.bank = MemoryBank(config.training.bank_momentum, self.model_id)
        self.calibration: Calibration | None = None

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def batch_size(self) -> int:
        return self.runtime.batch_size

    @property
    def cpu_bf16(self) -> bool:
        return self.runtime.cpu_bf16

    @classmethod
    def load(cls, name_or_path: str | None = None, device: str = "auto") -> "Segmenter":
        """The bundled model (default) or a model folder."""
        from ..weights import load_model

        from ..resources import model_dir

        model, cfg, _ = load_model(name_or_path)
        seg = cls(model, cfg, device)
        bank = model_dir(name_or_path) / BANK_FILE
        if bank.is_file():
            seg.bank = MemoryBank.load(bank)
            seg.bank.model_id = seg.model_id
        seg.calibration = load_calibration(model_dir(name_or_path))
        return seg

    # -- stages ------------------------------------------------------------------------------
    def prepare(self, image, affine, modality: str = "auto", what: str = "target image") -> Prepared:
        """Stage 1: the image checked, normalised and on the working grid."""
        return prepare(image, affine, modality, self.config.model.spacing, self.config.inference, what)

    def localise(self, target: Prepared, task: TaskEmbedding, mode: str = "auto", progress: Progress | None = None,
                 cancel: Cancel | None = None) -> Localisation:
        """Stage 2: the task's references registered onto the target (`localise.py`); "none", or "auto" without
        a registration engine or reference images, gives the whole field of view."""
        if mode not in LOCALISE_MODES:
            raise IrisInputError(f"unknown localise mode {mode!r}; use one of {', '.join(LOCALISE_MODES)}")
        if mode == "none":
            return unlocalised()
        if not greedy_available():
            msg = "registration needs the picsl-greedy package (pip install picsl-greedy)"
            if mode == "registration":
                raise IrisInputError(f"localisation by registration {msg}; or choose no localisation (--localise none)")
            return unlocalised([f"{msg}: segmenting the whole field of view"])
        if mode == "registration" and not task.atlases:
            raise IrisInputError("localisation by registration: this task carries no reference image (a memory-bank task, or "
                                 "one saved before localisation existed); encode the reference again, or choose no localisation "
                                 "(--localise none)")
        threads = max(1, torch.get_num_threads())
        return localise(target, task.atlases, task.labels, self.config.localise, float(self.config.model.spacing[0]), threads,
                        progress, cancel)

    def plan_windows(self, shape, overlap: float, region: torch.Tensor | None = None, exclude=()) -> list[tuple[int, int, int]]:
        """Stage 3: window origins on a padded grid of `shape`, all of them or those touching `region`."""
        return plan(shape, self.config.model.window, overlap, region, 0, exclude)

    def run_windows(self, padded: torch.Tensor, origins: list, tokens: torch.Tensor, blend: GaussianBlend,
                    report: Progress, cancel: Cancel | None = None, span: tuple[float, float] = (0.0, 1.0)) -> int:
        """Stage 4: the windows through the network into `blend`; the runtime after any out-of-memory fallback is kept."""
        self.runtime, ran = run_windows(self.model, self.runtime, padded, origins, tokens, blend, report, cancel, span)
        return ran

    def probabilities(self, work: torch.Tensor, tokens: torch.Tensor, overlap: float, report: Progress,
                      cancel: Cancel | None = None, strategy: str | None = None, spread: bool = False,
                      region: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Stages 3-4 together: blended class probabilities (K, X, Y, Z) on the working grid, the window spread
        (with `spread`, else None) and the windows run.

        With a `region` (from localisation) the overlapping windows touching it run, and nothing else. Without,
        "full" runs every overlapping window; "coarse-to-fine" first the subset that just covers the volume, then
        the others only where a coarse probability reaches `coarse_threshold` (plus `coarse_margin` voxels):
        there the blend is exactly the full one. Windows holding a constant image are not run (probability 0)."""
        inf = self.config.inference
        strategy = strategy or inf.strategy
        if strategy not in STRATEGIES:
            raise IrisInputError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
        win = self.config.model.window
        padded, shape = pad_to_window(work, win)
        blend = GaussianBlend(tokens.shape[0], padded.shape[1:], win, inf.gaussian_sigma_scale, spread)
        if region is not None:
            grown = torch.zeros(padded.shape[1:], dtype=torch.bool)
            grown[tuple(slice(0, s) for s in shape)] = region
            n = self.run_windows(padded, self.plan_windows(padded.shape[1:], overlap, grown), tokens, blend, report, cancel,
                                 (0.3, 0.9))
        elif strategy == "full":
            n = self.run_windows(padded, self.plan_windows(padded.shape[1:], overlap), tokens, blend, report, cancel, (0.05, 0.9))
        else:
            coarse = coarse_tile(padded.shape[1:], win, overlap)
            n = self.run_windows(padded, coarse, tokens, blend, report, cancel, (0.05, 0.35))
            found = blend.found(inf.coarse_threshold)
            rest = plan(padded.shape[1:], win, overlap, found, inf.coarse_margin, coarse)
            del found
            n += self.run_windows(padded, rest, tokens, blend, report, cancel, (0.35, 0.9))
        probs, sd = blend.result(shape)
        return probs, sd, n

    # -- reference crops --------------------------------------------------------------------
    def _crops(self, mask: torch.Tensor) -> list[tuple[int, int, int]]:
        """Window origins centred on a structure; several tiling its extent when it exceeds one window."""
        win = self.config.model.window
        pts = torch.nonzero(mask > 0)
        lo, hi = pts.min(0).values.tolist(), pts.max(0).values.tolist()
        per_axis = []
        for a, b, w in zip(lo, hi, win):
            ext = b - a + 1
            if ext <= w:
                per_axis.append([(a + b) // 2 - w // 2])
            else:
                n = int(np.ceil(ext / w))
                per_axis.append([int(round(a + i * (ext - w) / max(n - 1, 1))) for i in range(n)])
        origins = [(x, y, z) for x in per_axis[0] for y in per_axis[1] for z in per_axis[2]]
        if len(origins) > self.config.inference.max_reference_crops:
            idx = np.linspace(0, len(origins) - 1, self.config.inference.max_reference_crops).round().astype(int)
            origins = [origins[i] for i in idx]
        return origins

    @staticmethod
    def _extract(volume: torch.Tensor, origin, window, fill: float) -> torch.Tensor:
        """(C, X, Y, Z) -> (C, *window) at `origin` (may lie partly outside), padded with `fill`."""
        out = volume.new_full((volume.shape[0], *window), fill)
        src = [slice(max(o, 0), min(o + w, n)) for o, w, n in zip(origin, window, volume.shape[1:])]
        dst = [slice(s.start - o, s.stop - o) for s, o in zip(src, origin)]
        out[(slice(None), *dst)] = volume[(slice(None), *src)]
        return out

    @staticmethod
    def _working_masks(grid: WorkingGrid, label: np.ndarray, labels: list[int]) -> torch.Tensor:
        """Binary masks on the working grid (trilinear, then >= 0.5; any overlap for structures that would vanish)."""
        soft = grid.to_working(torch.from_numpy(np.stack([(label == v) for v in labels]).astype(np.float32)))
        hard = soft >= 0.5
        tiny = ~hard.flatten(1).any(1)
        hard[tiny] = soft[tiny] > 0
        return hard.float()

    # -- task encoding -----------------------------------------------------------------------
    def encode(self, image, affine, label, labels: list[int] | None = None, names: list[str] | None = None,
               colours: list[Colour] | None = None, modality: str = "auto", confidence: bool = True) -> TaskEmbedding:
        """Task embedding of the structures `labels` (default: every non-zero value) in one reference;
        `confidence`: also segment the reference crops with it (self-Dice, a confidence feature)."""
        img = check_volume(image, "reference image")
        lab = check_volume(label, "reference label")
        if img.shape != lab.shape:
            raise IrisInputError(f"reference image {img.shape} and label {lab.shape} differ in shape; give the label map drawn on this image")
        lab = np.rint(finite(lab, "reference label")).astype(np.int64)
        present = [int(v) for v in np.unique(lab) if v != 0]
        if not present:
            raise IrisInputError("the reference label map is empty: draw the structures to segment on the reference first")
        labels = list(labels) if labels else present
        missing = [v for v in labels if v not in present]
        if missing:
            raise IrisInputError(f"label(s) {missing} not in the reference label map (it has {present}): pick from those, or draw it on the reference first")
        ref = self.prepare(img, affine, modality, "reference image")
        work, grid = ref.work, ref.grid
        if ref.constant:
            warnings.warn("reference image is constant: its task embedding carries no appearance information")
        masks = self._working_masks(grid, lab, labels)
        win = self.config.model.window
        fill = float(work.min())
        tokens, stats = [], []
        voxel_ml = float(np.prod(self.config.model.spacing)) / 1000.0
        with torch.inference_mode():
            for k in range(len(labels)):
                crops, stat = [], {"ml": float(masks[k].sum()) * voxel_ml, "pieces": float(pieces(masks[k].numpy() > 0))}
                for origin in self._crops(masks[k]):
                    im = self._extract(work, origin, win, fill)[None]
                    mk = self._extract(masks[k : k + 1], origin, win, 0.0)[None]
                    if float(mk.sum()) > 0:
                        t, self_dice = self._encode_crop(im, mk, confidence and "self_dice" not in stat)  # first crop only
                        crops.append(t)
                        if self_dice is not None:
                            stat["self_dice"] = self_dice
                if not crops:
                    raise IrisInputError(f"label {labels[k]} is too small to see at the working spacing {self.config.model.spacing} mm: draw it larger, or use another reference")
                tokens.append(torch.stack(crops).mean(0))
                stats.append(stat)
        atlas = make_atlas(ref, masks, labels, self.config.localise, float(self.config.model.spacing[0]))
        return TaskEmbedding(torch.stack(tokens), labels, list(names or []), list(colours or []), self.model_id, stats, [atlas])

    def _until_fits(self, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        """`run()`, retried on the CPU after CUDA out of memory (a single window cannot be split)."""
        while True:
            try:
                return run()
            except torch.cuda.OutOfMemoryError:
                self.runtime = self.runtime.after_oom(batch=1)
                if isinstance(self.model, torch.nn.Module):
                    self.model.to(self.device)

    def _encode_crop(self, image: torch.Tensor, mask: torch.Tensor, check: bool = False) -> tuple[torch.Tensor, float | None]:
        """One window's task tokens and, with `check`, the Dice of that task on its own window (a confidence
        feature: one more window's forward); on CUDA out of memory, continues on the CPU (one window cannot be split)."""
        tokens = self._until_fits(lambda: self.model.encode_task(image.to(self.device), mask.to(self.device))[0, 0].float().cpu())
        if not check:
            return tokens, None
        pred = self._until_fits(lambda: self.runtime.forward(self.model, [image[0]], tokens[None]))[0, 0] >= 0.5
        truth = mask[0, 0] > 0
        return tokens, 2.0 * float((pred & truth).sum()) / max(float(pred.sum() + truth.sum()), 1.0)

    def encode_references(self, references: list[tuple], labels: list[int] | None = None, names=None, colours=None,
                          modality: str = "auto") -> TaskEmbedding:
        """Context ensemble: the mean task embedding of several (image, affine, label) references."""
        return TaskEmbedding.ensemble([self.encode(i, a, l, labels, names, colours, modality) for i, a, l in references])

    def tune(self, task: TaskEmbedding, references: list[tuple], steps: int = 20, lr: float = 1e-2, modality: str = "auto") -> TaskEmbedding:
        """In-context tuning: optimise the task tokens on labelled references, network frozen."""
        win = self.config.model.window
        ims, mks = [], []
        for image, affine, label in references:
            prepared = self.prepare(image, affine, modality, "tuning image")
            work, grid = prepared.work, prepared.grid
            lab = np.rint(np.asarray(label)).astype(np.int64)
            masks = self._working_masks(grid, lab, task.labels)
            for k in range(len(task.labels)):
                if masks[k].max() > 0:
                    origin = self._crops(masks[k])[0]
                    ims.append(self._extract(work, origin, win, float(work.min())))
                    mks.append(self._extract(masks, origin, win, 0.0))
        if not ims:
            raise IrisInputError("in-context tuning needs at least one image where the task's labels are present")
        tokens = self._until_fits(lambda: tune(self.model.segment, task.tokens.to(self.device)[None], torch.stack(ims).to(self.device),
                                               torch.stack(mks).to(self.device), steps, lr))
        return task.with_tokens(tokens[0].cpu())

    def retrieve(self, image, affine, task: TaskEmbedding, top_k: int = 1, modality: str = "auto",
                 progress: Progress | None = None, cancel: Cancel | None = None) -> tuple[SegmentationResult, list[list[str]]]:
        """Object-level retrieval: segment with `task`, encode the query's own predicted masks, replace
        each class's embedding by the mean of its `top_k` most similar memory-bank entries, segment again."""
        first = self.segment(image, affine, task, modality, progress=progress, cancel=cancel)
        found = [v for v in task.labels if (first.label_map == v).any()]
        if not found:
            return first, [[] for _ in task.labels]
        own = self.encode(image, affine, first.label_map, labels=found, modality=modality)
        hits = dict(zip(found, self.bank.retrieve(own.tokens, top_k)))
        tokens = task.tokens.clone()
        for i, v in enumerate(task.labels):
            if v in hits:
                tokens[i] = torch.stack([self.bank.embeddings[n] for n, _ in hits[v]]).mean(0)
        second = task.with_tokens(tokens)
        result = self.segment(image, affine, second, modality, progress=progress, cancel=cancel)
        return result, [[n for n, _ in hits.get(v, [])] for v in task.labels]

    # -- segmentation ------------------------------------------------------------------------
    def segment(self, image, affine, task: TaskEmbedding, modality: str = "auto", overlap: float | None = None,
                progress: Progress | None = None, cancel: Cancel | None = None, strategy: str | None = None,
                confidence: bool = True, localise: str | None = None, postprocess: bool = True,
                keep_prior: bool = False) -> SegmentationResult:
        """Label map of the task's structures in `image`, on the image's own grid.

        `localise`: "auto" (default from the config: registration where the task carries its references and
        the registration engine is installed), "registration" or "none" (the whole field of view, no prior).
        `strategy`: "coarse-to-fine" or "full", for the unlocalised windows (`probabilities`). `confidence`:
        also the confidence features and, with a calibration, the estimated Dice (`confidence.py`).
        `postprocess`: largest component where the reference structure is one piece, holes filled.
        `keep_prior`: also return the prior on the target grid (to inspect it)."""
        t0 = time.perf_counter()
        times: dict[str, float] = {}

        def lap(stage: str) -> None:
            times[stage] = time.perf_counter() - t0 - sum(times.values())

        if task.model_id != self.model_id:
            raise IrisInputError(f"the task embedding was made by model {task.model_id!r}, not by the loaded {self.model_id!r}; encode the reference again with this model")
        overlap = self.config.inference.overlap if overlap is None else overlap
        if not 0 <= overlap < 1:
            raise IrisInputError(f"overlap must be in [0, 1), not {overlap}")
        report = progress or (lambda f, m: None)
        target = self.prepare(image, affine, modality, "target image")
        shape, grid = tuple(np.asarray(image).shape[:3]), target.grid
        lap("prepare")
        if target.constant:
            warnings.warn("target image is constant: nothing can be segmented; the result is empty")
            return SegmentationResult(np.zeros(shape, np.uint8), task.labels, task.names, task.colours, str(self.device),
                                      time.perf_counter() - t0, 0, stage_seconds=times)
        loc = self.localise(target, task, localise or self.config.localise.mode,
                            lambda f, m: report(0.3 * f, m), cancel)
        for w in loc.warnings:
            warnings.warn(w)
        lap("localise")
        probs, spread, n_windows = self.probabilities(target.work, task.tokens, overlap, report, cancel, strategy, confidence,
                                                      loc.region)
        del target
        lap("windows")
        feats: dict[int, dict[str, float]] = {}
        estimated: dict[int, float] = {}
        if loc.prior is not None:
            agreement = prior_agreement(probs, loc.prior, loc.region)
            self.merge_prior(probs, loc, task)
        if confidence:
            voxel_ml = float(np.prod(self.config.model.spacing)) / 1000.0
            rows = features(probs, spread, voxel_ml, task.references)
            for k, row in enumerate(rows):
                row["prior_agreement"] = agreement[k] if loc.prior is not None else 0.0
            feats = dict(zip(task.labels, rows))
            if self.calibration is not None:
                estimated = dict(zip(task.labels, self.calibration.predict(rows)))
        del spread
        lap("merge")
        label_map = to_label_map(probs, grid, task.labels, self.config.inference.threshold)
        prior = None
        if keep_prior and loc.prior is not None:
            prior = np.stack([grid.from_working(loc.prior[k : k + 1])[0].numpy().astype(np.float16) for k in range(len(task.labels))])
        del probs
        lap("label map")
        if postprocess:
            self.postprocess(label_map, task)
        lap("post-process")
        report(1.0, "done")
        return SegmentationResult(label_map, task.labels, task.names, task.colours, str(self.device), time.perf_counter() - t0,
                                  n_windows, estimated, feats, loc.method, loc.warnings, times, prior)

    def trusted(self, task: TaskEmbedding) -> list[bool]:
        """Per class, whether the network's own segmentation of its reference crop (self-Dice, measured at encode)
        reaches `localise.min_self_dice`; unknown (no self-Dice): trusted."""
        floor = self.config.localise.min_self_dice
        refs = task.references or [{}] * len(task.labels)
        return [r.get("self_dice", 1.0) >= floor for r in refs]

    def merge_prior(self, probs: torch.Tensor, loc: Localisation, task: TaskEmbedding) -> torch.Tensor:
        """Stage 5, in place: trusted classes `prior_weight * prior + (1 - prior_weight) * network` inside the region;
        the others (the network cannot segment its own reference) the warped masks alone; 0 outside the region."""
        trusted = self.trusted(task)
        weights = torch.tensor([self.config.localise.prior_weight if t else 1.0 for t in trusted])
        prior = loc.prior
        if not all(trusted):
            prior = prior.clone()
            rest = [k for k, t in enumerate(trusted) if not t]
            prior[rest] = loc.warped_masks(rest)
        return combine_prior(probs, prior, loc.region, weights)

    @staticmethod
    def postprocess(label_map: np.ndarray, task: TaskEmbedding) -> np.ndarray:
        """Stage 7 (`postprocess.py`), with "one piece" from the reference (unknown: one piece, as the authors keep every
        label's largest component)."""
        one = [float(r.get("pieces", 1)) <= 1.0 for r in task.references] if task.references else [True] * len(task.labels)
        return postprocess(label_map, task.labels, one)
