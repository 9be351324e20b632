"""The engine: reference encoding (`encoding.py`), and segmentation of a target as a short story over public stages:

    prepare -> localise -> plan windows -> run windows -> merge (+ prior, + appearance) -> label map -> post-process

Each stage is a public function of its own module (`prepare.py`, `localise.py`, `windows.py`, `sliding.py`,
`merge.py`, `appearance.py`, `labelmap.py`, `postprocess.py`); `Segmenter.segment` tells the story, and a benchmark,
the batch runner or Slicer can call any stage on its own. Per-stage seconds come back in the result."""
from __future__ import annotations

import time
import warnings
from typing import Protocol

import numpy as np
import torch

from ..config import LOCALISE_MODES, BundleConfig
from ..errors import IrisInputError
from ..progress import Cancel, Progress
from .appearance import refine
from .body import crop_affine, raw_body_box
from .confidence import Calibration, features, load_calibration, prior_agreement
from .encoding import ReferenceEncoding
from .labelmap import paste, to_label_map
from .localise import Localisation, greedy_available, localise, unlocalised
from .merge import GaussianBlend, combine_prior
from .postprocess import postprocess
from .prepare import Prepared, check_volume, prepare
from .result import SegmentationResult
from .runtime import Runtime, cpu_autocast, resolve_device
from .sliding import run_windows
from .task import MemoryBank, TaskEmbedding
from .windows import coarse_tile, pad_to_window, plan

__all__ = ["Segmenter", "SegmentationResult", "check_volume", "resolve_device", "load_calibration"]

BANK_FILE = "memory_bank.safetensors"
STRATEGIES = ("coarse-to-fine", "full")


