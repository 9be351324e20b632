"""What a batch run is: the model, the task and the inference options, and the task key that names them.

The task key is a short hash of everything that decides the label maps: the model's weights and config, the bytes of
the task's sources (the saved task file, or the reference images and label maps), the selected labels, and the
options (overlap, strategy, modality, localise; defaults resolved from the model's config). It is written into every row of
results.csv: a rerun with another key finds results of another task in the output folder and refuses to mix them
(unless --overwrite). The device is not part of it: CPU and GPU give the same task, up to floating-point rounding.
Hashing the inputs rather than the encoded tokens keeps the key stable when the encoding runs on a GPU, whose
floating-point results may differ in the last bits from run to run.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

CHUNK = 1 << 20


@dataclass(frozen=True)
class Options:
    model: str  # absolute model folder (workers load it from the same path: a shared file system)
    device: str  # as given on the command line (auto, cpu, cuda, cuda:1); each worker resolves it
    overlap: float
    strategy: str
    modality: str
    localise: str = "auto"


def digest(path: str | Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names and bytes, sorted)."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(f.relative_to(p).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(CHUNK), b""):
                h.update(block)
    return h.hexdigest()


def task_key(options: Options, sources: list[str | Path], labels: list[int] | None, model_files: list[str | Path]) -> str:
    """12 hex digits naming the model, the task's sources, the labels and the options (see the module docstring)."""
    content = {
        "model": [digest(f) for f in model_files],
        "sources": [digest(s) for s in sources],
        "labels": list(labels) if labels else None,  # the order decides ties
        "options": {k: v for k, v in asdict(options).items() if k not in ("model", "device")},
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]
