"""Speed of IrisSegment end to end (issue 5), against MONAI's sliding window and per-class forward passes.

Scenarios, on real abdominal CT (BTCV validation patients from --data; intensities are BTCV's 8-bit window):
  1. the paper's: one reference (SABS_1, as stored), 10 query volumes of 128^3 at 1.5 mm (crops of SABS_0,
     SABS_10 and SABS_11, each centred on one of their organs), 15 classes: BTCV has 10 labelled organs, so
     the task holds the 10 organs and then the first five again (a repeated class costs the network what
     a new one does; its voxels are scored as its organ).
  2. a clinical CT-sized target: SABS_0 resampled (linear; labels nearest) to 512x512x300 at 0.8x0.8x1.5 mm
     around its five organs (padded beyond the scan), 5 classes (spleen, both kidneys, liver, stomach),
     one reference (SABS_1) encoded in the run.
  3. the same target from a saved task embedding (TaskEmbedding.load; no reference encoding; the task is
     encoded once by this script on the CPU before the rows run).
Every row is end to end: arrays in memory in, label maps out (task encoding or loading, preprocessing,
sliding window, resampling back to the target grid).

Rows, all with the same network, task tokens, preprocessing and resampling back:
  - IrisSegment localised (the product default, `segment(..., localise="registration")`): the task's reference
    (which an encoded or saved task carries) registered onto each target with Greedy in a child process, windows
    run only near the registered prior, the prior combined in, the label map post-processed (largest component,
    holes filled). A target whose registration fails is segmented over its whole field of view (coarse-to-fine);
    the row says on how many targets registration localised and its mean seconds per target;
  - IrisSegment coarse-to-fine and full (every overlapping window) over the whole field of view
    (`localise="none"`, no post-processing: what these rows measured before localisation existed);
  - MONAI `sliding_window_inference` (the baseline): roi = the model window, the product's overlap,
    mode "gaussian" with the product's sigma scale, sw_batch_size = the product's batch size, on the
    product's preprocessed working-grid tensor placed on the device (where MONAI also accumulates); its
    predictor is the network with the product's autocast and sigmoid. It runs every window.
  - per-class forward passes (the UniverSeg-style cost): the full pipeline with the network called once
    per class per window. Where that is more than --per-class-windows windows, the network time of both
    ways is measured on that many real windows of the first target and the row is extrapolated from the
    full row: full seconds + windows x (per-class - joint seconds per window); the row says so.

Columns: seconds (median of --runs after one warm-up on a centre crop of the first target), windows
run (constant windows are skipped by IrisSegment), windows/s, peak host MiB (VmHWM of a fresh
process per row: Python, torch, the network, the input arrays and, for its row, MONAI), peak GPU MiB
(torch.cuda.max_memory_allocated, reset per run), mean Dice against the target labels and against
IrisSegment full, the speed-up over MONAI, and the floor: the network's FLOPs for the windows run
(torch.utils.flop_counter on one window) over the device's peak measured in the same run (the best of
a large matmul and a conv3d in the network's dtype), and how many times the floor the row took.

    python -m benchmarks.speed [--device auto|cpu|cuda] [--runs 3] [--scenarios 1,2,3] [--rows localised,full,...]
        [--threads N] [--per-class-windows N] [--quick] [--data ../shared/data] [--json results.json]

--quick: small volumes, the tiny test config with random weights: checks the machinery in about a
minute of CPU time (mostly process starts); its numbers mean nothing. MONAI is a benchmark-only dependency: pip install -e ".[bench]".
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from IrisSegmentLib import Segmenter, TaskEmbedding
from IrisSegmentLib.config import BundleConfig
from IrisSegmentLib.inference.geometry import WorkingGrid, spacing_of
from IrisSegmentLib.inference.labelmap import to_label_map
from IrisSegmentLib.inference.runtime import resolve_device
from IrisSegmentLib.inference.windows import pad_to_window, tile
from IrisSegmentLib.model import build_iris
from IrisSegmentLib.training.pause import paused_training
from benchmarks.common import CONFIGS, DATA, ROOT, command
from benchmarks.common.processes import ChildFailed, cpu_model, peak_rss_mib, run_child
from benchmarks.common.tables import fmt

MIB = 2**20
ORGANS = {1: "spleen", 2: "R kidney", 3: "L kidney", 4: "gallbladder", 5: "esophagus", 6: "liver", 7: "stomach",
          8: "aorta", 9: "IVC", 10: "portal/splenic vein"}
REFERENCE = "SABS_1"
CT_TARGET = "SABS_0"
QUERY_CASES = ("SABS_0", "SABS_10", "SABS_11")
ROWS = {"localised": "IrisSegment localised (registration prior, windows near it, post-processed; the default)",
        "coarse-to-fine": "IrisSegment coarse-to-fine (whole field of view)", "full": "IrisSegment full (whole field of view)",
        "monai": "MONAI sliding_window_inference", "per-class": "per-class forward passes"}
PRODUCT_ROWS = ("localised", "coarse-to-fine")  # the rows issue 5's targets are checked for
BASELINE = "monai"
# Issue 5's targets: seconds per scenario and device, and peak GPU memory (8 GB)
TARGET_SECONDS = {"cuda": {1: 1.0, 2: 3.0}, "cpu": {2: 120.0}}
TARGET_GPU_MIB = 8e9 / MIB

Method = Callable[[np.ndarray, np.ndarray, TaskEmbedding], tuple[np.ndarray, int, dict]]  # label map, windows, details


@dataclass(frozen=True)
class Sizes:
    """What the scenarios are made of; `config` None: the bundled model, else a config with random weights."""

    config: str | None
    queries: int
    query_shape: tuple[int, int, int]
    query_spacing: float
    query_classes: tuple[int, ...]  # organ ids, repeats allowed
    ct_shape: tuple[int, int, int]
    ct_spacing: tuple[float, float, float]
    ct_classes: tuple[int, ...]
    reference: tuple[tuple[int, int, int], float] | None = None  # None: as stored, else (shape, spacing) around its organs


FULL = Sizes(None, 10, (128, 128, 128), 1.5, tuple(ORGANS) + tuple(ORGANS)[:5], (512, 512, 300), (0.8, 0.8, 1.5),
             (1, 2, 3, 6, 7))
QUICK = Sizes("tiny", 2, (40, 40, 40), 1.5, (1, 2, 6, 1), (64, 64, 32), (0.8, 0.8, 1.5), (6, 7), ((64, 64, 48), 3.0))
# (matmul size, conv3d edge) that measure a device's peak: large enough to reach it, small enough to be quick
PEAK_SIZES = {"quick": (512, 16), "cpu": (2048, 32), "cuda": (8192, 64)}


@dataclass(frozen=True)
class Scenario:
    number: int
    inputs: str  # .npz file in the work folder
    encode: bool  # True: the reference is encoded in the run; False: the saved task is loaded


SCENARIOS = {1: Scenario(1, "queries.npz", True), 2: Scenario(2, "ct.npz", True), 3: Scenario(3, "ct.npz", False)}
TASK_FILE = "task.safetensors"


# -- inputs ---------------------------------------------------------------------------------------
def read_case(data: Path, case: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float32 image, affine, integer label map) of one BTCV case."""
    import nibabel as nib

    img = nib.load(str(data / "btcv" / f"{case}_image.nii.gz"))
    lab = nib.load(str(data / "btcv" / f"{case}_label.nii.gz"))
    return img.get_fdata(dtype=np.float32), img.affine, np.rint(lab.get_fdata(dtype=np.float32)).astype(np.uint8)