class SegmentationModel(Protocol):
    def encode_task(self, ref_image: torch.Tensor, ref_masks: torch.Tensor) -> torch.Tensor: ...
    def segment(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor: ...


class Segmenter(ReferenceEncoding):
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

    @property
    def flag_below(self) -> float | None:
        """Segments estimated below this Dice are flagged (`SegmentationResult.flagged`); None without a calibration."""
        return self.calibration.flag_below if self.calibration is not None else None

    @classmethod
    def load(cls, name_or_path: str | None = None, device: str = "auto") -> "Segmenter":
        """The bundled model (default) or a model folder."""
        from ..resources import model_dir
        from ..weights import load_model

        model, cfg, _ = load_model(name_or_path)
        seg = cls(model, cfg, device)
        bank = model_dir(name_or_path) / BANK_FILE
        if bank.is_file():
            seg.bank = MemoryBank.load(bank)
            seg.bank.model_id = seg.model_id
        seg.calibration = load_calibration(model_dir(name_or_path))
        return seg

    # -- checks ------------------------------------------------------------------------------
    def check_task(self, task: TaskEmbedding) -> None:
        """A task embedding segments only with the model that made it."""
        if task.model_id != self.model_id:
            raise IrisInputError(f"the task embedding was made by model {task.model_id!r}, not by the loaded {self.model_id!r}; "
                                 "encode the reference again with this model")

    def check_overlap(self, overlap: float | None = None) -> float:
        """The sliding-window overlap: `overlap`, or the config's (None), checked to be in [0, 1)."""
        overlap = self.config.inference.overlap if overlap is None else overlap
        if not 0 <= overlap < 1:
            raise IrisInputError(f"overlap must be in [0, 1), not {overlap}")
        return overlap

    # -- stages ------------------------------------------------------------------------------
    def prepare(self, image, affine, modality: str = "auto", what: str = "target image", polarity: float = 1.0) -> Prepared:
        """Stage 1: the image checked, normalised and on the working grid; `polarity` -1: intensities inverted, as a
        task's references were (`TaskEmbedding.polarity`)."""
        out = prepare(image, affine, modality, self.config.model.spacing, self.config.inference, what)
        if polarity < 0:
            out.work.neg_()
        return out

    def body(self, image: np.ndarray, affine) -> tuple[slice, ...]:
        """Stage 1a, with localisation: the target's body box in its own voxels (`localise.body_margin_mm` around what
        is not background), found before intensities are normalised: a scan inside a large empty field is then
        normalised and segmented on its own. `prepare(image[box], crop_affine(affine, box))` follows."""
        return raw_body_box(check_volume(image, "target image"), affine, self.config.localise.body_margin_mm)

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
                    report: Progress, cancel: Cancel | None = None, span: tuple[float, float] = (0.0, 1.0),
                    prior: torch.Tensor | None = None) -> int:
        """Stage 4: the windows through the network into `blend` (with their crops of a padded `prior`); the runtime
        after any out-of-memory fallback is kept."""
        self.runtime, ran = run_windows(self.model, self.runtime, padded, origins, tokens, blend, report, cancel, span, prior)
        return ran

    def probabilities(self, work: torch.Tensor, tokens: torch.Tensor, overlap: float, report: Progress,
                      cancel: Cancel | None = None, strategy: str | None = None, spread: bool = False,
                      region: torch.Tensor | None = None, prior: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Stages 3-4 together: blended class probabilities (K, X, Y, Z) on the working grid, the window spread
        (with `spread`, else None) and the windows run.

        With a `region` (from localisation) the overlapping windows touching it run, and nothing else; a `prior`
        (K, X, Y, Z) goes into the network with them (a network that takes one refines it). Without,
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
            inner = tuple(slice(0, s) for s in shape)
            grown = torch.zeros(padded.shape[1:], dtype=torch.bool)
            grown[inner] = region
            if prior is not None:
                padded_prior = prior.new_zeros((prior.shape[0], *padded.shape[1:]))
                padded_prior[(slice(None), *inner)] = prior
                prior = padded_prior
            n = self.run_windows(padded, self.plan_windows(padded.shape[1:], overlap, grown), tokens, blend, report, cancel,
                                 (0.3, 0.9), prior)
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

    def retrieve(self, image, affine, task: TaskEmbedding, top_k: int = 1, modality: str = "auto",
                 progress: Progress | None = None, cancel: Cancel | None = None) -> tuple[SegmentationResult, list[list[str]]]:
        """Object-level retrieval: segment with `task`, encode the query's own predicted masks, replace
        each class's embedding by the mean of its `top_k` most similar memory-bank entries, segment again."""
        first = self.segment(image, affine, task, modality, progress=progress, cancel=cancel)
        found = [v for v in task.labels if (first.label_map == v).any()]
        if not found:
            return first, [[] for _ in task.labels]
        own = self.encode(image, affine, first.label_map, labels=found, modality=modality, polarity=task.polarity)
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
                keep_prior: bool = False, localisation: Localisation | None = None) -> SegmentationResult:
        """Label map of the task's structures in `image`, on the image's own grid.

        `localise`: "auto" (default from the config: registration where the task carries its references and
        the registration engine is installed), "registration" or "none" (the whole field of view, no prior).
        `strategy`: "coarse-to-fine" or "full", for the unlocalised windows (`probabilities`). `confidence`:
        also the confidence features and, with a calibration, the estimated Dice (`confidence.py`).
        `postprocess`: largest component where the reference structure is one piece, holes filled.
        `keep_prior`: also return the prior on the target grid (to inspect it). `localisation`: one made before by
        `localise` for this image and task (e.g. to segment again with other settings without registering again)."""
        t0 = time.perf_counter()
        times: dict[str, float] = {}

        def lap(stage: str) -> None:
            times[stage] = time.perf_counter() - t0 - sum(times.values())

        self.check_task(task)
        overlap = self.check_overlap(overlap)
        report = progress or (lambda f, m: None)
        mode = localise or self.config.localise.mode
        image = check_volume(image, "target image")
        shape = tuple(image.shape[:3])
        box = self.body(image, affine) if mode != "none" else tuple(slice(0, n) for n in shape)
        target = self.prepare(image[box], crop_affine(affine, box), modality, "target image", task.polarity)
        grid = target.grid
        lap("prepare")
        if target.constant:
            warnings.warn("target image is constant: nothing can be segmented; the result is empty")
            return SegmentationResult(np.zeros(shape, np.uint8), task.labels, task.names, task.colours, str(self.device),
                                      time.perf_counter() - t0, 0, stage_seconds=times, flag_below=self.flag_below)
        loc = localisation or self.localise(target, task, mode, lambda f, m: report(0.3 * f, m), cancel)
        if loc.prior is not None and tuple(loc.prior.shape[1:]) != tuple(target.work.shape[1:]):
            raise IrisInputError("the localisation given was made for another image (its grid differs): localise this one")
        for w in loc.warnings:
            warnings.warn(w)
        lap("localise")
        trusted = self.trusted(task)
        probs, spread, n_windows = self.probabilities(target.work, task.tokens, overlap, report, cancel, strategy, confidence,
                                                      self.window_region(loc, trusted), loc.prior)
        work = target.work[0]
        del target
        lap("windows")
        feats: dict[int, dict[str, float]] = {}
        estimated: dict[int, float] = {}
        if loc.prior is not None:
            agreement = prior_agreement(probs, loc.prior, loc.region)
            self.merge_prior(probs, loc, trusted, work)
        del work
        if confidence:
            voxel_ml = float(np.prod(self.config.model.spacing)) / 1000.0
            rows = features(probs, spread, voxel_ml, task.references)
            for k, row in enumerate(rows):
                if loc.prior is None:
                    row["prior_agreement"] = 0.0
                elif trusted[k]:
                    row["prior_agreement"] = agreement[k]
                else:  # no window ran for it: what the network and its windows say is unknown (the calibration's mean)
                    del row["disagreement"]
            feats = dict(zip(task.labels, rows))
            if self.calibration is not None:
                estimated = dict(zip(task.labels, self.calibration.predict(rows)))
        del spread
        lap("merge")
        label_map = paste(to_label_map(probs, grid, task.labels, self.config.inference.threshold), box, shape)
        prior = None
        if keep_prior and loc.prior is not None:
            prior = np.stack([paste(grid.from_working(loc.prior[k : k + 1])[0].numpy().astype(np.float16), box, shape)
                              for k in range(len(task.labels))])
        del probs
        lap("label map")
        if postprocess:
            self.postprocess(label_map, task)
        lap("post-process")
        report(1.0, "done")
        return SegmentationResult(label_map, task.labels, task.names, task.colours, str(self.device), time.perf_counter() - t0,
                                  n_windows, estimated, feats, loc.method, loc.warnings, times, prior, self.flag_below)

    def window_region(self, loc: Localisation, trusted: list[bool]) -> torch.Tensor | None:
        """Stage 3's region: where a class the network is trusted with can be (`Localisation.region_of`); the others
        take the warped masks (`merge_prior`), so no window runs for them alone (none at all when no class is
        trusted). None without localisation: the whole field of view."""
        if loc.prior is None:
            return None
        return loc.region_of([k for k, t in enumerate(trusted) if t], self.config.localise.margin_mm,
                             float(self.config.model.spacing[0]))

    def trusted(self, task: TaskEmbedding) -> list[bool]:
        """Per class, whether the network's own segmentation of its reference crop (self-Dice, measured at encode)
        reaches `localise.min_self_dice`; unknown (no self-Dice): trusted."""
        floor = self.config.localise.min_self_dice
        refs = task.references or [{}] * len(task.labels)
        return [r.get("self_dice", 1.0) >= floor for r in refs]

    def merge_prior(self, probs: torch.Tensor, loc: Localisation, trusted: list[bool], work: torch.Tensor) -> torch.Tensor:
        """Stage 5, in place: the `trusted` classes (whose windows ran, `window_region`) `prior_weight * prior +
        (1 - prior_weight) * network` inside the region (the prior blurred by each structure's depth,
        `Localisation.merge_prior`); the others (the network cannot segment its own reference) the
        warped masks, refined by the target's intensities `work` (X, Y, Z) (`appearance.py`;
        `localise.appearance_iterations` 0: as warped); 0 outside."""
        cfg = self.config.localise
        weights = torch.tensor([cfg.prior_weight if t else 1.0 for t in trusted])
        prior = loc.merge_prior(cfg, float(self.config.model.spacing[0]), [k for k, t in enumerate(trusted) if t])
        if not all(trusted):
            if prior is loc.prior:
                prior = prior.clone()
            rest = [k for k, t in enumerate(trusted) if not t]
            if cfg.appearance_iterations:
                prior[rest] = refine(work, loc.warped_masks(), loc.region, cfg.appearance_iterations, cfg.appearance_bins,
                                     cfg.appearance_sigma_mm / self.config.model.spacing[0], rest)
            else:
                prior[rest] = loc.warped_masks(rest)
        return combine_prior(probs, prior, loc.region, weights)

    @staticmethod
    def postprocess(label_map: np.ndarray, task: TaskEmbedding) -> np.ndarray:
        """Stage 7 (`postprocess.py`), with "one piece" from the reference (unknown: one piece, as the authors keep every
        label's largest component)."""
        one = [float(r.get("pieces", 1)) <= 1.0 for r in task.references] if task.references else [True] * len(task.labels)
        return postprocess(label_map, task.labels, one)
