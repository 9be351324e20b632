"""What each `iris-segment` command does (the parser is in `cli.py`)."""
from __future__ import annotations

import json
import platform
import sys
import warnings
from pathlib import Path

import numpy as np

from .atomic import write_atomic
from .errors import IrisInputError


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
    write_atomic(report_path, json.dumps(report, indent=1))
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
    segments = [{"label": v, "name": n, "volume_ml": round(np.count_nonzero(result.label_map == v) * voxel_mm3 / 1000, 3),
                 "estimated_dice": result.confidence.get(v), "flagged": v in result.flagged,
                 "features": result.confidence_features.get(v, {})}
                for v, n in zip(result.labels, result.names)]
    return {"model_id": seg.model_id, "estimated_dice": seg.calibration is not None, "flag_below": result.flag_below,
            "segments": segments}


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
    overlap = seg.check_overlap(a.overlap)
    task = _task(a, seg, refs_i, refs_l, formats.read_image)
    seg.check_task(task)
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
    if a.registrations:
        from .training.registrations import pack_registrations

        done = pack_registrations(out, a.registrations, cfg.localise, float(cfg.model.spacing[0]))
        print("real registration priors: " + ", ".join(f"{k} {v}" for k, v in done.items()))
    return 0


def cmd_train(a) -> int:
    import dataclasses

    from .config import BundleConfig
    from .resources import model_dir
    from .training import pause
    from .training.train import train
    from .weights import CONFIG

    if not a.config and not a.init:
        raise IrisInputError("give --config, or --init MODEL_DIR to train with that model folder's config")
    cfg = BundleConfig.load(a.config or model_dir(a.init) / CONFIG)
    overrides = {k: v for k, v in (("seed", a.seed), ("batch_size", a.batch_size)) if v is not None}
    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, **overrides))
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    pause.register()  # the machine's background training run: benchmarks pause it while they time something
    try:
        train(cfg, a.data, a.out, a.minutes, a.resume, a.device, checkpoint_minutes=a.checkpoint_minutes, init=a.init,
              workers=a.workers, resume_dir=a.resume_dir, bank_crops=a.bank_crops)
    finally:
        pause.unregister()
    return 0
