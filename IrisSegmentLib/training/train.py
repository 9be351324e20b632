"""Episodic training with a time budget: resumable, deterministic given a seed, logs loss and validation Dice."""
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

from ..config import BundleConfig
from ..inference.segmenter import BANK_FILE
from ..inference.task import MemoryBank
from ..model import IrisModel
from ..weights import save_model
from .data import load
from .losses import dice_bce, dice_score
from .sampler import EpisodeSampler, collate

CHECKPOINT = "checkpoint.safetensors"


def lr_at(step: int, cfg) -> float:
    """Linear warm-up, then exponential decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr * cfg.decay_per_1k ** ((step - cfg.warmup_steps) / 1000)


def save_checkpoint(path: Path, model, ema, opt, bank: MemoryBank, step: int, cfg: BundleConfig) -> None:
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
    tensors |= {f"bank.{k}": v for k, v in bank.embeddings.items()}
    meta = {"step": str(step), "config": json.dumps(cfg.to_dict()), "opt_scalars": json.dumps(scalars),
            "bank_counts": json.dumps(bank.counts)}
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    tmp.replace(path)


def load_checkpoint(path: Path, model, ema, opt, bank: MemoryBank) -> int:
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
    bank.embeddings = {k[5:]: v for k, v in t.items() if k.startswith("bank.")}
    bank.counts = json.loads(meta.get("bank_counts", "{}"))
    return int(meta["step"])


@torch.no_grad()
def validate(model, batches: list[dict], device) -> dict[str, float]:
    """Mean one-shot Dice per dataset on fixed validation episodes."""
    model.eval()
    per: dict[str, list[float]] = {}
    for b in batches:
        logits = model(b["query_image"].to(device), b["ref_image"].to(device), b["ref_masks"].to(device), b["valid"].to(device))
        d = dice_score(logits > 0, b["query_masks"].to(device) > 0.5).cpu()
        for i, names in enumerate(b["names"]):
            for j, n in enumerate(names):
                if n and b["valid"][i, j] and b["query_masks"][i, j].sum() > 0:
                    per.setdefault(n.split(":")[0], []).append(float(d[i, j]))
    return {k: float(np.mean(v)) for k, v in sorted(per.items())}


def train(cfg: BundleConfig, packed: str | Path, out: str | Path, minutes: float, resume: str | Path | None = None,
          device: str = "cpu", val_episodes: int = 24, log_every: int = 10, checkpoint_minutes: float = 2.0,
          log=print) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tc = cfg.training
    torch.manual_seed(tc.seed)
    model = IrisModel(cfg.model).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    bank = MemoryBank(tc.bank_momentum, f"{cfg.model.name}-{cfg.model.fingerprint()}")
    step = 0
    if resume:
        step = load_checkpoint(Path(resume), model, ema, opt, bank)
        log(f"resumed from {resume} at step {step}")
    sampler = EpisodeSampler(load(packed, "train"), tc, seed=tc.seed + step)
    real_only = dataclasses.replace(tc, dataset_weights={**tc.dataset_weights, "shapes": 0.0})
    vs = EpisodeSampler(load(packed, "val"), real_only, seed=12345, augment_images=False)
    val_batches = [collate([vs.sample() for _ in range(tc.batch_size)]) for _ in range(max(1, val_episodes // tc.batch_size))]
    cuda = str(device).startswith("cuda")
    start = last_ckpt = time.time()
    budget = minutes * 60
    losses = []
    logf = open(out / "log.jsonl", "a")
    while time.time() - start < budget:
        model.train()
        b = collate([sampler.sample() for _ in range(tc.batch_size)])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            tokens = model.encode_task(b["ref_image"].to(device), b["ref_masks"].to(device))
            logits = model.segment(b["query_image"].to(device), tokens, b["valid"].to(device))
        loss = dice_bce(logits, b["query_masks"].to(device), b["valid"].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        step += 1
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - tc.ema_decay)
            for be, bm in zip(ema.buffers(), model.buffers()):
                be.copy_(bm)
            for i, names in enumerate(b["names"]):
                for j, n in enumerate(names):
                    if n and b["valid"][i, j]:
                        bank.update(n, tokens[i, j].float())
        losses.append(loss.item())
        if step % log_every == 0:
            rec = {"step": step, "loss": float(np.mean(losses[-log_every:])), "lr": lr_at(step, tc), "minutes": (time.time() - start) / 60}
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            log(json.dumps(rec))
        if time.time() - last_ckpt > checkpoint_minutes * 60:
            save_checkpoint(out / CHECKPOINT, model, ema, opt, bank, step, cfg)
            last_ckpt = time.time()
    save_checkpoint(out / CHECKPOINT, model, ema, opt, bank, step, cfg)
    val = validate(ema, val_batches, device)
    rec = {"step": step, "val_dice": val, "val_mean": float(np.mean(list(val.values()))) if val else math.nan}
    logf.write(json.dumps(rec) + "\n")
    logf.close()
    log(json.dumps(rec))
    export(ema, cfg, bank, out / "model", {"steps": step, "val_dice": val})
    return out


def export(model, cfg: BundleConfig, bank: MemoryBank, directory: Path, info: dict) -> Path:
    """Writes a loadable model folder: fp16 weights, config and the memory bank."""
    save_model(model, cfg, directory, info=info)
    if bank.embeddings:
        bank.save(directory / BANK_FILE)
    return directory
