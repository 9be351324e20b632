"""Command line: iris-segment segment | batch | demo | info | pack | train (the commands are in `commands.py`)."""
from __future__ import annotations

import argparse
import sys
import warnings

from .commands import cmd_batch, cmd_demo, cmd_info, cmd_pack, cmd_segment, cmd_train
from .errors import Cancelled, IrisInputError


def _reference_options(p: argparse.ArgumentParser) -> None:
    """The task of `segment` and `batch`: references or a saved task, and the labels."""
    p.add_argument("--reference-image", action="append", help="reference image; repeat for a context ensemble")
    p.add_argument("--reference-label", action="append", help="label map drawn on the reference image; one per --reference-image")
    p.add_argument("--task", help="saved task embedding (.safetensors) used instead of references")
    p.add_argument("--labels", help="comma-separated label values to segment (default: all in the reference)")


def _window_options(p: argparse.ArgumentParser) -> None:
    """How `segment` and `batch` run the sliding window and normalise intensities."""
    p.add_argument("--overlap", type=float, default=None, help="sliding-window overlap in [0, 1) (default 0.5)")
    p.add_argument("--strategy", choices=("coarse-to-fine", "full"), default=None,
                   help="coarse-to-fine (default): overlapping windows only around what a first covering pass found; "
                        "full: every overlapping window")
    p.add_argument("--modality", default="auto", choices=["auto", "ct", "mr"], help="intensity normalisation")
    p.add_argument("--localise", choices=("auto", "registration", "none"), default=None,
                   help="auto (default): register the reference onto the target and segment only where its structures can "
                        "be (the whole field of view, with a warning, where registration fails); registration: the same, but an "
                        "error where it cannot run at all (no registration engine, or a task without reference images); "
                        "none: the whole field of view, no prior")


def build_parser() -> argparse.ArgumentParser:
    from .training.travel import MARGIN

    p = argparse.ArgumentParser(prog="iris-segment", description="In-context 3D segmentation with IRIS")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("segment", help="segment a target with the structures of one or more references")
    _reference_options(s)
    s.add_argument("--target", required=True, help="image to segment (NIfTI)")
    s.add_argument("--output", required=True, help="output label map (.nii.gz), with the target's geometry")
    s.add_argument("--save-task", help="also save the task embedding to this file for reuse")
    s.add_argument("--save-prior", help="also save the localisation prior (.nii.gz, one volume per structure) to inspect it")
    s.add_argument("--model", default=None, help="bundled model name or model folder (default: iris-small)")
    s.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    _window_options(s)
    s.add_argument("--overwrite", action="store_true", help="replace existing output files")
    s.set_defaults(fn=cmd_segment)

    b = sub.add_parser("batch", help="segment a cohort (a folder or CSV of targets) on a local or Dask cluster, resumable")
    _reference_options(b)
    b.add_argument("--targets", required=True, help="folder searched recursively for images, or a CSV with a path column (and optionally id)")
    b.add_argument("--pattern", action="append", help="glob of target names in the folder; repeatable (default: *.nii.gz and *.nii); "
                                                         "a matching folder is read as a DICOM series")
    b.add_argument("--output-dir", required=True, help="label maps OUT/<study id>.nii.gz and OUT/results.csv (created if missing)")
    b.add_argument("--workers", type=int, default=None, help="local worker processes (default: one per GPU, or cores/4 on the CPU)")
    b.add_argument("--scheduler", default=None, help="address of a running Dask scheduler (tcp://host:8786) instead of a local cluster")
    b.add_argument("--model", default=None, help="bundled model name or model folder (default: iris-small); workers load it from the same path")
    b.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda, for every worker")
    _window_options(b)
    b.add_argument("--overwrite", action="store_true", help="redo every study and replace existing outputs")
    b.set_defaults(fn=cmd_batch)

    d = sub.add_parser("demo", help="segment the bundled sample data and report the Dice")
    d.add_argument("--output-dir", required=True)
    d.add_argument("--device", default="auto")
    d.add_argument("--model", default=None)
    d.set_defaults(fn=cmd_demo)

    i = sub.add_parser("info", help="model, device and versions")
    i.add_argument("--device", default="auto")
    i.add_argument("--model", default=None)
    i.set_defaults(fn=cmd_info)

    k = sub.add_parser("pack", help="pack training data onto the working grid (data cache for training)")
    src = k.add_mutually_exclusive_group(required=True)
    src.add_argument("--source", help="folder laid out as shared/data")
    src.add_argument("--travel", metavar="PACKED", help="instead: shrink this packed cache into a travel cache for the GPU machine")
    k.add_argument("--out", required=True)
    k.add_argument("--config", default=None, help="bundle config whose spacing and intensity settings --source uses")
    k.add_argument("--margin", type=int, default=MARGIN, help=f"--travel: voxels kept around each label's bounding box (default {MARGIN})")
    k.add_argument("--registrations", type=int, default=0, metavar="N",
                   help="--source: also register N random pairs of training cases per collection with images (Greedy, as the "
                        "engine does), for real registration priors in training (kept; a rerun adds what is missing)")
    k.set_defaults(fn=cmd_pack)

    t = sub.add_parser("train", help="episodic training with a time budget, resumable")
    t.add_argument("--config", default=None, help="bundle config YAML (e.g. Resources/Configs/iris-small.yaml); default with --init: that folder's")
    t.add_argument("--data", required=True, help="packed or travel data folder (from `iris-segment pack`)")
    t.add_argument("--minutes", type=float, required=True, help="time budget from the start (data loading included); validation and the final export follow")
    t.add_argument("--resume", default=None, help="checkpoint.safetensors to continue from")
    t.add_argument("--init", default=None, metavar="MODEL_DIR", help="start from this model folder's weights (EMA too), fresh optimiser and warm-up")
    t.add_argument("--out", required=True, help="gets log.jsonl and the model folder model/")
    t.add_argument("--resume-dir", default=None, help="where checkpoint.safetensors (~120 MB for iris-small) goes (default: --out)")
    t.add_argument("--checkpoint-minutes", type=float, default=2.0, help="checkpoint and export this often")
    t.add_argument("--device", default="cpu", help="cpu or cuda")
    t.add_argument("--workers", type=int, default=0, help="processes that sample episodes (0: this one)")
    t.add_argument("--batch-size", type=int, default=None, help="episodes per step (default: the config's)")
    t.add_argument("--bank-crops", type=int, default=4, help="reference crops per class that the exported memory bank averages over")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's, one per core); 1 for a background run on a CPU that other jobs "
                        "share: several threads then wait for each other at every operation (measured 60x slower)")
    t.set_defaults(fn=cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda msg, *a, **k: print(f"warning: {msg}", file=sys.stderr)
        try:
            return args.fn(args)
        except IrisInputError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except (Cancelled, KeyboardInterrupt):
            print("cancelled: no output written", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
