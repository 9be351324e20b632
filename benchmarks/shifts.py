"""Domain shifts for the generalisation benchmark: new contrasts and new acquisition geometries.

Intensity shifts act on a raw image (before the engine's normalisation) and are deterministic, so a
reference and its query get the same new contrast:
- `invert`: the contrast reversed about the volume's own 0.5-99.5 percentile range;
- `cosine`: a non-monotonic remap, cos(3 pi u) of the percentile-scaled intensity u (three monotonic
  pieces: dark and bright tissue can end up alike);
- `rendered`: a new contrast rendered from the labels, SynthSeg-style: every labelled structure and
  each of five intensity bands of the unlabelled image gets a random intensity from one fixed table
  (blurred, noise, bias field).

Geometry shifts resample a query onto a new grid in the same world space (`reslice`): another voxel
size, slice thickness (slab-averaged), orientation (axial, sagittal, coronal, with a tilt) and field
of view; the label map goes along by nearest neighbour at slice centres.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from IrisSegmentLib.training import synth

CONTRAST_SEED = 11  # the intensity table of the rendered contrast, shared by references and queries
BANDS = 5  # intensity bands of the unlabelled image in the rendered contrast


def _range(image: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(image, (0.5, 99.5))
    return float(lo), float(max(hi, lo + 1e-6))


def invert(image: np.ndarray, label: np.ndarray, seed: int) -> np.ndarray:
    lo, hi = _range(image)
    return (lo + hi - image).astype(np.float32)


def cosine(image: np.ndarray, label: np.ndarray, seed: int) -> np.ndarray:
    lo, hi = _range(image)
    u = np.clip((image - lo) / (hi - lo), 0.0, 1.0)
    return np.cos(3.0 * math.pi * u).astype(np.float32)


def rendered(image: np.ndarray, label: np.ndarray, seed: int) -> np.ndarray:
    """Regions: intensity bands (quantiles of the unlabelled voxels) and the structures; `seed`: the noise."""
    free = label == 0
    edges = np.quantile(image[free], np.linspace(0, 1, BANDS + 1)[1:-1]) if free.any() else np.array([])
    regions = np.where(free, np.digitize(image, edges), BANDS + np.clip(label, 0, None))
    means, stds = synth.random_modality(int(regions.max()) + 1, torch.Generator().manual_seed(CONTRAST_SEED))
    img = synth.render(torch.from_numpy(regions.astype(np.int64)), means, stds, torch.Generator().manual_seed(seed))
    return img.numpy().astype(np.float32)


INTENSITY = {"inverted contrast": invert, "non-monotonic remap": cosine, "rendered new contrast": rendered}

# Voxel axes of a resliced grid, as world (RAS) axes; the last one is the slice axis.
ORIENTATIONS = {"axial": (0, 1, 2), "coronal": (0, 2, 1), "sagittal": (1, 2, 0)}


@dataclass(frozen=True)
class Geometry:
    """A new acquisition grid: in-plane and slice spacing (mm), orientation, a tilt (degrees, about the
    first in-plane axis) and the field of view as a fraction of the original extent per axis."""

    in_plane: float
    slice: float
    orientation: str = "axial"
    tilt: float = 0.0
    fov: float = 1.0


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    x, y, z = axis / np.linalg.norm(axis)
    k = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * k @ k


def new_grid(shape, affine: np.ndarray, geo: Geometry) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and voxel-to-world matrix of the resliced grid, centred on the original volume's centre."""
    axes = np.eye(3)[:, list(ORIENTATIONS[geo.orientation])]
    axes = _rotation(axes[:, 0], geo.tilt) @ axes
    corners = np.array([[i, j, k, 1] for i in (-0.5, shape[0] - 0.5) for j in (-0.5, shape[1] - 0.5) for k in (-0.5, shape[2] - 0.5)])
    world = (affine @ corners.T)[:3].T
    centre = world.mean(0)
    extent = np.ptp(world @ axes, axis=0) * geo.fov
    spacing = np.array([geo.in_plane, geo.in_plane, geo.slice])
    out_shape = tuple(int(max(1, round(e / s))) for e, s in zip(extent, spacing))
    out = np.eye(4)
    out[:3, :3] = axes * spacing
    out[:3, 3] = centre - out[:3, :3] @ ((np.array(out_shape) - 1) / 2)
    return out_shape, out


def _sample(volume: np.ndarray, affine: np.ndarray, points: np.ndarray, mode: str) -> np.ndarray:
    """`volume` at world `points` (N, 3); 0 outside."""
    idx = (np.linalg.inv(affine) @ np.c_[points, np.ones(len(points))].T)[:3].T
    n = np.array(volume.shape, dtype=np.float64)
    norm = 2 * idx / np.maximum(n - 1, 1) - 1
    grid = torch.from_numpy(norm[:, ::-1].copy()).float().view(1, -1, 1, 1, 3)
    vol = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    return F.grid_sample(vol, grid, mode=mode, padding_mode="zeros", align_corners=True).view(-1).numpy()


def reslice(image: np.ndarray, affine: np.ndarray, label: np.ndarray, geo: Geometry,
            slab_samples: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, affine, label) on the grid of `geo`: each image voxel the mean over its slice thickness
    (`slab_samples` points), background (the image minimum) outside the original field of view."""
    shape, out = new_grid(image.shape, affine, geo)
    ijk = np.stack(np.meshgrid(*(np.arange(s) for s in shape), indexing="ij"), -1).reshape(-1, 3).astype(np.float64)
    centres = (out @ np.c_[ijk, np.ones(len(ijk))].T)[:3].T
    floor = float(image.min())
    step = out[:3, 2]  # one slice, in world mm
    offsets = (np.arange(slab_samples) + 0.5) / slab_samples - 0.5
    img = np.mean([_sample(image - floor, affine, centres + o * step, "bilinear") for o in offsets], axis=0) + floor
    lab = _sample(label.astype(np.float32), affine, centres, "nearest")
    return img.reshape(shape).astype(np.float32), out, np.rint(lab).reshape(shape).astype(label.dtype)


GEOMETRY = {
    "thick 5 mm axial slices": Geometry(in_plane=1.0, slice=5.0),
    "sagittal 4 mm slices, 15° tilt": Geometry(in_plane=1.0, slice=4.0, orientation="sagittal", tilt=15.0),
    "2.5 mm isotropic voxels": Geometry(in_plane=2.5, slice=2.5),
    "coronal, 70 % field of view": Geometry(in_plane=1.25, slice=1.25, orientation="coronal", fov=0.7),
}
