"""What the module panel and the Segment Editor effect show after a run: the status text and the segments' confidence."""
from __future__ import annotations

from typing import Sequence

import vtk

from ..engine import RunInfo
from .write import ESTIMATED_DICE_TAG, LOW_CONFIDENCE_TAG


def segment_confidence(segmentation_node, segment_ids: Sequence[str]) -> list[tuple[str, float | None, bool]]:
    """Per segment: name, estimated Dice (None where the segment has no estimate) and whether it is flagged
    low, from the segment tags (they are saved with the scene and in .seg.nrrd files)."""
    segmentation = segmentation_node.GetSegmentation()
    out = []
    for sid in segment_ids:
        segment = segmentation.GetSegment(sid)
        if segment is None:
            continue
        value, flag = vtk.reference(""), vtk.reference("")
        has = segment.GetTag(ESTIMATED_DICE_TAG, value)
        segment.GetTag(LOW_CONFIDENCE_TAG, flag)
        out.append((segment.GetName(), float(str(value)) if has else None, str(flag) == "true"))
    return out


def localisation_text(run: RunInfo) -> str:
    """How the structures were found, as a sentence for the status."""
    if run.localisation == "registration":
        seconds = run.stage_seconds.get("localise")
        took = f" ({seconds:.1f} s)" if seconds is not None else ""
        return f"Localised by registration{took}: segmented only where the reference structures can be."
    return "Not localised: segmented the whole field of view."


def status_text(run: RunInfo, output_segmentation_node, segment_ids: Sequence[str]) -> str:
    """What was added, how fast, how it was localised, the engine's warnings, and each segment's estimated Dice
    (flagged where low)."""
    segmentation = output_segmentation_node.GetSegmentation()
    names = ", ".join(segmentation.GetSegment(s).GetName() for s in segment_ids if segmentation.GetSegment(s) is not None)
    extra = "".join(f"; {x}" for x in (run.memory, "reused the reference embedding" if run.reused_task else "") if x)
    lines = [f"Added {names or 'no segment'} to '{output_segmentation_node.GetName()}' in {run.seconds:.1f} s on {run.device}{extra}.",
             localisation_text(run)]
    lines += [f"Warning: {w}" for w in run.warnings]
    for name, est, low in segment_confidence(output_segmentation_node, segment_ids):
        if est is not None:
            lines.append(f"{name}: estimated Dice {est:.2f}" + ("  LOW: check this segment before using it" if low else ""))
    return "\n".join(lines)