def resample_axis(x: np.ndarray, src: np.ndarray, axis: int, nearest: bool, fill: float) -> np.ndarray:
    """`x` sampled along `axis` at source voxel coordinates `src` (linear or nearest); `fill` beyond its outer faces."""
    n = x.shape[axis]
    if nearest:
        out = np.take(x, np.clip(np.rint(src), 0, n - 1).astype(np.int64), axis=axis)
    else:
        s = np.clip(src, 0, n - 1)
        i0 = np.floor(s).astype(np.int64)
        w = (s - i0).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
        out = np.take(x, i0, axis=axis) * (1 - w) + np.take(x, np.minimum(i0 + 1, n - 1), axis=axis) * w
    outside = (src < -0.5) | (src > n - 0.5)
    np.moveaxis(out, axis, 0)[outside] = fill
    return out


def resample(volume: np.ndarray, affine: np.ndarray, shape, spacing, centre: np.ndarray, nearest: bool,
             fill: float) -> tuple[np.ndarray, np.ndarray]:
    """`volume` (axis-aligned `affine`) on a grid of `shape` x `spacing` mm centred on world point `centre`,
    with the same axis directions; returns the array and its affine."""
    step = np.diag(affine[:3, :3])
    if not np.allclose(affine[:3, :3], np.diag(step)):
        raise ValueError("resample handles axis-aligned (diagonal) voxel-to-world matrices only")
    new_step = np.sign(step) * np.asarray(spacing, dtype=float)
    origin = np.asarray(centre) - new_step * (np.asarray(shape) - 1) / 2
    x = volume
    for axis in range(3):
        world = origin[axis] + new_step[axis] * np.arange(shape[axis])
        x = resample_axis(x, (world - affine[axis, 3]) / step[axis], axis, nearest, fill)
    out_affine = np.diag([*new_step, 1.0])
    out_affine[:3, 3] = origin
    return x, out_affine


def centroid(label: np.ndarray, affine: np.ndarray, organs) -> np.ndarray:
    """World centre of mass of the voxels of `organs`."""
    idx = np.argwhere(np.isin(label, organs)).mean(0)
    return affine[:3, :3] @ idx + affine[:3, 3]


