"""Bridge between a 3D Slicer MRML scene and the engine: the only library module that imports slicer/vtk.

Qt-free, so it runs inside Slicer and headless (the `slicer-core` wheel). Reading inputs and writing
segments happen on the calling thread; torch work runs through an `Engine`, which can hand it to one
long-lived worker thread that never touches MRML while the caller waits in short slices.

Arrays are indexed (i, j, k) in the voxel order of their IJK-to-world matrix, world in RAS mm;
vtk image scalars are stored k-slowest, hence the transposes below.
"""
from __future__ import annotations

import hashlib
import os
import queue
import re
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .config import LOCALISE_MODES
from .errors import Cancelled, IrisInputError
from .inference.segmenter import Cancel, Progress, Segmenter, resolve_device
from .inference.task import Colour, TaskEmbedding

BINARY_LABELMAP = "Binary labelmap"
TASK_SUFFIX = ".task.safetensors"
ESTIMATED_DICE_TAG = "IrisSegment.EstimatedDice"  # segment tags: saved with the scene and in .seg.nrrd
LOW_CONFIDENCE_TAG = "IrisSegment.LowConfidence"

# (segmentation node, segment name, colour, binary labelmap in the node's coordinates) -> new segment ID
AddSegment = Callable[[object, str, Colour, object], str]


# -- geometry ----------------------------------------------------------------------------------
def _to_numpy(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _to_vtk(array: np.ndarray):
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r, c]))
    return m


def to_world(node) -> np.ndarray:
    """4x4 from the node's coordinates to world: its linear parent transforms; non-linear ones are refused."""
    transform = node.GetParentTransformNode()
    if transform is None:
        return np.eye(4)
    if not transform.IsTransformToWorldLinear():
        raise IrisInputError(
            f"'{node.GetName()}' is under the non-linear transform '{transform.GetName()}'; harden it first "
            "(Data module: right-click the node, 'Harden transform')")
    m = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(m)
    return _to_numpy(m)


def volume_array(volume_node) -> tuple[np.ndarray, np.ndarray]:
    """A copy of the voxels, indexed (i, j, k), and the 4x4 IJK-to-world RAS matrix (parent transforms applied)."""
    image = volume_node.GetImageData() if volume_node is not None else None
    if image is None or image.GetPointData().GetScalars() is None:
        name = volume_node.GetName() if volume_node is not None else "no volume"
        raise IrisInputError(f"'{name}' has no image data: load a volume or pick another one")
    ni, nj, nk = image.GetDimensions()
    comps = image.GetNumberOfScalarComponents()
    kji = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(nk, nj, ni, comps)
    array = kji.copy().transpose(2, 1, 0, 3)  # copy: the worker must not see later edits or a freed buffer
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return (array[..., 0] if comps == 1 else array), to_world(volume_node) @ _to_numpy(m)


def _oriented_image(array: np.ndarray, ijk_to_world: np.ndarray):
    """vtkOrientedImageData holding an (i, j, k) integer array with the given geometry."""
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(*array.shape)
    kind = {np.dtype(np.uint8): vtk.VTK_UNSIGNED_CHAR, np.dtype(np.uint16): vtk.VTK_UNSIGNED_SHORT}[array.dtype]
    flat = np.ascontiguousarray(array.transpose(2, 1, 0)).ravel()
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(flat, deep=True, array_type=kind))
    image.SetImageToWorldMatrix(_to_vtk(ijk_to_world))
    return image


def _geometry(shape: Sequence[int], ijk_to_world: np.ndarray):
    """An oriented image with the given grid and no voxels: the target of a resampling."""
    image = slicer.vtkOrientedImageData()
    image.SetExtent(0, shape[0] - 1, 0, shape[1] - 1, 0, shape[2] - 1)
    image.SetImageToWorldMatrix(_to_vtk(ijk_to_world))
    return image


def _image_array(image, shape: Sequence[int]) -> np.ndarray:
    """(i, j, k) voxels of an oriented image resampled onto a `shape` grid (zeros when it holds none)."""
    scalars = image.GetPointData().GetScalars()
    if scalars is None:
        return np.zeros(shape, np.uint8)
    return numpy_support.vtk_to_numpy(scalars).reshape(tuple(shape)[::-1]).transpose(2, 1, 0)


# -- segments ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SegmentInfo:
    """What a new segment inherits from its reference segment."""

    name: str
    colour: Colour
    terminology: str = ""


