"""Files <-> (array, affine): the only module that reads or writes image files."""
from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .errors import IrisInputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _nib():
    import nibabel

    return nibabel


def read_image(path: str | Path) -> tuple[np.ndarray, np.ndarray, object]:
    """Returns (array in voxel order, 4x4 voxel-to-RAS, header) for a NIfTI file."""
    p = Path(path)
    if not p.exists():
        raise IrisInputError(f"{p}: file not found; check the path")
    if not str(p).endswith(NIFTI_SUFFIXES):
        raise IrisInputError(f"{p}: not a NIfTI file (.nii or .nii.gz); convert it first, e.g. with 3D Slicer or SimpleITK")
    nib = _nib()
    try:
        img = nib.load(str(p))
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for broken files
        raise IrisInputError(f"{p}: cannot be read as NIfTI ({e}); is the file complete?") from None
    return data, np.asarray(img.affine, dtype=np.float64), img.header


def check_output(path: str | Path, overwrite: bool = False, suffixes: tuple[str, ...] = NIFTI_SUFFIXES) -> Path:
    """An output path that can be written: right suffix, existing folder, no file replaced unless `overwrite`."""
    p = Path(path)
    if not str(p).endswith(suffixes):
        raise IrisInputError(f"{p}: output must end in {' or '.join(suffixes)}")
    if not p.parent.is_dir():
        raise IrisInputError(f"{p.parent}: output folder does not exist; create it first")
    if p.is_dir():
        raise IrisInputError(f"{p} is a folder; give a file name inside it")
    if p.exists() and not overwrite:
        raise IrisInputError(f"{p} exists; pass --overwrite to replace it")
    return p


def world_box(shape, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest world (RAS mm) coordinates of a grid's voxels, outer faces included."""
    corners = np.array(list(itertools.product(*[(-0.5, n - 0.5) for n in tuple(shape)[:3]])))
    world = corners @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    return world.min(0), world.max(0)


def check_label_on_image(image: np.ndarray, affine: np.ndarray, label: np.ndarray, label_affine: np.ndarray,
                         image_name: str, label_name: str) -> None:
    """A label map must be drawn on its image: the same voxel grid. Says which of space, shape or geometry differs."""
    (lo_i, hi_i), (lo_l, hi_l) = world_box(image.shape, affine), world_box(label.shape, label_affine)
    if np.any(hi_l <= lo_i) or np.any(hi_i <= lo_l):
        def span(lo, hi):
            return ", ".join(f"{axis} {a:.1f}..{b:.1f}" for axis, a, b in zip("RAS", lo, hi))

        raise IrisInputError(f"{label_name} and {image_name} do not overlap in space (label: {span(lo_l, hi_l)} mm; "
                             f"image: {span(lo_i, hi_i)} mm): give the label map drawn on this image")
    if tuple(image.shape[:3]) != tuple(label.shape[:3]):
        raise IrisInputError(f"{image_name} {tuple(image.shape[:3])} and {label_name} {tuple(label.shape[:3])} differ in shape: "
                             "give the label map drawn on this image, or resample it onto the image first (nearest neighbour)")
    if not np.allclose(affine, label_affine, atol=1e-3):
        raise IrisInputError(f"{image_name} and {label_name} have the same shape but different geometry; the label must be drawn on this image")


def write_label_map(path: str | Path, labels: np.ndarray, affine: np.ndarray, header=None, overwrite: bool = False) -> None:
    """Writes an integer label map with the given geometry; atomic (temporary file, then rename)."""
    top = int(labels.max(initial=0))
    dtype = np.uint8 if top < 256 else np.uint16 if top < 65536 else np.int32
    write_volume(path, labels.astype(dtype), affine, header, overwrite)


def write_volume(path: str | Path, data: np.ndarray, affine: np.ndarray, header=None, overwrite: bool = False) -> None:
    """Writes `data` (3D, or 4D: one volume per structure) in its own dtype with the given geometry, unscaled;
    atomic (temporary file, then rename)."""
    p = check_output(path, overwrite)
    nib = _nib()
    hdr = header.copy() if header is not None else None
    img = nib.Nifti1Image(data, affine, hdr)
    img.set_data_dtype(data.dtype)
    img.header.set_slope_inter(1, 0)
    if hdr is not None:
        img.set_qform(affine, int(hdr["qform_code"]) or 1)
        img.set_sform(affine, int(hdr["sform_code"]) or 1)
    with atomic_path(p) as tmp:
        nib.save(img, str(tmp))


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
