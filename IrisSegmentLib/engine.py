"""The front ends' engine, without Slicer: references as arrays, the model kept loaded, the last task embedding reused,
torch work on one worker thread (`worker.py`) while the calling thread waits in short slices, and the library's
warnings collected for the user. It imports no slicer, vtk or qt: `mrml/` reads the scene into these arrays and
writes the result back, on the calling thread.

Every long step reports progress and checks `cancel` (`progress.py` says when Cancel takes effect in each).
"""
from __future__ import annotations

import hashlib
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from .errors import Cancelled, IrisInputError
from .inference.result import SegmentationResult
from .inference.segmenter import Segmenter, resolve_device
from .inference.task import Colour, TaskEmbedding, with_first_polarity
from .progress import Cancel, Progress, span
from .worker import Worker

WRITE_AT = 0.97  # share of a run's progress done when the segments are about to be added


@dataclass(frozen=True)
class SegmentInfo:
    """What a new segment inherits from its reference segment."""

    name: str
    colour: Colour
    terminology: str = ""


@dataclass
class Reference:
    """A reference volume and some of its segments, as arrays on the volume's grid."""

    image: np.ndarray
    affine: np.ndarray
    masks: list[np.ndarray]
    labels: list[int]  # label value of each mask in the task (1 + index of the segment in the main reference)

    def label_map(self) -> np.ndarray:
        out = np.zeros(self.masks[0].shape, np.uint16)
        for mask, value in zip(self.masks, self.labels):
            out[mask] = value
        return out

    def disjoint(self) -> bool:
        return len(self.masks) == 1 or int(np.sum(self.masks, axis=0, dtype=np.uint16).max()) <= 1

    def digest(self) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        for a in (self.image, self.affine, *self.masks, np.asarray(self.labels)):
            h.update(str((a.shape, a.dtype)).encode())
            h.update(np.ascontiguousarray(a).data)
        return h.digest()


@dataclass
class RunInfo:
    """What the status line reports about the last computation."""

    device: str
    seconds: float
    windows: int
    memory: str = ""  # GPU memory, when a GPU was used
    reused_task: bool = False
    localisation: str = "none"  # "registration": segmented only where the registered reference structures can be
    warnings: list[str] = field(default_factory=list)  # the engine's (e.g. a failed registration), for the user
    stage_seconds: dict[str, float] = field(default_factory=dict)


class Engine:
    """What stays between runs: the loaded model per device, the last task embedding, the worker thread.

    `model`: a bundled model name, a model folder, or a ready `Segmenter` (None: the bundled default).
    `wait`: when set, torch work runs on the worker thread and `wait()` is called on the calling
    thread every `slice_s` seconds until it finishes (in Slicer: process GUI events); progress
    reports are delivered on the calling thread.
    """

    def __init__(self, model: str | os.PathLike | Segmenter | None = None, wait: Callable[[], None] | None = None,
                 slice_s: float = 0.05):
        self.model = model
        self.wait = wait
        self.slice_s = slice_s
        self.last: RunInfo | None = None
        self._segmenters: dict[str, Segmenter] = {}
        self._task_key: tuple | None = None
        self._task: TaskEmbedding | None = None
        self._worker: Worker | None = None
        self._busy = False

    def segmenter(self, device: str = "auto", report: Progress | None = None) -> Segmenter:
        """The model on `device`, loaded once (`report` is told when it loads)."""
        if isinstance(self.model, Segmenter):
            return self.model
        key = str(resolve_device(device))
        if key not in self._segmenters:
            if report is not None:
                report(0.0, f"loading the model on {key} (first run only)")
            self._segmenters[key] = Segmenter.load(self.model, key)
        return self._segmenters[key]

    def run(self, fn: Callable[[Progress], object], progress: Progress | None = None):
        """fn(report) on the worker thread (or here when there is no `wait`); its reports reach `progress` here."""
        report = progress or (lambda f, m: None)
        if self.wait is None:
            return fn(report)
        if self._busy:
            raise IrisInputError("IrisSegment is already running: wait for it to finish or cancel it")
        self._busy = True
        try:
            self._worker = self._worker or Worker()
            return self._worker.run(fn, report, self.wait, self.slice_s)
        finally:
            self._busy = False

    def task(self, segmenter: Segmenter, references: list[Reference], infos: list[SegmentInfo], tuning_steps: int,
             report: Progress, cancel: Cancel | None = None) -> tuple[TaskEmbedding, bool]:
        """Task embedding of the references (context ensemble, optional in-context tuning), and whether the last one
        was reused. `report` spans encoding (and tuning); `cancel()` is checked between structures and tuning steps."""
        key = (segmenter.model_id, tuning_steps, tuple(r.digest() for r in references), tuple(infos))
        if key == self._task_key:
            return self._task, True
        names, colours = [i.name for i in infos], [i.colour for i in infos]
        encoded = 0.3 if tuning_steps > 0 else 1.0  # share of `report` for encoding
        n = len(references)
        tasks = with_first_polarity([
            lambda polarity, j=j, r=r: _encode(segmenter, r, names, colours, span(
                report, encoded * j / n, encoded * (j + 1) / n, f"reference {j + 1}/{n}: " if n > 1 else ""), cancel, polarity)
            for j, r in enumerate(references)])
        task = TaskEmbedding.ensemble(tasks) if len(tasks) > 1 else tasks[0]
        if tuning_steps > 0:
            task = segmenter.tune(task, [(r.image, r.affine, r.label_map()) for r in references], steps=tuning_steps,
                                  progress=span(report, encoded, 1.0), cancel=cancel)
        self._task_key, self._task = key, task
        return task, False

    def segment(self, image: np.ndarray, affine: np.ndarray, references: Sequence[Reference], infos: Sequence[SegmentInfo],
                saved: TaskEmbedding | None = None, device: str = "auto", progress: Progress | None = None,
                cancel: Cancel | None = None, *, overlap: float | None = None, tuning_steps: int = 0,
                localise: str | None = None, postprocess: bool = True) -> tuple[SegmentationResult, RunInfo]:
        """The target segmented with the `saved` task, or with the references' task (encoded, or the last one reused);
        progress runs to `WRITE_AT`. The library's warnings meanwhile are in the run info (also `self.last`)."""
        cancelled = cancel or (lambda: False)

        def work(report: Progress) -> tuple[SegmentationResult, RunInfo]:
            t0 = time.perf_counter()
            segmenter = self._load(device, report, cancelled)
            if segmenter.device.type == "cuda":
                import torch

                torch.cuda.reset_peak_memory_stats(segmenter.device)
            encoded = 0.05 if saved is not None else 0.15 if tuning_steps <= 0 else 0.35  # share before segmenting
            embedding, reused = (saved, False) if saved is not None else self.task(
                segmenter, list(references), list(infos), tuning_steps, span(report, 0.05, encoded), cancelled)
            if cancelled():
                raise Cancelled("segmentation cancelled")
            report(encoded, "preparing the target")
            result = segmenter.segment(image, affine, embedding, overlap=overlap, progress=span(report, encoded, WRITE_AT),
                                       cancel=cancelled, localise=localise, postprocess=postprocess)
            run = RunInfo(result.device, time.perf_counter() - t0, result.windows, _gpu_memory(result.device), reused,
                          result.localisation, list(result.warnings), dict(result.stage_seconds))
            return result, run

        issued: list[str] = []
        with _library_warnings(issued):
            result, run = self.run(work, progress)
        run.warnings = list(dict.fromkeys([*run.warnings, *issued]))
        self.last = run
        return result, run

    def encode(self, references: Sequence[Reference], infos: Sequence[SegmentInfo], device: str = "auto",
               progress: Progress | None = None, cancel: Cancel | None = None, tuning_steps: int = 0) -> TaskEmbedding:
        """The references' task embedding (as `segment` makes it), to save and reuse without them; progress runs to
        `WRITE_AT`. Cancel (loading, encoding, tuning) raises Cancelled."""
        cancelled = cancel or (lambda: False)

        def work(report: Progress) -> TaskEmbedding:
            segmenter = self._load(device, report, cancelled)
            task = self.task(segmenter, list(references), list(infos), tuning_steps, span(report, 0.05, WRITE_AT), cancelled)[0]
            if cancelled():
                raise Cancelled("encoding cancelled")
            return task

        return self.run(work, progress)

    def _load(self, device: str, report: Progress, cancel: Cancel) -> Segmenter:
        """The model, loaded on the first run (it cannot be interrupted: `cancel` is checked once it is in)."""
        if cancel():
            raise Cancelled("segmentation cancelled")
        segmenter = self.segmenter(device, span(report, 0.0, 0.05))
        if cancel():
            raise Cancelled("segmentation cancelled")
        return segmenter


