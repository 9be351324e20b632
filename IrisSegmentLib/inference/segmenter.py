"""The engine: reference encoding and sliding-window segmentation of a target, world-correct."""
from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from ..config import BundleConfig
from ..errors import Cancelled, IrisInputError
from ..io import file_sha256
from .confidence import CALIBRATION_FILE, Calibration, features
from .geometry import WorkingGrid
from .intensity import normalise_
from .task import Colour, MemoryBank, TaskEmbedding, tune
from .windows import coarse_tile, gaussian_weights, pad_to_window, tile

log = logging.getLogger("IrisSegmentLib")

BANK_FILE = "memory_bank.safetensors"
SLAB_VALUES = 1 << 20  # probabilities resampled to the target grid at a time (4 MiB of float32)
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


def resolve_device(device: str = "auto") -> torch.device:
    if device in ("auto", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "gpu":
        device = "cuda"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise IrisInputError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise IrisInputError(f"unknown device {device!r}; use auto, cpu or cuda") from None


def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises native bfloat16 arithmetic (AVX512-BF16 or AMX, Linux /proc/cpuinfo);
    elsewhere bf16 would be emulated and slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def cpu_autocast(precision: str) -> bool:
    """Whether window forward passes on the CPU run under bfloat16 autocast."""
    if precision not in ("auto", "bf16", "fp32"):
        raise IrisInputError(f"cpu_precision must be auto, bf16 or fp32, not {precision!r}")
    return precision == "bf16" or precision == "auto" and cpu_has_native_bf16()


def check_volume(image: np.ndarray, what: str) -> np.ndarray:
    """A 3D scalar volume, or a message that says what it is and what to do."""
    a = np.asarray(image)
    if a.ndim == 4 and a.shape[3] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        raise IrisInputError(f"{what} is 2D {a.shape}; IrisSegment needs a 3D volume (stack the slices into one volume)")
    if a.ndim == 4:
        raise IrisInputError(f"{what} has 4 dimensions {a.shape} (a time series or multi-component image); extract one 3D volume or one component first")
    if a.ndim == 5 and a.shape[3] == 1:  # NIfTI keeps vector components in the 5th dimension
        raise IrisInputError(f"{what} is a multi-component (vector) image {a.shape} with {a.shape[4]} components; extract one component first")
    if a.ndim != 3:
        raise IrisInputError(f"{what} has {a.ndim} dimensions {a.shape}; a 3D volume is needed: extract one first")
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise IrisInputError(f"{what} has data type {a.dtype} (e.g. colour or complex); a real-valued scalar image is needed: "
                             "convert it to a grey-level volume first")
    return a


def _finite(image: np.ndarray, what: str) -> np.ndarray:
    """A C-ordered float32 copy (the caller's array is never changed), NaN/Inf replaced by the minimum, with a warning."""
    x = np.array(image, dtype=np.float32, order="C")
    if np.issubdtype(np.asarray(image).dtype, np.floating):
        bad = ~np.isfinite(x)
        if bad.any():
            fill = float(np.min(x[~bad])) if (~bad).any() else 0.0
            warnings.warn(f"{what}: {int(bad.sum())} NaN/Inf voxels replaced by {fill:g}")
            x[bad] = fill
    return x


class Segmenter:
    """Encodes references into task embeddings and segments targets with them."""

    def __init__(self, model: SegmentationModel, config: BundleConfig, device: str = "auto", model_id: str | None = None):
        self.config = config
        self.device = resolve_device(device)
        self.model = model.to(self.device) if isinstance(model, torch.nn.Module) else model
        if isinstance(self.model, torch.nn.Module):
            self.model.eval().requires_grad_(False)
        self.model_id = model_id or f"{config.model.name}-{config.model.fingerprint()}"
        self.batch_size = config.inference.batch_size
        self.cpu_bf16 = cpu_autocast(config.inference.cpu_precision)
        self.bank = MemoryBank(config.training.bank_momentum, self.model_id)
        self.calibration: Calibration | None = None

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

    # -- preparation -------------------------------------------------------------------------
    def _prepare(self, image, affine, modality: str, what: str) -> tuple[torch.Tensor, WorkingGrid, bool]:
        img = check_volume(image, what)
        grid = WorkingGrid.create(img.shape, affine, self.config.model.spacing)
        # One float32 copy, in nearest-RAS order and normalised in place: the same scan stored in another
        # axis order or direction (LPS, RAS, sagittal...) gets exactly the same working image.
        x = _finite(grid.reoriented_view(img), what)
        constant = float(x.max() - x.min()) == 0.0
        normalise_(x, modality, self.config.inference)
        return grid.to_working(torch.from_numpy(x)[None], reoriented=True), grid, constant

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
        lab = np.rint(_finite(lab, "reference label")).astype(np.int64)
        present = [int(v) for v in np.unique(lab) if v != 0]
        if not present:
            raise IrisInputError("the reference label map is empty: draw the structures to segment on the reference first")
        labels = list(labels) if labels else present
        missing = [v for v in labels if v not in present]
        if missing:
            raise IrisInputError(f"label(s) {missing} not in the reference label map (it has {present}): pick from those, or draw it on the reference first")
        work, grid, constant = self._prepare(img, affine, modality, "reference image")
        if constant:
            warnings.warn("reference image is constant: its task embedding carries no appearance information")
        masks = self._working_masks(grid, lab, labels)
        win = self.config.model.window
        fill = float(work.min())
        tokens, stats = [], []
        voxel_ml = float(np.prod(self.config.model.spacing)) / 1000.0
        with torch.inference_mode():
            for k in range(len(labels)):
                crops, stat = [], {"ml": float(masks[k].sum()) * voxel_ml}
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
        return TaskEmbedding(torch.stack(tokens), labels, list(names or []), list(colours or []), self.model_id, stats)

    def _encode_crop(self, image: torch.Tensor, mask: torch.Tensor, check: bool = False) -> tuple[torch.Tensor, float | None]:
        """One window's task tokens and, with `check`, the Dice of that task on its own window (a confidence
        feature: one more window's forward); on CUDA out of memory, continues on the CPU (one window cannot be split)."""
        while True:
            try:
                tokens = self.model.encode_task(image.to(self.device), mask.to(self.device))[0, 0].float().cpu()
                break
            except torch.cuda.OutOfMemoryError:
                self._shrink_after_oom(batch=1)
        if not check:
            return tokens, None
        pred, truth = self._forward([image[0]], tokens[None])[0, 0] >= 0.5, mask[0, 0] > 0
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
            work, grid, _ = self._prepare(image, affine, modality, "tuning image")
            lab = np.rint(np.asarray(label)).astype(np.int64)
            masks = self._working_masks(grid, lab, task.labels)
            for k in range(len(task.labels)):
                if masks[k].max() > 0:
                    origin = self._crops(masks[k])[0]
                    ims.append(self._extract(work, origin, win, float(work.min())))
                    mks.append(self._extract(masks, origin, win, 0.0))
        if not ims:
            raise IrisInputError("in-context tuning needs at least one image where the task's labels are present")
        while True:
            try:
                tokens = tune(self.model.segment, task.tokens.to(self.device)[None], torch.stack(ims).to(self.device),
                              torch.stack(mks).to(self.device), steps, lr)
                break
            except torch.cuda.OutOfMemoryError:
                self._shrink_after_oom(batch=1)
        return TaskEmbedding(tokens[0].cpu(), task.labels, task.names, task.colours, task.model_id, task.references)

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
        second = TaskEmbedding(tokens, task.labels, task.names, task.colours, task.model_id, task.references)
        result = self.segment(image, affine, second, modality, progress=progress, cancel=cancel)
        return result, [[n for n, _ in hits.get(v, [])] for v in task.labels]

    # -- segmentation ------------------------------------------------------------------------
    def segment(self, image, affine, task: TaskEmbedding, modality: str = "auto", overlap: float | None = None,
                progress: Progress | None = None, cancel: Cancel | None = None, strategy: str | None = None,
                confidence: bool = True) -> SegmentationResult:
        """Label map of the task's structures in `image`, on the image's own grid. `strategy`: "coarse-to-fine"
        (default from the config) or "full" (see `_sliding_window`). `confidence`: also the confidence
        features per segment and, where the model has a calibration, the estimated Dice (`confidence.py`)."""
        t0 = time.perf_counter()
        if task.model_id != self.model_id:
            raise IrisInputError(f"the task embedding was made by model {task.model_id!r}, not by the loaded {self.model_id!r}; encode the reference again with this model")
        overlap = self.config.inference.overlap if overlap is None else overlap
        if not 0 <= overlap < 1:
            raise IrisInputError(f"overlap must be in [0, 1), not {overlap}")
        report = progress or (lambda f, m: None)
        work, grid, constant = self._prepare(image, affine, modality, "target image")
        shape = tuple(np.asarray(image).shape[:3])
        if constant:
            warnings.warn("target image is constant: nothing can be segmented; the result is empty")
            return SegmentationResult(np.zeros(shape, np.uint8), task.labels, task.names, task.colours, str(self.device), time.perf_counter() - t0, 0)
        probs, spread, n_windows = self._sliding_window(work, task.tokens, overlap, report, cancel, strategy, confidence)
        del work
        feats: dict[int, dict[str, float]] = {}
        estimated: dict[int, float] = {}
        if confidence:
            voxel_ml = float(np.prod(self.config.model.spacing)) / 1000.0
            feats = dict(zip(task.labels, features(probs, spread, voxel_ml, task.references)))
            if self.calibration is not None:
                estimated = dict(zip(task.labels, self.calibration.predict(list(feats.values()))))
        del spread
        label_map = self._to_label_map(probs, grid, task.labels)
        report(1.0, "done")
        return SegmentationResult(label_map, task.labels, task.names, task.colours, str(self.device), time.perf_counter() - t0,
                                  n_windows, estimated, feats)

    def _sliding_window(self, work: torch.Tensor, tokens: torch.Tensor, overlap: float, report: Progress,
                        cancel: Cancel | None, strategy: str | None = None,
                        spread: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Gaussian-blended class probabilities (K, X, Y, Z) on the working grid, with `spread` the weighted
        standard deviation of the overlapping windows' probabilities (else None), and the windows run.

        "full" runs every overlapping window. "coarse-to-fine" first runs the subset of those windows that
        just covers the volume, then the other overlapping windows only where the coarse probabilities
        reach `coarse_threshold` (plus `coarse_margin` voxels): inside that region the blend is exactly the
        full one. Windows holding a constant image (padding, air clipped to the CT window) are not run;
        their probability is 0.

        The accumulator stays float32 (K x working grid): float16 would move probabilities near the 0.5
        threshold by up to 2.4e-4 and so change results. The working grid (1.5 mm) is much smaller than
        the usual sub-millimetre target; only thick slices are upsampled (5 mm: x3.3 along them)."""
        inf = self.config.inference
        strategy = strategy or inf.strategy
        if strategy not in STRATEGIES:
            raise IrisInputError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
        win = self.config.model.window
        padded, shape = pad_to_window(work, win)
        origins = tile(padded.shape[1:], win, overlap)
        acc = torch.zeros((tokens.shape[0], *padded.shape[1:]), dtype=torch.float32)
        acc2 = torch.zeros_like(acc) if spread else None
        wsum = torch.zeros(padded.shape[1:], dtype=torch.float32)
        weight = gaussian_weights(win, inf.gaussian_sigma_scale)

        def run(batch_origins: list, lo: float, hi: float) -> int:
            ran, done, pending = 0, 0, list(batch_origins)
            while pending:
                if cancel is not None and cancel():
                    raise Cancelled("segmentation cancelled")
                chunk = pending[: self.batch_size]
                places = [tuple(slice(a, a + w) for a, w in zip(o, win)) for o in chunk]
                crops = [padded[(slice(None), *sl)] for sl in places]
                live = [i for i, c in enumerate(crops) if float(c.max() - c.min()) > 0]
                try:
                    probs = self._forward([crops[i] for i in live], tokens) if live else None
                except torch.cuda.OutOfMemoryError:
                    self._shrink_after_oom(len(live))
                    continue
                for j, i in enumerate(live):
                    acc[(slice(None), *places[i])] += probs[j] * weight
                    if acc2 is not None:
                        acc2[(slice(None), *places[i])] += probs[j].square() * weight
                for sl in places:
                    wsum[sl] += weight
                pending = pending[len(chunk):]
                ran += len(live)
                done += len(chunk)
                report(lo + (hi - lo) * done / len(batch_origins), f"window {done}/{len(batch_origins)}")
            return ran

        if strategy == "full":
            n = run(origins, 0.05, 0.9)
        else:
            coarse = coarse_tile(padded.shape[1:], win, overlap)
            n = run(coarse, 0.05, 0.35)
            roi = (acc > inf.coarse_threshold * wsum).any(0)
            m, first = inf.coarse_margin, set(coarse)
            rest = [o for o in origins if o not in first
                    and bool(roi[tuple(slice(max(a - m, 0), a + w + m) for a, w in zip(o, win))].any())]
            del roi
            n += run(rest, 0.35, 0.9)
        acc /= wsum.clamp_min_(1e-12)  # in place: the accumulator becomes the probabilities
        inner = (slice(None), *(slice(0, s) for s in shape))
        if acc2 is not None:  # E[p^2] - E[p]^2, in place
            acc2 /= wsum
            acc2.addcmul_(acc, acc, value=-1).clamp_(min=0).sqrt_()
            return acc[inner], acc2[inner], n
        return acc[inner], None, n

    def _forward(self, crops: list[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        x = torch.stack(crops).to(self.device)
        if self.device.type == "cuda":
            half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            autocast = torch.autocast("cuda", dtype=half)
        else:
            autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cpu_bf16 and self.device.type == "cpu")
        with torch.inference_mode(), autocast:
            logits = self.model.segment(x, tokens.to(self.device)[None])
        return torch.sigmoid(logits.float()).cpu()

    def _shrink_after_oom(self, batch: int) -> None:
        """CUDA out of memory with a batch of `batch` windows: halve the window batch, then fall back to the
        CPU; say so. The caller retries the same windows."""
        torch.cuda.empty_cache()
        if batch > 1:
            self.batch_size = batch // 2
            msg = f"GPU out of memory: retrying with {self.batch_size} window(s) per batch"
        elif self.device.type != "cpu":
            self.device = torch.device("cpu")
            if isinstance(self.model, torch.nn.Module):
                self.model = self.model.to(self.device)
            msg = "GPU out of memory even with one window: continuing on the CPU (slower)"
        else:  # cannot happen with a real model; never loop
            raise IrisInputError("out of memory on the CPU as well: close other programs or segment a smaller (cropped) volume")
        warnings.warn(msg)
        log.warning(msg)

    def _to_label_map(self, probs: torch.Tensor, grid: WorkingGrid, labels: list[int]) -> np.ndarray:
        """On the target grid, the label of the most probable class (the first on ties) where its probability
        is >= threshold, else 0. Streamed: the probabilities are resampled a slab of target rows at a time
        (about SLAB_VALUES floats), so no target-sized float array is made; the label map is filled in place."""
        dtype = np.uint8 if max(labels) < 256 else np.uint16 if max(labels) < 65536 else np.int32
        out = np.zeros(grid.shape, dtype)
        rows = grid.reoriented_view(out)  # writing rows of this view writes `out`
        values = torch.tensor(labels, dtype=torch.int32)
        n, ny, nz = rows.shape
        step = max(1, SLAB_VALUES // (probs.shape[0] * ny * nz))
        for start in range(0, n, step):
            best, arg = grid.from_working_rows(probs, start, min(n, start + step)).max(0)
            rows[start : start + step] = values[arg].masked_fill_(~(best >= self.config.inference.threshold), 0).numpy()
        return out
