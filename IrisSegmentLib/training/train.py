"""Episodic training with a time budget: resumable or started from a model folder, deterministic
given a seed and the number of workers; logs loss, speed and validation Dice, and exports the
model folder (fp16 EMA weights, config, memory bank) every few minutes and at the end."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..atomic import atomic_path
from ..config import BundleConfig
from ..errors import IrisInputError
from ..inference.runtime import cpu_autocast
from ..inference.segmenter import BANK_FILE
from ..model import build_iris
from ..weights import load_model, save_model
from .bank import bank_batches, fill_bank
from .data import load, without
from .losses import dice_bce, dice_score
from .registrations import coverage, load_registrations
from .sampler import EpisodeSampler, episodes, real_only
from .stream import episode_batches

CHECKPOINT = "checkpoint.safetensors"
MODEL = "model"


def lr_at(step: int, cfg) -> float:
    """Linear warm-up, then exponential decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr * cfg.decay_per_1k ** ((step - cfg.warmup_steps) / 1000)


def save_checkpoint(path: Path, model, ema, opt, step: int, cfg: BundleConfig) -> None:
    """Everything resuming needs: model, EMA, AdamW state, step (~16 bytes per parameter)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
    opt_state = opt.state_dict()
    scalars = {}
    for pid, st in opt_state["state"].items():
        for name, val in st.items():
            if torch.is_tensor(val) and val.dim() > 0:
                tensors[f"opt.{pid}.{name}"] = val
            else:
                scalars[f"{pid}.{name}"] = float(val)
    meta = {"step": str(step), "config": json.dumps(cfg.to_dict()), "opt_scalars": json.dumps(scalars)}
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)


def load_checkpoint(path: Path, model, ema, opt) -> int:
    """Restores a checkpoint (a memory bank that older ones hold is ignored); returns its step."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("ema.")})
    scalars = json.loads(meta["opt_scalars"])
    state = opt.state_dict()
    for key, val in t.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state["state"].setdefault(int(pid), {})[name] = val
    for key, val in scalars.items():
        pid, name = key.split(".", 1)
        state["state"].setdefault(int(pid), {})[name] = torch.tensor(val)
    opt.load_state_dict(state)
    return int(meta["step"])


def init_weights(model_dir, cfg: BundleConfig) -> dict[str, torch.Tensor]:
    """The weights of a model folder, refused unless it has the architecture of `cfg`, or that architecture
    without the prior input (then the prior fusion keeps its initialisation: zero output, the folder's behaviour)."""
    model, folder_cfg, _ = load_model(model_dir)
    adds_prior = folder_cfg.model.prior_channels == 0 and cfg.model.prior_channels > 0
    mine = dataclasses.replace(cfg.model, prior_channels=0) if adds_prior else cfg.model
    if folder_cfg.model.fingerprint() != mine.fingerprint():
        raise IrisInputError(f"{model_dir}: its architecture (fingerprint {folder_cfg.model.fingerprint()}) is not the "
                             f"config's ({cfg.model.fingerprint()}); leave out --config to train with the folder's own")
    return model.state_dict()


def _prior(b: dict, device) -> torch.Tensor | None:
    return None if b.get("query_prior") is None else b["query_prior"].to(device, non_blocking=True)


