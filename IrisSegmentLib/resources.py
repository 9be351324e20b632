"""Where bundled models and sample data live."""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL = "iris-small"


def resources_dir() -> Path:
    """$IRIS_SEGMENT_RESOURCES, else the `Resources/` folder beside the IrisSegmentLib package."""
    env = os.environ.get("IRIS_SEGMENT_RESOURCES")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "Resources"


def model_dir(name_or_path: str | os.PathLike | None = None) -> Path:
    """A model folder (config.yaml + weights.safetensors) by bundled name or by path."""
    p = Path(name_or_path or DEFAULT_MODEL)
    if p.is_dir():
        return p
    bundled = resources_dir() / "Models" / str(name_or_path or DEFAULT_MODEL)
    if bundled.is_dir():
        return bundled
    names = sorted(d.name for d in (resources_dir() / "Models").glob("*") if d.is_dir())
    from .errors import IrisInputError

    raise IrisInputError(f"model {str(name_or_path)!r} not found: give a folder with config.yaml and weights.safetensors, or one of {names}")


def sample_data_dir() -> Path:
    return resources_dir() / "SampleData"
