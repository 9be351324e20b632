"""Peak host memory of `Segmenter.segment` for targets of increasing size, on the CPU.

Each measurement runs in a fresh Python process and reads its peak resident set size
(VmHWM) at three points: after loading the network, encoding a small
reference and segmenting that small volume once ("base": Python, torch, the network and its working
memory), after building the target array, and after segmenting it ("peak").
The network is randomly initialised from a seed (the tiny test config by default, or the product
config with --config iris-small): memory does not depend on the weights. Targets are int16,
stored LPS-ordered (flipped i and j axes, as many scanner-derived files are) with a bright
sphere on a graded background, at the spacings listed in SIZES.

Both rows segment the whole field of view (`localise="none"`) with no post-processing, as before
localisation and post-processing existed: what is measured is the windows and the label map.

Baseline, measured in the same run: the previous implementation of the last step, which resampled
every class's probabilities to the full target grid as float32 and took the arg-max there
(`full_volume_label_map` below); run with --baseline (sizes where it would not fit are skipped). It runs
the engine's public stages (`prepare`, `probabilities`, the confidence features) as `segment` does, and
then this function in place of the engine's streamed `labelmap.to_label_map`: the engine is not patched.

    python -m benchmarks.memory [--config tiny|iris-small] [--sizes 128x128x128,...] [--baseline]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import CONFIGS
from benchmarks.common.processes import ChildFailed, peak_rss_mib, run_child

# shape -> spacing (mm); the 5 mm case is upsampled along k on the working grid
SIZES = {
    "128x128x128": (1.0, 1.0, 1.0),
    "256x256x200": (0.8, 0.8, 1.0),
    "512x512x60": (0.7, 0.7, 5.0),
    "512x512x300": (0.7, 0.7, 1.0),
    "1024x1024x800": (0.4, 0.4, 0.5),
}
MIB = 2**20


def full_volume_label_map(probs, grid, labels, threshold):
    """The previous label map (baseline; same arguments as `labelmap.to_label_map`): full-size float32
    probabilities per class, arg-max on the full grid."""
    import torch

    best = None
    arg = None
    for k in range(probs.shape[0]):
        p = grid.from_working(probs[k : k + 1])[0]
        if best is None:
            best, arg = p, torch.zeros(p.shape, dtype=torch.int64)
        else:
            better = p > best
            best = torch.where(better, p, best)
            arg[better] = k
    values = torch.tensor([0, *labels])
    out = torch.where(best >= threshold, values[arg + 1], 0)
    dtype = np.uint8 if max(labels) < 256 else np.uint16 if max(labels) < 65536 else np.int32
    return out.numpy().astype(dtype)


def segment_streamed(seg, image, affine, task) -> tuple[np.ndarray, int]:
    """The engine as it is: `Segmenter.segment` (its label map streamed slab by slab), whole field of view."""
    result = seg.segment(image, affine, task, localise="none", postprocess=False)
    return result.label_map, result.windows


def segment_full_volume(seg, image, affine, task) -> tuple[np.ndarray, int]:
    """What `segment` does with localise="none" and no post-processing, by its public stages, with the previous
    full-volume label map (`full_volume_label_map`) in place of `labelmap.to_label_map`."""
    from IrisSegmentLib.inference.confidence import features

    prepared = seg.prepare(image, affine, "auto", "target image")
    work, grid = prepared.work, prepared.grid
    del prepared
    probs, spread, windows = seg.probabilities(work, task.tokens, seg.config.inference.overlap, lambda f, m: None, spread=True)
    del work
    features(probs, spread, float(np.prod(seg.config.model.spacing)) / 1000.0, task.references)
    del spread
    label_map = full_volume_label_map(probs, grid, task.labels, seg.config.inference.threshold)
    del probs
    return label_map, windows


def target(shape, spacing) -> tuple[np.ndarray, np.ndarray]:
    """int16 target built slab by slab (no full-size float temporaries), LPS-ordered affine."""
    shape = tuple(shape)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    image = np.empty(shape, np.int16)
    centre = (np.array(shape) - 1) / 2
    radius = 0.25 * min(n * s for n, s in zip(shape, spacing))
    j = (np.arange(shape[1]) - centre[1]) * spacing[1]
    k = (np.arange(shape[2]) - centre[2]) * spacing[2]
    jk = j[:, None] ** 2 + k[None, :] ** 2
    for i in range(shape[0]):
        d2 = ((i - centre[0]) * spacing[0]) ** 2 + jk
        image[i] = np.where(d2 <= radius**2, 900, 100 + (i % 50) + (np.arange(shape[2]) % 7)[None, :]).astype(np.int16)
    return image, affine


def measure(size: str, config: str, impl: str, classes: int) -> dict:
    """One row, in a fresh process: peak memory after loading, with the target, after segmenting it."""
    import torch

    torch.set_num_threads(1)
    from IrisSegmentLib.config import BundleConfig
    from IrisSegmentLib.inference.segmenter import Segmenter
    from IrisSegmentLib.model import build_iris

    cfg = BundleConfig.load(CONFIGS / f"{config}.yaml")
    torch.manual_seed(0)
    seg = Segmenter(build_iris(cfg.model), cfg, "cpu")
    # a small reference with `classes` structures
    ref = np.full((48, 48, 48), 100, np.int16)
    lab = np.zeros(ref.shape, np.uint8)
    for c in range(classes):
        lab[6 + 12 * c : 16 + 12 * c, 10:38, 10:38] = c + 1
        ref[lab == c + 1] = 900 - 100 * c
    task = seg.encode(ref, np.diag([1.5, 1.5, 1.5, 1.0]), lab)
    segment = segment_full_volume if impl == "full" else segment_streamed
    segment(seg, ref, np.diag([1.5, 1.5, 1.5, 1.0]), task)  # warm-up: the network's working memory is in `base`
    base = peak_rss_mib()
    shape = tuple(int(n) for n in size.split("x"))
    image, affine = target(shape, SIZES.get(size, (1.0, 1.0, 1.0)))
    with_input = peak_rss_mib()
    t0 = time.perf_counter()
    label_map, windows = segment(seg, image, affine, task)
    seconds = time.perf_counter() - t0
    from IrisSegmentLib.inference.geometry import WorkingGrid

    grid = WorkingGrid.create(shape, affine, cfg.model.spacing)
    return {"size": size, "impl": impl, "config": config, "classes": classes, "input_mib": image.nbytes / MIB,
            "base_mib": base, "with_input_mib": with_input, "peak_mib": peak_rss_mib(), "seconds": seconds,
            "windows": windows, "working": "x".join(map(str, grid.working_shape)),
            "labelled": int(np.count_nonzero(label_map))}


def available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def run(size: str, config: str, impl: str, classes: int) -> dict | None:
    """`measure` in a fresh process; None (and why, on stderr) where it failed."""
    try:
        return run_child(measure, size, config, impl, classes)
    except ChildFailed as e:
        print(f"# {size} {impl}: failed ({e})", file=sys.stderr)
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", choices=["tiny", "iris-small"])
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--classes", type=int, default=2)
    ap.add_argument("--baseline", action="store_true", help="also measure the previous full-volume label map")
    a = ap.parse_args()
    print(f"config {a.config} (random weights), {a.classes} classes, CPU, 1 thread; MiB = 2^20 bytes; "
          "peak = VmHWM of a fresh process; base = that process after loading the network and segmenting a 48^3 volume once\n")
    print("| target (int16) | spacing mm | working grid | windows | input MiB | base MiB | peak MiB | (peak-base)/input | baseline peak MiB | baseline (peak-base)/input | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    last_full_ratio = None
    for size in a.sizes.split(","):
        r = run(size, a.config, "streamed", a.classes)
        if r is None:
            continue
        extra = ["", ""]
        if a.baseline:
            need = r["base_mib"] + (last_full_ratio or 0) * r["input_mib"]
            if last_full_ratio is not None and need > 0.85 * available_mib():
                extra = [f"not run: needs ~{need / 1024:.0f} GiB", ""]
            else:
                b = run(size, a.config, "full", a.classes)
                if b is not None:
                    last_full_ratio = (b["peak_mib"] - b["base_mib"]) / b["input_mib"]
                    extra = [f"{b['peak_mib']:.0f}", f"{last_full_ratio:.1f}"]
        print(f"| {size} | {'x'.join(f'{s:g}' for s in SIZES.get(size, (1, 1, 1)))} | {r['working']} | {r['windows']} | "
              f"{r['input_mib']:.0f} | {r['base_mib']:.0f} | {r['peak_mib']:.0f} | "
              f"{(r['peak_mib'] - r['base_mib']) / r['input_mib']:.1f} | {extra[0]} | {extra[1]} | {r['seconds']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