def _info(segment) -> SegmentInfo:
    tag = vtk.reference("")
    has = segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), tag)
    return SegmentInfo(segment.GetName(), tuple(float(c) for c in segment.GetColor()), str(tag) if has else "")


def resolve_segment_ids(segmentation_node, ids_or_names: Sequence[str] | None) -> list[str]:
    """Segment IDs from IDs or names; None or empty means every segment."""
    segmentation = segmentation_node.GetSegmentation()
    all_ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    if not ids_or_names:
        if not all_ids:
            raise IrisInputError(f"'{segmentation_node.GetName()}' has no segments: draw the structures on the reference first")
        return all_ids
    out = []
    for x in ids_or_names:
        sid = x if segmentation.GetSegment(x) else segmentation.GetSegmentIdBySegmentName(x)
        if not sid:
            names = [segmentation.GetSegment(s).GetName() for s in all_ids]
            raise IrisInputError(f"segment {x!r} is not in '{segmentation_node.GetName()}' (it has {names})")
        out.append(sid)
    return out


def segment_masks(segmentation_node, segment_ids: Sequence[str], shape: Sequence[int], ijk_to_world: np.ndarray) -> list[np.ndarray]:
    """Each segment as a boolean (i, j, k) mask on the given grid (nearest-neighbour, parent transforms applied)."""
    segmentation = segmentation_node.GetSegmentation()
    if not segmentation.ContainsRepresentation(BINARY_LABELMAP):
        segmentation_node.CreateBinaryLabelmapRepresentation()
    grid = _geometry(shape, ijk_to_world)
    masks = []
    for sid in segment_ids:
        world = slicer.vtkOrientedImageData()
        resampled = slicer.vtkOrientedImageData()
        if not (slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(segmentation_node, sid, world, True)
                and slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(world, grid, resampled, False, False)):
            raise IrisInputError(f"segment '{segmentation.GetSegment(sid).GetName()}' of '{segmentation_node.GetName()}' could not be read as a labelmap: "
                                 "convert the segmentation to a binary labelmap first (Segmentations module, Representations)")
        # The labelmap may be shared with other segments: this segment is its own label value.
        masks.append(_image_array(resampled, shape) == segmentation.GetSegment(sid).GetLabelValue())
    return masks


def _segment_has_voxels(segmentation_node, segment_id: str) -> bool:
    """Whether the segment holds any voxel at all, wherever it lies."""
    image = slicer.vtkOrientedImageData()
    if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(segmentation_node, segment_id, image, False):
        return False
    value = segmentation_node.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    return bool((_image_array(image, image.GetDimensions()) == value).any())


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


def read_reference(volume_node, segmentation_node, segment_ids: Sequence[str] | None) -> tuple[Reference, list[SegmentInfo]]:
    """The main reference: its image and the chosen segments (IDs or names) in the volume's geometry."""
    if volume_node is None or segmentation_node is None:
        raise IrisInputError("a reference needs both a volume and a segmentation drawn on it")
    ids = resolve_segment_ids(segmentation_node, segment_ids)
    image, affine = volume_array(volume_node)
    masks = segment_masks(segmentation_node, ids, image.shape[:3], affine)
    infos = [_info(segmentation_node.GetSegmentation().GetSegment(s)) for s in ids]
    for sid, mask, info in zip(ids, masks, infos):
        if not mask.any():
            if _segment_has_voxels(segmentation_node, sid):
                raise IrisInputError(
                    f"segment '{info.name}' of '{segmentation_node.GetName()}' lies outside the reference volume '{volume_node.GetName()}' "
                    "(they do not overlap in space): pick the volume it was drawn on, or check their transforms")
            raise IrisInputError(f"segment '{info.name}' is empty on '{volume_node.GetName()}': draw it on this volume first (or check that it overlaps it)")
    return Reference(image, affine, masks, list(range(1, len(ids) + 1))), infos


def source_volume(segmentation_node):
    """The volume a segmentation was drawn on (set by the Segment Editor), or None."""
    return segmentation_node.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())


