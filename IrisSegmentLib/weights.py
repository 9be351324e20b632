"""Model weights: safetensors only (never pickle), checked against the config saved beside them."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import atomic_path
from .config import BundleConfig
from .errors import IrisInputError
from .model import IrisModel, build_iris
from .resources import model_dir

WEIGHTS = "weights.safetensors"
CONFIG = "config.yaml"
FORMAT = "iris-segment-weights/1"


def save_model(model: IrisModel, cfg: BundleConfig, directory: str | Path, dtype=torch.float16, info: dict | None = None) -> Path:
    """Writes config.yaml and weights.safetensors (fp16 by default) into `directory`."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg.save(d / CONFIG)
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "fingerprint": cfg.model.fingerprint(), "name": cfg.model.name, "info": json.dumps(info or {})}
    with atomic_path(d / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return d


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; anything else is refused with a message."""
    p = Path(path)
    if not p.is_file():
        raise IrisInputError(f"{p}: weights file not found; a model folder holds config.yaml and weights.safetensors")
    try:
        with open(p, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise IrisInputError(f"{p}: weights file cannot be read ({e.strerror or e}); check its permissions") from None
    if head[:2] == b"\x80\x02" or head[:2] == b"PK" or head[:1] == b"\x80":
        raise IrisInputError(f"{p}: this is a pickle/PyTorch checkpoint; IrisSegment loads weights only from .safetensors files (convert with safetensors.torch.save_file)")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise IrisInputError(f"{p}: not a readable safetensors file ({e}); the file may be truncated or corrupt, download or copy it again") from None
    return tensors, meta


def load_model(name_or_path: str | Path | None = None) -> tuple[IrisModel, BundleConfig, dict]:
    """Builds the network from config.yaml and fills it from weights.safetensors (float32, eval mode)."""
    d = model_dir(name_or_path)
    if not (d / CONFIG).is_file():
        raise IrisInputError(f"{d}: no {CONFIG} beside the weights; copy the model folder whole")
    try:
        cfg = BundleConfig.load(d / CONFIG)
    except (ValueError, TypeError) as e:
        raise IrisInputError(f"{d / CONFIG}: {e}") from None
    tensors, meta = read_weights(d / WEIGHTS)
    if meta.get("fingerprint") not in (None, cfg.model.fingerprint()):
        raise IrisInputError(f"{d / WEIGHTS}: weights were made for another architecture than {d / CONFIG} describes (fingerprint {meta.get('fingerprint')} != {cfg.model.fingerprint()}); use the config.yaml that came with these weights")
    model = build_iris(cfg.model)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(
            s for s in (
                f"missing {missing[:3]}" if missing else "",
                f"unexpected {unexpected[:3]}" if unexpected else "",
                f"wrong shape {wrong[:3]}" if wrong else "",
            ) if s
        )
        raise IrisInputError(f"{d / WEIGHTS}: weights do not match the architecture in {d / CONFIG} ({detail}); use the config.yaml that came with these weights")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()})
    model.eval()
    info = json.loads(meta.get("info", "{}") or "{}")
    return model, cfg, info
