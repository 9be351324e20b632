"""Per-segment confidence: how far to trust each output segment, as an estimated Dice.

Features, all by-products of one segmentation (no extra pass over the target):
- `mean_prob`: mean probability inside the predicted segment;
- `disagreement`: mean spread (standard deviation) of the overlapping windows' probabilities where any
  window gives >= 0.25: every window is a variant that saw the structure in another context;
- `boundary`: log(1 + voxels at 0.25-0.75 per predicted voxel): how soft the segment is;
- `volume_ratio`: |log(predicted volume / reference volume)|, capped at log(100): the same structure in
  another subject rarely differs 3x in size, false positives everywhere or nothing found do;
- `self_dice`: how well the task segments its own reference crop (measured when encoding);
- `prior_agreement`: Dice between the network's segment and the registration prior's, before they are
  combined (0 without a prior: nothing localised the structure).
A calibration (`Calibration`, shipped beside the weights as `confidence.json`, fitted on the
validation split by `python -m benchmarks.accuracy --tables calibration --fit`) maps them to an estimated
Dice: ridge least squares on the logit of the Dice of validation pairs. A segment with no voxel gets 0.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..atomic import write_atomic
from ..io import file_sha256

FEATURES = ("mean_prob", "disagreement", "boundary", "volume_ratio", "self_dice", "prior_agreement")
CALIBRATION_FILE = "confidence.json"
MAX_LOG_RATIO = math.log(100.0)


def features(probs: torch.Tensor, spread: torch.Tensor, voxel_ml: float, references: list[dict]) -> list[dict[str, float]]:
    """Per class: the features above from probabilities and window spread (K, X, Y, Z) on the working
    grid; `references`: per class {"ml", "self_dice"} from the task (missing keys: feature left out)."""
    out = []
    for k in range(probs.shape[0]):
        p, s = probs[k], spread[k]
        fg = p >= 0.5
        n = int(fg.sum())
        near = p >= 0.25
        f = {"voxels": float(n),
             "mean_prob": float(p[fg].mean()) if n else 0.0,
             "disagreement": float(s[near].mean()) if bool(near.any()) else 0.0,
             "boundary": math.log1p(float(((p >= 0.25) & (p < 0.75)).sum()) / max(n, 1))}
        ref = references[k] if k < len(references) else {}
        if ref.get("ml"):
            ratio = abs(math.log(max(n * voxel_ml, 1e-6) / ref["ml"]))
            f["volume_ratio"] = min(ratio, MAX_LOG_RATIO)
        if "self_dice" in ref:
            f["self_dice"] = float(ref["self_dice"])
        out.append(f)
    return out


def prior_agreement(probs: torch.Tensor, prior: torch.Tensor, region: torch.Tensor) -> list[float]:
    """Per class, the Dice of (network >= 0.5) and (prior >= 0.5) inside `region` (1 where both are empty)."""
    out = []
    for p, q in zip(probs, prior):
        a, b = (p >= 0.5) & region, q >= 0.5
        n = float(a.sum() + b.sum())
        out.append(1.0 if n == 0 else 2.0 * float((a & b).sum()) / n)
    return out


def _logit(d: np.ndarray) -> np.ndarray:
    d = np.clip(d, 0.02, 0.98)
    return np.log(d / (1 - d))


@dataclass
class Calibration:
    """Features -> estimated Dice: sigmoid(bias + weights . standardised features); a missing feature
    counts as its mean. `features`: the names it was fitted on (a calibration from before a feature existed
    still works without it)."""

    mean: list[float]
    std: list[float]
    weights: list[float]
    bias: float
    weights_sha256: str = ""
    flag_below: float = 0.5
    fitted_on: dict = field(default_factory=dict)
    features: tuple[str, ...] = FEATURES

    def matrix(self, rows: list[dict[str, float]]) -> np.ndarray:
        z = np.array([[r.get(f, m) for f, m in zip(self.features, self.mean)] for r in rows], dtype=np.float64).reshape(-1, len(self.features))
        return (z - np.array(self.mean)) / np.array(self.std)

    def predict(self, rows: list[dict[str, float]]) -> list[float]:
        if not rows:
            return []
        s = self.bias + self.matrix(rows) @ np.array(self.weights)
        est = 1.0 / (1.0 + np.exp(-s))
        return [0.0 if r.get("voxels", 1.0) == 0 else round(float(e), 4) for r, e in zip(rows, est)]

    @classmethod
    def fit(cls, rows: list[dict[str, float]], dice: list[float], ridge: float = 1.0, **kw) -> "Calibration":
        """Least squares on logit(Dice) over segments with voxels, features standardised."""
        keep = [i for i, r in enumerate(rows) if r.get("voxels", 1.0) > 0]
        if len(keep) < len(FEATURES) + 2:
            raise ValueError(f"{len(keep)} segments with voxels: too few to fit a calibration")
        raw = np.array([[rows[i].get(f, np.nan) for f in FEATURES] for i in keep], dtype=np.float64)
        mean = np.nanmean(raw, 0)
        mean = np.where(np.isnan(mean), 0.0, mean)
        raw = np.where(np.isnan(raw), mean, raw)
        std = raw.std(0)
        std = np.where(std < 1e-9, 1.0, std)
        z = (raw - mean) / std
        y = _logit(np.array([dice[i] for i in keep]))
        a = np.c_[np.ones(len(z)), z]
        reg = ridge * np.eye(a.shape[1])
        reg[0, 0] = 0.0
        coef = np.linalg.solve(a.T @ a + reg, a.T @ y)
        return cls(mean.tolist(), std.tolist(), coef[1:].tolist(), float(coef[0]), **kw)

    def save(self, path: str | Path) -> None:
        """JSON, atomically."""
        data = {**self.__dict__, "features": list(self.features)}
        write_atomic(path, json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        data = json.loads(Path(path).read_text())
        names = tuple(data.pop("features"))
        if set(names) - set(FEATURES) or len(names) != len(data["mean"]):
            raise ValueError(f"{path}: fitted on other features; refit it")
        return cls(**data, features=names)


def load_calibration(folder: Path) -> Calibration | None:
    """The model folder's confidence calibration, if it has one fitted on exactly its weights (else a warning)."""
    from ..weights import WEIGHTS

    path = folder / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        cal = Calibration.load(path)
    except (ValueError, TypeError, KeyError) as e:
        warnings.warn(f"{path}: unreadable confidence calibration ({e}); segments get no estimated Dice")
        return None
    if cal.weights_sha256 != file_sha256(folder / WEIGHTS):
        warnings.warn(f"{path} was fitted on other weights than {folder / WEIGHTS}; segments get no estimated Dice until it is "
                      "refitted (python -m benchmarks.accuracy --tables calibration --fit)")
        return None
    return cal
