"""Writing results into the scene: new segments only, all or none (what was added is removed on a failure)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import slicer

from ..engine import WRITE_AT, RunInfo, SegmentInfo
from ..errors import Cancelled, IrisInputError
from ..inference.task import Colour
from ..progress import Cancel, Progress
from .convert import BINARY_LABELMAP, oriented_image, to_world

ESTIMATED_DICE_TAG = "IrisSegment.EstimatedDice"  # segment tags: saved with the scene and in .seg.nrrd
LOW_CONFIDENCE_TAG = "IrisSegment.LowConfidence"

# (segmentation node, segment name, colour, binary labelmap in the node's coordinates) -> new segment ID
AddSegment = Callable[[object, str, Colour, object], str]


@dataclass
class Pending:
    """Computed segments not yet in the scene: a label map on the target grid and what each label becomes."""

    target_node: object
    ijk_to_world: np.ndarray
    label_map: np.ndarray
    labels: list[int]
    infos: list[SegmentInfo]
    run: RunInfo
    confidence: dict[int, float] = field(default_factory=dict)  # estimated Dice per label (model with a calibration)
    flag_below: float | None = None  # the calibration's threshold
    flagged: set[int] = field(default_factory=set)  # labels estimated below it (`SegmentationResult.flagged`)


def before_writing(progress: Progress | None, cancel: Cancel | None, what: str = "adding the segments") -> None:
    """The last moment to cancel: `what` is reported, then Cancelled raised if cancel() is true, so that a Cancel
    clicked while the result was computed still adds (or writes) nothing."""
    if progress is not None:
        progress(WRITE_AT, what)
    if cancel is not None and cancel():
        raise Cancelled("segmentation cancelled")


def unique_name(name: str, taken: set[str]) -> str:
    """`name`, or "name (2)", "name (3)"... when it is taken."""
    if name not in taken:
        return name
    n = 2
    while f"{name} ({n})" in taken:
        n += 1
    return f"{name} ({n})"


def create_output_segmentation(target_volume_node, name: str | None = None):
    """A new segmentation for results on the target: same parent transform, beside it in the subject hierarchy."""
    scene = target_volume_node.GetScene()
    if scene is None:
        raise IrisInputError(f"'{target_volume_node.GetName()}' is no longer in the scene; pick another target volume")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or f"{target_volume_node.GetName()} IRIS")
    node.CreateDefaultDisplayNodes()
    node.SetAndObserveTransformNodeID(target_volume_node.GetTransformNodeID())
    node.SetReferenceImageGeometryParameterFromVolumeNode(target_volume_node)
    node.SetNodeReferenceID(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole(), target_volume_node.GetID())
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    target_item = hierarchy.GetItemByDataNode(target_volume_node) if hierarchy else 0
    if target_item:
        parent = hierarchy.GetItemParent(target_item)
        item = hierarchy.GetItemByDataNode(node) or hierarchy.CreateItem(parent, node)
        hierarchy.SetItemParent(item, parent)
    return node


def write_segments(pending: Pending, output_segmentation_node, add: AddSegment | None = None, show_3d: bool = False) -> list[str]:
    """Adds one segment per computed label in the target's geometry; returns their IDs.

    Existing segments are never changed (a clashing name gets " (2)"); on any failure the segments
    added so far are removed. `add` replaces the default way of adding one binary segment (the
    Segment Editor effect uses it to respect the editor's masking).
    """
    node = output_segmentation_node
    if node is None or node.GetScene() is None:
        raise IrisInputError("the output segmentation is no longer in the scene; select another output")
    segmentation = node.GetSegmentation()
    existing = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    if existing and segmentation.GetSourceRepresentationName() != BINARY_LABELMAP:
        raise IrisInputError(f"'{node.GetName()}' stores {segmentation.GetSourceRepresentationName()}s, not labelmaps; pick another output segmentation")
    segmentation.SetSourceRepresentationName(BINARY_LABELMAP)
    if not existing:
        node.SetReferenceImageGeometryParameterFromVolumeNode(pending.target_node)
    local = np.linalg.inv(to_world(node)) @ pending.ijk_to_world
    taken = {segmentation.GetSegment(s).GetName() for s in existing}
    names = []
    for info in pending.infos:
        names.append(unique_name(info.name, taken))
        taken.add(names[-1])
    labels = np.asarray(pending.label_map)
    labels = labels.astype(np.uint8 if max(pending.labels, default=0) < 256 else np.uint16, copy=False)
    added: list[str] = []
    try:
        if add is None:
            shared = oriented_image(labels, local)  # one new labelmap layer shared by the new segments
            segments = []
            for value, name, info in zip(pending.labels, names, pending.infos):
                segment = _segment(name, info)
                segment.AddRepresentation(BINARY_LABELMAP, shared)
                segment.SetLabelValue(value)
                segments.append(segment)
            for segment in segments:
                sid = segmentation.GenerateUniqueSegmentID(segment.GetName())
                if not segmentation.AddSegment(segment, sid):
                    raise RuntimeError(f"could not add segment '{segment.GetName()}' to '{node.GetName()}'")
                added.append(sid)
        else:
            for value, name, info in zip(pending.labels, names, pending.infos):
                sid = add(node, name, info.colour, oriented_image((labels == value).astype(np.uint8), local))
                added.append(sid)
                if info.terminology:
                    segmentation.GetSegment(sid).SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), info.terminology)
        for sid, value in zip(added, pending.labels):
            if value in pending.confidence:
                segment = segmentation.GetSegment(sid)
                segment.SetTag(ESTIMATED_DICE_TAG, f"{pending.confidence[value]:.3f}")
                segment.SetTag(LOW_CONFIDENCE_TAG, "true" if value in pending.flagged else "false")
    except BaseException:
        for sid in added:
            segmentation.RemoveSegment(sid)
        raise
    node.CreateDefaultDisplayNodes()
    if show_3d:
        node.CreateClosedSurfaceRepresentation()
    return added


def _segment(name: str, info: SegmentInfo):
    segment = slicer.vtkSegment()
    segment.SetName(name)
    segment.SetColor(*info.colour)
    segment.SetNameAutoGenerated(False)
    segment.SetColorAutoGenerated(False)
    if info.terminology:
        segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), info.terminology)
    return segment
