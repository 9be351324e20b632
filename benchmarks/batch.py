"""Cohort throughput (issue 10): `iris-segment batch` against a plain sequential loop of `iris-segment segment` calls.

Rows, each one command (or loop of commands) run from here as a shell would run it, into its own empty folder:
  - loop: `iris-segment segment --reference-image R --reference-label RL --target T --output O` once per study, one
    after the other: every call starts Python, imports torch, loads the model and encodes the reference again;
  - batch, 1 worker: `iris-segment batch ... --workers 1` (one worker process with every core as torch threads);
  - batch, N workers: `iris-segment batch ... --workers N` (N processes, cores // N torch threads each).
Every row is timed wall-clock from its first process's start to its last one's exit, so process starts, imports,
model loading, reference encoding, the Dask cluster's start and writing the label maps all count. The loop and the
batch client run with OMP_NUM_THREADS = cores (torch's threads); batch workers get cores // workers threads.
Columns: studies, seconds, studies per minute, and the loop's seconds over the row's (speed-up; > 1: faster).
Below the table: how many of each batch row's label maps equal the loop's voxel for voxel.

Cohort: the 10 la2018 validation images (`--data`/la2018/val/*_image.nii.gz, left-atrium LGE-MRI) segmented with
the first la2018 training case (image and label map) as the reference, with the bundled model.
--quick: 4 small synthetic studies and the tiny test network with random weights, to check the machinery in about
half a minute (mostly process starts); its numbers mean nothing.

    python -m benchmarks.batch [--data ../shared/data] [--workers N] [--device cpu|cuda] [--quick] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from IrisSegmentLib.cohort.cluster import available_cores
from IrisSegmentLib.training.pause import paused_training
from benchmarks.common import CONFIGS, DATA, ROOT, command
from benchmarks.common.processes import cpu_model
from benchmarks.common.tables import fmt

QUICK_STUDIES = 4
CLI = [sys.executable, "-m", "IrisSegmentLib.cli"]


@dataclass
class Row:
    name: str
    workers: int | None  # None: the loop
    threads: int  # torch threads per process
    studies: int
    seconds: float | None = None
    ok: int = 0  # label maps written
    note: str = ""  # why it failed
    identical: int | None = None  # label maps equal to the loop's

    @property
    def per_minute(self) -> float | None:
        return self.studies / self.seconds * 60 if self.seconds else None


# -- the cohort ---------------------------------------------------------------------------------------------------
def real_cohort(data: Path, work: Path) -> dict:
    val = sorted((data / "la2018" / "val").glob("*_image.nii.gz"))
    train = sorted((data / "la2018" / "train").glob("*_image.nii.gz"))
    if not val or not train:
        raise SystemExit(f"{data / 'la2018'}: la2018 train/val not found; pass --data")
    ref = train[0]
    return {"targets": data / "la2018" / "val", "pattern": "*_image.nii.gz", "studies": [p for p in val],
            "reference": ref, "reference_label": ref.with_name(ref.name.replace("_image", "_label")), "model": None,
            "description": f"{len(val)} la2018 validation images (left-atrium LGE-MRI, {shape_range(val)} voxels at "
                           f"1.25 mm), reference la2018/train/{ref.name.replace('_image.nii.gz', '')} (first training case)"}


def shape_range(paths: list[Path]) -> str:
    import nibabel as nib

    shapes = np.array([nib.load(str(p)).shape[:3] for p in paths])
    lo, hi = shapes.min(0), shapes.max(0)
    return "x".join(f"{a}" if a == b else f"{a}-{b}" for a, b in zip(lo, hi))


def quick_cohort(work: Path) -> dict:
    """Small synthetic studies, and a model folder holding the tiny test network with random weights (threshold 0)."""
    import dataclasses

    import nibabel as nib
    import torch

    from IrisSegmentLib.config import BundleConfig
    from IrisSegmentLib.model import build_iris
    from IrisSegmentLib.weights import save_model

    cfg = BundleConfig.load(CONFIGS / "tiny.yaml")
    cfg = dataclasses.replace(cfg, inference=dataclasses.replace(cfg.inference, threshold=0.0))
    torch.manual_seed(0)
    save_model(build_iris(cfg.model).eval(), cfg, work / "model", info={"note": "random weights (python -m benchmarks.batch --quick)"})
    rng = np.random.default_rng(0)
    aff = np.diag([1.5, 1.5, 2.0, 1.0])
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in (24, 22, 14)), indexing="ij"), -1)
    blob = (((grid - [12, 11, 7]) / [7, 6, 4]) ** 2).sum(-1) <= 1
    nib.save(nib.Nifti1Image((50 + 150 * blob + rng.normal(0, 5, blob.shape)).astype(np.float32), aff), str(work / "ref.nii.gz"))
    nib.save(nib.Nifti1Image(blob.astype(np.uint8), aff), str(work / "ref_label.nii.gz"))
    (work / "targets").mkdir()
    studies = []
    for i in range(QUICK_STUDIES):
        p = work / "targets" / f"study{i}.nii.gz"
        nib.save(nib.Nifti1Image((50 + 150 * blob + rng.normal(0, 5, blob.shape)).astype(np.int16), aff), str(p))
        studies.append(p)
    return {"targets": work / "targets", "pattern": "*.nii.gz", "studies": studies, "reference": work / "ref.nii.gz",
            "reference_label": work / "ref_label.nii.gz", "model": work / "model",
            "description": f"{QUICK_STUDIES} synthetic 24x22x14 studies (--quick)"}


# -- the rows -------------------------------------------------------------------------------------------------------
def study_id(path: Path) -> str:
    return path.name[: -len(".nii.gz")]


def timed(commands: list[list[str]], env: dict) -> tuple[float, str]:
    """Seconds to run `commands` one after the other, and the last failure's message ('' if none)."""
    t0 = time.perf_counter()
    failure = ""
    for c in commands:
        p = subprocess.run(c, capture_output=True, text=True, env=env)
        if p.returncode != 0:
            failure = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
    return time.perf_counter() - t0, failure