def resampled_case(image, affine, label, shape, spacing, centre) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image (int16, as CT is stored), affine and label map of a case on a new grid."""
    img, out_affine = resample(image, affine, shape, spacing, centre, False, float(image.min()))
    lab, _ = resample(label, affine, shape, spacing, centre, True, 0)
    return np.rint(img).astype(np.int16), out_affine, lab


def build_inputs(data: Path, sizes: Sizes, work: Path, numbers: set[int]) -> None:
    """Writes the scenarios' arrays to `work` (queries.npz, ct.npz)."""
    ref_image, ref_affine, ref_label = read_case(data, REFERENCE)
    if sizes.reference:
        shape, spacing = sizes.reference
        centre = centroid(ref_label, ref_affine, sizes.query_classes + sizes.ct_classes)
        ref_image, ref_affine, ref_label = resampled_case(ref_image, ref_affine, ref_label, shape, (spacing,) * 3, centre)
    reference = {"ref_image": ref_image, "ref_affine": ref_affine, "ref_label": ref_label}
    if 1 in numbers:
        cases = {c: read_case(data, c) for c in QUERY_CASES[: sizes.queries]}
        crops = []
        for i in range(sizes.queries):
            image, affine, label = cases[QUERY_CASES[i % len(QUERY_CASES)]]
            organ = tuple(ORGANS)[i % len(ORGANS)]
            crops.append(resampled_case(image, affine, label, sizes.query_shape, (sizes.query_spacing,) * 3,
                                        centroid(label, affine, [organ])))
        np.savez(work / SCENARIOS[1].inputs, **reference, labels=np.array(sizes.query_classes), **stack(crops))
    if numbers & {2, 3}:
        image, affine, label = read_case(data, CT_TARGET)
        ct = resampled_case(image, affine, label, sizes.ct_shape, sizes.ct_spacing, centroid(label, affine, sizes.ct_classes))
        np.savez(work / SCENARIOS[2].inputs, **reference, labels=np.array(sizes.ct_classes), **stack([ct]))


def stack(cases: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    return {"images": np.stack([c[0] for c in cases]), "affines": np.stack([c[1] for c in cases]),
            "truths": np.stack([c[2] for c in cases])}


# -- the methods ----------------------------------------------------------------------------------
def load_segmenter(sizes: Sizes, device: str) -> Segmenter:
    if sizes.config is None:
        return Segmenter.load(None, device)
    cfg = BundleConfig.load(CONFIGS / f"{sizes.config}.yaml")
    torch.manual_seed(0)
    return Segmenter(build_iris(cfg.model), cfg, device)


class PerClass:
    """The same network called once per class: K forward passes per window (the UniverSeg-style cost)."""

    def __init__(self, model):
        self.model = model

    def encode_task(self, ref_image: torch.Tensor, ref_masks: torch.Tensor) -> torch.Tensor:
        return self.model.encode_task(ref_image, ref_masks)

    def segment(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.model.segment(image, tokens[:, k : k + 1]) for k in range(tokens.shape[1])], 1)


def per_class_segmenter(seg: Segmenter) -> Segmenter:
    return Segmenter(PerClass(seg.model), seg.config, str(seg.device), model_id=seg.model_id)


def network_dtype(seg: Segmenter) -> torch.dtype:
    """The dtype the product's window forward passes compute in (its autocast in `Runtime.forward`)."""
    if seg.device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if seg.cpu_bf16 else torch.float32


