"""Reading references from the scene: segments by ID or name, as masks on the reference volume's grid."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import slicer
import vtk

from ..engine import Reference, SegmentInfo
from ..errors import IrisInputError
from .convert import BINARY_LABELMAP, empty_grid, image_array, volume_array


def segment_info(segment) -> SegmentInfo:
    """A segment's name, colour and terminology."""
    tag = vtk.reference("")
    has = segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), tag)
    return SegmentInfo(segment.GetName(), tuple(float(c) for c in segment.GetColor()), str(tag) if has else "")


def resolve_segment_ids(segmentation_node, ids_or_names: Sequence[str] | None) -> list[str]:
    """Segment IDs from IDs or names; None or empty means every segment."""
    segmentation = segmentation_node.GetSegmentation()
    all_ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    if not ids_or_names:
        if not all_ids:
            raise IrisInputError(f"'{segmentation_node.GetName()}' has no segments: draw the structures on the reference first")
        return all_ids
    out = []
    for x in ids_or_names:
        sid = x if segmentation.GetSegment(x) else segmentation.GetSegmentIdBySegmentName(x)
        if not sid:
            names = [segmentation.GetSegment(s).GetName() for s in all_ids]
            raise IrisInputError(f"segment {x!r} is not in '{segmentation_node.GetName()}' (it has {names})")
        out.append(sid)
    return out


def segment_masks(segmentation_node, segment_ids: Sequence[str], shape: Sequence[int], ijk_to_world: np.ndarray) -> list[np.ndarray]:
    """Each segment as a boolean (i, j, k) mask on the given grid (nearest-neighbour, parent transforms applied)."""
    segmentation = segmentation_node.GetSegmentation()
    if not segmentation.ContainsRepresentation(BINARY_LABELMAP):
        segmentation_node.CreateBinaryLabelmapRepresentation()
    grid = empty_grid(shape, ijk_to_world)
    masks = []
    for sid in segment_ids:
        world = slicer.vtkOrientedImageData()
        resampled = slicer.vtkOrientedImageData()
        if not (slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(segmentation_node, sid, world, True)
                and slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(world, grid, resampled, False, False)):
            raise IrisInputError(f"segment '{segmentation.GetSegment(sid).GetName()}' of '{segmentation_node.GetName()}' could not be read as a labelmap: "
                                 "convert the segmentation to a binary labelmap first (Segmentations module, Representations)")
        # The labelmap may be shared with other segments: this segment is its own label value.
        masks.append(image_array(resampled, shape) == segmentation.GetSegment(sid).GetLabelValue())
    return masks


def _segment_has_voxels(segmentation_node, segment_id: str) -> bool:
    """Whether the segment holds any voxel at all, wherever it lies."""
    image = slicer.vtkOrientedImageData()
    if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(segmentation_node, segment_id, image, False):
        return False
    value = segmentation_node.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    return bool((image_array(image, image.GetDimensions()) == value).any())


def read_reference(volume_node, segmentation_node, segment_ids: Sequence[str] | None) -> tuple[Reference, list[SegmentInfo]]:
    """The main reference: its image and the chosen segments (IDs or names) in the volume's geometry."""
    if volume_node is None or segmentation_node is None:
        raise IrisInputError("a reference needs both a volume and a segmentation drawn on it")
    ids = resolve_segment_ids(segmentation_node, segment_ids)
    image, affine = volume_array(volume_node)
    masks = segment_masks(segmentation_node, ids, image.shape[:3], affine)
    infos = [segment_info(segmentation_node.GetSegmentation().GetSegment(s)) for s in ids]
    for sid, mask, info in zip(ids, masks, infos):
        if not mask.any():
            if _segment_has_voxels(segmentation_node, sid):
                raise IrisInputError(
                    f"segment '{info.name}' of '{segmentation_node.GetName()}' lies outside the reference volume '{volume_node.GetName()}' "
                    "(they do not overlap in space): pick the volume it was drawn on, or check their transforms")
            raise IrisInputError(f"segment '{info.name}' is empty on '{volume_node.GetName()}': draw it on this volume first (or check that it overlaps it)")
    return Reference(image, affine, masks, list(range(1, len(ids) + 1))), infos


def source_volume(segmentation_node):
    """The volume a segmentation was drawn on (set by the Segment Editor), or None."""
    return segmentation_node.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())


def read_extra_reference(volume_node, segmentation_node, infos: Sequence[SegmentInfo]) -> Reference:
    """Another reference for the context ensemble: its segments named like the main reference's ones."""
    volume_node = volume_node or source_volume(segmentation_node)
    if volume_node is None:
        raise IrisInputError(f"extra reference '{segmentation_node.GetName()}' has no volume: select its source volume in the Segment Editor first")
    segmentation = segmentation_node.GetSegmentation()
    by_name = {segmentation.GetSegment(segmentation.GetNthSegmentID(i)).GetName().strip().lower(): segmentation.GetNthSegmentID(i)
               for i in range(segmentation.GetNumberOfSegments())}
    found = [(by_name[i.name.strip().lower()], v) for v, i in enumerate(infos, 1) if i.name.strip().lower() in by_name]
    if not found:
        raise IrisInputError(f"extra reference '{segmentation_node.GetName()}' has none of the segments {[i.name for i in infos]} (segments are matched by name)")
    image, affine = volume_array(volume_node)
    masks = segment_masks(segmentation_node, [s for s, _ in found], image.shape[:3], affine)
    kept = [(m, v) for m, (_, v) in zip(masks, found) if m.any()]
    if not kept:
        raise IrisInputError(f"extra reference '{segmentation_node.GetName()}': the matching segments are empty on '{volume_node.GetName()}': "
                             "draw them on that volume, or check that they overlap it")
    return Reference(image, affine, [m for m, _ in kept], [v for _, v in kept])
