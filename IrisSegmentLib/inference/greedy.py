"""Greedy (picsl-greedy, the engine of ITK-SNAP) in a child process: the command lines of one registration and the
job that runs them. Its C++ holds the GIL and writes to the terminal, and a child can be killed at once when the
user cancels (`greedy_job.py`, no torch and no package import)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from ..config import LocaliseConfig
from ..errors import Cancelled
from ..progress import Cancel, Progress
from .search import translation_start

if TYPE_CHECKING:
    from .localise import Atlas

JOB = Path(__file__).with_name("greedy_job.py")


def python_executable() -> str:
    """The Python to run the registration child with: Slicer's PythonSlicer inside Slicer, else this one."""
    exe = Path(sys.executable)
    if "slicer" in exe.name.lower():
        found = shutil.which("PythonSlicer") or shutil.which("PythonSlicer", path=str(exe.parent))
        if found:
            return found
    return sys.executable


MIN_LEVEL_VOXELS = 4  # ITK's recursive Gaussian needs four voxels along every axis at every pyramid level


def pyramid(iterations: str, shortest: int) -> str:
    """Greedy's `-n` for images whose shortest axis has `shortest` voxels: the coarsest levels (each halves the
    grid) dropped while they would have fewer than MIN_LEVEL_VOXELS along it."""
    levels = iterations.split("x")
    while len(levels) > 1 and shortest / 2 ** (len(levels) - 1) < MIN_LEVEL_VOXELS:
        levels = levels[1:]
    return "x".join(levels)


def greedy_commands(cfg: LocaliseConfig, metric: str, masks: int, dof: int = 12, shortest: int = 64,
                    start: str = "intensity") -> list[tuple[str, str]]:
    """The stages of one registration: (name, Greedy command line); `dof` of the affine stage (12, or 7: a
    similarity transform); `shortest`: the fewest voxels along an axis of either image (`pyramid`); `start`: the
    moments initialisation on the images' intensities, or on their "edges" (gradient magnitude, which an inverted
    contrast leaves unchanged), or "search": the translation found by `search.translation_start` (search.mat).
    `-noise 0 -jitter 0` and one thread for the rigid and affine stages: Greedy otherwise adds unseeded random
    noise to the images (NCC), jitters the affine's sample points and sums over threads in varying order, and the
    same pair then registers differently from run to run, now and then into a wrong minimum (DESIGN 2.10); these
    stages are cheap, the deformable one keeps every thread. NCC compares patches of `ncc_radius` in the rigid and
    affine stages and of the smaller `deformable_ncc_radius` in the deformable one.
    The masks are resliced onto the fixed grid and onto `padded.nii` (twice its extent): how much of them the
    target's field of view holds."""
    def metric_option(radius: int) -> str:  # Greedy's -m: NCC over (2 radius + 1)^3 patches, or NMI
        return f"-m NCC {radius}x{radius}x{radius}" if metric == "ncc" else "-m NMI"

    m = metric_option(cfg.ncc_radius)
    need = 2 * max(cfg.ncc_radius, cfg.deformable_ncc_radius) + 1 if metric == "ncc" else MIN_LEVEL_VOXELS  # NCC patches
    if shortest < need:
        raise RuntimeError(f"an image has only {shortest} voxel(s) along one axis on the registration grid, fewer than "
                           f"the {need} that registration compares at once: too small to register")
    exact = "-noise 0 -jitter 0 -threads 1"
    pair = "fixed_edges.nii moving_edges.nii" if start == "edges" else "fixed.nii moving.nii"
    stages = [] if start == "search" else [("moments", f"-i {pair} -moments 1 -o moments.mat")]
    first = "search.mat" if start == "search" else "moments.mat"
    stages += [("rigid", f"-i fixed.nii moving.nii -a -dof 6 -ia {first} {m} -n {pyramid(cfg.rigid_iterations, shortest)} {exact} -o rigid.mat"),
              ("affine", f"-i fixed.nii moving.nii -a -dof {dof} -ia rigid.mat {m} -n {pyramid(cfg.affine_iterations, shortest)} {exact} "
                         "-o affine.mat")]
    chain = "affine.mat"
    if cfg.deformable_iterations:
        stages.append(("deformable", f"-i fixed.nii moving.nii -it affine.mat {metric_option(cfg.deformable_ncc_radius)} "
                                     f"-n {pyramid(cfg.deformable_iterations, shortest)} "
                                     f"-s {cfg.deformable_smoothing} -noise 0 -o warp.nii"))
        chain = "warp.nii affine.mat"
    outs = " ".join(f"-rm mask{k}.nii warped{k}.nii" for k in range(masks))
    stages.append(("warping", f"-rf fixed.nii -ri LINEAR -rm moving.nii warped_image.nii {outs} -r {chain}"))
    carried = " ".join(f"-rm mask{k}.nii carried{k}.nii" for k in range(masks))
    stages.append(("warping", f"-rf padded.nii -ri LINEAR {carried} -r {chain}"))
    return stages


