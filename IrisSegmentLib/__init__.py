"""IrisSegmentLib: the IRIS in-context segmentation model and its inference engine.

    from IrisSegmentLib import Segmenter
    s = Segmenter.load()                                  # bundled model
    task = s.encode(image, affine, label, labels=[1, 3])  # numpy arrays + 4x4 voxel-to-world
    out = s.segment(target, target_affine, task)          # out.label_map aligned with the target
"""
from .config import BundleConfig, InferenceConfig, ModelConfig, TrainingConfig
from .errors import Cancelled, IrisInputError
from .inference.segmenter import SegmentationResult, Segmenter
from .inference.task import MemoryBank, TaskEmbedding

__version__ = "0.1.0"
__all__ = [
    "BundleConfig", "Cancelled", "InferenceConfig", "IrisInputError", "MemoryBank", "ModelConfig",
    "SegmentationResult", "Segmenter", "TaskEmbedding", "TrainingConfig", "__version__",
]
