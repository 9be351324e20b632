"""Reading one target study: NIfTI through nibabel (io.read_image), NRRD, MetaImage and DICOM-series folders through
SimpleITK, an optional extra (pip install "IrisSegmentLib[formats]"). Every reader returns the array in its voxel
order and the 4x4 voxel-to-RAS matrix, as io.read_image does; SimpleITK's LPS world is turned into RAS here."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import io
from ..errors import IrisInputError

SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_SUFFIXES = io.NIFTI_SUFFIXES + SITK_SUFFIXES
INSTALL = 'pip install "IrisSegmentLib[formats]"'
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def image_suffix(path: str | Path) -> str | None:
    """The image suffix a file name ends with (.nii.gz before .nii), or None."""
    name = Path(path).name
    for s in (".nii.gz", ".nii"):
        if name.endswith(s):
            return s
    low = name.lower()
    return next((s for s in SITK_SUFFIXES if low.endswith(s)), None)


def is_nifti(path: str | Path) -> bool:
    return image_suffix(path) in io.NIFTI_SUFFIXES


def _sitk(path: Path):
    try:
        import SimpleITK
    except ImportError:
        kind = "DICOM series folders" if path.is_dir() else f"{image_suffix(path) or path.suffix} files"
        raise IrisInputError(f"{path}: reading {kind} needs SimpleITK: {INSTALL}") from None
    return SimpleITK


def _one_line(e: Exception) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    text = next((s for s in lines if "ERROR" in s or "error" in s), lines[0] if lines else type(e).__name__)
    return text if len(text) <= 200 else text[:197] + "..."


def _check_exists(p: Path) -> None:
    if not p.exists():
        raise IrisInputError(f"{p}: file not found; check the path")


def _unsupported(p: Path) -> IrisInputError:
    return IrisInputError(f"{p}: not an image IrisSegment reads (NIfTI .nii/.nii.gz; with SimpleITK: NRRD .nrrd/.nhdr, "
                          "MetaImage .mha/.mhd, or a folder holding one DICOM series); convert it first")


def affine_from_sitk(dimension: int, spacing, origin, direction) -> np.ndarray:
    """4x4 voxel-to-RAS from SimpleITK's LPS geometry (direction row-major, columns = index axes); 2D images get a
    unit third axis, 4D images keep their first three."""
    d = np.asarray(direction, dtype=np.float64).reshape(dimension, dimension)
    lin, org = np.eye(3), np.zeros(3)
    k = min(dimension, 3)
    lin[:k, :k] = d[:k, :k] * np.asarray(spacing, dtype=np.float64)[:k]
    org[:k] = np.asarray(origin, dtype=np.float64)[:k]
    a = np.eye(4)
    a[:3, :3] = LPS_TO_RAS @ lin
    a[:3, 3] = LPS_TO_RAS @ org
    return a


def _dicom_files(sitk, p: Path) -> list[str]:
    try:
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(p))
    except RuntimeError as e:
        raise IrisInputError(f"{p}: cannot list DICOM series ({_one_line(e)})") from None
    if not ids:
        raise IrisInputError(f"{p}: a folder but no DICOM series in it; give image files, or a folder holding one DICOM series")
    if len(ids) > 1:
        raise IrisInputError(f"{p}: holds {len(ids)} DICOM series; put each series in its own folder (one study per folder)")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(p), ids[0]))


def _read_sitk(p: Path):
    sitk = _sitk(p)
    try:
        if p.is_dir():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(_dicom_files(sitk, p))
            img = reader.Execute()
        else:
            img = sitk.ReadImage(str(p))
    except RuntimeError as e:
        what = "a DICOM series" if p.is_dir() else image_suffix(p)
        raise IrisInputError(f"{p}: cannot be read as {what} ({_one_line(e)}); is it complete?") from None
    return sitk, img


def read_image(path: str | Path) -> tuple[np.ndarray, np.ndarray, object]:
    """(array in voxel order, 4x4 voxel-to-RAS, NIfTI header or None) of a target file or DICOM-series folder."""
    p = Path(path)
    _check_exists(p)
    if is_nifti(p):
        return io.read_image(p)
    if not p.is_dir() and image_suffix(p) is None:
        raise _unsupported(p)
    sitk, img = _read_sitk(p)
    arr = sitk.GetArrayFromImage(img)  # (z, y, x[, components]): reverse the index axes to (x, y, z)
    dim = img.GetDimension()
    order = tuple(range(dim - 1, -1, -1)) + tuple(range(dim, arr.ndim))
    arr = np.ascontiguousarray(arr.transpose(order))
    return arr, affine_from_sitk(dim, img.GetSpacing(), img.GetOrigin(), img.GetDirection()), None


def read_geometry(path: str | Path) -> tuple[tuple[int, ...], np.ndarray]:
    """(shape, 4x4 voxel-to-RAS) of a target without reading its voxels (a DICOM series is read whole)."""
    p = Path(path)
    _check_exists(p)
    if is_nifti(p):
        import nibabel

        try:
            img = nibabel.load(str(p))
            return tuple(int(n) for n in img.shape), np.asarray(img.affine, dtype=np.float64)
        except Exception as e:  # nibabel raises many types for broken files
            raise IrisInputError(f"{p}: cannot be read as NIfTI ({e}); is the file complete?") from None
    if p.is_dir():
        arr, affine, _ = read_image(p)
        return arr.shape, affine
    if image_suffix(p) is None:
        raise _unsupported(p)
    sitk = _sitk(p)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise IrisInputError(f"{p}: cannot be read as {image_suffix(p)} ({_one_line(e)}); is it complete?") from None
    dim = reader.GetDimension()
    shape = tuple(int(n) for n in reader.GetSize()) + ((reader.GetNumberOfComponents(),) if reader.GetNumberOfComponents() > 1 else ())
    return shape, affine_from_sitk(dim, reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())