def read_extra_reference(volume_node, segmentation_node, infos: Sequence[SegmentInfo]) -> Reference:
    """Another reference for the context ensemble: its segments named like the main reference's ones."""
    volume_node = volume_node or source_volume(segmentation_node)
    if volume_node is None:
        raise IrisInputError(f"extra reference '{segmentation_node.GetName()}' has no volume: select its source volume in the Segment Editor first")
    segmentation = segmentation_node.GetSegmentation()
    by_name = {segmentation.GetSegment(segmentation.GetNthSegmentID(i)).GetName().strip().lower(): segmentation.GetNthSegmentID(i)
               for i in range(segmentation.GetNumberOfSegments())}
    found = [(by_name[i.name.strip().lower()], v) for v, i in enumerate(infos, 1) if i.name.strip().lower() in by_name]
    if not found:
        raise IrisInputError(f"extra reference '{segmentation_node.GetName()}' has none of the segments {[i.name for i in infos]} (segments are matched by name)")
    image, affine = volume_array(volume_node)
    masks = segment_masks(segmentation_node, [s for s, _ in found], image.shape[:3], affine)
    kept = [(m, v) for m, (_, v) in zip(masks, found) if m.any()]
    if not kept:
        raise IrisInputError(f"extra reference '{segmentation_node.GetName()}': the matching segments are empty on '{volume_node.GetName()}': "
                             "draw them on that volume, or check that they overlap it")
    return Reference(image, affine, [m for m, _ in kept], [v for _, v in kept])


# -- compute -----------------------------------------------------------------------------------
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


@dataclass
class Pending:
    """Computed segments not yet in the scene: a label map on the target grid and what each label becomes."""

    target_node: object
    ijk_to_world: np.ndarray
    label_map: np.ndarray
    labels: list[int]
    infos: list[SegmentInfo]
    run: RunInfo
    confidence: dict[int, float] = field(default_factory=dict)  # estimated Dice per label (model with a calibration)
    flag_below: float | None = None  # segments estimated below this are flagged


class _Worker:
    """One long-lived daemon thread that runs submitted functions in order."""

    def __init__(self):
        self._jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._loop, name="IrisSegment worker", daemon=True).start()

    def _loop(self) -> None:
        while True:
            fn, box, done = self._jobs.get()
            try:
                box["result"] = fn()
            except BaseException as e:  # handed to the waiting thread, which re-raises it
                box["error"] = e
            finally:
                done.set()

    def submit(self, fn: Callable[[], object]) -> tuple[dict, threading.Event]:
        box, done = {}, threading.Event()
        self._jobs.put((fn, box, done))
        return box, done


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
        self._worker: _Worker | None = None
        self._busy = False

    def segmenter(self, device: str = "auto") -> Segmenter:
        """The model on `device`, loaded once."""
        if isinstance(self.model, Segmenter):
            return self.model
        key = str(resolve_device(device))
        if key not in self._segmenters:
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
        latest: list = []
        lock = threading.Lock()

        def relay(fraction: float, message: str) -> None:
            with lock:
                latest[:] = [(fraction, message)]

        def deliver() -> None:
            with lock:
                pending, latest[:] = list(latest), []
            for fraction, message in pending:
                report(fraction, message)

        try:
            self._worker = self._worker or _Worker()
            box, done = self._worker.submit(lambda: fn(relay))
            while not done.wait(self.slice_s):
                deliver()
                self.wait()
            deliver()
        finally:
            self._busy = False
        if "error" in box:
            raise box["error"]
        return box["result"]

    def task(self, segmenter: Segmenter, references: list[Reference], infos: list[SegmentInfo], tuning_steps: int,
             report: Progress) -> tuple[TaskEmbedding, bool]:
        """Task embedding of the references (context ensemble, optional in-context tuning), and whether the last one was reused."""
        key = (segmenter.model_id, tuning_steps, tuple(r.digest() for r in references), tuple(infos))
        if key == self._task_key:
            return self._task, True
        report(0.01, "encoding the reference")
        names, colours = [i.name for i in infos], [i.colour for i in infos]
        tasks = [_encode(segmenter, r, names, colours) for r in references]
        task = TaskEmbedding.ensemble(tasks) if len(tasks) > 1 else tasks[0]
        if tuning_steps > 0:
            report(0.03, f"in-context tuning ({tuning_steps} steps)")
            task = segmenter.tune(task, [(r.image, r.affine, r.label_map()) for r in references], steps=tuning_steps)
        self._task_key, self._task = key, task
        return task, False