def padded_affine(affine: np.ndarray, shape) -> np.ndarray:
    """Voxel-to-world of a grid of `shape` voxels twice the size of `affine`'s, centred on the same point: it
    covers the grid of (`shape`, `affine`) and half its extent again on every side."""
    m = np.diag([2.0, 2.0, 2.0, 1.0])
    m[:3, 3] = -(np.asarray(shape, dtype=np.float64) - 1) / 2
    return np.asarray(affine, dtype=np.float64) @ m


def run_greedy(fixed: tuple[np.ndarray, np.ndarray], atlas: Atlas, cfg: LocaliseConfig, metric: str, threads: int,
               report: Progress, cancel: Cancel | None, dof: int = 12,
               start: str = "intensity") -> tuple[np.ndarray, np.ndarray, np.ndarray, float, list[float]]:
    """Registers `atlas` onto `fixed` (image, affine) with a `dof` affine stage, initialised from `start`
    (`greedy_commands`): (warped image, warped masks (K, ...), affine matrix) on
    the fixed grid, the fraction of the warped masks' volume that the fixed grid holds (the rest left the
    target's field of view), and that fraction per mask. Raises Cancelled when `cancel()` turns true, RuntimeError
    when Greedy fails or times out."""
    import nibabel as nib

    with tempfile.TemporaryDirectory(prefix="iris-register-") as d:
        folder = Path(d)
        # Non-negative images: the moments initialisation weighs voxels by intensity (NCC and NMI do not mind a shift).
        nib.save(nib.Nifti1Image((fixed[0] - fixed[0].min()).astype(np.float32), fixed[1]), folder / "fixed.nii")
        nib.save(nib.Nifti1Image((atlas.image - atlas.image.min()).astype(np.float32), atlas.affine), folder / "moving.nii")
        if start == "edges":
            for name, (img, aff) in {"fixed": fixed, "moving": (atlas.image, atlas.affine)}.items():
                edges = ndimage.gaussian_gradient_magnitude(np.asarray(img, np.float32), 1.0)
                nib.save(nib.Nifti1Image(edges.astype(np.float32), aff), folder / f"{name}_edges.nii")
        for k, mk in enumerate(atlas.masks):
            nib.save(nib.Nifti1Image(mk.astype(np.float32), atlas.affine), folder / f"mask{k}.nii")
        if start == "search":
            np.savetxt(folder / "search.mat", translation_start(fixed[0], fixed[1], atlas.image, atlas.affine))
        padded = padded_affine(fixed[1], fixed[0].shape)
        nib.save(nib.Nifti1Image(np.zeros(fixed[0].shape, np.float32), padded), folder / "padded.nii")
        stages = greedy_commands(cfg, metric, len(atlas.masks), dof, min(*fixed[0].shape, *atlas.image.shape), start)
        (folder / "job.json").write_text(json.dumps({"threads": threads, "commands": [c for _, c in stages]}))
        proc = subprocess.Popen([python_executable(), str(JOB), str(folder)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
        reader.start()
        t0 = time.monotonic()
        try:
            while proc.poll() is None:
                if cancel is not None and cancel():
                    raise Cancelled("segmentation cancelled during registration")
                if time.monotonic() - t0 > cfg.timeout_s:
                    raise RuntimeError(f"registration took longer than {cfg.timeout_s:g} s")
                started = [ln for ln in lines if ln.startswith("stage")]
                if started:
                    i = int(started[-1].split()[1].split("/")[0])
                    report((i - 1) / len(stages), stages[i - 1][0])
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            reader.join(timeout=5)
            proc.stdout.close()
        if proc.returncode != 0:
            err = next((ln[7:].strip() for ln in lines if ln.startswith("error:")), "".join(lines[-3:]).strip())
            raise RuntimeError(f"registration failed: {err or f'exit code {proc.returncode}'}")
        image = np.asarray(nib.load(folder / "warped_image.nii").get_fdata(), np.float32)
        masks = np.stack([np.asarray(nib.load(folder / f"warped{k}.nii").get_fdata(), np.float32) for k in range(len(atlas.masks))])
        carried = [float(np.asarray(nib.load(folder / f"carried{k}.nii").dataobj, np.float64).sum()) for k in range(len(atlas.masks))]
        matrix = np.loadtxt(folder / "affine.mat")
    held = masks.reshape(len(masks), -1).sum(1, dtype=np.float64) * abs(np.linalg.det(fixed[1][:3, :3]))
    out = np.asarray(carried) * abs(np.linalg.det(padded[:3, :3]))
    return image, masks, matrix, float(held.sum() / max(out.sum(), 1e-9)), [float(h / max(c, 1e-9)) for h, c in zip(held, out)]
