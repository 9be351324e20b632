"""Command line: iris-segment segment | batch | demo | info | pack | train."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import warnings
from pathlib import Path

import numpy as np

from .errors import Cancelled, IrisInputError


def _labels(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise IrisInputError(f"--labels must be comma-separated integers like 1,3; got {text!r}") from None


class _Bar:
    """tqdm progress bar fed by the engine's progress(fraction, message) callback."""

    def __init__(self, desc: str):
        from tqdm import tqdm

        self.bar = tqdm(total=100, desc=desc, unit="%", bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")

    def __call__(self, fraction: float, message: str) -> None:
        self.bar.n = int(round(100 * fraction))
        self.bar.set_postfix_str(message, refresh=True)

    def close(self):
        self.bar.close()


def cmd_segment(a) -> int:
    from . import io
    from .inference.segmenter import Segmenter, check_volume

    # Outputs are checked before any work, and written only at the end (nothing when cancelled).
    out = io.check_output(a.output, a.overwrite)
    report_path = io.check_output(confidence_path(out), a.overwrite, (".json",))
    if a.save_task:
        io.check_output(a.save_task, a.overwrite, (".safetensors",))
    if a.save_prior:
        io.check_output(a.save_prior, a.overwrite)
    refs_i, refs_l = _reference_args(a)
    seg = Segmenter.load(a.model, a.device)
    target, t_aff, t_hdr = io.read_image(a.target)
    check_volume(target, "target image")  # before the reference is encoded
    task = _task(a, seg, refs_i, refs_l, io.read_image)
    bar = _Bar("segment")
    try:
        result = seg.segment(target, t_aff, task, modality=a.modality, overlap=a.overlap, progress=bar, strategy=a.strategy,
                             localise=a.localise, keep_prior=bool(a.save_prior))
    finally:
        bar.close()
    io.write_label_map(out, result.label_map, t_aff, t_hdr, overwrite=a.overwrite)
    if a.save_prior:
        if result.prior is None:
            print(f"no prior to save to {a.save_prior}: nothing was localised ({result.localisation})")
        else:
            io.write_volume(a.save_prior, np.moveaxis(result.prior.astype(np.float32), 0, -1), t_aff, None, a.overwrite)
            print(f"saved the localisation prior (one volume per structure, {', '.join(map(str, result.labels))}) to {a.save_prior}")
    if a.save_task and not a.task:
        task.save(a.save_task)
        print(f"saved the task embedding to {a.save_task}")
    vox = float(abs(np.linalg.det(t_aff[:3, :3])))
    report = confidence_report(result, vox, seg)
    write_json(report_path, report)
    where = "localised by registration" if result.localisation == "registration" else "whole field of view"
    print(f"wrote {out} ({result.seconds:.1f} s on {result.device}, {result.windows} windows, {where}) and {report_path.name}")
    for r in report["segments"]:
        est = "" if r["estimated_dice"] is None else f"  estimated Dice {r['estimated_dice']:.2f}"
        flag = "  LOW: check this segment" if r["flagged"] else ""
        print(f"  {r['label']:>4} {r['name']:<24} {r['volume_ml']:9.2f} ml{est}{flag}")
    if report["estimated_dice"] is False:
        print("  (no estimated Dice: this model folder has no confidence calibration fitted on its weights)")
    return 0


def confidence_path(output: Path) -> Path:
    """The confidence JSON beside a label map: seg.nii.gz -> seg.confidence.json."""
    name = output.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return output.with_name(name + ".confidence.json")


def confidence_report(result, voxel_mm3: float, seg) -> dict:
    """Per segment: volume, estimated Dice (None without a calibration), whether it is flagged, the features."""
    cal = seg.calibration
    segments = []
    for v, n in zip(result.labels, result.names):
        est = result.confidence.get(v)
        segments.append({"label": v, "name": n, "volume_ml": round(np.count_nonzero(result.label_map == v) * voxel_mm3 / 1000, 3),
                         "estimated_dice": est, "flagged": bool(est is not None and est < cal.flag_below),
                         "features": result.confidence_features.get(v, {})})
    return {"model_id": seg.model_id, "estimated_dice": cal is not None, "flag_below": cal.flag_below if cal else None,
            "segments": segments}


def write_json(path: Path, data: dict) -> None:
    """Atomically: a temporary file beside it, then a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _reference_args(a) -> tuple[list[str], list[str]]:
    """The --reference-image/--reference-label pairs, or [] with --task; the same messages for segment and batch."""
    refs_i, refs_l = a.reference_image or [], a.reference_label or []
    if a.task and refs_i:
        raise IrisInputError("give either --task or --reference-image/--reference-label, not both")
    if not a.task and not refs_i:
        raise IrisInputError("give a reference (--reference-image R --reference-label RL) or a saved --task FILE")
    if len(refs_i) != len(refs_l):
        raise IrisInputError(f"{len(refs_i)} --reference-image but {len(refs_l)} --reference-label; give them in pairs")
    return refs_i, refs_l


def _task(a, seg, refs_i: list[str], refs_l: list[str], read_image):
    """The task embedding: the saved --task (with --labels selected from it), or the references encoded by `seg`."""
    from .inference.task import TaskEmbedding
    from .io import check_label_on_image

    if a.task:
        task = TaskEmbedding.load(a.task)
        if a.labels:
            missing = [v for v in _labels(a.labels) if v not in task.labels]
            if missing:
                raise IrisInputError(f"label(s) {missing} not in the task (it has {task.labels}): pick from those")
            task = task.select(_labels(a.labels))
        return task
    refs = []
    for ip, lp in zip(refs_i, refs_l):
        img, aff, _ = read_image(ip)
        lab, laff, _ = read_image(lp)
        check_label_on_image(img, aff, lab, laff, str(ip), str(lp))
        refs.append((img, aff, lab))
    return seg.encode_references(refs, _labels(a.labels), modality=a.modality)


def cmd_batch(a) -> int:
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise IrisInputError('iris-segment batch needs Dask distributed: pip install "IrisSegmentLib[cohort]"') from None
    from .cohort import formats
    from .cohort.run import run_batch
    from .cohort.settings import Options, task_key
    from .cohort.targets import find_targets
    from .inference.segmenter import Segmenter, resolve_device
    from .resources import model_dir
    from .weights import CONFIG, WEIGHTS

    refs_i, refs_l = _reference_args(a)
    out = Path(a.output_dir)
    if out.exists() and not out.is_dir():
        raise IrisInputError(f"{out}: --output-dir is a file; give a folder (it is created if missing)")
    if a.workers is not None and a.workers < 1:
        raise IrisInputError(f"--workers must be at least 1, not {a.workers}")
    if a.scheduler and a.workers is not None:
        warnings.warn("--workers is ignored with --scheduler: the cluster's own workers are used")
    studies = find_targets(a.targets, a.pattern, exclude=out)
    # The task is encoded once, here; on a client without the GPU the workers use, on its CPU.
    device = a.device
    if a.scheduler:
        try:
            resolve_device(device)
        except IrisInputError:
            device = "cpu"
    seg = Segmenter.load(a.model, device)
    overlap = seg.config.inference.overlap if a.overlap is None else a.overlap
    if not 0 <= overlap < 1:
        raise IrisInputError(f"overlap must be in [0, 1), not {overlap}")
    task = _task(a, seg, refs_i, refs_l, formats.read_image)
    if task.model_id != seg.model_id:
        raise IrisInputError(f"the task embedding was made by model {task.model_id!r}, not by the loaded {seg.model_id!r}; "
                             "encode the reference again with this model")
    folder = model_dir(a.model).resolve()
    options = Options(str(folder), a.device, overlap, a.strategy or seg.config.inference.strategy, a.modality,
                      a.localise or seg.config.localise.mode)
    del seg
    key = task_key(options, [a.task] if a.task else [*refs_i, *refs_l], _labels(a.labels), [folder / WEIGHTS, folder / CONFIG])
    out.mkdir(parents=True, exist_ok=True)
    s = run_batch(studies, out, task, options, key, source=str(a.targets), scheduler=a.scheduler, workers=a.workers,
                  overwrite=a.overwrite)
    rate = f", {s.ran / s.seconds * 60:.1f} studies/min" if s.ran and s.seconds else ""
    print(f"{s.ok} segmented, {s.failed} failed, {s.kept} kept, {s.already_done} already done "
          f"({s.seconds:.1f} s{rate}): {s.results}")
    if s.interrupted:
        print(f"interrupted: finished studies are kept in {s.results}; run the same command again to resume", file=sys.stderr)
        return 130
    if s.failed:
        print(f"{s.failed} failed: the reasons are in {s.results}; fix them and run the same command again "
              "(finished studies are not redone)", file=sys.stderr)
        return 1
    return 0


def cmd_demo(a) -> int:
    from .demo import run_demo

    summary = run_demo(Path(a.output_dir), a.device, a.model)
    print(json.dumps(summary, indent=1))
    return 0


def cmd_info(a) -> int:
    import torch

    from .inference.segmenter import resolve_device
    from .resources import resources_dir
    from .weights import load_model
    from . import __version__

    print(f"IrisSegmentLib {__version__}, Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}")
    dev = resolve_device(a.device)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"device: {dev} (CUDA GPU: {gpu}; CPU threads: {torch.get_num_threads()})")
    print(f"resources: {resources_dir()}")
    model, cfg, info = load_model(a.model)
    n = sum(p.numel() for p in model.parameters())
    print(f"model: {cfg.model.name} ({n / 1e6:.2f}M parameters, fingerprint {cfg.model.fingerprint()}), "
          f"window {cfg.model.window} at {cfg.model.spacing} mm")
    if info:
        print("training: " + json.dumps(info))
    return 0


def cmd_pack(a) -> int:
    if a.travel:
        from .training.travel import make_travel

        summary = make_travel(a.travel, a.out, margin=a.margin)
        size = sum(f.stat().st_size for f in Path(a.out).rglob("*") if f.is_file())
        for key, (kept, total) in summary["cases_kept_of"].items():
            print(f"  {key:<20} {kept:>4} of {total:<4} cases {summary['bytes'][key] / 2**20:7.2f} MiB")
        print(f"image quantisation error: max {summary['image_max_abs_error']:.4f}, RMS {summary['image_rms_error']:.4f}")
        print(f"travel cache {a.out}: {size / 2**20:.1f} MiB")
        return 0
    from .config import BundleConfig
    from .training.data import pack

    cfg = BundleConfig.load(a.config) if a.config else BundleConfig()
    out = pack(a.source, a.out, cfg.model.spacing, cfg.inference)
    print(f"packed into {out}")
    return 0


def cmd_train(a) -> int:
    import dataclasses

    from .config import BundleConfig
    from .resources import model_dir
    from .training.train import train
    from .weights import CONFIG

    if not a.config and not a.init:
        raise IrisInputError("give --config, or --init MODEL_DIR to train with that model folder's config")
    cfg = BundleConfig.load(a.config or model_dir(a.init) / CONFIG)
    overrides = {k: v for k, v in (("seed", a.seed), ("batch_size", a.batch_size)) if v is not None}
    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, **overrides))
    train(cfg, a.data, a.out, a.minutes, a.resume, a.device, checkpoint_minutes=a.checkpoint_minutes, init=a.init,
          workers=a.workers, resume_dir=a.resume_dir, bank_crops=a.bank_crops)
    return 0


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