def _encode(segmenter: Segmenter, ref: Reference, names: list[str], colours: list[Colour]) -> TaskEmbedding:
    """One reference's embedding; overlapping segments are encoded one by one so none hides another."""
    if ref.disjoint():
        return segmenter.encode(ref.image, ref.affine, ref.label_map(), ref.labels,
                                [names[v - 1] for v in ref.labels], [colours[v - 1] for v in ref.labels])
    return TaskEmbedding.ensemble([
        segmenter.encode(ref.image, ref.affine, mask.astype(np.uint8) * v, [v], [names[v - 1]], [colours[v - 1]])
        for mask, v in zip(ref.masks, ref.labels)
    ])


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


_ENGINE: Engine | None = None


def _default_engine() -> Engine:
    """The engine `segment_volume` uses when given none: the model stays loaded between calls."""
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = Engine()
    return _ENGINE


_PACKAGE_DIR = os.path.realpath(os.path.dirname(__file__)) + os.sep


@contextmanager
def _engine_warnings(into: list[str]):
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


def compute_segments(target_volume_node, reference_volume_node=None, reference_segmentation_node=None,
                     reference_segment_ids: Sequence[str] | None = None, device: str = "auto",
                     progress: Progress | None = None, cancel: Cancel | None = None, *,
                     extra_references: Sequence[tuple] = (), task: TaskEmbedding | str | os.PathLike | None = None,
                     overlap: float | None = None, tuning_steps: int = 0, localise: str | None = None,
                     postprocess: bool = True, engine: Engine | None = None) -> Pending:
    """Reads the inputs here, segments the target through the engine; nothing is written to the scene.

    Either a reference (volume, segmentation, segment IDs or names; None: all segments) with optional
    `extra_references` [(volume or None, segmentation)] for the context ensemble, or a saved `task`.
    `localise`: "auto", "registration" or "none" (None: the model's default), see `Segmenter.segment`;
    `postprocess`: the engine's clean-up (largest piece where the reference structure is one piece, holes filled).
    The engine's warnings (e.g. a failed registration) are in the result's `run.warnings`.
    """
    if localise is not None and localise not in LOCALISE_MODES:
        raise IrisInputError(f"unknown localisation {localise!r}: use one of {', '.join(LOCALISE_MODES)}")
    engine = engine or _default_engine()
    cancelled = cancel or (lambda: False)
    image, affine = volume_array(target_volume_node)
    if task is not None:
        saved = task if isinstance(task, TaskEmbedding) else TaskEmbedding.load(task)
        references, infos = [], [SegmentInfo(n, tuple(c)) for n, c in zip(saved.names, saved.colours)]
    else:
        saved = None
        main, infos = read_reference(reference_volume_node, reference_segmentation_node, reference_segment_ids)
        references = [main] + [read_extra_reference(v, s, infos) for v, s in extra_references]

    def work(report: Progress) -> Pending:
        t0 = time.perf_counter()
        report(0.0, "loading the model")
        segmenter = engine.segmenter(device)
        if segmenter.device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(segmenter.device)
        embedding, reused = (saved, False) if saved is not None else engine.task(segmenter, references, infos, tuning_steps, report)
        if cancelled():
            raise Cancelled("segmentation cancelled")
        result = segmenter.segment(image, affine, embedding, overlap=overlap, progress=report, cancel=cancelled,
                                   localise=localise, postprocess=postprocess)
        run = RunInfo(result.device, time.perf_counter() - t0, result.windows, _gpu_memory(result.device), reused,
                      result.localisation, list(result.warnings), dict(result.stage_seconds))
        flag = segmenter.calibration.flag_below if segmenter.calibration is not None else None
        return Pending(target_volume_node, affine, result.label_map, list(result.labels), infos, run, dict(result.confidence), flag)

    issued: list[str] = []
    with _engine_warnings(issued):
        pending = engine.run(work, progress)
    pending.run.warnings = list(dict.fromkeys([*pending.run.warnings, *issued]))
    engine.last = pending.run
    return pending


# -- write -------------------------------------------------------------------------------------
def unique_name(name: str, taken: set[str]) -> str:
    """`name`, or "name (2)", "name (3)"... when it is taken."""
    if name not in taken:
        return name
    n = 2
    while f"{name} ({n})" in taken:
        n += 1
    return f"{name} ({n})"


