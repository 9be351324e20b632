"""Task files from the scene: a reference encoded once, saved by name in a folder, listed for reuse."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

from ..engine import Engine, default_engine
from ..errors import IrisInputError
from ..inference.task import TaskEmbedding
from ..progress import Cancel, Progress
from .read import read_extra_reference, read_reference

TASK_SUFFIX = ".task.safetensors"


def encode_task(reference_volume_node, reference_segmentation_node, reference_segment_ids, device: str = "auto",
                progress: Progress | None = None, cancel: Cancel | None = None, *, extra_references: Sequence[tuple] = (),
                tuning_steps: int = 0, engine: Engine | None = None) -> TaskEmbedding:
    """The task embedding of a reference (as `compute_segments` makes it), to save and reuse without the reference.
    Cancel (loading, encoding, tuning) raises Cancelled."""
    engine = engine or default_engine()
    main, infos = read_reference(reference_volume_node, reference_segmentation_node, reference_segment_ids)
    references = [main] + [read_extra_reference(v, s, infos) for v, s in extra_references]
    return engine.encode(references, infos, device, progress, cancel, tuning_steps)


def _file_name(name: str) -> str:
    clean = re.sub(r"[^\w .-]+", "_", name).strip(" ._")
    if not clean:
        raise IrisInputError("give the task a name (letters or digits)")
    return clean


def task_path(folder: str | os.PathLike, name: str) -> Path:
    """Where `save_task` writes the task `name`."""
    return Path(folder) / (_file_name(name) + TASK_SUFFIX)


def save_task(task: TaskEmbedding, folder: str | os.PathLike, name: str) -> Path:
    """Writes `task` as <folder>/<name>.task.safetensors (replacing one of the same name), atomically."""
    path = task_path(folder, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    task.save(path)
    return path


def saved_tasks(folder: str | os.PathLike) -> dict[str, Path]:
    """Saved tasks in `folder` by name, sorted."""
    d = Path(folder)
    files = sorted(d.glob("*" + TASK_SUFFIX)) if d.is_dir() else []
    return {p.name[: -len(TASK_SUFFIX)]: p for p in files}