def _encode(segmenter: Segmenter, ref: Reference, names: list[str], colours: list[Colour], report: Progress,
            cancel: Cancel | None, polarity: float | None = None) -> TaskEmbedding:
    """One reference's embedding (`polarity` None: chosen); overlapping segments are encoded one by one so none hides
    another, all with the polarity chosen for the first."""
    if ref.disjoint():
        return segmenter.encode(ref.image, ref.affine, ref.label_map(), ref.labels, [names[v - 1] for v in ref.labels],
                                [colours[v - 1] for v in ref.labels], progress=report, cancel=cancel, polarity=polarity)
    k = len(ref.labels)
    return TaskEmbedding.ensemble(with_first_polarity([
        lambda first, i=i, mask=mask, v=v: segmenter.encode(
            ref.image, ref.affine, mask.astype(np.uint8) * v, [v], [names[v - 1]], [colours[v - 1]],
            progress=span(report, i / k, (i + 1) / k), cancel=cancel, polarity=first)
        for i, (mask, v) in enumerate(zip(ref.masks, ref.labels))], polarity))


def _gpu_memory(device: str) -> str:
    import torch

    if not device.startswith("cuda"):
        return ""
    dev = torch.device(device)
    total = torch.cuda.get_device_properties(dev).total_memory / 2**30
    return f"GPU memory peak {torch.cuda.max_memory_allocated(dev) / 2**30:.1f} of {total:.0f} GiB"


def device_choices() -> list[tuple[str, str]]:
    """(value, label) for the device selector, with what was detected."""
    import torch

    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = f"{p.name}, {p.total_memory / 2**30:.0f} GiB"
        return [("auto", f"auto (GPU: {gpu})"), ("cuda", f"GPU: {gpu}"), ("cpu", "CPU")]
    return [("auto", "auto (CPU: no CUDA GPU detected)"), ("cpu", "CPU")]


_DEFAULT: Engine | None = None


def default_engine() -> Engine:
    """The engine the front ends use when given none: the model stays loaded between calls."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Engine()
    return _DEFAULT


_PACKAGE_DIR = os.path.realpath(os.path.dirname(__file__)) + os.sep


@contextmanager
def _library_warnings(into: list[str]) -> Iterator[None]:
    """Collects the user warnings this library issues meanwhile (also on the worker thread) into `into`, to show
    them to the user; other warnings are shown as usual."""
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.filterwarnings("always", category=UserWarning, module=r"IrisSegmentLib(\.|$)")
            yield
    finally:
        for w in caught:
            if issubclass(w.category, UserWarning) and os.path.realpath(w.filename).startswith(_PACKAGE_DIR):
                into.append(str(w.message))
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