def create_output_segmentation(target_volume_node, name: str | None = None):
    """A new segmentation for results on the target: same parent transform, beside it in the subject hierarchy."""
    scene = target_volume_node.GetScene()
    if scene is None:
        raise IrisInputError(f"'{target_volume_node.GetName()}' is no longer in the scene; pick another target volume")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or f"{target_volume_node.GetName()} IRIS")
    node.CreateDefaultDisplayNodes()
    node.SetAndObserveTransformNodeID(target_volume_node.GetTransformNodeID())
    node.SetReferenceImageGeometryParameterFromVolumeNode(target_volume_node)
    node.SetNodeReferenceID(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole(), target_volume_node.GetID())
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    target_item = hierarchy.GetItemByDataNode(target_volume_node) if hierarchy else 0
    if target_item:
        parent = hierarchy.GetItemParent(target_item)
        item = hierarchy.GetItemByDataNode(node) or hierarchy.CreateItem(parent, node)
        hierarchy.SetItemParent(item, parent)
    return node


def write_segments(pending: Pending, output_segmentation_node, add: AddSegment | None = None, show_3d: bool = False) -> list[str]:
    """Adds one segment per computed label in the target's geometry; returns their IDs.

    Existing segments are never changed (a clashing name gets " (2)"); on any failure the segments
    added so far are removed. `add` replaces the default way of adding one binary segment (the
    Segment Editor effect uses it to respect the editor's masking).
    """
    node = output_segmentation_node
    if node is None or node.GetScene() is None:
        raise IrisInputError("the output segmentation is no longer in the scene; select another output")
    segmentation = node.GetSegmentation()
    existing = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    if existing and segmentation.GetSourceRepresentationName() != BINARY_LABELMAP:
        raise IrisInputError(f"'{node.GetName()}' stores {segmentation.GetSourceRepresentationName()}s, not labelmaps; pick another output segmentation")
    segmentation.SetSourceRepresentationName(BINARY_LABELMAP)
    if not existing:
        node.SetReferenceImageGeometryParameterFromVolumeNode(pending.target_node)
    local = np.linalg.inv(to_world(node)) @ pending.ijk_to_world
    taken = {segmentation.GetSegment(s).GetName() for s in existing}
    names = []
    for info in pending.infos:
        names.append(unique_name(info.name, taken))
        taken.add(names[-1])
    labels = np.asarray(pending.label_map)
    labels = labels.astype(np.uint8 if max(pending.labels, default=0) < 256 else np.uint16, copy=False)
    added: list[str] = []
    try:
        if add is None:
            shared = _oriented_image(labels, local)  # one new labelmap layer shared by the new segments
            segments = []
            for value, name, info in zip(pending.labels, names, pending.infos):
                segment = _segment(name, info)
                segment.AddRepresentation(BINARY_LABELMAP, shared)
                segment.SetLabelValue(value)
                segments.append(segment)
            for segment in segments:
                sid = segmentation.GenerateUniqueSegmentID(segment.GetName())
                if not segmentation.AddSegment(segment, sid):
                    raise RuntimeError(f"could not add segment '{segment.GetName()}' to '{node.GetName()}'")
                added.append(sid)
        else:
            for value, name, info in zip(pending.labels, names, pending.infos):
                sid = add(node, name, info.colour, _oriented_image((labels == value).astype(np.uint8), local))
                added.append(sid)
                if info.terminology:
                    segmentation.GetSegment(sid).SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), info.terminology)
        for sid, value in zip(added, pending.labels):
            if value in pending.confidence:
                est = pending.confidence[value]
                segment = segmentation.GetSegment(sid)
                segment.SetTag(ESTIMATED_DICE_TAG, f"{est:.3f}")
                segment.SetTag(LOW_CONFIDENCE_TAG, "true" if pending.flag_below is not None and est < pending.flag_below else "false")
    except BaseException:
        for sid in added:
            segmentation.RemoveSegment(sid)
        raise
    node.CreateDefaultDisplayNodes()
    if show_3d:
        node.CreateClosedSurfaceRepresentation()
    return added


def segment_confidence(segmentation_node, segment_ids: Sequence[str]) -> list[tuple[str, float | None, bool]]:
    """Per segment: name, estimated Dice (None where the segment has no estimate) and whether it is flagged
    low, from the segment tags (they are saved with the scene and in .seg.nrrd files)."""
    segmentation = segmentation_node.GetSegmentation()
    out = []
    for sid in segment_ids:
        segment = segmentation.GetSegment(sid)
        if segment is None:
            continue
        value, flag = vtk.reference(""), vtk.reference("")
        has = segment.GetTag(ESTIMATED_DICE_TAG, value)
        segment.GetTag(LOW_CONFIDENCE_TAG, flag)
        out.append((segment.GetName(), float(str(value)) if has else None, str(flag) == "true"))
    return out


