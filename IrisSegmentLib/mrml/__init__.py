"""Bridge between a 3D Slicer MRML scene and the engine: the only library package that imports slicer/vtk.

Qt-free, so it runs inside Slicer and headless (the `slicer-core` wheel). Reading inputs and writing segments
happen on the calling thread; the torch work runs through an `Engine` (`IrisSegmentLib/engine.py`, no Slicer),
which can hand it to its worker thread, which never touches VTK or MRML.

    convert.py   VTK <-> numpy: matrices, volumes, oriented images
    read.py      references: segments by ID or name as masks on the reference volume's grid
    compute.py   compute_segments (nothing written yet: a Pending) and segment_volume
    write.py     new segments in an output segmentation, all or none; confidence tags
    tasks.py     task files: encode, save by name, list
    status.py    the status text and the segments' estimated Dice, for the GUI
"""
from ..engine import WRITE_AT, Engine, Reference, RunInfo, SegmentInfo, device_choices
from .compute import compute_segments, segment_volume
from .convert import BINARY_LABELMAP, matrix_array, oriented_image, to_world, volume_array
from .read import read_extra_reference, read_reference, resolve_segment_ids, segment_masks, source_volume
from .status import localisation_text, segment_confidence, status_text
from .tasks import TASK_SUFFIX, encode_task, save_task, saved_tasks, task_path
from .write import (ESTIMATED_DICE_TAG, LOW_CONFIDENCE_TAG, AddSegment, Pending, before_writing,
                    create_output_segmentation, unique_name, write_segments)

__all__ = [
    "AddSegment", "BINARY_LABELMAP", "ESTIMATED_DICE_TAG", "Engine", "LOW_CONFIDENCE_TAG", "Pending", "Reference",
    "RunInfo", "SegmentInfo", "TASK_SUFFIX", "WRITE_AT", "before_writing", "compute_segments", "create_output_segmentation",
    "device_choices", "encode_task", "localisation_text", "matrix_array", "oriented_image", "read_extra_reference",
    "read_reference", "resolve_segment_ids", "save_task", "saved_tasks", "segment_confidence", "segment_masks",
    "segment_volume", "source_volume", "status_text", "task_path", "to_world", "unique_name", "volume_array",
    "write_segments",
]
