"""Evidence for the nine gap choices (issue 11): ablations, sensitivity, and cost against input size.

1. Ablations. For each of the nine gaps the paper leaves open (docs/DESIGN.md section 2), the design
   against at least one credible alternative, each trained with the same budget (--steps) from the
   same seeds (--seeds) on one CPU mini-benchmark:
     data: the packed la2018 + hippocampus + acdc training cases (`iris-segment pack`, --data), on
       the tiny network (Resources/Configs/tiny.yaml: 32^3 crops and windows, 1.5 mm), AdamW as
       in train.py (lr 1e-3, warm-up --steps/6, weight EMA 0.99), the product sampler and augmentation;
     validation (the same for every row): 48 fixed one-shot episodes from the validation split of
       the three collections (EpisodeSampler seed 12345, no augmentation, the design's sampler
       settings), Dice of the EMA network per collection, then the mean over collections ("episode
       Dice"); and, for rows marked so, "volume Dice": the packed validation volume (its labelled
       region plus 12 mm) segmented by the product engine (Segmenter: reference crops, sliding
       windows, blending, resampling) with a reference from another subject (acdc 3 targets,
       la2018 4, hippocampus 4).
   Gaps whose alternative is a training-time choice train their own networks (model/training config
   switches, ModelConfig ablation fields); gaps whose alternative is an inference-time choice (memory
   bank filling, sliding-window overlap/blending/strategy) are evaluated on the design's networks.
2. Sensitivity: learning rate, number of context queries m, working spacing (training data resampled,
   evaluated by the engine on the 1.5 mm validation volumes), window size, one-shot vs 3-reference
   ensemble, on the same mini-benchmark.
3. Cost against input size for the product (bundled iris-small, Segmenter API, CPU, default
   precision): seconds and peak memory (VmHWM of a fresh process per row) against the target size,
   the number of classes and the number of references; the spread of sliding-window choices (the
   seed's "10-50x inference time"); and training-step memory of the paper-sized network (the seed's
   "24-48 GB"). Fitted growth is written with the tables; plots go to docs/.
4. The prior network (issue 17, --parts prior): the tiny network with a prior input (prior_channels 4, the
   episodes of issue 17: query crops near the structure, simulated registration priors, prior dropout 0.25)
   against no prior input, against each prior simulation (no simulated error: the blurred truth only; each
   error of priors.PRIOR_ERRORS left out in turn) and against prior dropout 0; same budget and seeds. Each
   network is evaluated by the engine on PRIOR_TARGETS whole validation volumes per collection, one
   reference from another subject, localised by registration (real Greedy priors; the localisation does
   not depend on the network, so it is made once per (target, reference) pair and cached under
   --work/localisations): the engine's merge (w = localise.prior_weight 0.5), the network alone inside the
   region (w = 0), and no localisation (pure in-context segmentation, the whole field of view); with
   registration alone (the warped masks, no network) on the same pairs for reference. The verdicts rest on
   these volume Dice; episode Dice (simulated priors, crop level) is a training signal only.
5. Training speed on the CPU (issue 17, --parts speed): CPU seconds per training step (fresh process, as
   for the architectures) of the tiny and the product network in fp32 and bf16 autocast, contiguous and
   channels-last 3D, at 32³ and 48³ crops; a one-step profile of the product network (iris-small, 48³,
   batch 2, episodes of the packed training set): data, forward, backward, optimiser, and the top
   operators; the real loop (episode_batches + train_step) with 0 and 1 episode workers; and, trained at
   equal steps with the prior rows' budget, bf16, channels-last and 48³ crops against the prior design (and
   32³ crops with 3x the steps: about the 48³ row's CPU time).

Every training run is its own fresh process; results are cached as JSON under --work, so an
interrupted run resumes and finished runs are skipped (and runs that another invocation is running
are left to it). Table columns: Dice mean and sd over seeds; parameters, process CPU seconds per
training step and peak memory come from a separate fresh process per variant on a fixed batch of the
variant's shapes (`arch_cost`: peak = VmHWM after resetting it through /proc/self/clear_refs, above
the resident memory before the first step, optimiser state included), so other jobs on a shared
machine do not distort them; the cost rows also report process CPU seconds.
Verdict per gap: the difference from the design is "within noise" when |diff| < 2 sd (sd pooled
over both rows; for inference-time alternatives on the same networks, the sd of the per-seed
paired differences), else the better row is named. The prior and speed rows (issue 17) are paired
by seed (a seed gives every variant the same initial weights and the same draws of datasets, pairs
and crops), with the unpaired 2 sd printed beside each verdict.

    python -m benchmarks.ablations [--data .cache/packed] [--steps 200] [--seeds 0,1,2] [--jobs 2]
        [--parts ablations,sensitivity,cost,prior,speed] [--work runs/ablations] [--docs docs] [--quick]

docs/ablations.md holds one section per group of parts (issue 11: ablations, sensitivity, cost; prior;
speed); a run rewrites the sections of the parts it ran and keeps the others as they were.

--quick: synthetic data, 16^3 crops, 1 step, 2 seeds, tiny random network for the cost rows, all
in one process: checks the machinery in about a minute; its numbers mean nothing. It writes
to --work only (default a temporary folder), never to docs/.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from IrisSegmentLib.config import BundleConfig
from IrisSegmentLib.model import build_iris
from IrisSegmentLib.training.data import Case
from IrisSegmentLib.training.priors import PRIOR_ERRORS
from benchmarks.common import CONFIGS, ROOT
from benchmarks.common.processes import ChildFailed, peak_rss_mib, reset_peak_rss, run_child

MIB = 2**20
DATASETS = ("la2018", "hippocampus", "acdc")
VOLUME_TARGETS = {"acdc": 3, "la2018": 4, "hippocampus": 4}
PRIOR_TARGETS = {"acdc": 8, "la2018": 8, "hippocampus": 8}  # the prior rows: registration is cached, so more pairs
VAL_EPISODES = 48
VAL_SEED = 12345
GAPS = {
    1: "task-encoding attention", 2: "high-resolution foreground pooling", 3: "3D pixel shuffle (context tokens)",
    4: "bidirectional cross-attention", 5: "decoder", 6: "episodic sampling", 7: "memory bank",
    8: "multi-class", 9: "sliding window",
}


# -- what is compared -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One trained configuration: overrides of the mini-benchmark's model and training config."""

    key: str
    group: str  # "design", "gap N" or a sensitivity name
    label: str
    model: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    spacing: float = 1.5  # working spacing of the training data and of the engine, mm
    volume: bool = False  # also the engine's volume Dice (needed where episodes are not comparable)
    localised: bool = False  # the engine with localisation by registration, and without (the prior rows)
    crop_scale: float = 1.0  # training crop and window: the mini-benchmark's times this
    steps_scale: float = 1.0  # training steps (and warm-up): the mini-benchmark's times this
    bf16: bool = False  # bf16 autocast in the training steps (CPU)
    channels_last: bool = False  # model and batches in channels-last 3D memory format


@dataclass(frozen=True)
class Probe:
    """One inference-time alternative, evaluated on the design's networks by the engine."""

    key: str
    group: str
    label: str
    inference: dict = field(default_factory=dict)
    window: int | None = None
    references: int = 1
    bank: str | None = None  # "export-mean" (design), "ema-0.99", "seed-ema-0.999"


DESIGN = Variant("design", "design", "design (every gap as in DESIGN.md)", volume=True)
TRAINED = [
    DESIGN,
    Variant("joint-attention", "gap 1", "seed-style self-attention over [tokens; features]", {"task_attention": "joint"}),
    Variant("upsample-then-pool", "gap 2", "upsample features, then pool (same numbers, full-res cost)", {"foreground_pooling": "upsample-then-pool"}),
    Variant("downsample-pool", "gap 2", "mask area-pooled to 1/8, pool there", {"foreground_pooling": "downsample"}),
    Variant("no-fg-pool", "gap 2", "no foreground pooling (learnt token)", {"foreground_pooling": "none"}),
    Variant("pool-context", "gap 3", "context from the mask area-pooled to 1/8 (no shuffle)", {"context_tokens": "pool"}),
    Variant("one-way", "gap 4", "one-way: image <- tokens only", {"decoder_attention": "one-way"}),
    Variant("no-second-fusion", "gap 5", "no second (1/4-scale) image <- tokens fusion", {"second_fusion": False}),
    Variant("seed-sampling", "gap 6", "seed's sampler: dataset weights by size, one class per episode, no unions",
            training={"dataset_weights": "by-size", "max_classes": 1, "merge_prob": 0.0}),
    Variant("independent-classes", "gap 8", "one decoder pass per class (no class interaction)", {"class_interaction": "independent"}),
]
SENSITIVITY = [
    Variant("lr-3e-4", "learning rate", "lr 3e-4", training={"lr": 3e-4}),
    Variant("lr-3e-3", "learning rate", "lr 3e-3", training={"lr": 3e-3}),
    Variant("m-1", "context queries m", "m = 1", {"num_queries": 1}),
    Variant("m-10", "context queries m", "m = 10", {"num_queries": 10}),
    Variant("spacing-2.0", "working spacing", "2.0 mm", spacing=2.0, volume=True),
    Variant("spacing-3.0", "working spacing", "3.0 mm", spacing=3.0, volume=True),
]
PRIOR_CHANNELS = 4  # the tiny network's prior fusion width (iris-small: 8)
PRIOR = {"prior_channels": PRIOR_CHANNELS}
PRIOR_DESIGN = Variant("prior", "prior design", "design: prior input, every simulated error, prior dropout 0.25", PRIOR,
                       localised=True)
PRIOR_TRAINED = [
    PRIOR_DESIGN,
    Variant("no-prior-input", "prior input", "no prior input (prior_channels 0; the same episodes)", localised=True),
    Variant("prior-errors-none", "prior simulation", "no simulated error: the blurred truth only", PRIOR,
            {"prior_errors": ()}, localised=True),
    *[Variant(f"prior-no-{e}", "prior simulation", f"every simulated error but {e}", PRIOR,
              {"prior_errors": tuple(x for x in PRIOR_ERRORS if x != e)}, localised=True) for e in PRIOR_ERRORS],
    Variant("prior-dropout-0", "prior dropout", "prior dropout 0 (every batch with its prior)", PRIOR,
            {"prior_dropout": 0.0}, localised=True),
]
SPEED_TRAINED = [
    Variant("prior-bf16", "training speed", "bf16 autocast training steps", PRIOR, localised=True, bf16=True),
    Variant("prior-channels-last", "training speed", "channels-last 3D (model and batches)", PRIOR, localised=True,
            channels_last=True),
    Variant("prior-crop-48", "training speed", "48³ crops and windows (1.5x the design's 32³)", PRIOR, localised=True,
            crop_scale=1.5),
    Variant("prior-steps-3x", "training speed", "32³ crops, 3x the steps: about the CPU time of the 48³ row", PRIOR,
            localised=True, steps_scale=3.0),
]
ALL_VARIANTS = TRAINED + SENSITIVITY + PRIOR_TRAINED + SPEED_TRAINED
DESIGN_VALUES = {"learning rate": "lr 1e-3", "context queries m": "m = 4", "working spacing": "1.5 mm",
                 "window size": "32^3", "references": "one-shot (1 reference)"}
PROBES = [
    Probe("engine", "design", "design: window 32^3, overlap 0.5, Gaussian sigma w/8, coarse-to-fine"),
    Probe("bank-export-mean", "gap 7", "bank: mean tokens of the exported net on fixed crops (design)", bank="export-mean"),
    Probe("bank-ema-0.99", "gap 7", "bank: EMA 0.99 of training-step tokens (first sighting initialises)", bank="ema-0.99"),
    Probe("bank-seed-0.999", "gap 7", "bank: seed's zero-initialised EMA 0.999 of training-step tokens", bank="seed-ema-0.999"),
    Probe("overlap-0", "gap 9", "overlap 0", {"overlap": 0.0}),
    Probe("uniform-blend", "gap 9", "overlaps averaged (no Gaussian)", {"gaussian_sigma_scale": 1e3}),
    Probe("full-strategy", "gap 9", "every overlapping window (no coarse-to-fine)", {"strategy": "full"}),
    Probe("window-24", "window size", "24^3", window=24),
    Probe("window-48", "window size", "48^3", window=48),
    Probe("ensemble-3", "references", "context ensemble of 3 references", references=3),
]