def train_step(model, opt, b: dict, lr: float, grad_clip: float, device, cpu_bf16: bool = False) -> torch.Tensor:
    """One AdamW step on a batch (bf16 autocast on CUDA, and on the CPU with `cpu_bf16`); returns the loss,
    detached, unsynchronised."""
    model.train()
    for g in opt.param_groups:
        g["lr"] = lr
    cuda = str(device).startswith("cuda")
    with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda or cpu_bf16):
        tokens = model.encode_task(b["ref_image"].to(device, non_blocking=True), b["ref_masks"].to(device, non_blocking=True))
        logits = model.segment(b["query_image"].to(device, non_blocking=True), tokens, b["valid"].to(device), _prior(b, device))
    loss = dice_bce(logits, b["query_masks"].to(device, non_blocking=True), b["valid"].to(device))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss.detach()


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """The weight EMA after one step: parameters move `1 - decay` of the way to the model's; buffers are copied."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


@torch.no_grad()
def validate(model, batches: list[dict], device) -> dict[str, float]:
    """Mean one-shot Dice per dataset on fixed validation episodes."""
    model.eval()
    per: dict[str, list[float]] = {}
    for b in batches:
        logits = model(b["query_image"].to(device), b["ref_image"].to(device), b["ref_masks"].to(device), b["valid"].to(device),
                       _prior(b, device))
        d = dice_score(logits > 0, b["query_masks"].to(device) > 0.5).cpu()
        for i, names in enumerate(b["names"]):
            for j, n in enumerate(names):
                if n and b["valid"][i, j] and b["query_masks"][i, j].sum() > 0:
                    per.setdefault(n.split(":")[0], []).append(float(d[i, j]))
    return {k: float(np.mean(v)) for k, v in sorted(per.items())}


def train(cfg: BundleConfig, packed: str | Path, out: str | Path, minutes: float, resume: str | Path | None = None,
          device: str = "cpu", val_episodes: int = 24, log_every: int = 10, checkpoint_minutes: float = 2.0,
          log=print, init: str | Path | None = None, workers: int = 0, resume_dir: str | Path | None = None,
          bank_crops: int = 4) -> Path:
    """Trains until `minutes` after the call (setup included), then validates and exports; writes
    out/log.jsonl, out/model (every `checkpoint_minutes` and at the end) and the resume checkpoint
    into `resume_dir` (default `out`). `init` starts from a model folder's weights (EMA too) with a
    fresh optimiser; `resume` continues a checkpoint."""
    called = time.time()
    if resume and init:
        raise IrisInputError("give --resume (continue a run) or --init (start from a model folder), not both")
    out = Path(out)
    resume_dir = Path(resume_dir or out)
    out.mkdir(parents=True, exist_ok=True)
    resume_dir.mkdir(parents=True, exist_ok=True)
    tc = cfg.training
    cuda = str(device).startswith("cuda")
    cpu_bf16 = not cuda and cpu_autocast(cfg.inference.cpu_precision)  # the engine's rule: bf16 where the CPU has it
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(tc.seed)
    model = build_iris(cfg.model)
    if init:
        missing, _ = model.load_state_dict(init_weights(init, cfg), strict=False)
        if any(not k.startswith("decoder.prior_fusion.") for k in missing):
            raise IrisInputError(f"{init}: weights lack {missing[:3]}")
        log(f"initialised from {init}")
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, fused=True if cuda else None)
    step = 0
    if resume:
        step = load_checkpoint(Path(resume), model, ema, opt)
        log(f"resumed from {resume} at step {step}")
    cases = without(load(packed, "train"), tc.holdout)
    bank_set: list[dict] = []  # made when first needed: minutes on a CPU

    def bank() -> list[dict]:
        if not bank_set:
            bank_set.extend(bank_batches(cases, tc, bank_crops))
        return bank_set

    val_cases = without(load(packed, "val"), tc.holdout)  # a travel cache may have none: then there is no validation
    val_batches = []
    if val_cases:
        val_batches = episodes(EpisodeSampler(val_cases, real_only(tc), seed=12345, augment_images=False), val_episodes, tc.batch_size)
    registrations = load_registrations(packed)
    batches = episode_batches(cases, tc, tc.seed + step, workers, pin_memory=cuda, registrations=registrations)
    start = last_save = time.time()
    first_step, waited, speed_logged, losses = step, 0.0, False, []
    with open(out / "log.jsonl", "a") as logf:
        def record(rec: dict) -> None:
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            log(json.dumps(rec))

        record({"step": step, "setup_s": start - called, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                "train_cases": len(cases), "val_cases": len(val_cases), "batch_size": tc.batch_size, "workers": workers, "cpu_bf16": cpu_bf16,
                "registrations": coverage(registrations)})
        while (step == first_step and minutes > 0) or time.time() - called < minutes * 60:  # >= 1 step unless 0 minutes
            t0 = time.time()
            b = next(batches)
            waited += time.time() - t0
            losses.append(train_step(model, opt, b, lr_at(step, tc), tc.grad_clip, device, cpu_bf16))
            step += 1
            ema_update(ema, model, tc.ema_decay)
            if step % log_every == 0:
                record({"step": step, "loss": float(torch.stack(losses).mean()), "lr": lr_at(step, tc), "minutes": (time.time() - start) / 60})
                losses.clear()
            elapsed = time.time() - start
            if not speed_logged and elapsed >= 60:
                n = step - first_step
                record({"step": step, "steps_per_s": n / elapsed, "episodes_per_s": n * tc.batch_size / elapsed,
                        "data_wait_fraction": waited / elapsed})
                speed_logged = True
            if time.time() - last_save > checkpoint_minutes * 60:
                save_checkpoint(resume_dir / CHECKPOINT, model, ema, opt, step, cfg)
                # the memory bank takes minutes on a CPU: there only the final export fills it
                export(ema, cfg, out / MODEL, {"steps": step}, bank() if cuda else [], device)
                last_save = time.time()
        batches.close()
        save_checkpoint(resume_dir / CHECKPOINT, model, ema, opt, step, cfg)
        val = validate(ema, val_batches, device)
        final = {"step": step, "val_dice": val, "val_mean": float(np.mean(list(val.values()))) if val else math.nan}
        record(final)
    export(ema, cfg, out / MODEL, {"steps": step, "val_dice": val}, bank(), device)
    return out


def export(model, cfg: BundleConfig, directory: Path, info: dict, bank_set: list[dict], device="cpu") -> Path:
    """Writes a loadable model folder: fp16 weights, config, and the memory bank that the fp16
    weights give on `bank_set` (none for an empty set). Made beside `directory`, then moved in file by file."""
    tmp = directory.with_name(f".{directory.name}.tmp")
    save_model(model, cfg, tmp, info=info)
    exported = load_model(tmp)[0].to(device)
    bank = fill_bank(exported, bank_set, cfg.training.bank_momentum, f"{cfg.model.name}-{cfg.model.fingerprint()}", device)
    if bank.embeddings:
        bank.save(tmp / BANK_FILE)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / BANK_FILE).unlink(missing_ok=True)
    for f in tmp.iterdir():
        f.replace(directory / f.name)
    tmp.rmdir()
    return directory
