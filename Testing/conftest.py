"""Shared fixtures: the repository root, the tiny test network (seeded, NOT trained), NIfTI helpers,
analytic geometry helpers and an oracle model that segments by intensity.

The tiny network is randomly initialised from a fixed seed; tests that use it check plumbing,
shapes, geometry and file formats, never segmentation quality.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)  # share the CPU with other jobs on this machine
# training runs started by tests (and their CLI children) must not take the place of the machine's background
# training run in its pid file (IrisSegmentLib/training/pause.py): give the tests their own
os.environ["IRIS_TRAINING_PIDFILE"] = os.path.join(tempfile.mkdtemp(prefix="iris-test-"), "training.pid")

from IrisSegmentLib.config import BundleConfig  # noqa: E402
from IrisSegmentLib.model import IrisModel, build_iris  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO_ROOT / "Resources" / "Configs" / "tiny.yaml"
PRODUCT_CONFIG = REPO_ROOT / "Resources" / "Configs" / "iris-small.yaml"
SEED = 1234


# -- repository and configs ---------------------------------------------------------------------
@pytest.fixture(scope="session")
def repo_root() -> Path:
    assert (REPO_ROOT / "IrisSegmentLib" / "__init__.py").is_file()
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_cfg() -> BundleConfig:
    return BundleConfig.load(TINY_CONFIG)


def make_tiny_model(cfg: BundleConfig, seed: int = SEED) -> IrisModel:
    """The tiny network, randomly initialised from `seed` (untrained), eval mode."""
    torch.manual_seed(seed)
    return build_iris(cfg.model).eval()


@pytest.fixture()
def tiny_model(tiny_cfg) -> IrisModel:
    return make_tiny_model(tiny_cfg)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_cfg) -> Path:
    """A model folder (config.yaml + fp16 weights.safetensors) holding the seeded tiny network."""
    from IrisSegmentLib.weights import save_model

    d = tmp_path_factory.mktemp("models") / "tiny"
    save_model(make_tiny_model(tiny_cfg), tiny_cfg, d, info={"note": "seeded, untrained test network"})
    return d


@pytest.fixture(scope="session")
def tiny_model_dir_threshold0(tmp_path_factory, tiny_cfg) -> Path:
    """Same network, with inference.threshold 0: every voxel gets the arg-max class, so label
    values in the output are determined by the plumbing, not by the (untrained) network's output."""
    from IrisSegmentLib.weights import save_model

    cfg = dataclasses.replace(tiny_cfg, inference=dataclasses.replace(tiny_cfg.inference, threshold=0.0))
    d = tmp_path_factory.mktemp("models") / "tiny-t0"
    save_model(make_tiny_model(tiny_cfg), cfg, d)
    return d


# -- NIfTI --------------------------------------------------------------------------------------
def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64)), str(path))
    return path


def read_nifti(path: Path):
    import nibabel as nib

    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), img.affine, img.header


# -- geometry helpers ---------------------------------------------------------------------------
def rot_x(deg: float) -> np.ndarray:
    a = math.radians(deg)
    return np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])


def rot_y(deg: float) -> np.ndarray:
    a = math.radians(deg)
    return np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])


def rot_z(deg: float) -> np.ndarray:
    a = math.radians(deg)
    return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])


def make_affine(linear: np.ndarray, origin) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = linear
    a[:3, 3] = origin
    return a


def voxel_world(shape, affine) -> np.ndarray:
    """(*shape, 3) world coordinates of every voxel centre."""
    idx = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1).astype(np.float64)
    return idx @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


def ellipsoid_mask(shape, affine, centre, radii, rotation=np.eye(3)) -> np.ndarray:
    """Analytic ellipsoid (world centre, radii along the columns of `rotation`) on a voxel grid."""
    local = (voxel_world(shape, affine) - np.asarray(centre)) @ np.asarray(rotation)
    return ((local / np.asarray(radii)) ** 2).sum(-1) <= 1.0


def write_la2018_val(root: Path, cases=("A", "B", "C")) -> np.ndarray:
    """A tiny `la2018/val` under `root` for the benchmark tests: one subject per case, an ellipsoid
    'atrium' shifted per subject on one 1.5 mm grid; returns that grid's affine."""
    affine = make_affine(np.diag([1.5, 1.5, 1.5]), [0.0, 0.0, 0.0])
    rng = np.random.default_rng(0)
    la = root / "la2018" / "val"
    la.mkdir(parents=True)
    for i, cid in enumerate(cases):
        lab = ellipsoid_mask((24, 24, 20), affine, (15.0 + 3 * i, 18.0 - 2 * i, 15.0), (8, 7, 6)).astype(np.uint8)
        img = (100 + 500 * lab.astype(np.float32) + rng.normal(0, 20, lab.shape)).astype(np.float32)
        write_nifti(la / f"{cid}_image.nii.gz", img, affine)
        write_nifti(la / f"{cid}_label.nii.gz", lab, affine)
    return affine


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * np.logical_and(a, b).sum() / s


# -- oracle model --------------------------------------------------------------------------------
class OracleModel:
    """Not a network: segments by thresholding the (normalised) image.

    encode_task returns, per class, one 1-channel token: the mean normalised intensity under the
    reference mask. segment returns logits = gain * (image - fraction * token) for every class, so
    the result is right only if the engine feeds it correctly aligned images and masks.
    """

    def __init__(self, gain: float = 50.0, fraction: float = 0.5):
        self.gain = gain
        self.fraction = fraction
        self.encoded: list[torch.Tensor] = []
        self.segment_calls = 0

    def encode_task(self, ref_image: torch.Tensor, ref_masks: torch.Tensor) -> torch.Tensor:
        w = ref_masks.float()
        mean = (ref_image * w).flatten(2).sum(-1) / w.flatten(2).sum(-1).clamp_min(1e-6)  # (B, K)
        tokens = mean[:, :, None, None]  # (B, K, T=1, C=1)
        self.encoded.append(tokens.clone())
        return tokens

    def segment(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        self.segment_calls += 1
        thr = self.fraction * tokens[:, :, 0, 0]  # (1 or B, K)
        return self.gain * (image - thr[:, :, None, None, None])


@pytest.fixture()
def oracle() -> OracleModel:
    return OracleModel()