def common(cohort: dict, device: str) -> list[str]:
    args = ["--reference-image", str(cohort["reference"]), "--reference-label", str(cohort["reference_label"]),
            "--device", device]
    return args + (["--model", str(cohort["model"])] if cohort["model"] else [])


def run_loop(cohort: dict, out: Path, device: str, env: dict, threads: int) -> Row:
    out.mkdir()
    commands = [[*CLI, "segment", *common(cohort, device), "--target", str(t), "--output", str(out / f"{study_id(t)}.nii.gz")]
                for t in cohort["studies"]]
    row = Row("loop of `iris-segment segment` (one process per study)", None, threads, len(commands))
    row.seconds, row.note = timed(commands, env)
    row.ok = len(list(out.glob("*.nii.gz")))
    return row


def run_batch(cohort: dict, out: Path, device: str, env: dict, workers: int, cores: int) -> Row:
    threads = max(1, cores // workers)
    command = [*CLI, "batch", *common(cohort, device), "--targets", str(cohort["targets"]), "--pattern", cohort["pattern"],
               "--output-dir", str(out), "--workers", str(workers)]
    row = Row(f"`iris-segment batch --workers {workers}` ({threads} thread(s) each)", workers, threads, len(cohort["studies"]))
    row.seconds, row.note = timed([command], env)
    row.ok = len(list(out.glob("*.nii.gz")))
    return row


def same_maps(a: Path, b: Path, studies: list[Path]) -> int:
    import nibabel as nib

    n = 0
    for t in studies:
        fa, fb = a / f"{study_id(t)}.nii.gz", b / f"{study_id(t)}.nii.gz"
        if fa.exists() and fb.exists() and np.array_equal(np.asanyarray(nib.load(str(fa)).dataobj),
                                                          np.asanyarray(nib.load(str(fb)).dataobj)):
            n += 1
    return n


# -- report ---------------------------------------------------------------------------------------------------------
def table(rows: list[Row]) -> str:
    loop = rows[0].seconds
    lines = ["| row | studies | seconds | studies/min | ratio vs loop |", "|---|---|---|---|---|"]
    for r in rows:
        label = r.name + (f" ({r.ok} of {r.studies} written: {r.note})" if r.ok < r.studies or r.note else "")
        ratio = loop / r.seconds if loop and r.seconds else None
        lines.append(f"| {label} | {r.studies} | {fmt(r.seconds, '.1f')} | {fmt(r.per_minute, '.1f')} | "
                     f"{fmt(ratio, '.2f')}{'×' if ratio else ''} |")
    return "\n".join(lines)


def caption(args, cohort: dict, rows: list[Row], cores: int, load: tuple[float, float]) -> str:
    import torch

    same = "; ".join(f"--workers {r.workers}: {r.identical} of {r.studies}" for r in rows if r.workers is not None)
    busy = max(load) > cores + 0.5
    return "\n\n".join([
        f"Command: `{command('benchmarks.batch')}`",
        f"Device: {args.device}; {cpu_model()} ({cores} cores); torch {torch.__version__}; load average (1 min) {load[0]:.1f} before, "
        f"{load[1]:.1f} after" + (": other jobs shared the CPU, the times are contended." if busy else "."),
        f"Cohort: {cohort['description']}. Model: " + ("the bundled iris-small." if cohort["model"] is None else
                                                       "the tiny test network with random weights (--quick: numbers mean nothing)."),
        f"Label maps equal to the loop's, voxel for voxel: {same}.",
        "Each row is timed from its first process's start to its last one's exit: Python and torch start-up, model "
        "loading, reference encoding (once per call in the loop, once per run in batch), the Dask cluster's start, "
        "reading, segmenting and writing the studies.",
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--workers", type=int, default=None,
                    help="workers of the last row (default: one per core, at least 2; with --device cuda one per GPU)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="4 small synthetic studies, tiny random network: checks the machinery")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    cores = available_cores()
    if args.device == "cuda":
        import torch

        workers = args.workers or torch.cuda.device_count()  # one worker per GPU
    else:
        workers = args.workers or max(2, cores)
    env = {**os.environ, "OMP_NUM_THREADS": str(cores), "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONWARNINGS": "ignore"}
    load_before = os.getloadavg()[0]
    with paused_training(lambda m: print(m, file=sys.stderr)), tempfile.TemporaryDirectory(prefix="iris-batch-bench-") as tmp:
        work = Path(tmp)
        cohort = quick_cohort(work) if args.quick else real_cohort(args.data, work)
        rows = [run_loop(cohort, work / "loop", args.device, env, cores)]
        print(f"# loop: {fmt(rows[-1].seconds, '.1f')} s {rows[-1].note}", file=sys.stderr, flush=True)
        for n in dict.fromkeys((1, workers)):
            rows.append(run_batch(cohort, work / f"batch{n}", args.device, env, n, cores))
            rows[-1].identical = same_maps(work / "loop", work / f"batch{n}", cohort["studies"])
            print(f"# batch --workers {n}: {fmt(rows[-1].seconds, '.1f')} s {rows[-1].note}", file=sys.stderr, flush=True)
    text = "\n\n".join([table(rows), caption(args, cohort, rows, cores, (load_before, os.getloadavg()[0]))])
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"rows": [{**asdict(r), "per_minute": r.per_minute} for r in rows], "cores": cores,
                                         "device": args.device, "quick": args.quick, "command": sys.argv}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