@dataclass(frozen=True)
class Mini:
    """The mini-benchmark's budget."""

    steps: int = 200
    crop: int = 32
    val_episodes: int = VAL_EPISODES
    volume_targets: dict = field(default_factory=lambda: dict(VOLUME_TARGETS))
    prior_targets: dict = field(default_factory=lambda: dict(PRIOR_TARGETS))
    bank_crops: int = 4
    memory_steps: int = 3  # training steps of a throw-away copy over which the peak memory is taken
    quick: bool = False


QUICK = Mini(steps=1, crop=16, val_episodes=2, volume_targets={"synA": 1, "synB": 1}, prior_targets={"synA": 1},
             bank_crops=1, memory_steps=0, quick=True)


def tiny_config(mini: Mini, variant: Variant, train_cases: list[Case]) -> BundleConfig:
    cfg = BundleConfig.load(CONFIGS / "tiny.yaml")
    crop = (round(mini.crop * variant.crop_scale / 8) * 8,) * 3  # divisible by the tiny network's 2^3
    training = dict(variant.training)
    if training.get("dataset_weights") == "by-size":
        counts: dict[str, int] = {}
        for c in train_cases:
            counts[c.dataset] = counts.get(c.dataset, 0) + 1
        training["dataset_weights"] = {d: n / len(train_cases) for d, n in counts.items()}
    tc = replace(cfg.training, crop=crop, warmup_steps=max(1, variant_steps(mini, variant) // 6), **training)
    from IrisSegmentLib.training.sampler import DEFAULT_WEIGHTS

    unknown = {c.dataset: 1.0 for c in train_cases if c.dataset not in DEFAULT_WEIGHTS}  # quick mode's synthetic sets
    tc = replace(tc, dataset_weights={**unknown, **tc.dataset_weights, "shapes": 0.0})  # the collections only
    model = replace(cfg.model, window=crop, spacing=(variant.spacing,) * 3, **variant.model)
    model.validate()
    return BundleConfig(model, replace(cfg.inference, cpu_precision="fp32"), tc)


# -- data -------------------------------------------------------------------------------------------
def _cache_dir(work: Path, spacing: float) -> Path:
    return work / "data" / f"{spacing:g}mm"


def prepare_data(packed: Path, work: Path, spacing: float) -> Path:
    """The mini-benchmark's cases as uncompressed .npy files (memory-mapped by every run), resampled
    to `spacing` (image trilinear, label nearest) from the packed 1.5 mm cache; made once."""
    out = _cache_dir(work, spacing)
    if (out / "index.json").is_file():
        return out
    from IrisSegmentLib.training.data import load

    tmp = out.with_name(out.name + ".tmp")
    index = []
    for split in ("train", "val"):
        for c in load(packed, split):
            if c.dataset not in DATASETS:
                continue
            label, image = c.label, c.image.astype(np.float32)
            if spacing != 1.5:  # the packed cache is on the 1.5 mm working grid
                size = [max(1, round(n * 1.5 / spacing)) for n in label.shape]
                image = torch.nn.functional.interpolate(torch.from_numpy(image)[None, None], size=size, mode="trilinear",
                                                        align_corners=False)[0, 0].numpy()
                label = torch.nn.functional.interpolate(torch.from_numpy(label.astype(np.float32))[None, None], size=size,
                                                        mode="nearest")[0, 0].numpy().astype(np.uint8)
            d = tmp / split / c.dataset / c.case_id
            d.mkdir(parents=True, exist_ok=True)
            np.save(d / "label.npy", np.ascontiguousarray(label))
            np.save(d / "image.npy", np.ascontiguousarray(image.astype(np.float16)))
            np.save(d / "values.npy", c.values)
            index.append({"split": split, "dataset": c.dataset, "id": c.case_id, "group": c.group,
                          "dir": str(d.relative_to(tmp))})
    (tmp / "index.json").write_text(json.dumps(index))
    tmp.rename(out)
    return out


def load_cases(cache: Path, split: str) -> list[Case]:
    out = []
    for e in json.loads((cache / "index.json").read_text()):
        if e["split"] == split:
            d = cache / e["dir"]
            out.append(Case(e["dataset"], e["id"], e["group"], np.load(d / "label.npy", mmap_mode="r"),
                            np.load(d / "values.npy"), np.load(d / "image.npy", mmap_mode="r")))
    return out


def synthetic_cases(split: str) -> list[Case]:
    """Quick mode: two small synthetic collections (random shapes, one intensity table each)."""
    from IrisSegmentLib.training import synth

    out = []
    for di, name in enumerate(("synA", "synB")):
        g = torch.Generator().manual_seed(100 * di + (0 if split == "train" else 7))
        means, stds = torch.tensor([0.1, 0.5, 0.9]) + 0.05 * di, torch.full((3,), 0.03)
        for i in range(4 if split == "train" else 2):
            lab = synth.random_shapes((24, 24, 24) if split == "train" else (16, 16, 16), 2, g)
            present = sorted(int(v) for v in torch.unique(lab))
            if present != [0, 1, 2]:
                lab[2:6, 2:6, 2:6], lab[10:14, 10:14, 10:14] = 1, 2  # both classes, always
            img = synth.render(lab, means, stds, g)
            out.append(Case(name, f"{name}{i}", f"{name}{i}", lab.numpy(), np.array([0, 1, 2], np.int32),
                            img.numpy().astype(np.float16)))
    return out


# -- one training run -------------------------------------------------------------------------------
def val_batches(cfg: BundleConfig, val_cases: list[Case], mini: Mini) -> list[dict]:
    """The fixed validation episodes: the design's sampler, no augmentation, seed VAL_SEED."""
    from IrisSegmentLib.training.sampler import EpisodeSampler, episodes, real_only

    return episodes(EpisodeSampler(val_cases, real_only(cfg.training), seed=VAL_SEED, augment_images=False),
                    mini.val_episodes, cfg.training.batch_size)


class TokenBanks:
    """The memory-bank alternatives of gap 7, filled from the live network's tokens at every training step."""

    def __init__(self):
        from IrisSegmentLib.inference.task import MemoryBank

        self.ema = MemoryBank(0.99)  # first sighting initialises (the bundled bank's history)
        self.seed: dict[str, torch.Tensor] = {}  # the seed's: zero start, a = 0.999
        self.last: torch.Tensor | None = None

    def hook(self, module, inputs, output):
        self.last = output.detach().float()

    def update(self, batch: dict) -> None:
        for i, names in enumerate(batch["names"]):
            for j, n in enumerate(names):
                if n and batch["valid"][i, j]:
                    t = self.last[i, j]
                    self.ema.update(n, t)
                    self.seed[n] = 0.999 * self.seed.get(n, torch.zeros_like(t)) + 0.001 * t


def train_run(variant: Variant, seed: int, mini: Mini, train_cases: list[Case], val_cases: list[Case],
              design_val: list[dict], work: Path) -> dict:
    """Trains one (variant, seed) with the mini-benchmark budget; returns its row and saves the EMA weights."""
    from safetensors.torch import save_file

    from IrisSegmentLib.training.sampler import EpisodeSampler
    from IrisSegmentLib.training.train import ema_update, lr_at, train_step, validate

    cfg = tiny_config(mini, variant, train_cases)
    tc = replace(cfg.training, seed=seed)
    torch.manual_seed(seed)
    model = in_layout(build_iris(cfg.model), variant.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sampler = EpisodeSampler(train_cases, tc, seed)
    step_peak = memory_probe(model, train_cases, tc, variant, mini.memory_steps)
    banks = TokenBanks() if variant.key == "design" else None
    handle = model.task_encoder.register_forward_hook(banks.hook) if banks else None
    times, losses = [], []
    for step in range(variant_steps(mini, variant)):
        batch = in_layout(sampler.batch(tc.batch_size), variant.channels_last)  # with the design's prior dropout
        t0 = time.perf_counter()
        losses.append(float(train_step(model, opt, batch, lr_at(step, tc), tc.grad_clip, "cpu", variant.bf16)))
        times.append(time.perf_counter() - t0)
        ema_update(ema, model, tc.ema_decay)
        if banks:
            banks.update(batch)
    if handle:
        handle.remove()
    ema = in_layout(ema, False)
    row = {"key": variant.key, "seed": seed, "steps": variant_steps(mini, variant),
           "params": sum(p.numel() for p in model.parameters()), "step_s": float(np.median(times)), "peak_mib": step_peak,
           "final_loss": float(np.mean(losses[-20:]))}
    if variant.spacing == DESIGN.spacing:  # episodes are at 1.5 mm: comparable across rows
        per = validate(ema, design_val, "cpu")
        row["episode_dice"] = float(np.mean(list(per.values())))
        row["episode_per"] = per
    ema_state = {k: v.detach().contiguous() for k, v in ema.state_dict().items()}
    weights = work / "models" / f"{variant.key}-s{seed}.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file(ema_state, str(weights))
    if banks:
        torch.save({"ema-0.99": banks.ema.embeddings, "seed-ema-0.999": banks.seed}, weights.with_suffix(".banks.pt"))
    if variant.volume:
        probes = PROBES if variant.key == "design" else PROBES[:1]
        row["probes"] = {p.key: volume_dice(ema, cfg, p, train_cases, val_cases, mini, weights) for p in probes}
        row["volume_dice"] = row["probes"]["engine"]["dice"]
    if variant.localised:
        row["engine"] = localised_dice(ema, cfg, val_cases, mini, work)
        row["volume_dice"] = row["engine"]["registration"]["dice"]
    return row


def memory_probe(model, train_cases: list[Case], tc, variant: Variant, steps: int) -> float:
    """Peak memory (MiB above the resident memory before) of `steps` training steps of a throw-away copy of `model`
    on one batch; nan with 0 steps (not measured: quick mode)."""
    from IrisSegmentLib.training.sampler import EpisodeSampler, collate
    from IrisSegmentLib.training.train import train_step

    if not steps:
        return math.nan
    batch = in_layout(collate([EpisodeSampler(train_cases, tc, 999).sample() for _ in range(tc.batch_size)]),
                      variant.channels_last)
    scratch = copy.deepcopy(model)
    opt = torch.optim.AdamW(scratch.parameters(), lr=tc.lr)
    before = reset_peak_rss()
    for _ in range(steps):
        train_step(scratch, opt, batch, tc.lr, tc.grad_clip, "cpu", variant.bf16)
    return peak_rss_mib() - before


def variant_steps(mini: Mini, variant: Variant) -> int:
    return max(1, round(mini.steps * variant.steps_scale))


def in_layout(x, channels_last: bool):
    """A module, or a batch's 5D tensors, in channels-last 3D memory format (else contiguous)."""
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    if isinstance(x, torch.nn.Module):
        return x.to(memory_format=fmt)
    return {k: v.contiguous(memory_format=fmt) if torch.is_tensor(v) and v.dim() == 5 else v for k, v in x.items()}


ARCH_STEPS = 5


def arch_cost(key: str, mini: Mini) -> dict:
    """Parameters, CPU seconds per training step (median of ARCH_STEPS after a first one; process CPU time,
    so other jobs on the machine do not count) and peak memory of training steps (above the resident memory
    before the first; the optimiser state included) of one variant, on a fixed batch of the variant's shapes
    (synthetic images: the cost depends on the shapes only). Run in a fresh process."""
    from IrisSegmentLib.training.sampler import EpisodeSampler, collate

    torch.set_num_threads(1)
    variant = variant_of(key)
    cases = synthetic_cases("train")
    cfg = tiny_config(mini, variant, cases)
    sampler = EpisodeSampler(cases, cfg.training, 0)
    batch = in_layout(collate([sampler.sample() for _ in range(cfg.training.batch_size)]), variant.channels_last)
    torch.manual_seed(0)
    model = in_layout(build_iris(cfg.model), variant.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.training.lr)
    base = reset_peak_rss()
    times = step_seconds(model, opt, batch, variant.bf16, 1 + (1 if mini.quick else ARCH_STEPS))
    return {"key": key, "params": sum(p.numel() for p in model.parameters()), "step_cpu_s": float(np.median(times[1:])),
            "peak_mib": peak_rss_mib() - base, "classes": int(batch["valid"].shape[1])}


def step_seconds(model, opt, batch: dict, bf16: bool, n: int) -> list[float]:
    """Process CPU seconds of `n` training steps on one batch (lr 1e-3, clip 1)."""
    from IrisSegmentLib.training.train import train_step

    times = []
    for _ in range(n):
        c0 = time.process_time()
        train_step(model, opt, batch, 1e-3, 1.0, "cpu", bf16)
        times.append(time.process_time() - c0)
    return times


def variant_of(key: str) -> Variant:
    return next(v for v in ALL_VARIANTS if v.key == key)


def trained_variants(parts: list[str]) -> list[Variant]:
    """The trained variants of `parts` (the issue 11 grid, the prior rows, the speed rows' accuracy runs)."""
    out = []
    if "ablations" in parts or "sensitivity" in parts:
        out += TRAINED + SENSITIVITY
    if "prior" in parts:
        out += PRIOR_TRAINED
    if "speed" in parts:
        out += [PRIOR_DESIGN] * ("prior" not in parts) + SPEED_TRAINED
    return out


def run_arch_costs(work: Path, mini: Mini, log, variants: list[Variant]) -> None:
    for v in variants:
        f = work / "arch" / f"{v.key}.json"
        if f.is_file():
            continue
        if mini.quick:
            r = arch_cost(v.key, mini)
        else:
            r, failure = in_child(arch_cost, v.key, mini)
            if r is None:
                log(f"arch cost {v.key}: FAILED: {failure}")
                continue
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(r))
        log(f"arch cost {v.key}: {json.dumps(r)}")



def in_child(fn: Callable[..., dict], *args) -> tuple[dict | None, str]:
    """`fn(*args)` in a fresh one-thread process: its row, or None and what failed (exit code and the end of its
    output)."""
    try:
        return run_child(fn, *args, threads=1), ""
    except ChildFailed as e:
        return None, f"(exit {e.exitcode}): {e.output.strip()[-1500:]}"


# -- the engine on whole validation volumes -------------------------------------------------------------
def volume_pairs(val_cases: list[Case], mini: Mini, targets: dict | None = None) -> list[tuple[Case, list[Case]]]:
    """(target, references from three other subjects), fixed: per collection the first case of each
    subject in order; subject i is segmented with subjects i+1, i+2, i+3 as references. `targets`: how many
    per collection (default the mini-benchmark's volume_targets)."""
    out = []
    for dataset, n in (targets or mini.volume_targets).items():
        firsts: dict[str, Case] = {}
        for c in val_cases:
            if c.dataset == dataset and c.group not in firsts:
                firsts[c.group] = c
        subjects = list(firsts.values())
        for i in range(min(n, len(subjects))):
            refs = [subjects[(i + j) % len(subjects)] for j in (1, 2, 3)]
            out.append((subjects[i], [r for r in refs if r.group != subjects[i].group] or refs))
    return out


VOLUME_MARGIN = 8  # voxels (12 mm) kept around the labelled region of a validation volume


def _volume(case: Case, spacing: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, affine, label values) of a case: its labelled region plus VOLUME_MARGIN voxels (the packed
    cases keep 48 mm; the tighter crop keeps the CPU cost of the engine rows affordable)."""
    label = np.asarray(case.label)
    fg = np.argwhere(label > 0)
    sl = tuple(slice(max(int(a) - VOLUME_MARGIN, 0), int(b) + VOLUME_MARGIN + 1) for a, b in zip(fg.min(0), fg.max(0)))
    affine = np.diag([spacing] * 3 + [1.0])
    return np.asarray(case.image[sl], dtype=np.float32), affine, case.values[label[sl]]


def _bank(kind: str, model, cfg: BundleConfig, train_cases: list[Case], mini: Mini, weights: Path):
    from IrisSegmentLib.inference.task import MemoryBank
    from IrisSegmentLib.training.bank import bank_batches, fill_bank

    if kind == "export-mean":
        return fill_bank(model, bank_batches(train_cases, cfg.training, mini.bank_crops), cfg.training.bank_momentum, "")
    bank = MemoryBank()
    bank.embeddings = torch.load(weights.with_suffix(".banks.pt"))[kind]
    return bank


def volume_dice(model, cfg: BundleConfig, probe: Probe, train_cases, val_cases, mini: Mini, weights: Path) -> dict:
    """Mean Dice per collection (then over collections) of the engine on the fixed validation volumes
    (Dice on the 1.5 mm packed grid, whatever the working spacing); seconds of segmentation."""
    from IrisSegmentLib import Segmenter, TaskEmbedding

    inf = replace(cfg.inference, **probe.inference)
    m = cfg.model if probe.window is None else replace(cfg.model, window=(probe.window,) * 3)
    seg = Segmenter(model, BundleConfig(m, inf, cfg.training), "cpu")
    bank = _bank(probe.bank, model, cfg, train_cases, mini, weights) if probe.bank else None
    if bank is not None:
        bank.model_id = seg.model_id
    per: dict[str, list[float]] = {}
    seconds = 0.0
    for target, refs in volume_pairs(val_cases, mini):
        image, affine, truth = _volume(target, 1.5)
        labels = [int(v) for v in np.unique(truth) if v]
        if bank is not None:  # a class the bank never saw cannot be segmented from it: Dice 0
            have = [v for v in labels if f"{target.dataset}:{v}" in bank.embeddings]
            per.setdefault(target.dataset, []).extend([0.0] * (len(labels) - len(have)))
            if not have:
                continue
            task = bank.task([f"{target.dataset}:{v}" for v in have], have)
        else:
            tasks = []
            for ref in refs[: probe.references]:
                rimg, raff, rlab = _volume(ref, 1.5)
                tasks.append(seg.encode(rimg, raff, rlab, labels=[v for v in labels if (rlab == v).any()],
                                        modality="mr", confidence=False))
            task = TaskEmbedding.ensemble(tasks)
        t0 = time.process_time()
        res = seg.segment(image, affine, task, modality="mr", confidence=False)
        seconds += time.process_time() - t0
        for v in task.labels:
            p, t = res.label_map == v, truth == v
            per.setdefault(target.dataset, []).append(2 * float((p & t).sum()) / max(float(p.sum() + t.sum()), 1.0))
    means = {k: float(np.mean(v)) for k, v in sorted(per.items())}
    return {"dice": float(np.mean(list(means.values()))) if means else math.nan, "per": means, "seconds": seconds}


ENGINE_MODES = {  # the localised rows' engine columns: (localise mode, prior weight w)
    "registration": ("registration", None),  # the engine as shipped: w = localise.prior_weight inside the region
    "network-in-region": ("registration", 0.0),  # w = 0: the network's own output inside the region
    "none": ("none", None),  # no localisation: the whole field of view, no prior (pure in-context)
}


REGISTRATION_CODE = ("localise.py", "greedy_job.py", "body.py")  # IrisSegmentLib/inference: what makes a localisation


def localisation_version() -> str:
    """A hash of the registration code and the default localise config: cached localisations, and the engine numbers
    of the rows made with them, belong to one version; a row of another version is evaluated again."""
    from IrisSegmentLib.config import LocaliseConfig

    h = hashlib.sha1(json.dumps(dataclasses.asdict(LocaliseConfig()), sort_keys=True).encode())
    for name in REGISTRATION_CODE:
        h.update((ROOT / "IrisSegmentLib" / "inference" / name).read_bytes())
    return h.hexdigest()[:12]


def cached_localisation(seg, image: np.ndarray, affine: np.ndarray, task, path: Path):
    """The engine's localisation of `image` by the task's reference (Greedy), made once and kept at `path`: it
    depends on the reference image and masks and the target only, not on the network's weights."""
    from IrisSegmentLib.inference.body import crop_affine

    if path.is_file():
        return torch.load(path, weights_only=False)
    box = seg.body(image, affine)
    loc = seg.localise(seg.prepare(image[box], crop_affine(affine, box), "mr"), task, "registration")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(loc, tmp)
    tmp.replace(path)
    return loc


def registration_alone(seg, image: np.ndarray, affine: np.ndarray, task, loc) -> np.ndarray:
    """The warped reference masks (unblurred) thresholded at 0.5 and post-processed, as the engine's fallback for
    a class the network cannot do (benchmarks/wholescan.py's column); empty where registration failed."""
    from IrisSegmentLib.inference.body import crop_affine
    from IrisSegmentLib.inference.labelmap import paste, to_label_map

    if loc.prior is None:
        return np.zeros(image.shape, np.uint8)
    box = seg.body(image, affine)
    target = seg.prepare(image[box], crop_affine(affine, box), "mr")
    label_map = to_label_map(loc.warped_masks(), target.grid, task.labels, seg.config.inference.threshold)
    return seg.postprocess(paste(label_map, box, image.shape), task)


def _dice(label_map: np.ndarray, truth: np.ndarray, value: int) -> float:
    p, t = label_map == value, truth == value
    return 2 * float((p & t).sum()) / max(float(p.sum() + t.sum()), 1.0)


def localised_dice(model, cfg: BundleConfig, val_cases: list[Case], mini: Mini, work: Path) -> dict:
    """Per ENGINE_MODES column and for registration alone: mean Dice per collection (then over collections) of
    the prior_targets validation volumes, one-shot (the next subject's volume as the reference), with the cached
    localisations; also how many registrations failed the engine's checks (those fall back to the whole field)."""
    from IrisSegmentLib import Segmenter

    segs = {mode: Segmenter(model, cfg if w is None else replace(cfg, localise=replace(cfg.localise, prior_weight=w)), "cpu")
            for mode, (_, w) in ENGINE_MODES.items()}
    per: dict[str, dict[str, list[float]]] = {m: {} for m in [*ENGINE_MODES, "registration-alone"]}
    failed = pairs = 0
    version = localisation_version()
    for target, refs in volume_pairs(val_cases, mini, mini.prior_targets):
        image, affine, truth = _volume(target, 1.5)
        rimg, raff, rlab = _volume(refs[0], 1.5)
        labels = [int(v) for v in np.unique(truth) if v and (rlab == v).any()]
        seg = segs["registration"]
        task = seg.encode(rimg, raff, rlab, labels=labels, modality="mr", confidence=False)
        loc = cached_localisation(seg, image, affine, task,
                                  work / "localisations" / version / f"{target.dataset}-{target.case_id}-{refs[0].case_id}.pt")
        pairs, failed = pairs + 1, failed + (loc.prior is None)
        maps = {"registration-alone": registration_alone(seg, image, affine, task, loc)}
        for mode, (localise, _) in ENGINE_MODES.items():
            maps[mode] = segs[mode].segment(image, affine, task, modality="mr", confidence=False, localise=localise,
                                            localisation=loc if localise == "registration" else None).label_map
        for mode, label_map in maps.items():
            per[mode].setdefault(target.dataset, []).extend(_dice(label_map, truth, v) for v in task.labels)
    out = {}
    for mode, by in per.items():
        means = {k: float(np.mean(v)) for k, v in sorted(by.items())}
        out[mode] = {"dice": float(np.mean(list(means.values()))) if means else math.nan, "per": means}
    out["pairs"], out["failed_registrations"], out["version"] = pairs, failed, version
    return out


# -- scheduling ------------------------------------------------------------------------------------------
def result_path(work: Path, key: str, seed: int) -> Path:
    return work / "results" / f"{key}-s{seed}.json"


def child_main(key: str, seed: int, mini: Mini, packed: Path, work: Path) -> None:
    torch.set_num_threads(1)
    variant = variant_of(key)
    lock = result_path(work, key, seed).with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(str(os.getpid()))
    if mini.quick:
        train_cases, val_cases = synthetic_cases("train"), synthetic_cases("val")
        val_15 = val_cases
    else:
        cache = prepare_data(packed, work, variant.spacing)
        train_cases, val_cases = load_cases(cache, "train"), load_cases(cache, "val")
        val_15 = load_cases(prepare_data(packed, work, 1.5), "val")
    t0 = time.time()
    if stale(work, key, seed):  # trained before the registration changed: the engine again, on the saved weights
        done = json.loads(result_path(work, key, seed).read_text(encoding="utf-8"))
        row = reevaluate(done, mini, train_cases, val_15, work)
    else:
        design_val = val_batches(tiny_config(mini, DESIGN, train_cases), val_15, mini)
        # the engine is always evaluated on the 1.5 mm volumes (the spacing rows resample them themselves)
        row = train_run(variant, seed, mini, train_cases, val_15, design_val, work)
        row["wall_s"] = time.time() - t0
    out = result_path(work, key, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1))
    tmp.replace(out)
    lock.unlink(missing_ok=True)


def stale(work: Path, key: str, seed: int) -> bool:
    """A localised row whose engine numbers were made with another version of the registration."""
    f = result_path(work, key, seed)
    if not variant_of(key).localised or not f.is_file():
        return False
    return json.loads(f.read_text(encoding="utf-8")).get("engine", {}).get("version") != localisation_version()


def reevaluate(row: dict, mini: Mini, train_cases: list[Case], val_cases: list[Case], work: Path) -> dict:
    """`row` with its engine numbers made again from its saved EMA weights (training untouched)."""
    from safetensors.torch import load_file

    variant = variant_of(row["key"])
    cfg = tiny_config(mini, variant, train_cases)
    model = build_iris(cfg.model)
    model.load_state_dict(load_file(str(work / "models" / f"{variant.key}-s{row['seed']}.safetensors")))
    t0 = time.process_time()
    row["engine"] = localised_dice(model.requires_grad_(False), cfg, val_cases, mini, work)
    row["volume_dice"], row["reevaluated_cpu_s"] = row["engine"]["registration"]["dice"], time.process_time() - t0
    return row


def todo(parts: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    """(variant, seed): the gap rows, seed by seed, before the sensitivity rows; then the prior rows and the speed
    rows' accuracy runs, seed by seed."""
    order = []
    gaps = [v.key for v in TRAINED] if "ablations" in parts else []
    sens = [v.key for v in SENSITIVITY] if "sensitivity" in parts else []
    if sens and not gaps:
        gaps = [DESIGN.key]
    for s in seeds:  # the nine gaps with every seed first, then the sensitivity grid
        order += [(k, s) for k in gaps]
    for s in seeds:
        order += [(k, s) for k in sens]
    prior = [v.key for v in trained_variants([p for p in parts if p in ("prior", "speed")])]
    for s in seeds:
        order += [(k, s) for k in prior]
    return order


def _running_elsewhere(work: Path, key: str, seed: int) -> bool:
    """A run that another invocation has started and whose process is still alive."""
    lock = result_path(work, key, seed).with_suffix(".lock")
    try:
        os.kill(int(lock.read_text()), 0)
        return True
    except (OSError, ValueError):
        return False


def run_all(pairs: list[tuple[str, int]], mini: Mini, packed: Path, work: Path, jobs: int, log) -> None:
    pending = [(k, s) for k, s in pairs if (not result_path(work, k, s).is_file() or stale(work, k, s))
               and not _running_elsewhere(work, k, s)]
    again = sum(stale(work, k, s) for k, s in pending)
    log(f"{len(pairs) - len(pending)} of {len(pairs)} runs already done or running elsewhere"
        + (f"; {again} to evaluate again (registration changed)" if again else ""))
    if mini.quick:
        for k, s in pending:
            child_main(k, s, mini, packed, work)
        return
    for sp in sorted({v.spacing for v in ALL_VARIANTS if any(v.key == k for k, _ in pending)} | {1.5}):
        prepare_data(packed, work, sp)

    def run(key: str, seed: int) -> str:
        t0 = time.time()
        try:
            run_child(child_main, key, seed, mini, packed, work, threads=1)
        except ChildFailed as e:
            return f"run {key} seed {seed}: FAILED (exit {e.exitcode}): {e.output.strip()[-2000:]}"
        return f"run {key} seed {seed}: done in {time.time() - t0:.0f} s"

    with ThreadPoolExecutor(jobs) as pool:  # `jobs` fresh processes at a time, in the order of `pending`
        for done in as_completed([pool.submit(run, k, s) for k, s in pending]):
            log(done.result())


# -- tables ---------------------------------------------------------------------------------------------
def rows_of(work: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for f in sorted((work / "results").glob("*.json")):
        r = json.loads(f.read_text())
        out.setdefault(r["key"], []).append(r)
    return out


def _ms(values: list[float]) -> tuple[float, float, int]:
    v = [x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return math.nan, math.nan, 0
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else math.nan, len(v)


def _fmt(m: float, s: float, n: int, scale: float = 100.0) -> str:
    if n == 0:
        return "owed"
    return f"{m * scale:.1f} ± {s * scale:.1f}" if n > 1 else f"{m * scale:.1f} (1 seed)"


def _arch_columns(arch: dict, key: str, params: bool = True) -> str:
    """'parameters | CPU s / step | peak MiB' of a variant (its fixed-batch measurement), or dashes."""
    a = arch.get(key)
    cols = [f"{a['params']:,}", f"{a['step_cpu_s']:.3f}", f"{a['peak_mib']:.0f}"] if a else ["—", "—", "—"]
    return " | ".join(cols if params else cols[1:])


def verdict(name_a: str, a: list[float], name_b: str, b: list[float], paired: bool) -> str:
    """`a` the design, `b` the alternative (Dice per seed, same seeds in the same order when paired)."""
    if paired:
        n = min(len(a), len(b))
        d = [y - x for x, y in zip(a[:n], b[:n])]
        diff, sd, k = _ms(d)
        noise = sd
    else:
        (ma, sa, na), (mb, sb, nb) = _ms(a), _ms(b)
        diff, k = mb - ma, min(na, nb)
        noise = math.sqrt((sa**2 + sb**2) / 2) if na > 1 and nb > 1 else math.nan
    if k < 2 or math.isnan(noise):
        return f"{name_b} vs {name_a}: {diff * 100:+.1f} Dice points, seeds too few to judge noise" if k else f"{name_b}: owed"
    if diff == 0 and noise == 0:
        return f"{name_b} vs {name_a}: identical on every seed"
    if abs(diff) < 5e-4 and noise < 5e-4:
        return f"{name_b} vs {name_a}: equal to within 0.05 Dice points on every seed"
    if abs(diff) <= 2 * noise:
        return f"{name_b} vs {name_a}: {diff * 100:+.1f} Dice points, within noise (2 sd = {2 * noise * 100:.1f})"
    better = name_a if diff < 0 else name_b
    return f"{name_b} vs {name_a}: {diff * 100:+.1f} Dice points (2 sd = {2 * noise * 100:.1f}): {better} better"


def tables(work: Path, seeds: list[int]) -> tuple[str, dict]:
    """The markdown of the ablation and sensitivity results, and the summary that the plots use."""
    rows = rows_of(work)
    arch = {f.stem: json.loads(f.read_text()) for f in sorted((work / "arch").glob("*.json"))}
    design = sorted(rows.get("design", []), key=lambda r: r["seed"])
    lines = ["| gap | variant | seeds | episode Dice % (mean ± sd) | volume Dice % | parameters | CPU s / step | peak MiB (train steps) |",
             "|---|---|---|---|---|---|---|---|"]
    summary = {}

    def trained_row(v: Variant, group: str) -> None:
        rs = sorted(rows.get(v.key, []), key=lambda r: r["seed"])
        ep, vol = _ms([r.get("episode_dice", math.nan) for r in rs]), _ms([r.get("volume_dice", math.nan) for r in rs])
        cost = _arch_columns(arch, v.key)
        lines.append(f"| {group} | {v.label} | {len(rs)} | {_fmt(*ep) if ep[2] else '—' if rs else 'owed'} | "
                     f"{(_fmt(*vol) if vol[2] else '—') if rs else 'owed' if v.volume else '—'} | {cost} |")
        summary[v.key] = {"label": v.label, "group": group, "episode": ep, "volume": vol}

    def probe_row(p: Probe) -> None:
        vals = [r["probes"][p.key]["dice"] for r in design if p.key in r.get("probes", {})]
        ms = _ms(vals)
        lines.append(f"| {p.group} | {p.label} | {ms[2]} | (design's networks) | {_fmt(*ms) if ms[2] else 'owed'} | "
                     f"(design's) | (engine: see cost) | — |")
        summary[p.key] = {"label": p.label, "group": p.group, "volume": ms}

    trained_row(DESIGN, "design")
    for g in range(1, 10):
        for v in TRAINED[1:]:
            if v.group == f"gap {g}":
                trained_row(v, v.group)
        for p in PROBES[1:]:
            if p.group == f"gap {g}":
                probe_row(p)
    ablation_md = "\n".join(lines)
    # verdicts
    dv = [r.get("episode_dice", math.nan) for r in design]
    dvol = [r.get("probes", {}).get("engine", {}).get("dice", math.nan) for r in design]
    verdicts = []
    for g in range(1, 10):
        parts = []
        for v in TRAINED[1:]:
            if v.group == f"gap {g}":
                rs = sorted(rows.get(v.key, []), key=lambda r: r["seed"])
                parts.append(verdict("design", dv, v.label, [r.get("episode_dice", math.nan) for r in rs], paired=False))
        for p in PROBES[1:]:
            if p.group == f"gap {g}":
                if p.bank:
                    ref = "export-mean" if p.bank != "export-mean" else None
                    if ref is None:
                        continue
                    base = [r["probes"]["bank-export-mean"]["dice"] for r in design if "probes" in r]
                    name = "design bank"
                else:
                    base, name = dvol, "design engine"
                parts.append(verdict(name, base, p.label, [r.get("probes", {}).get(p.key, {}).get("dice", math.nan) for r in design], paired=True))
        verdicts.append(f"- **Gap {g} ({GAPS[g]})**: " + "; ".join(parts) + ".")
    # sensitivity
    sl = ["| parameter | value | seeds | episode Dice % | volume Dice % | CPU s / step | peak MiB |", "|---|---|---|---|---|---|---|"]
    for name in ("learning rate", "context queries m", "working spacing"):
        rs = design
        ep, vol = _ms([r.get("episode_dice", math.nan) for r in rs]), _ms([r.get("volume_dice", math.nan) for r in rs])
        sl.append(f"| {name} | {DESIGN_VALUES[name]} (design) | {len(rs)} | {_fmt(*ep) if ep[2] else 'owed'} | "
                  f"{_fmt(*vol) if vol[2] else 'owed'} | {_arch_columns(arch, 'design', params=False)} |")
        for v in SENSITIVITY:
            if v.group == name:
                rs = sorted(rows.get(v.key, []), key=lambda r: r["seed"])
                ep, vol = _ms([r.get("episode_dice", math.nan) for r in rs]), _ms([r.get("volume_dice", math.nan) for r in rs])
                sl.append(f"| {name} | {v.label} | {len(rs)} | {_fmt(*ep) if ep[2] else ('—' if rs or v.volume else 'owed')} | "
                          f"{(_fmt(*vol) if vol[2] else '—') if rs or not v.volume else 'owed'} | {_arch_columns(arch, v.key, params=False)} |")
                summary[v.key] = {"label": v.label, "group": name, "episode": ep, "volume": vol}
                if ep[2]:
                    verdicts.append(f"- {name}: " + verdict("design", dv, v.label, [r.get("episode_dice", math.nan) for r in rs], paired=False) + ".")
                elif vol[2]:
                    verdicts.append(f"- {name}: " + verdict("design (volume)", dvol, v.label, [r.get("volume_dice", math.nan) for r in rs], paired=False) + ".")
    for name in ("window size", "references"):
        vol = _ms(dvol)
        sl.append(f"| {name} | {DESIGN_VALUES[name]} (design) | {vol[2]} | (design's networks) | {_fmt(*vol) if vol[2] else 'owed'} | — | — |")
        for p in PROBES:
            if p.group == name:
                vals = [r.get("probes", {}).get(p.key, {}).get("dice", math.nan) for r in design]
                ms = _ms(vals)
                sl.append(f"| {name} | {p.label} | {ms[2]} | (design's networks) | {_fmt(*ms) if ms[2] else 'owed'} | — | — |")
                summary[p.key] = {"label": p.label, "group": name, "volume": ms}
                verdicts.append(f"- {name}: " + verdict("design engine", dvol, p.label, vals, paired=True) + ".")
    summary["design"]["volume"] = _ms(dvol)
    return ablation_md + "\n\n" + "\n".join(verdicts), {"sensitivity_md": "\n".join(sl), "summary": summary}


# -- the prior rows and the speed rows (issue 17) ----------------------------------------------------------
ENGINE_COLUMNS = {"registration": "engine: registration prior, w 0.5", "network-in-region": "network alone in the region (w 0)",
                  "none": "no localisation"}


def _engine(rs: list[dict], mode: str) -> list[float]:
    return [r.get("engine", {}).get(mode, {}).get("dice", math.nan) for r in rs]


def _by_seed(rows: dict[str, list[dict]], key: str) -> list[dict]:
    return sorted(rows.get(key, []), key=lambda r: r["seed"])


def localised_table(work: Path, variants: list[Variant], first: str) -> str:
    """The trained variants evaluated by the engine with and without localisation: Dice mean ± sd over seeds."""
    rows = rows_of(work)
    arch = {f.stem: json.loads(f.read_text(encoding="utf-8")) for f in sorted((work / "arch").glob("*.json"))}
    cols = " | ".join(f"volume Dice %: {c}" for c in ENGINE_COLUMNS.values())
    lines = [f"| {first} | variant | seeds | episode Dice % (simulated prior) | {cols} | parameters | CPU s / step | peak MiB (train steps) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for v in variants:
        rs = _by_seed(rows, v.key)
        ep = _ms([r.get("episode_dice", math.nan) for r in rs])
        vols = [_ms(_engine(rs, m)) for m in ENGINE_COLUMNS]
        cells = [_fmt(*ep) if rs else "owed", *[_fmt(*x) if rs else "owed" for x in vols]]
        lines.append(f"| {v.group} | {v.label} | {len(rs)} | {' | '.join(cells)} | {_arch_columns(arch, v.key)} |")
    return "\n".join(lines)


def _per_seed(rs: list[dict], mode: str) -> dict[int, float]:
    return {r["seed"]: r.get("engine", {}).get(mode, {}).get("dice", math.nan) for r in rs}


def _versus(design: dict[int, float], alt: dict[int, float], key: str, base: str = "prior design") -> str:
    """The verdict of `alt` against `base` (the prior design), without the names in front: paired by seed (one seed
    gives both networks the same initial weights and the same draws of datasets, pairs and crops, so its luck
    cancels; the sd is that of the per-seed differences), with the unpaired 2 sd (pooled over both rows) beside it."""
    seeds = sorted(set(design) & set(alt))
    text = verdict(base, [design[s] for s in seeds], key, [alt[s] for s in seeds], paired=True)
    text = text.removeprefix(f"{key} vs {base}: ")
    (_, sa, na), (_, sb, nb) = _ms(list(design.values())), _ms(list(alt.values()))
    return text + (f" [unpaired 2 sd = {200 * math.sqrt((sa**2 + sb**2) / 2):.1f}]" if na > 1 and nb > 1 else "")


def localised_verdicts(work: Path, variants: list[Variant], modes: dict[str, list[str]]) -> list[str]:
    """One line per variant: its verdict against the prior design on the engine columns `modes[group]`."""
    rows = rows_of(work)
    design = _by_seed(rows, PRIOR_DESIGN.key)
    out = []
    for v in variants:
        rs = _by_seed(rows, v.key)
        cols = modes.get(v.group, list(ENGINE_COLUMNS))
        out.append(f"- **{v.group}**, {v.label} ({v.key}) against the prior design: " + "; ".join(
            f"{ENGINE_COLUMNS[m]}: {_versus(_per_seed(design, m), _per_seed(rs, m), v.key)}" for m in cols) + ".")
    return out


def equal_cpu_line(work: Path, base: str, alt: str) -> str:
    """`alt` against `base` (another row than the prior design: the two that take about the same CPU time)."""
    rows = rows_of(work)
    a, b = _by_seed(rows, base), _by_seed(rows, alt)
    return (f"- **equal CPU time**, {variant_of(alt).label} ({alt}) against {variant_of(base).label} ({base}): " + "; ".join(
        f"{ENGINE_COLUMNS[m]}: {_versus(_per_seed(a, m), _per_seed(b, m), alt, base)}" for m in ENGINE_COLUMNS) + ".")


def registration_alone_line(work: Path) -> str:
    """Registration alone on the prior rows' pairs (the same for every network: the localisations are cached)."""
    design = _by_seed(rows_of(work), PRIOR_DESIGN.key)
    if not design:
        return "Registration alone: owed (no prior design run yet)."
    e = design[0]["engine"]
    per = ", ".join(f"{k} {100 * v:.1f}" for k, v in e["registration-alone"]["per"].items())
    return (f"Registration alone (the warped reference masks, unblurred, no network; the same pairs, the same for every "
            f"network): {100 * e['registration-alone']['dice']:.1f} % ({per}). {e['failed_registrations']} of {e['pairs']} "
            f"registrations failed the engine's checks: those pairs fall back to the whole field of view in the engine "
            f"columns and count 0 for registration alone.")


def per_collection_table(work: Path, keys: list[str]) -> str:
    """Volume Dice per collection (mean over seeds) of the engine with the registration prior, and registration alone."""
    rows = rows_of(work)
    design = _by_seed(rows, PRIOR_DESIGN.key)
    sets = sorted({d for r in design for d in r.get("engine", {}).get("registration", {}).get("per", {})})
    if not sets:
        return ""
    lines = [f"| engine (registration prior, w 0.5), volume Dice % | {' | '.join(sets)} |", "|---|" + "---|" * len(sets)]
    for key in keys:
        rs = _by_seed(rows, key)
        vals = [_fmt(*_ms([r["engine"]["registration"]["per"].get(d, math.nan) for r in rs])) for d in sets]
        lines.append(f"| {variant_of(key).label} | {' | '.join(vals)} |")
    alone = [f"{100 * design[0]['engine']['registration-alone']['per'].get(d, math.nan):.1f}" for d in sets]
    lines.append(f"| registration alone (no network) | {' | '.join(alone)} |")
    return "\n".join(lines)


def _owed(work: Path, variants: list[Variant], seeds: list[int]) -> str:
    owed = [f"{v.key} seed {s}" for s in seeds for v in variants if not result_path(work, v.key, s).is_file()]
    return f"Runs not done: {', '.join(owed) if owed else 'none'}."


PRIOR_VERDICT_COLUMNS = {"prior input": ["registration", "network-in-region", "none"],
                         "prior simulation": ["registration", "network-in-region"],
                         "prior dropout": ["none", "registration"]}


def prior_section(work: Path, seeds: list[int], mini: Mini) -> str:
    md = ["## The prior network (issue 17)", "", localised_table(work, PRIOR_TRAINED, "comparison"), "",
          registration_alone_line(work), "", per_collection_table(work, [PRIOR_DESIGN.key, "no-prior-input"]), "",
          "Verdicts on the engine's volume Dice (paired by seed: |diff| < 2 sd of the per-seed differences is within noise):", "",
          *localised_verdicts(work, PRIOR_TRAINED[1:], PRIOR_VERDICT_COLUMNS), "", _owed(work, PRIOR_TRAINED, seeds)]
    return "\n".join(md)


def _step_medians(rows: list[dict]) -> dict[str, float]:
    """Per spec, the median CPU s / step over its repeats."""
    by: dict[str, list[float]] = {}
    for r in rows:
        by.setdefault(r["spec"], []).append(r["step_cpu_s"])
    return {k: float(np.median(v)) for k, v in by.items()}


def _ratio(rows: list[dict], spec: str) -> float:
    """Median CPU s / step of `spec` over that of the same network and crop in fp32, contiguous."""
    by = _step_medians(rows)
    base = by.get(spec.split("/")[0] + "/fp32/contiguous")
    return by[spec] / base if base else math.nan


def step_table(rows: list[dict]) -> str:
    lines = [("| network @ crop (batch 2, prior input, one AdamW step) | precision | memory format | parameters | repeats | "
              "CPU s / step (median) | min-max | x fp32 contiguous | peak MiB |"), "|---|---|---|---|---|---|---|---|---|"]
    medians = _step_medians(rows)
    for spec, median in medians.items():
        rs = [r for r in rows if r["spec"] == spec]
        net, prec, layout = spec.split("/")
        times = [r["step_cpu_s"] for r in rs]
        lines.append(f"| {net} | {prec} | {layout} | {rs[0]['params']:,} | {len(rs)} | {median:.3f} | {min(times):.3f}-{max(times):.3f} | "
                     f"{_ratio(rows, spec):.2f} | {max(r['peak_mib'] for r in rs):.0f} |")
    return "\n".join(lines)


def profile_table(rows: list[dict]) -> str:
    """The phases of one step per precision, and the top operators of each."""
    if not rows:
        return ""
    phases = ("data_s", "forward", "backward", "optimiser")
    names = {"data_s": "data: sample a batch (2 episodes, priors simulated)", "forward": "forward: task encoding, segmentation, loss",
             "backward": "backward", "optimiser": "optimiser: clip, AdamW"}
    head = " | ".join(f"{r['spec'].split('/')[1]} CPU s | %" for r in rows)
    lines = [f"| phase ({rows[0]['spec'].split('/')[0]}, batch {rows[0]['batch']}, episodes of the training set) | {head} |",
             "|---|" + "---|---|" * len(rows)]
    totals = [sum(r[p] for p in phases) for r in rows]
    for p in phases:
        lines.append(f"| {names[p]} | " + " | ".join(f"{r[p]:.3f} | {100 * r[p] / t:.0f}" for r, t in zip(rows, totals)) + " |")
    lines.append("| total | " + " | ".join(f"{t:.3f} | 100" for t in totals) + " |")
    lines.append("| train_step itself on the same batch (no data) | " + " | ".join(f"{r['train_step_s']:.3f} | —" for r in rows) + " |")
    for r in rows:
        lines += ["", f"| operator ({r['spec']}, one step, torch.profiler) | self CPU % | calls |", "|---|---|---|"]
        lines += [f"| {o['op']} | {o['self_pct']:.1f} | {o['calls']} |" for o in r["top"]]
    return "\n".join(lines)


def loop_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    lines = [(f"| episode workers ({rows[0]['spec'].split('/')[0]}, {'bf16' if rows[0]['bf16'] else 'fp32'}) | steps | "
              "wall s / step | main-process CPU s / step | waiting for a batch, % of wall |"), "|---|---|---|---|---|"]
    lines += [f"| {r['workers']} | {r['steps']} | {r['wall_s_per_step']:.3f} | {r['cpu_s_per_step']:.3f} | {100 * r['wait_fraction']:.1f} |"
              for r in rows]
    means = {w: float(np.mean([r["wall_s_per_step"] for r in rows if r["workers"] == w])) for w in sorted({r["workers"] for r in rows})}
    return "\n".join(lines) + "\n\nMean wall s / step: " + ", ".join(f"{w} workers {m:.3f}" for w, m in means.items()) + "."


def speed_summary(rows: list[dict], product: str) -> list[str]:
    """Per option, the product network's CPU time per step against its fp32 contiguous 48³ baseline."""
    by = _step_medians(rows)
    net = product.split("@")[0]
    small = next((s for s in by if s.startswith(net + "@") and s.split("/")[0] != product and s.endswith("/fp32/contiguous")), None)
    out = []
    for spec in (f"{product}/bf16/contiguous", f"{product}/fp32/channels-last", f"{product}/bf16/channels-last"):
        if spec in by:
            out.append(f"- {spec}: {_ratio(rows, spec):.2f}x the CPU time per step of {product}/fp32/contiguous.")
    if small and f"{product}/fp32/contiguous" in by:
        out.append(f"- {small}: {by[small] / by[product + '/fp32/contiguous']:.2f}x the CPU time per step of "
                   f"{product}/fp32/contiguous (crops {small.split('@')[1].split('/')[0]}³ vs {product.split('@')[1]}³).")
    return out


def speed_section(work: Path, seeds: list[int], speed: dict[str, list[dict]], quick: bool) -> str:
    product = "tiny@16" if quick else "iris-small@48"
    md = ["## Training speed on the CPU (issue 17)", "", "### CPU seconds per training step (fresh process per row, 1 thread)", "",
          step_table(speed.get("step", [])), "", *speed_summary(speed.get("step", []), product), "",
          "### One step of the product network, profiled", "", profile_table(speed.get("profile", [])), "",
          "### The real loop: episode workers (wall clock on the shared machine)", "", loop_table(speed.get("loop", [])), "",
          "### Accuracy at equal steps (the prior rows' budget and evaluation)", "",
          localised_table(work, [PRIOR_DESIGN, *SPEED_TRAINED], "speed option"), "",
          "Verdicts on the engine's volume Dice (paired by seed, as for the prior rows):", "",
          *localised_verdicts(work, SPEED_TRAINED, {}), equal_cpu_line(work, "prior-crop-48", "prior-steps-3x"), "",
          _owed(work, [PRIOR_DESIGN, *SPEED_TRAINED], seeds)]
    return "\n".join(md)


# -- cost against input size ---------------------------------------------------------------------------
def _blob_reference(n_classes: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A reference with `n_classes` boxes of distinct intensity on a graded background (1.5 mm)."""
    rng = np.random.default_rng(seed)
    img = (100 + 20 * rng.standard_normal((size,) * 3)).astype(np.float32)
    lab = np.zeros((size,) * 3, np.uint8)
    per = math.ceil(n_classes ** (1 / 3))
    cell = size // per
    for c in range(n_classes):
        i, j, k = c // (per * per), (c // per) % per, c % per
        sl = tuple(slice(a * cell + cell // 4, a * cell + 3 * cell // 4) for a in (i, j, k))
        lab[sl] = c + 1
        img[sl] += 300 + 25 * c
    return img, np.diag([1.5, 1.5, 1.5, 1.0]), lab


def _target(shape) -> tuple[np.ndarray, np.ndarray]:
    """int16 target at 1.5 mm (working grid = target grid): bright boxes on a graded, noisy background."""
    rng = np.random.default_rng(1)
    image = np.empty(shape, np.int16)
    for i in range(shape[0]):
        image[i] = (100 + (i % 50) + 20 * rng.standard_normal(shape[1:])).astype(np.int16)
    c = [n // 2 for n in shape]
    r = [max(2, n // 8) for n in shape]
    image[c[0] - r[0]:c[0] + r[0], c[1] - r[1]:c[1] + r[1], c[2] - r[2]:c[2] + r[2]] += 300
    return image, np.diag([1.5, 1.5, 1.5, 1.0])


def _segmenter(quick: bool, **model_overrides):
    from IrisSegmentLib import Segmenter
    from IrisSegmentLib.weights import load_model

    if quick:
        cfg = BundleConfig.load(CONFIGS / "tiny.yaml")
        torch.manual_seed(0)
        state = build_iris(cfg.model).state_dict()
    else:
        m, cfg, _ = load_model(None)
        state = m.state_dict()
    cfg = replace(cfg, model=replace(cfg.model, **model_overrides))
    model = build_iris(cfg.model)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return Segmenter(model, cfg, "cpu"), cfg


def cost_row(kind: str, value: str, quick: bool) -> dict:
    """One cost measurement in this process (fresh, in the full run): seconds and peak memory."""
    torch.set_num_threads(1)
    if kind == "train-memory":  # one training step of a network of the given size, batch 1, K = 4, fp32
        from IrisSegmentLib.training.train import train_step

        size, crop = value.split("@")
        cfg = BundleConfig.load(CONFIGS / ("tiny.yaml" if quick else "iris-small.yaml"))
        mc = cfg.model if size == "product" else replace(
            cfg.model, widths=(32, 64, 128, 256, 512), heads=16, num_queries=10, head_channels=32)  # paper size
        n = int(crop)
        mc = replace(mc, window=(n,) * 3)
        model = build_iris(mc)
        params = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(0)
        b = {"ref_image": torch.randn(1, 1, n, n, n, generator=g), "query_image": torch.randn(1, 1, n, n, n, generator=g),
             "ref_masks": (torch.rand(1, 4, n, n, n, generator=g) > 0.9).float(), "valid": torch.ones(1, 4, dtype=torch.bool)}
        b["query_masks"] = b["ref_masks"]
        base = reset_peak_rss()
        t0 = time.process_time()
        train_step(model, opt, b, 1e-4, 1.0, "cpu")
        return {"kind": kind, "value": value, "params": params, "seconds": time.process_time() - t0,
                "base_mib": base, "peak_mib": peak_rss_mib(), "extra_mib": peak_rss_mib() - base}
    if kind == "pooling":  # gap 2 at scale: the foreground token of K = 4 masks, one reference, forward
        from IrisSegmentLib.model.foreground_pooling import foreground_pool, upsample_then_pool

        method, size = value.split("@")
        c, n = (int(x) for x in size.split("x"))
        g = torch.Generator().manual_seed(0)
        feats = torch.randn(1, c, n // 16, n // 16, n // 16, generator=g)
        masks = (torch.rand(1, 4, n, n, n, generator=g) > 0.95).float()
        fn = foreground_pool if method == "adjoint" else upsample_then_pool
        base = reset_peak_rss()
        t0 = time.process_time()
        with torch.no_grad():
            out = fn(feats, masks)
        seconds = time.process_time() - t0
        return {"kind": kind, "value": value, "seconds": seconds, "base_mib": base, "peak_mib": peak_rss_mib(),
                "extra_mib": peak_rss_mib() - base, "checksum": float(out.double().sum())}
    over = {"class_interaction": "independent"} if kind == "spread" and value.startswith("per-class") else {}
    seg, cfg = _segmenter(quick, **over)
    from IrisSegmentLib import TaskEmbedding

    win = cfg.model.window[0]
    n_classes, n_refs, shape, strategy, overlap = 4, 1, ((win if quick else 2 * win),) * 3, "full", None
    if kind == "size":
        shape = tuple(int(x) for x in value.split("x"))
    elif kind == "classes":
        n_classes = int(value)
    elif kind == "references":
        n_refs = int(value)
    elif kind == "spread":  # "strategy/overlap" or "per-class/overlap"
        s, o = value.split("/")
        strategy, overlap = ("full" if s == "per-class" else s), float(o)
    ref_size = max(win, 16 * math.ceil(n_classes ** (1 / 3))) if not quick else win
    # warm-up (the network's working memory belongs to the base): one small target
    warm = _blob_reference(1, win, 5)
    seg.segment(warm[0], warm[1], seg.encode(*warm, confidence=False), confidence=False, strategy="full")
    image, affine = _target(shape)
    refs = [_blob_reference(n_classes, ref_size, seed=r) for r in range(n_refs)]
    base = reset_peak_rss()
    w0, c0 = time.perf_counter(), time.process_time()
    task = TaskEmbedding.ensemble([seg.encode(*r, confidence=False) for r in refs])
    encode_s, encode_wall = time.process_time() - c0, time.perf_counter() - w0
    w0, c0 = time.perf_counter(), time.process_time()
    res = seg.segment(image, affine, task, confidence=False, strategy=strategy, overlap=overlap)
    segment_s, segment_wall = time.process_time() - c0, time.perf_counter() - w0
    return {"kind": kind, "value": value, "shape": "x".join(map(str, shape)), "classes": n_classes, "references": n_refs,
            "windows": res.windows, "encode_s": encode_s, "segment_s": segment_s, "encode_wall_s": encode_wall,
            "segment_wall_s": segment_wall,
            "voxels": int(np.prod(shape)), "base_mib": base, "peak_mib": peak_rss_mib(), "extra_mib": peak_rss_mib() - base,
            "precision": "bf16" if seg.cpu_bf16 else "fp32"}


COST_FULL = {
    "size": ["64x64x64", "96x96x96", "128x128x128", "192x192x192", "256x256x256", "384x384x300", "512x512x300"],
    "classes": ["1", "2", "4", "8", "16", "32"],
    "references": ["1", "2", "4", "8"],
    "spread": ["coarse-to-fine/0.5", "full/0", "full/0.25", "full/0.5", "full/0.75", "per-class/0.5"],
    "train-memory": ["product@48", "product@64", "paper@64", "paper@96"],
    "pooling": ["adjoint@128x64", "upsample-then-pool@128x64", "adjoint@512x128", "upsample-then-pool@512x128"],
}
COST_QUICK = {"size": ["16x16x16", "32x32x32"], "classes": ["1", "2"], "references": ["1", "2"],
              "spread": ["coarse-to-fine/0.5", "per-class/0.5"], "train-memory": ["product@16"],
              "pooling": ["adjoint@8x32", "upsample-then-pool@8x32"]}
STOP_SECONDS = 120.0  # a size row needing more CPU seconds than this ends the size sweep


def run_cost(work: Path, quick: bool, log) -> dict[str, list[dict]]:
    """Every cost row, each in a fresh process (in-process with --quick); cached as JSON under work/cost."""
    rows: dict[str, list[dict]] = {}
    plan = COST_QUICK if quick else COST_FULL
    for kind, values in plan.items():
        for value in values:
            f = work / "cost" / f"{kind}-{value.replace('/', '_')}.json"
            if f.is_file():
                r = json.loads(f.read_text())
            elif quick:
                r = cost_row(kind, value, True)
            else:
                r, failure = in_child(cost_row, kind, value, False)
                if r is None:
                    log(f"cost {kind} {value}: FAILED {failure}")
                    break
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps(r))
            rows.setdefault(kind, []).append(r)
            log(f"cost {kind} {value}: {json.dumps(r)}")
            if kind == "size" and r.get("segment_s", 0) > STOP_SECONDS:
                rows.setdefault("stopped", []).append({"after": value, "seconds": r["segment_s"]})
                break
    return rows


# -- training speed on the CPU (issue 17) ---------------------------------------------------------------
SPEED_NETS_FULL = (("tiny", 32), ("tiny", 48), ("iris-small", 48), ("iris-small", 32))
STEP_REPEATS = 3  # passes over the step rows (one after another, so that a busy spell of the machine hits every row)
SPEED_FULL = {
    "step": [f"{net}@{crop}/{prec}/{layout}" for net, crop in SPEED_NETS_FULL for prec in ("fp32", "bf16")
             for layout in ("contiguous", "channels-last")] * STEP_REPEATS,
    "profile": ["iris-small@48/fp32", "iris-small@48/bf16"],
    "loop": ["iris-small@48/0", "iris-small@48/1", "iris-small@48/0", "iris-small@48/1"],  # episode workers, alternated
}
SPEED_QUICK = {"step": ["tiny@16/fp32/contiguous", "tiny@16/bf16/channels-last"], "profile": ["tiny@16/bf16"],
               "loop": ["tiny@16/0", "tiny@16/1"]}
PROFILE_DATA_BATCHES = 10  # batches whose sampling time is averaged
PROFILE_STEPS = 3  # timed steps after a first one
LOOP_STEPS = 20  # timed steps of the real loop after LOOP_WARMUP
LOOP_WARMUP = 2
TOP_OPS = 8


def speed_config(net: str, crop: int, quick: bool) -> BundleConfig:
    """The network `net` (tiny or iris-small) with a prior input, `crop`³ training crops and windows; with `quick`
    its training data are the synthetic collections."""
    cfg = BundleConfig.load(CONFIGS / f"{net}.yaml")
    model = replace(cfg.model, window=(crop,) * 3, prior_channels=cfg.model.prior_channels or PRIOR_CHANNELS)
    tc = replace(cfg.training, crop=(crop,) * 3)
    if quick:
        tc = replace(tc, dataset_weights={"synA": 1.0, "synB": 1.0, "shapes": 0.0})
    return replace(cfg, model=model, training=tc)


def _speed_cases(quick: bool, packed: Path, cfg: BundleConfig) -> list[Case]:
    """The episodes' source: the packed training set, as the product trains (synthetic with `quick`)."""
    from IrisSegmentLib.training.data import load, without

    return synthetic_cases("train") if quick else without(load(packed, "train"), cfg.training.holdout)


def step_cost(spec: str, quick: bool) -> dict:
    """'net@crop/precision/layout': parameters, CPU seconds per training step (median of ARCH_STEPS after a first)
    and the peak memory of the steps, on a fixed batch of episodes with their priors (the cost depends on shapes)."""
    from IrisSegmentLib.training.sampler import EpisodeSampler, collate

    torch.set_num_threads(1)
    net_crop, precision, layout = spec.split("/")
    net, crop = net_crop.split("@")
    cfg = speed_config(net, int(crop), True)  # synthetic episodes: the shapes are the product's
    sampler = EpisodeSampler(synthetic_cases("train"), cfg.training, 0)
    cl = layout == "channels-last"
    batch = in_layout(collate([sampler.sample() for _ in range(cfg.training.batch_size)]), cl)
    torch.manual_seed(0)
    model = in_layout(build_iris(cfg.model), cl)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    base = reset_peak_rss()
    times = step_seconds(model, opt, batch, precision == "bf16", 1 + (1 if quick else ARCH_STEPS))
    return {"kind": "step", "spec": spec, "params": sum(p.numel() for p in model.parameters()),
            "step_cpu_s": float(np.median(times[1:])), "peak_mib": peak_rss_mib() - base,
            "batch": cfg.training.batch_size, "classes": int(batch["valid"].shape[1])}


def _phases(model, opt, b: dict, bf16: bool) -> dict[str, float]:
    """One training step as train.train_step does it, with the process CPU seconds of its phases."""
    from IrisSegmentLib.training.losses import dice_bce

    model.train()
    out, c0 = {}, time.process_time()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        tokens = model.encode_task(b["ref_image"], b["ref_masks"])
        logits = model.segment(b["query_image"], tokens, b["valid"], b.get("query_prior"))
    loss = dice_bce(logits, b["query_masks"], b["valid"])
    out["forward"], c0 = time.process_time() - c0, time.process_time()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    out["backward"], c0 = time.process_time() - c0, time.process_time()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    out["optimiser"] = time.process_time() - c0
    return out


def profile_step(spec: str, quick: bool, packed: Path) -> dict:
    """'net@crop/precision': CPU seconds of sampling a batch (episodes of the training set, priors simulated) and of
    the forward, backward and optimiser phases of a step on it (medians), train_step's own CPU seconds on the same
    batch, and the top operators of one step by self CPU time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    from IrisSegmentLib.training.sampler import EpisodeSampler

    torch.set_num_threads(1)
    net_crop, precision = spec.split("/")
    net, crop = net_crop.split("@")
    cfg = speed_config(net, int(crop), quick)
    bf16 = precision == "bf16"
    sampler = EpisodeSampler(_speed_cases(quick, packed, cfg), cfg.training, 0)
    data, batch = [], None
    for _ in range(2 if quick else PROFILE_DATA_BATCHES):
        c0 = time.process_time()
        b = sampler.batch(cfg.training.batch_size)
        data.append(time.process_time() - c0)
        batch = b if b["query_prior"] is not None else batch
    batch = batch or sampler.batch(cfg.training.batch_size)
    if batch["query_prior"] is None:  # every batch dropped its prior: the step with one is what is profiled
        batch["query_prior"] = torch.zeros_like(batch["query_masks"])
    torch.manual_seed(0)
    model = build_iris(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    n = 1 + (1 if quick else PROFILE_STEPS)
    phases = [_phases(model, opt, batch, bf16) for _ in range(n)][1:]
    whole = step_seconds(model, opt, batch, bf16, 1 if quick else PROFILE_STEPS)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step_seconds(model, opt, batch, bf16, 1)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return {"kind": "profile", "spec": spec, "data_s": float(np.median(data)),
            **{k: float(np.median([p[k] for p in phases])) for k in phases[0]},
            "train_step_s": float(np.median(whole)), "crop": int(crop), "batch": cfg.training.batch_size,
            "top": [{"op": e.key, "self_pct": 100 * e.self_cpu_time_total / total, "calls": e.count} for e in events[:TOP_OPS]]}


def real_loop(spec: str, quick: bool, packed: Path) -> dict:
    """'net@crop/workers': the training loop's batches (episode_batches with that many workers) and steps
    (train_step, bf16 where train.py uses it) for LOOP_STEPS steps after LOOP_WARMUP: wall seconds per step, the
    main process's CPU seconds per step and the fraction of wall time spent waiting for a batch."""
    from IrisSegmentLib.inference.runtime import cpu_autocast
    from IrisSegmentLib.training.stream import episode_batches
    from IrisSegmentLib.training.train import train_step

    torch.set_num_threads(1)
    net_crop, workers = spec.split("/")
    net, crop = net_crop.split("@")
    cfg = speed_config(net, int(crop), quick)
    bf16 = cpu_autocast(cfg.inference.cpu_precision)
    torch.manual_seed(0)
    model = build_iris(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = episode_batches(_speed_cases(quick, packed, cfg), cfg.training, 0, int(workers))
    steps = 2 if quick else LOOP_STEPS
    for i in range(LOOP_WARMUP + steps):
        if i == LOOP_WARMUP:
            w0, c0, waited = time.perf_counter(), time.process_time(), 0.0
        t = time.perf_counter()
        b = next(batches)
        if i >= LOOP_WARMUP:
            waited += time.perf_counter() - t
        train_step(model, opt, b, 1e-3, 1.0, "cpu", bf16)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    batches.close()
    return {"kind": "loop", "spec": spec, "workers": int(workers), "steps": steps, "bf16": bf16,
            "wall_s_per_step": wall / steps, "cpu_s_per_step": cpu / steps, "wait_fraction": waited / wall}


def speed_row(kind: str, spec: str, quick: bool, packed: Path) -> dict:
    if kind == "step":
        return step_cost(spec, quick)
    if kind == "profile":
        return profile_step(spec, quick, packed)
    return real_loop(spec, quick, packed)


def _speed_file(work: Path, kind: str, i: int, spec: str) -> Path:
    return work / "speed" / f"{kind}-{i}-{spec.replace('/', '_').replace('@', '-')}.json"


def run_speed(work: Path, quick: bool, packed: Path, log, cached_only: bool = False) -> dict[str, list[dict]]:
    """Every speed measurement, each in a fresh one-thread process (in-process with --quick); cached as JSON
    under work/speed. `cached_only`: the ones made before, nothing run."""
    rows: dict[str, list[dict]] = {}
    for kind, specs in (SPEED_QUICK if quick else SPEED_FULL).items():
        for i, spec in enumerate(specs):
            f = _speed_file(work, kind, i, spec)
            if f.is_file():
                r = json.loads(f.read_text(encoding="utf-8"))
            elif cached_only:
                continue
            else:
                r, failure = (speed_row(kind, spec, True, packed), "") if quick else in_child(speed_row, kind, spec, False, packed)
                if r is None:
                    log(f"speed {kind} {spec}: FAILED {failure}")
                    continue
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_text(json.dumps(r), encoding="utf-8")
                log(f"speed {kind} {spec}: {json.dumps(r)}")
            rows.setdefault(kind, []).append(r)
    return rows


def _fit(x, y) -> tuple[float, float, float]:
    """Least-squares y = a + b x; returns a, b, R^2."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2:
        return math.nan, math.nan, math.nan
    b, a = np.polyfit(x, y, 1)
    ss = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - float(((y - (a + b * x)) ** 2).sum()) / ss if ss > 0 else 1.0
    return float(a), float(b), r2


CT_TARGET = ((512, 512, 300), (0.8, 0.8, 1.5))  # a clinical CT: voxels and spacing, mm


def _ct_projection(fits: dict, win: int) -> list[str]:
    """Windows and fitted CPU seconds of the sliding-window choices on the clinical CT target's working grid
    (projected from the measured time-per-window fit, not measured)."""
    from IrisSegmentLib.inference.windows import coarse_tile, tile

    shape, spacing = CT_TARGET
    work = [max(win, round(n * s / 1.5)) for n, s in zip(shape, spacing)]
    a, b, _ = fits["time_windows"]
    per_class = fits.get("per_class_x", math.nan)
    rows = [(f"full, overlap {o}", len(tile(work, (win,) * 3, o))) for o in (0.0, 0.25, 0.5, 0.75)]
    rows.insert(0, ("coarse-to-fine covering pass only (nothing found), overlap 0.5", len(coarse_tile(work, (win,) * 3, 0.5))))
    out = [f"Projected, not measured: the {'x'.join(map(str, shape))} CT at {'x'.join(f'{x:g}' for x in spacing)} mm "
           f"(working grid {'x'.join(map(str, work))}), CPU seconds from the fit above:", "",
           "| choice | windows | fitted CPU s |", "|---|---|---|"]
    out += [f"| {name} | {n} | {a + b * n:.0f} |" for name, n in rows]
    seconds = [a + b * n for _, n in rows]
    if not math.isnan(per_class):
        n = len(tile(work, (win,) * 3, 0.5))
        seconds.append((a + b * n) * 15 * per_class / 4)
        out.append(f"| one pass per class, 15 classes, overlap 0.5 | {n} x 15 passes | {seconds[-1]:.0f} |")
    fits["ct_overlap_spread"] = seconds[4] / seconds[1]
    fits["ct_spread"] = max(seconds) / min(seconds)
    out += ["", f"On this target overlap alone (0 to 0.75) spans {fits['ct_overlap_spread']:.0f}x; the rows span "
            f"{fits['ct_spread']:.0f}x; both choices together (overlap 0.75, one pass per class) would multiply.", ""]
    return out


def cost_tables(rows: dict[str, list[dict]]) -> tuple[str, dict]:
    out, fits = [], {}
    sz = rows.get("size", [])
    if sz:
        out += ["| target (1.5 mm, working grid = target) | windows (full tiling) | encode CPU s | segment CPU s | CPU s / window | peak MiB | above base MiB |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {r['shape']} | {r['windows']} | {r['encode_s']:.1f} | {r['segment_s']:.1f} | {r['segment_s'] / max(r['windows'], 1):.2f} | "
                f"{r['peak_mib']:.0f} | {r['extra_mib']:.0f} |" for r in sz]
        fits["time_windows"] = _fit([r["windows"] for r in sz], [r["segment_s"] for r in sz])
        fits["mem_voxels"] = _fit([r["voxels"] / 1e6 for r in sz], [r["extra_mib"] for r in sz])
        a, b, r2 = fits["time_windows"]
        a2, b2, r22 = fits["mem_voxels"]
        out += ["", f"Fit: segment CPU s = {a:.2f} + {b:.3f} x windows (R² {r2:.3f}); memory above base = {a2:.0f} MiB + "
                f"{b2:.1f} MiB per million target voxels (R² {r22:.3f}). Precision: {sz[0]['precision']}."]
        for s in rows.get("stopped", []):
            out.append(f"The size sweep stopped after {s['after']} ({s['seconds']:.0f} s > {STOP_SECONDS:.0f} s); larger targets "
                       f"follow the fit (windows x {b:.3f} s).")
        out.append("")
    for kind, name in (("classes", "classes K"), ("references", "reference images")):
        rs = rows.get(kind, [])
        if not rs:
            continue
        out += [f"| {name} | target | windows | encode CPU s | segment CPU s | peak MiB | above base MiB |", "|---|---|---|---|---|---|---|"]
        out += [f"| {r['value']} | {r['shape']} | {r['windows']} | {r['encode_s']:.1f} | {r['segment_s']:.1f} | {r['peak_mib']:.0f} | {r['extra_mib']:.0f} |" for r in rs]
        x = [int(r["value"]) for r in rs]
        fits[f"{kind}_segment"] = _fit(x, [r["segment_s"] for r in rs])
        fits[f"{kind}_encode"] = _fit(x, [r["encode_s"] for r in rs])
        fits[f"{kind}_mem"] = _fit(x, [r["extra_mib"] for r in rs])
        a, b, r2 = fits[f"{kind}_segment"]
        ae, be, r2e = fits[f"{kind}_encode"]
        am, bm, _ = fits[f"{kind}_mem"]
        out += ["", f"Fit: segment CPU s = {a:.2f} + {b:.3f} x {name} ({100 * b / a if a else math.nan:.1f} % of the intercept per unit, R² {r2:.3f}); "
                f"encode CPU s = {ae:.2f} + {be:.2f} x {name} (R² {r2e:.3f}); memory above base {am:.0f} + {bm:.1f} MiB per unit.", ""]
    sp = rows.get("spread", [])
    if sp:
        fastest = min(r["segment_s"] for r in sp)
        out += ["| sliding-window choice (4 classes) | windows | segment CPU s | x fastest |", "|---|---|---|---|"]
        out += [f"| {r['value']} | {r['windows']} | {r['segment_s']:.1f} | {r['segment_s'] / fastest:.1f} |" for r in sp]
        fits["spread"] = max(r["segment_s"] for r in sp) / fastest
        by = {r["value"]: r for r in sp}
        line = f"Slowest / fastest: {fits['spread']:.1f}x on {sp[0]['shape']} with 4 classes."
        if "full/0.5" in by and "per-class/0.5" in by:
            per_class = by["per-class/0.5"]["segment_s"] / by["full/0.5"]["segment_s"]
            fits["per_class_x"] = per_class
            line += (f" One pass per class costs {per_class:.1f}x the joint pass for 4 classes, about {per_class / 4:.2f}x K, "
                     f"so with the paper's 15 classes about {15 * per_class / 4:.0f}x.")
        out += ["", line, ""]
        if "time_windows" in fits and not math.isnan(fits["time_windows"][1]):
            out += _ct_projection(fits, win=64)
    pool = rows.get("pooling", [])
    if pool:
        out += ["| foreground pooling (gap 2), one reference, K = 4, forward | C x window | CPU s | peak MiB above base | sum of tokens |",
                "|---|---|---|---|---|"]
        out += [f"| {r['value'].split('@')[0]} | {r['value'].split('@')[1]}³ | {r['seconds']:.2f} | {r['extra_mib']:.0f} | {r['checksum']:.6g} |"
                for r in pool]
        out += ["", "Same tokens (sum column) from both; the upsampled features alone are C x window³ x 4 bytes "
                "(128 MiB at 128 x 64³, 4 GiB at the paper's 512 x 128³), per reference and again for their gradient in training.", ""]
    tm = rows.get("train-memory", [])
    if tm:
        out += ["| network @ crop (batch 1, K = 4, fp32, one AdamW step) | parameters | CPU s | peak MiB above base |", "|---|---|---|---|"]
        out += [f"| {r['value']} | {r['params'] / 1e6:.2f} M | {r['seconds']:.1f} | {r['extra_mib']:.0f} |" for r in tm]
        paper = [r for r in tm if r["value"].startswith("paper")]
        if len(paper) >= 2:
            a, b, _ = _fit([int(r["value"].split("@")[1]) ** 3 / 1e6 for r in paper], [r["extra_mib"] for r in paper])
            fits["paper_train"] = (a, b)
            est = a + b * 128**3 / 1e6
            per = (est - a) / 1024
            b24, b48 = (24 * 1e9 / 2**30 - a / 1024) / per, (48 * 1e9 / 2**30 - a / 1024) / per
            fits["paper_128"] = (a / 1024, per, b24, b48)
            out += ["", f"Paper-sized network: {a:.0f} MiB + {b:.0f} MiB per million crop voxels per sample; at the paper's 128³: "
                    f"{est / 1024:.1f} GiB for one sample in fp32 (linear in voxels through the two crops measured; the weights' "
                    f"gradients and AdamW moments, 3 x 4 bytes x parameters = {3 * 4 * paper[0]['params'] / 2**30:.2f} GiB, are "
                    f"inside both points), so a batch of b samples on one device needs about {per:.1f}·b GiB: the seed's 24-48 GB is a batch of "
                    f"{b24:.1f}-{b48:.1f} such samples per device (fp32, host memory on the CPU; bf16 autocast on a GPU stores "
                    f"activations in half the bytes; the GPU measurement is owed)."]
    return "\n".join(out), fits


def plots(summary: dict, cost: dict[str, list[dict]], fits: dict, docs: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    panels = [(metric, [k for k in summary if summary[k].get(metric, (math.nan, 0, 0))[2]]) for metric in ("episode", "volume")]
    panels = [(m, k) for m, k in panels if k]
    if panels:
        n = max(len(k) for _, k in panels)
        fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 0.33 * n + 1.5), squeeze=False)
        for ax, (metric, keys) in zip(axes[0], panels):
            m = [summary[k][metric][0] * 100 for k in keys]
            s = [0 if math.isnan(summary[k][metric][1]) else summary[k][metric][1] * 100 for k in keys]
            ax.barh(range(len(keys)), m, xerr=s, color=["tab:green" if k in ("design", "engine") else "tab:blue" for k in keys])
            ax.set_yticks(range(len(keys)), [f"{summary[k]['group']}: {k}" for k in keys], fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel(f"validation {metric} Dice % (mean ± sd over seeds)")
        fig.suptitle("Ablations and sensitivity: tiny network, CPU mini-benchmark (left: trained variants on fixed "
                     "episodes; right: the engine on whole volumes)", fontsize=9)
        fig.tight_layout()
        made.append(docs / "ablations_dice.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    if cost.get("size"):
        sz = cost["size"]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        x = np.array([r["windows"] for r in sz])
        a1.plot(x, [r["segment_s"] for r in sz], "o", label="measured")
        a, b, r2 = fits["time_windows"]
        a1.plot(x, a + b * x, "-", label=f"{a:.1f} + {b:.2f}·windows (R² {r2:.3f})")
        for r in sz:
            a1.annotate(r["shape"], (r["windows"], r["segment_s"]), fontsize=7)
        a1.set_xlabel("windows (64³, overlap 0.5, full tiling)")
        a1.set_ylabel("segment CPU seconds (1 thread)")
        a1.legend(fontsize=8)
        v = np.array([r["voxels"] / 1e6 for r in sz])
        a2.plot(v, [r["peak_mib"] for r in sz], "o", label="peak (process)")
        a2.plot(v, [r["extra_mib"] for r in sz], "s", label="above base")
        a, b, r2 = fits["mem_voxels"]
        a2.plot(v, a + b * v, "-", label=f"{a:.0f} + {b:.1f}·Mvoxels (R² {r2:.3f})")
        a2.set_xlabel("target voxels (millions)")
        a2.set_ylabel("MiB")
        a2.legend(fontsize=8)
        fig.suptitle("iris-small (bundled), Segmenter on the CPU: cost against target size")
        fig.tight_layout()
        made.append(docs / "cost_size.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    if cost.get("classes") or cost.get("references"):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, kind, name in zip(axes, ("classes", "references"), ("classes K", "reference images")):
            rs = cost.get(kind, [])
            if not rs:
                continue
            x = np.array([int(r["value"]) for r in rs])
            ax.plot(x, [r["segment_s"] for r in rs], "o-", label="segment CPU s")
            ax.plot(x, [r["encode_s"] for r in rs], "s-", label="encode CPU s")
            ax2 = ax.twinx()
            ax2.plot(x, [r["extra_mib"] for r in rs], "^:", color="grey", label="MiB above base")
            ax2.set_ylabel("MiB above base")
            ax.set_xscale("log", base=2)
            ax.set_xlabel(name)
            ax.set_ylabel("CPU seconds")
            ax.legend(loc="upper left", fontsize=8)
            ax2.legend(loc="lower right", fontsize=8)
            ax.set_title(f"{rs[0]['shape']} target, {rs[0]['windows']} windows")
        fig.suptitle("iris-small (bundled), Segmenter on the CPU: cost against classes and references")
        fig.tight_layout()
        made.append(docs / "cost_classes_references.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    return made


ISSUE_11_PARTS = ("ablations", "sensitivity", "cost")
SECTIONS = ("issue-11", "prior", "speed")  # the sections of docs/ablations.md, in this order
DOCS_TITLE = "# Evidence for the design choices: ablations, sensitivity, cost (issue 11); the prior network, training speed (issue 17)"
DOCS_INTRO = ("Generated by `python -m benchmarks.ablations` (what is compared and how: its docstring; the verdicts in "
              "`docs/DESIGN.md` sections 2 and 3.2). Do not edit by hand: rerun, it resumes; a run rewrites the sections of "
              "the parts it ran (each names its command) and keeps the others.")


def _mark(name: str, end: bool = False) -> str:
    return f"<!-- {'end of ' if end else ''}section: {name} -->"


def write_docs(path: Path, sections: dict[str, str]) -> str:
    """docs/ablations.md with `sections` replaced and the other sections kept from the file as it is (a file written
    before the sections were marked is all issue 11's)."""
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    kept = {}
    for name in SECTIONS:
        if _mark(name) in old and _mark(name, True) in old:
            kept[name] = old.split(_mark(name) + "\n", 1)[1].split("\n" + _mark(name, True), 1)[0]
    if old.strip() and not kept:  # made by the default command of then, whose parts were issue 11's
        kept["issue-11"] = (f"Made by `python -m benchmarks.ablations --parts {','.join(ISSUE_11_PARTS)}`.\n\n"
                            + old.split("\n\n", 2)[2].strip())
    kept.update(sections)
    body = "\n\n".join(f"{_mark(n)}\n{kept[n].strip()}\n{_mark(n, True)}" for n in SECTIONS if n in kept)
    text = f"{DOCS_TITLE}\n\n{DOCS_INTRO}\n\n{body}\n"
    path.write_text(text, encoding="utf-8")
    return text


def issue_11_section(work: Path, seeds: list[int], header: str, cost: dict | None) -> tuple[str, dict, dict]:
    """The nine gaps, the sensitivity grid and the cost rows; the summary and fits that the plots use."""
    ab_md, extra = tables(work, seeds)
    md = [header, "", "## Ablations (the nine gaps)", "", ab_md, "", "## Sensitivity", "", extra["sensitivity_md"], ""]
    fits = {}
    if cost:
        cost_md, fits = cost_tables(cost)
        md += ["## Cost against input size (product: bundled iris-small, Segmenter, CPU)", "", cost_md, ""]
    owed = [f"{k} seed {s}" for k, s in todo(["ablations", "sensitivity"], seeds) if not result_path(work, k, s).is_file()]
    md += ["## Owed", "",
           f"- Runs of this grid not done: {', '.join(owed) if owed else 'none'}.",
           "- Everything on a GPU: larger budgets (the real iris-small, thousands of steps, the 12-collection training "
           "set) and GPU time and memory for the cost rows; this machine had no GPU for this issue.", ""]
    return "\n".join(md), extra["summary"], fits


def report(work: Path, seeds: list[int], mini: Mini, parts: list[str], cost: dict | None, speed: dict | None,
           docs: Path | None, log, made_by: str) -> str:
    """The sections of the parts run, printed, written to work/ablations.md and (with `docs`) into docs/ablations.md;
    each starts with `made_by` (the command that made its runs)."""
    header = (f"Mini-benchmark: tiny network, {mini.crop}³ crops, {mini.steps} steps, batch 2, seeds {','.join(map(str, seeds))}"
              f"{' (QUICK: synthetic data, numbers mean nothing)' if mini.quick else ''}; CPU, 1 thread per run, "
              f"shared machine: seconds are process CPU seconds, memory is peak resident memory.")
    prior_header = (f"{header} Prior rows: prior_channels {PRIOR_CHANNELS}; the engine on up to "
                    f"{', '.join(f'{v} {k}' for k, v in mini.prior_targets.items())} validation volumes (one per subject; "
                    f"fewer where the split has fewer subjects: the pairs are counted below), one reference of another "
                    f"subject each, localisation by registration without the self-Dice gate (no confidence pass: every "
                    f"class gets the w mix).")
    sections, summary, fits = {}, None, {}
    if any(p in parts for p in ISSUE_11_PARTS):
        text, summary, fits = issue_11_section(work, seeds, header, cost)
        sections["issue-11"] = f"{made_by}\n\n{text}"
    if "prior" in parts:
        sections["prior"] = f"{made_by}\n\n{prior_header}\n\n{prior_section(work, seeds, mini)}"
    if "speed" in parts:
        sections["speed"] = f"{made_by}\n\n{prior_header}\n\n{speed_section(work, seeds, speed or {}, mini.quick)}"
    text = "\n\n".join(sections.values())
    (work / "ablations.md").write_text(text, encoding="utf-8")
    if docs is not None:
        write_docs(docs / "ablations.md", sections)
        if summary is not None:
            made = plots(summary, cost or {}, fits, docs)
            log("plots: " + ", ".join(str(p) for p in made))
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / ".cache" / "packed"))
    ap.add_argument("--work", default=None, help="results, weights and caches (default runs/ablations; --quick: a temporary folder)")
    ap.add_argument("--docs", default=None, help="write the plots here (default: docs/ for a full run, none for --quick)")
    ap.add_argument("--steps", type=int, default=Mini.steps)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--parts", default="ablations,sensitivity,cost,prior,speed")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="write the tables from the runs done so far")
    a = ap.parse_args()
    mini = QUICK if a.quick else replace(Mini(), steps=a.steps)
    work = Path(a.work) if a.work else (Path(tempfile.mkdtemp(prefix="ablations-quick-")) if a.quick else ROOT / "runs" / "ablations")
    torch.set_num_threads(1)
    work.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in a.seeds.split(",")] if not a.quick else [0, 1]
    parts = a.parts.split(",")
    logf = open(work / "log.txt", "a")

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, file=sys.stderr, flush=True)
        logf.write(line + "\n")
        logf.flush()

    speed = run_speed(work, a.quick, Path(a.data), log, cached_only=a.report_only) if "speed" in parts else None
    if not a.report_only:
        run_arch_costs(work, mini, log, trained_variants(parts))
        run_all(todo(parts, seeds), mini, Path(a.data), work, a.jobs, log)
    cost = None
    if "cost" in parts:
        cost = run_cost(work, a.quick, log) if not a.report_only else _cached_cost(work)
    docs = Path(a.docs) if a.docs else (None if a.quick else ROOT / "docs")
    command = " ".join(["python -m benchmarks.ablations", *(x for x in sys.argv[1:] if x != "--report-only")])
    made_by = f"Made by `{command}`" + (" (tables rewritten from its cached runs with `--report-only`)." if a.report_only else ".")
    print(report(work, seeds, mini, parts, cost, speed, docs, log, made_by))
    return 0


def _cached_cost(work: Path) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    plan = COST_FULL
    for kind, values in plan.items():
        for value in values:
            f = work / "cost" / f"{kind}-{value.replace('/', '_')}.json"
            if f.is_file():
                r = json.loads(f.read_text())
                rows.setdefault(kind, []).append(r)
                if kind == "size" and r.get("segment_s", 0) > STOP_SECONDS:
                    rows.setdefault("stopped", []).append({"after": value, "seconds": r["segment_s"]})
    return rows


if __name__ == "__main__":
    sys.exit(main())
