"""What `Segmenter.segment` returns, with the product rule on it: which segments are flagged for review."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .task import Colour


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
    localisation: str = "none"  # how the structures were found: "registration" or "none" (whole field of view)
    warnings: list[str] = field(default_factory=list)  # what went wrong on the way (e.g. a failed registration)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # prepare, localise, windows, merge, label map, post-process
    prior: np.ndarray | None = None  # with keep_prior: the localisation prior (K, I, J, K) on the target grid, float16
    flag_below: float | None = None  # the calibration's threshold (None: no calibration)

    @property
    def flagged(self) -> set[int]:
        """The labels whose estimated Dice is below `flag_below`: check those segments before using them."""
        if self.flag_below is None:
            return set()
        return {v for v, est in self.confidence.items() if est < self.flag_below}
