"""The IRIS network, tensors only: no files, no geometry, no device choices."""
from .iris import IrisModel

__all__ = ["IrisModel"]
