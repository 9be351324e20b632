"""The IRIS network, tensors only: no files, no geometry, no device choices. `build_iris(cfg)` makes one."""
from .build import build_iris
from .iris import IrisModel

__all__ = ["IrisModel", "build_iris"]