def localisation_text(run: RunInfo) -> str:
    """How the structures were found, as a sentence for the status."""
    if run.localisation == "registration":
        seconds = run.stage_seconds.get("localise")
        took = f" ({seconds:.1f} s)" if seconds is not None else ""
        return f"Localised by registration{took}: segmented only where the reference structures can be."
    return "Not localised: segmented the whole field of view."


def status_text(run: RunInfo, output_segmentation_node, segment_ids: Sequence[str]) -> str:
    """What was added, how fast, how it was localised, the engine's warnings, and each segment's estimated Dice
    (flagged where low): the status the module panel and the Segment Editor effect show."""
    segmentation = output_segmentation_node.GetSegmentation()
    names = ", ".join(segmentation.GetSegment(s).GetName() for s in segment_ids if segmentation.GetSegment(s) is not None)
    extra = "".join(f"; {x}" for x in (run.memory, "reused the reference embedding" if run.reused_task else "") if x)
    lines = [f"Added {names or 'no segment'} to '{output_segmentation_node.GetName()}' in {run.seconds:.1f} s on {run.device}{extra}.",
             localisation_text(run)]
    lines += [f"Warning: {w}" for w in run.warnings]
    for name, est, low in segment_confidence(output_segmentation_node, segment_ids):
        if est is not None:
            lines.append(f"{name}: estimated Dice {est:.2f}" + ("  LOW: check this segment before using it" if low else ""))
    return "\n".join(lines)


def _segment(name: str, info: SegmentInfo):
    segment = slicer.vtkSegment()
    segment.SetName(name)
    segment.SetColor(*info.colour)
    segment.SetNameAutoGenerated(False)
    segment.SetColorAutoGenerated(False)
    if info.terminology:
        segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), info.terminology)
    return segment


def segment_volume(target_volume_node, reference_volume_node, reference_segmentation_node, reference_segment_ids,
                   output_segmentation_node, device: str = "auto", progress: Progress | None = None,
                   cancel: Cancel | None = None, **options) -> list[str]:
    """Segments the target like the reference segments and adds the results to the output; returns the new segment IDs.

    `output_segmentation_node` None creates one beside the target. Nothing is added when cancelled
    or on error. `options`: extra_references, task, overlap, tuning_steps, localise, postprocess, engine
    (see `compute_segments`) and show_3d.
    """
    show_3d = options.pop("show_3d", False)
    pending = compute_segments(target_volume_node, reference_volume_node, reference_segmentation_node, reference_segment_ids,
                               device, progress, cancel, **options)
    if cancel is not None and cancel():
        raise Cancelled("segmentation cancelled")
    output = output_segmentation_node or create_output_segmentation(target_volume_node)
    return write_segments(pending, output, show_3d=show_3d)


# -- saved tasks -------------------------------------------------------------------------------
def encode_task(reference_volume_node, reference_segmentation_node, reference_segment_ids, device: str = "auto",
                progress: Progress | None = None, *, extra_references: Sequence[tuple] = (), tuning_steps: int = 0,
                engine: Engine | None = None) -> TaskEmbedding:
    """The task embedding of a reference (as `compute_segments` makes it), to save and reuse without the reference."""
    engine = engine or _default_engine()
    main, infos = read_reference(reference_volume_node, reference_segmentation_node, reference_segment_ids)
    references = [main] + [read_extra_reference(v, s, infos) for v, s in extra_references]
    return engine.run(lambda report: engine.task(engine.segmenter(device), references, infos, tuning_steps, report)[0], progress)


def _file_name(name: str) -> str:
    clean = re.sub(r"[^\w .-]+", "_", name).strip(" ._")
    if not clean:
        raise IrisInputError("give the task a name (letters or digits)")
    return clean


def save_task(task: TaskEmbedding, folder: str | os.PathLike, name: str) -> Path:
    """Writes `task` as <folder>/<name>.task.safetensors (replacing one of the same name)."""
    path = Path(folder) / (_file_name(name) + TASK_SUFFIX)
    path.parent.mkdir(parents=True, exist_ok=True)
    task.save(path)
    return path


def saved_tasks(folder: str | os.PathLike) -> dict[str, Path]:
    """Saved tasks in `folder` by name, sorted."""
    d = Path(folder)
    files = sorted(d.glob("*" + TASK_SUFFIX)) if d.is_dir() else []
    return {p.name[: -len(TASK_SUFFIX)]: p for p in files}
