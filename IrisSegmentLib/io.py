"""Files <-> (array, affine): the only module that reads or writes image files."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

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


def write_label_map(path: str | Path, labels: np.ndarray, affine: np.ndarray, header=None, overwrite: bool = False) -> None:
    """Writes an integer label map with the given geometry; atomic (temporary file, then rename)."""
    p = Path(path)
    if not str(p).endswith(NIFTI_SUFFIXES):
        raise IrisInputError(f"{p}: output must end in .nii or .nii.gz")
    if not p.parent.exists():
        raise IrisInputError(f"{p.parent}: output folder does not exist; create it first")
    if p.exists() and not overwrite:
        raise IrisInputError(f"{p} exists; pass --overwrite to replace it")
    nib = _nib()
    top = int(labels.max(initial=0))
    dtype = np.uint8 if top < 256 else np.uint16 if top < 65536 else np.int32
    hdr = header.copy() if header is not None else None
    img = nib.Nifti1Image(labels.astype(dtype), affine, hdr)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1, 0)
    if hdr is not None:
        img.set_qform(affine, int(hdr["qform_code"]) or 1)
        img.set_sform(affine, int(hdr["sform_code"]) or 1)
    suffix = ".nii.gz" if str(p).endswith(".gz") else ".nii"
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".iris-", suffix=suffix)
    os.close(fd)
    try:
        nib.save(img, tmp)
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