def probabilities(seg: Segmenter, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Sigmoid of the network's logits with the product's autocast, left on the device."""
    dtype = network_dtype(seg)
    with torch.inference_mode(), torch.autocast(seg.device.type, dtype=dtype, enabled=dtype != torch.float32):
        return torch.sigmoid(seg.model.segment(x, tokens).float())


def monai_method(seg: Segmenter) -> Method:
    """The product's preprocessing, MONAI's sliding window on the device, the product's resampling back."""
    from monai.inferers import sliding_window_inference

    inf = seg.config.inference

    def run(image: np.ndarray, affine: np.ndarray, task: TaskEmbedding) -> tuple[np.ndarray, int, dict]:
        prepared = seg.prepare(image, affine, "auto", "target image")
        work, grid = prepared.work, prepared.grid
        tokens = task.tokens.to(seg.device)[None]
        windows = 0

        def predictor(x: torch.Tensor) -> torch.Tensor:
            nonlocal windows
            windows += x.shape[0]
            return probabilities(seg, x, tokens)

        with torch.inference_mode():
            probs = sliding_window_inference(work[None].to(seg.device), seg.config.model.window, seg.batch_size, predictor,
                                             overlap=inf.overlap, mode="gaussian", sigma_scale=inf.gaussian_sigma_scale,
                                             cval=float(work.min()))
        return to_label_map(probs[0].cpu(), grid, task.labels, seg.config.inference.threshold), windows, {}

    return run


def product_method(seg: Segmenter, strategy: str | None, localise: str = "none") -> Method:
    """`Segmenter.segment`: over the whole field of view without post-processing (`localise` "none", as these rows ran
    before localisation existed), or localised by registration with the product's post-processing."""
    localised = localise != "none"

    def run(image: np.ndarray, affine: np.ndarray, task: TaskEmbedding) -> tuple[np.ndarray, int, dict]:
        result = seg.segment(image, affine, task, strategy=strategy, localise=localise, postprocess=localised)
        details = {"localisation": result.localisation, "localise_s": result.stage_seconds.get("localise", 0.0),
                   "warnings": result.warnings} if localised else {}
        return result.label_map, result.windows, details

    return run


def method(row: str, seg: Segmenter) -> Method:
    if row == "monai":
        return monai_method(seg)
    if row == "per-class":
        return product_method(per_class_segmenter(seg), "full")
    if row == "localised":
        return product_method(seg, None, "registration")
    return product_method(seg, row)


# -- child processes --------------------------------------------------------------------------------
def code_version() -> str:
    """Short hash of the engine's source, configs and bundled model: rows that ran different code or weights show up."""
    import hashlib

    files = [*(ROOT / "IrisSegmentLib").rglob("*.py"), *(ROOT / "Resources" / "Configs").glob("*.yaml"),
             *(ROOT / "Resources" / "Models").rglob("*.*")]
    return hashlib.sha1(b"".join(f.read_bytes() for f in sorted(files))).hexdigest()[:10]


def centre_crop(image: np.ndarray, affine: np.ndarray, seg: Segmenter) -> np.ndarray:
    """The centre of `image`, 1.5 windows wide on the working grid (8 windows): the warm-up target."""
    m = seg.config.model
    size = [min(n, int(np.ceil(1.5 * w * s / t))) for n, w, s, t in zip(image.shape, m.window, m.spacing, spacing_of(affine))]
    lo = [(n - s) // 2 for n, s in zip(image.shape, size)]
    return image[tuple(slice(a, a + s) for a, s in zip(lo, size))]


def task_of(seg: Segmenter, inputs, scenario: Scenario, work: Path) -> TaskEmbedding:
    if not scenario.encode:
        return TaskEmbedding.load(work / TASK_FILE)
    return seg.encode(inputs["ref_image"], inputs["ref_affine"], inputs["ref_label"], labels=inputs["labels"].tolist())


def measure_row(spec: dict) -> dict:
    """Median seconds, windows, peak memory of one row; its label maps are saved for the parent."""
    scenario, work = SCENARIOS[spec["scenario"]], Path(spec["work"])
    code = code_version()
    seg = load_segmenter(QUICK if spec["quick"] else FULL, spec["device"])
    inputs = dict(np.load(work / scenario.inputs))
    run = method(spec["row"], seg)
    cuda = seg.device.type == "cuda"

    def once(targets) -> tuple[list[np.ndarray], int, list[dict]]:
        task = task_of(seg, inputs, scenario, work)
        out = [run(image, affine, task) for image, affine in targets]
        return [o[0] for o in out], sum(o[1] for o in out), [o[2] for o in out]

    targets = list(zip(inputs["images"], inputs["affines"]))
    once([(centre_crop(*targets[0], seg), targets[0][1])])
    seconds, gpu = [], []
    for _ in range(spec["runs"]):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        maps, windows, details = once(targets)
        seconds.append(time.perf_counter() - t0)
        gpu.append(torch.cuda.max_memory_allocated() / MIB if cuda else None)
    np.save(work / f"s{scenario.number}-{spec['row']}.npy", np.stack(maps))
    note = ""
    if details and "localisation" in details[0]:  # of the last run
        hit = sum(d["localisation"] == "registration" for d in details)
        note = (f"registration localised {hit}/{len(details)} target(s), {statistics.mean(d['localise_s'] for d in details):.1f} s "
                "each" + ("; the others whole field of view" if hit < len(details) else ""))
        why = next((w for d in details if d["localisation"] != "registration" for w in d["warnings"]), "")
        if why:
            note += f", e.g. {' '.join(why.split())[:120]}"
    return {"seconds": seconds, "windows": windows, "host_mib": peak_rss_mib(), "gpu_mib": max(gpu) if cuda else None,
            "threads": torch.get_num_threads(), "code": sorted({code, code_version()}), "note": note}


def live_windows(seg: Segmenter, image: np.ndarray, affine: np.ndarray, n: int) -> list[torch.Tensor]:
    """`n` of the full tiling's non-constant windows of `image`, evenly spread over it."""
    work = seg.prepare(image, affine, "auto", "target image").work
    win = seg.config.model.window
    padded, _ = pad_to_window(work, win)
    crops = [padded[(slice(None), *(slice(a, a + w) for a, w in zip(o, win)))]
             for o in tile(padded.shape[1:], win, seg.config.inference.overlap)]
    live = [c for c in crops if float(c.max() - c.min()) > 0]
    return [live[i] for i in np.unique(np.linspace(0, len(live) - 1, min(n, len(live))).round().astype(int))]


def measure_per_class_windows(spec: dict) -> dict:
    """Network seconds of the same windows run jointly and once per class (median of runs, after a warm-up)."""
    scenario, work = SCENARIOS[spec["scenario"]], Path(spec["work"])
    seg = load_segmenter(QUICK if spec["quick"] else FULL, spec["device"])
    inputs = dict(np.load(work / scenario.inputs))
    tokens = task_of(seg, inputs, scenario, work).tokens
    crops = live_windows(seg, inputs["images"][0], inputs["affines"][0], spec["windows"])

    def timed(s: Segmenter, batches: list[list[torch.Tensor]]) -> float:
        t0 = time.perf_counter()
        for b in batches:
            s.runtime.forward(s.model, b, tokens)
        return time.perf_counter() - t0

    batches = [crops[i : i + seg.batch_size] for i in range(0, len(crops), seg.batch_size)]
    out = {"n": len(crops)}
    for name, s in (("joint", seg), ("per_class", per_class_segmenter(seg))):
        timed(s, batches[:1])
        out[name] = statistics.median(timed(s, batches) for _ in range(spec["runs"]))
    return out


def best_rate(fn: Callable[[], torch.Tensor], flops: float, device: torch.device, reps: int) -> float:
    """FLOP/s of `fn` from its fastest of `reps` runs after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return flops / best


def measure_peak(spec: dict) -> dict:
    """The device's peak FLOP/s (best of a square matmul and a 64-channel 3x3x3 conv3d) in the network's dtype."""
    seg = load_segmenter(QUICK if spec["quick"] else FULL, spec["device"])
    device, dtype = seg.device, network_dtype(seg)
    cuda = device.type == "cuda"
    (n, edge), reps = spec["sizes"], 10 if cuda else 5
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    x = torch.randn(2, 64, edge, edge, edge, device=device, dtype=dtype)
    w = torch.randn(64, 64, 3, 3, 3, device=device, dtype=dtype)
    with torch.inference_mode():
        rates = {f"matmul {n}^2": best_rate(lambda: a @ b, 2.0 * n**3, device, reps),
                 f"conv3d 64ch {edge}^3": best_rate(lambda: F.conv3d(x, w, padding=1),
                                                       2.0 * x.numel() * 64 * 27, device, reps)}
    name = torch.cuda.get_device_name(device) if cuda else f"{cpu_model()} ({os.cpu_count()} cores)"
    return {"rates": rates, "dtype": str(dtype).removeprefix("torch."), "device_name": name, "threads": torch.get_num_threads()}


def child(job: Callable[[dict], dict], spec: dict) -> dict | str:
    """Runs one job in a fresh Python process; its result, or the reason it failed."""
    try:
        return run_child(job, spec, threads=spec.get("threads"))
    except ChildFailed as e:
        return f"failed: {e}"


# -- the parent ---------------------------------------------------------------------------------------
def window_flops(seg: Segmenter, k: int) -> int:
    """FLOPs of one window's forward pass with `k` classes (tokens (1, K, m+1, C))."""
    from torch.utils.flop_counter import FlopCounterMode

    m = seg.config.model
    x = torch.zeros(1, 1, *m.window)
    tokens = torch.zeros(1, k, m.num_queries + 1, m.token_dim)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        seg.model.segment(x, tokens)
    return counter.get_total_flops()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks; NaN when both are empty."""
    s = int(a.sum()) + int(b.sum())
    return float("nan") if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def mean_dice(pred: np.ndarray, ref: np.ndarray, organs, skip_empty_ref: bool) -> float:
    """Mean Dice over maps and organs; with `skip_empty_ref`, organs absent from `ref` are left out."""
    d = [dice(p == v, r == v) for p, r in zip(pred, ref) for v in organs if not skip_empty_ref or (r == v).any()]
    d = [x for x in d if not np.isnan(x)]
    return float(np.mean(d)) if d else float("nan")


@dataclass
class Row:
    scenario: int
    row: str
    note: str = ""  # why it was not run, or how it was extrapolated
    classes: int | None = None
    seconds: float | None = None
    runs: list[float] | None = None
    windows: int | None = None
    passes: int | None = None  # network passes per window
    host_mib: float | None = None
    gpu_mib: float | None = None
    dice_truth: float | None = None
    dice_full: float | None = None
    floor_s: float | None = None
    code: list[str] | None = None  # code_version() at the row's start and end


def measure_scenario(n: int, args, work: Path, have_monai: bool) -> list[Row]:
    """Every row of scenario `n` (the per-class row after the full row it may be extrapolated from)."""
    inputs = np.load(work / SCENARIOS[n].inputs)
    k = len(inputs["labels"])
    base = {"scenario": n, "work": str(work), "device": args.device, "runs": args.runs, "quick": args.quick,
            "threads": args.threads}
    rows: dict[str, Row] = {}
    for name in args.rows:
        if name == "monai" and not have_monai:
            rows[name] = Row(n, name, "not run: MONAI not installed (pip install -e '.[bench]')")
        elif name == "per-class" and args.per_class_windows and "full" not in rows:
            rows[name] = Row(n, name, "not run: it is extrapolated from the full row, which was not asked for (--rows)")
        elif name == "per-class" and args.per_class_windows:
            rows[name] = per_class_row(base, rows["full"], args.per_class_windows)
        else:
            rows[name] = measured(base, name)
        r = rows[name]
        r.classes, r.passes = k, k if name == "per-class" else 1
        print(f"# scenario {n} {name}: {fmt(r.seconds, '.2f')} s {r.note}", file=sys.stderr, flush=True)
    score(rows, work, n, inputs["truths"], sorted(set(inputs["labels"].tolist())))
    return list(rows.values())


def measured(base: dict, name: str) -> Row:
    r = child(measure_row, {**base, "row": name})
    if isinstance(r, str):
        return Row(base["scenario"], name, r)
    return Row(base["scenario"], name, r.get("note", ""), seconds=statistics.median(r["seconds"]), runs=r["seconds"],
               windows=r["windows"], host_mib=r["host_mib"], gpu_mib=r["gpu_mib"], code=r["code"])


def best_peak(first: dict, last: dict | str) -> dict:
    """Each kernel's best rate of the measurements before and after the rows (other jobs may have slowed one)."""
    if isinstance(last, str):
        return first
    return {**first, "rates": {k: max(v, last["rates"][k]) for k, v in first["rates"].items()}}


def set_floors(rows: list[Row], flops: dict[int, int], peak: float) -> None:
    """Floor seconds: windows x passes x FLOPs of one pass / peak FLOP/s."""
    for r in rows:
        if r.windows is not None:
            r.floor_s = r.windows * r.passes * flops[1 if r.passes > 1 else r.classes] / peak


def per_class_row(base: dict, full: Row, limit: int) -> Row:
    """Measured when the full row ran at most `limit` windows; else extrapolated from the full row with the network
    time of both ways on `limit` real windows: full seconds + windows x (per-class - joint seconds per window)."""
    if full.windows is None:
        return Row(full.scenario, "per-class", "not run: the full row it is extrapolated from failed")
    if full.windows <= limit:
        return measured(base, "per-class")
    r = child(measure_per_class_windows, {**base, "windows": limit})
    if isinstance(r, str):
        return Row(full.scenario, "per-class", r)
    extra = full.windows * (r["per_class"] - r["joint"]) / r["n"]
    return Row(full.scenario, "per-class", f"extrapolated from {r['n']} windows", seconds=full.seconds + extra,
               windows=full.windows)


def score(rows: dict[str, Row], work: Path, n: int, truths: np.ndarray, organs: list[int]) -> None:
    """Dice of each measured row against the target labels and against IrisSegment full."""
    full_file = work / f"s{n}-full.npy"
    full = np.load(full_file) if full_file.exists() else None
    for r in rows.values():
        f = work / f"s{n}-{r.row}.npy"
        if r.runs is None or not f.exists():
            continue
        maps = np.load(f)
        r.dice_truth = mean_dice(maps, truths, organs, True)
        r.dice_full = mean_dice(maps, full, organs, False) if full is not None else None


# -- report ---------------------------------------------------------------------------------------------
def table(rows: list[Row], runs: int) -> str:
    head = ["scenario", "method", f"s (median of {runs})", "windows", "windows/s", "peak host MiB", "peak GPU MiB",
            "Dice vs truth", "Dice vs full", "speed-up vs MONAI", "floor s", "s / floor"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    monai = {r.scenario: r.seconds for r in rows if r.row == BASELINE}
    for r in rows:
        label = ROWS[r.row] + (f" ({r.note})" if r.note else "")
        if r.passes and r.passes > 1:
            label += f", {r.passes} passes per window"
        ok = r.seconds is not None
        speedup = monai.get(r.scenario) / r.seconds if ok and monai.get(r.scenario) else None
        lines.append("| " + " | ".join([
            str(r.scenario), label, fmt(r.seconds, ".2f"), fmt(r.windows, "d"),
            fmt(r.windows / r.seconds if ok and r.windows else None), fmt(r.host_mib, ".0f"), fmt(r.gpu_mib, ".0f"),
            fmt(r.dice_truth, ".3f"), fmt(r.dice_full, ".3f"), fmt(speedup, ".2f") + ("×" if speedup else ""),
            fmt(r.floor_s, ".2f"), fmt(r.seconds / r.floor_s if ok and r.floor_s else None)]) + " |")
    return "\n".join(lines)


def targets_line(rows: list[Row], device: str) -> str:
    """Issue 5's targets, met or not, for the product's rows: localised (the default) and coarse-to-fine over the
    whole field of view (the default before localisation existed)."""
    monai = {r.scenario: r.seconds for r in rows if r.row == BASELINE and r.seconds is not None}
    out = []
    for name in PRODUCT_ROWS:
        default = {r.scenario: r for r in rows if r.row == name and r.seconds is not None}
        part = [f"scenario {n} <= {t:g} s: {default[n].seconds:.2f} s ({'met' if default[n].seconds <= t else 'NOT met'})"
                for n, t in TARGET_SECONDS.get(device, {}).items() if n in default]
        if device == "cuda":
            gpu = [r.gpu_mib for r in default.values() if r.gpu_mib is not None]
            if gpu:
                part.append(f"peak GPU <= 8 GB: {max(gpu):.0f} MiB ({'met' if max(gpu) <= TARGET_GPU_MIB else 'NOT met'})")
        part += [f"scenario {n} faster than MONAI: {'yes' if default[n].seconds < s else 'NO'}" for n, s in monai.items()
                 if n in default]
        if part:
            out.append(f"{name}: " + ", ".join(part))
    return "; ".join(out) or "none measured"


def code_warning(rows: list[Row]) -> list[str]:
    codes = sorted({c for r in rows for c in r.code or []})
    if len(codes) < 2:
        return []
    return [f"WARNING: the engine's code changed during this run (rows ran versions {', '.join(codes)}): rerun it."]


def caption(args, sizes: Sizes, seg: Segmenter, peak: dict, flops: dict[int, int], threads: int, load: tuple) -> str:
    m, inf = seg.config.model, seg.config.inference
    monai = importlib.util.find_spec("monai")
    ct_grid = WorkingGrid.create(sizes.ct_shape, np.diag([*sizes.ct_spacing, 1.0]), m.spacing).working_shape
    repeats = len(sizes.query_classes) - len(set(sizes.query_classes))
    rates = ", ".join(f"{k}: {v / 1e9:.0f}" for k, v in peak["rates"].items())
    lines = [
        f"Command: `{command('benchmarks.speed')}`",
        f"Device: {args.device}, {peak['device_name']}; torch {torch.__version__}, {threads} thread(s); "
        f"MONAI {__import__('monai').__version__ if monai else 'not installed'}; load average (1 min) {load[0]:.1f} "
        f"before, {load[1]:.1f} after" + (": above the threads used, other jobs shared the CPU and the times are contended."
                                          if max(load) > threads + 0.5 else "."),
        f"Model: {'the bundled ' + m.name if sizes.config is None else m.name + ' with random weights (--quick: numbers mean nothing)'}, "
        f"window {'x'.join(map(str, m.window))} on a {m.spacing[0]:g} mm grid, overlap {inf.overlap:g}, {seg.batch_size} windows per batch.",
        f"Scenario 1: reference {REFERENCE}, {sizes.queries} queries of {'x'.join(map(str, sizes.query_shape))} at "
        f"{sizes.query_spacing:g} mm (crops of {', '.join(QUERY_CASES)}), {len(sizes.query_classes)} classes"
        + (f" ({repeats} of them repeat an organ: BTCV has 10)" if repeats else "") + ", reference encoded once per run. "
        f"Scenario 2: {CT_TARGET} at {'x'.join(map(str, sizes.ct_shape))}, {'x'.join(f'{s:g}' for s in sizes.ct_spacing)} mm "
        f"(working grid {'x'.join(map(str, ct_grid))}), {len(sizes.ct_classes)} classes "
        f"({', '.join(ORGANS[v] for v in sizes.ct_classes)}), reference {REFERENCE} encoded in the run. "
        "Scenario 3: the same target and classes from a saved task embedding.",
        f"Floor: one window {', '.join(f'{v / 1e9:.2f} GFLOP with {k} class(es)' for k, v in flops.items())} "
        f"(torch FlopCounterMode); device peak {max(peak['rates'].values()) / 1e9:.0f} GFLOP/s in {peak['dtype']} measured in "
        f"this run, the better of before and after the rows ({rates} GFLOP/s); floor = windows x passes x FLOPs / peak, network only (no encoding, "
        "preprocessing or resampling back).",
        f"IrisSegment localised: `segment(..., localise=\"registration\")`, the product default: the task's reference "
        f"(an encoded or saved task carries it, block-averaged to at most {seg.config.localise.max_voxels:,} voxels) "
        "registered onto each target by Greedy in a child process (moments, or a translation search where one field of "
        f"view holds less than {seg.config.localise.search_fov_ratio:g} of the other's volume; rigid, affine"
        + (", deformable" if seg.config.localise.deformable_iterations else "") + f"; metric {seg.config.localise.metric}"
        + (": NCC within one modality, NMI across" if seg.config.localise.metric == "auto" else "") + "), "
        f"windows only within {seg.config.localise.margin_mm:g} mm of the registered prior, the prior combined in "
        f"(weight {seg.config.localise.prior_weight:g}), the label map post-processed (largest component, holes filled); "
        "its seconds include the registration. A target whose registration fails (e.g. a crop showing too little of "
        "the reference's structures) is segmented over its whole field of view, coarse-to-fine; the row says how many "
        "were localised. IrisSegment coarse-to-fine and full: `localise=\"none\"` and no post-processing, the whole "
        "field of view, as these rows ran before localisation existed.",
        "Rows run in fresh processes, one warm-up on a centre crop of the first target, then the median; peak host MiB: "
        "the row process's peak resident memory (VmHWM: Python, torch, the network, the input arrays, MONAI for its row); "
        "peak GPU MiB: torch.cuda.max_memory_allocated over the timed runs. Dice: mean "
        "over organs (and queries) present in the target labels; 'Dice vs full': against IrisSegment full's label map. "
        f"MONAI: the same network, tokens, autocast ({peak['dtype']}) and sigmoid, roi {'x'.join(map(str, m.window))}, overlap "
        f"{inf.overlap:g}, gaussian sigma scale {inf.gaussian_sigma_scale:g}, sw_batch_size {seg.batch_size}, on the "
        "product's preprocessed working-grid tensor, accumulating on the device, resampled back by the product; it runs "
        "every window, IrisSegment skips constant ones. BTCV is stored as an 8-bit soft-tissue window, so air and fat are "
        "exactly 0 and windows holding only them are constant; in HU CT with noise in the air fewer windows would be skipped.",
    ]
    return "\n\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--runs", type=int, default=3, help="timed runs per row (after one warm-up); the median is reported")
    ap.add_argument("--scenarios", default="1,2,3")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"the rows to measure, in table order (default: all of {', '.join(ROWS)})")
    ap.add_argument("--threads", type=int, help="torch threads in every measurement (default: torch's default)")
    ap.add_argument("--per-class-windows", type=int,
                    help="measure the per-class row on at most this many windows and extrapolate beyond "
                         "(0: never; default: 0 on CUDA, 8 on the CPU)")
    ap.add_argument("--quick", action="store_true", help="small volumes, tiny random network: checks the machinery")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--json", type=Path, help="also write every measurement here")
    args = ap.parse_args()
    args.device = resolve_device(args.device).type
    if args.per_class_windows is None:
        args.per_class_windows = 0 if args.device == "cuda" else 8
    if args.threads:
        torch.set_num_threads(args.threads)
    asked = {r.strip() for r in args.rows.split(",") if r.strip()}
    if not asked or asked - set(ROWS):
        raise SystemExit(f"--rows: choose from {', '.join(ROWS)}")
    args.rows = [r for r in ROWS if r in asked]
    numbers = sorted({int(s) for s in args.scenarios.split(",")})
    if not set(numbers) <= set(SCENARIOS):
        raise SystemExit(f"--scenarios: choose from {sorted(SCENARIOS)}")
    if not (args.data / "btcv").is_dir():
        raise SystemExit(f"{args.data / 'btcv'}: BTCV not found; pass --data")
    sizes = QUICK if args.quick else FULL
    load_before = os.getloadavg()[0]
    with paused_training(lambda m: print(m, file=sys.stderr)), tempfile.TemporaryDirectory(prefix="iris-speed-") as tmp:
        work = Path(tmp)
        build_inputs(args.data, sizes, work, set(numbers))
        seg = load_segmenter(sizes, "cpu")
        if 3 in numbers:
            task_of(seg, dict(np.load(work / SCENARIOS[3].inputs)), SCENARIOS[2], work).save(work / TASK_FILE)
        ks = {1} | {len(np.load(work / SCENARIOS[n].inputs)["labels"]) for n in numbers}
        flops = {k: window_flops(seg, k) for k in sorted(ks)}
        peak_job = {"device": args.device, "threads": args.threads, "quick": args.quick,
                    "sizes": PEAK_SIZES["quick" if args.quick else args.device]}
        first = child(measure_peak, peak_job)
        if isinstance(first, str):
            raise SystemExit(f"peak measurement {first}")
        have_monai = importlib.util.find_spec("monai") is not None
        rows = [r for n in numbers for r in measure_scenario(n, args, work, have_monai)]
        peak = best_peak(first, child(measure_peak, peak_job))
        set_floors(rows, flops, max(peak["rates"].values()))
    text = "\n\n".join([table(rows, args.runs), *code_warning(rows), f"Issue 5 targets ({args.device}): {targets_line(rows, args.device)}",
                        caption(args, sizes, seg, peak, flops, peak["threads"], (load_before, os.getloadavg()[0]))])
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"rows": [asdict(r) for r in rows], "peak": peak, "window_flops": flops,
                                         "sizes": asdict(sizes), "device": args.device, "command": sys.argv}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
