"""The bundled sample pair as a data set of Slicer's Sample Data module: a reference MRI with its segmentation
and a target MRI of another subject, loaded from the files bundled with the extension (no download)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

CATEGORY = "IRIS Segment"
SAMPLE_NAME = "IRIS hippocampus pair"
# (file in the sample data folder, node name, Slicer file type): reference image, its segmentation, target image
FILES = (
    ("hippocampus_001_image.nii.gz", "hippocampus_001_image", "VolumeFile"),
    ("hippocampus_001_label.seg.nrrd", "hippocampus_001 reference labels", "SegmentationFile"),
    ("hippocampus_003_image.nii.gz", "hippocampus_003_image", "VolumeFile"),
)


def sample_data_dir(module_dir: str | Path) -> Path:
    """Where IrisSegmentLib's resources put the sample data, seen from the module's folder: $IRIS_SEGMENT_RESOURCES,
    else Resources/SampleData beside the module (extension build) or beside its parent (source checkout)."""
    env = os.environ.get("IRIS_SEGMENT_RESOURCES")
    if env:
        return Path(env) / "SampleData"
    here = Path(module_dir)
    built, checkout = here / "Resources" / "SampleData", here.parent / "Resources" / "SampleData"
    return built if (built / FILES[0][0]).is_file() else checkout


def source(module_dir: str | Path, thumbnail: str | Path) -> dict:
    """Keyword arguments of SampleData.SampleDataLogic.registerCustomSampleDataSource for the bundled pair; the
    checksums make Slicer's cache copy follow the bundled files."""
    folder = sample_data_dir(module_dir)
    paths = [folder / name for name, _, _ in FILES]
    return {
        "category": CATEGORY,
        "sampleName": SAMPLE_NAME,
        "thumbnailFileName": str(thumbnail),
        "uris": [p.as_uri() for p in paths],
        "fileNames": [p.name for p in paths],
        "nodeNames": [node for _, node, _ in FILES],
        "loadFileTypes": [kind for _, _, kind in FILES],
        "checksums": ["SHA256:" + hashlib.sha256(p.read_bytes()).hexdigest() for p in paths],
    }
