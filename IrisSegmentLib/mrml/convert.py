"""VTK <-> numpy: matrices, volumes and oriented images.

Arrays are indexed (i, j, k) in the voxel order of their IJK-to-world matrix, world in RAS mm;
vtk image scalars are stored k-slowest, hence the transposes below.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from ..errors import IrisInputError

BINARY_LABELMAP = "Binary labelmap"  # the segmentation representation read and written


def matrix_array(matrix) -> np.ndarray:
    """A vtkMatrix4x4 as a 4x4 array."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def vtk_matrix(array: np.ndarray):
    """A 4x4 array as a vtkMatrix4x4."""
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r, c]))
    return m


def to_world(node) -> np.ndarray:
    """4x4 from the node's coordinates to world: its linear parent transforms; non-linear ones are refused."""
    transform = node.GetParentTransformNode()
    if transform is None:
        return np.eye(4)
    if not transform.IsTransformToWorldLinear():
        raise IrisInputError(
            f"'{node.GetName()}' is under the non-linear transform '{transform.GetName()}'; harden it first "
            "(Data module: right-click the node, 'Harden transform')")
    m = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(m)
    return matrix_array(m)


def volume_array(volume_node) -> tuple[np.ndarray, np.ndarray]:
    """A copy of the voxels, indexed (i, j, k), and the 4x4 IJK-to-world RAS matrix (parent transforms applied)."""
    image = volume_node.GetImageData() if volume_node is not None else None
    if image is None or image.GetPointData().GetScalars() is None:
        name = volume_node.GetName() if volume_node is not None else "no volume"
        raise IrisInputError(f"'{name}' has no image data: load a volume or pick another one")
    ni, nj, nk = image.GetDimensions()
    comps = image.GetNumberOfScalarComponents()
    kji = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(nk, nj, ni, comps)
    array = kji.copy().transpose(2, 1, 0, 3)  # copy: the worker must not see later edits or a freed buffer
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return (array[..., 0] if comps == 1 else array), to_world(volume_node) @ matrix_array(m)


def oriented_image(array: np.ndarray, ijk_to_world: np.ndarray):
    """vtkOrientedImageData holding an (i, j, k) uint8 or uint16 array with the given geometry."""
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(*array.shape)
    kind = {np.dtype(np.uint8): vtk.VTK_UNSIGNED_CHAR, np.dtype(np.uint16): vtk.VTK_UNSIGNED_SHORT}[array.dtype]
    flat = np.ascontiguousarray(array.transpose(2, 1, 0)).ravel()
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(flat, deep=True, array_type=kind))
    image.SetImageToWorldMatrix(vtk_matrix(ijk_to_world))
    return image


def empty_grid(shape: Sequence[int], ijk_to_world: np.ndarray):
    """An oriented image with the given grid and no voxels: the target of a resampling."""
    image = slicer.vtkOrientedImageData()
    image.SetExtent(0, shape[0] - 1, 0, shape[1] - 1, 0, shape[2] - 1)
    image.SetImageToWorldMatrix(vtk_matrix(ijk_to_world))
    return image


def image_array(image, shape: Sequence[int]) -> np.ndarray:
    """(i, j, k) voxels of an oriented image resampled onto a `shape` grid (zeros when it holds none)."""
    scalars = image.GetPointData().GetScalars()
    if scalars is None:
        return np.zeros(shape, np.uint8)
    return numpy_support.vtk_to_numpy(scalars).reshape(tuple(shape)[::-1]).transpose(2, 1, 0)
