"""Segmenting from the scene: the inputs read here, the work done by an `Engine` (on its worker thread), the result
kept as a `Pending` until `write_segments` adds it."""
from __future__ import annotations

import os
from typing import Sequence

from ..config import LOCALISE_MODES
from ..engine import Engine, SegmentInfo, default_engine
from ..errors import IrisInputError
from ..inference.task import TaskEmbedding
from ..progress import Cancel, Progress
from .convert import volume_array
from .read import read_extra_reference, read_reference
from .write import Pending, before_writing, create_output_segmentation, write_segments


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
    engine = engine or default_engine()
    image, affine = volume_array(target_volume_node)
    if task is not None:
        saved = task if isinstance(task, TaskEmbedding) else TaskEmbedding.load(task)
        references, infos = [], [SegmentInfo(n, tuple(c)) for n, c in zip(saved.names, saved.colours)]
    else:
        saved = None
        main, infos = read_reference(reference_volume_node, reference_segmentation_node, reference_segment_ids)
        references = [main] + [read_extra_reference(v, s, infos) for v, s in extra_references]
    result, run = engine.segment(image, affine, references, infos, saved, device, progress, cancel, overlap=overlap,
                                 tuning_steps=tuning_steps, localise=localise, postprocess=postprocess)
    return Pending(target_volume_node, affine, result.label_map, list(result.labels), infos, run, dict(result.confidence),
                   result.flag_below, result.flagged)


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
    before_writing(progress, cancel)
    output = output_segmentation_node or create_output_segmentation(target_volume_node)
    ids = write_segments(pending, output, show_3d=show_3d)
    if progress is not None:
        progress(1.0, "done")
    return ids
