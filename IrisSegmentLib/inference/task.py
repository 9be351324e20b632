"""Task embeddings as first-class objects: save/load, context ensemble, memory bank, in-context tuning."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..atomic import atomic_path
from ..errors import Cancelled, IrisInputError
from ..progress import Cancel, Progress
from .localise import Atlas

Colour = tuple[float, float, float]


def default_colour(i: int) -> Colour:
    """A distinct colour per class (golden-ratio hue walk), RGB in [0, 1]."""
    import colorsys

    return tuple(round(c, 4) for c in colorsys.hsv_to_rgb((0.11 + i * 0.618034) % 1.0, 0.75, 0.95))


@dataclass
class TaskEmbedding:
    """Tokens per class (K, m+1, C) with label values, names, colours and the model they belong to;
    `references`: per class what the confidence estimate needs from the reference ({"ml": volume,
    "self_dice": Dice of the task on its own reference crop, "pieces": its connected parts}), empty for bank or
    loaded old tasks; `atlases`: the references themselves, coarse, for localisation by registration (none for
    a memory-bank task); `polarity`: -1 where the references were encoded with their intensities inverted
    (`encoding.choose_polarity`), and targets are then inverted alike."""

    tokens: torch.Tensor
    labels: list[int]
    names: list[str] = field(default_factory=list)
    colours: list[Colour] = field(default_factory=list)
    model_id: str = ""
    references: list[dict] = field(default_factory=list)
    atlases: list[Atlas] = field(default_factory=list)
    polarity: float = 1.0

    def __post_init__(self):
        k = self.tokens.shape[0]
        if len(self.labels) != k:
            raise ValueError(f"{k} token sets but {len(self.labels)} labels")
        if not self.names:
            self.names = [f"label {v}" for v in self.labels]
        if not self.colours:
            self.colours = [default_colour(i) for i in range(k)]
        if self.references and len(self.references) != k:
            raise ValueError(f"{k} token sets but {len(self.references)} reference statistics")

    def select(self, labels: list[int]) -> "TaskEmbedding":
        idx = [self.labels.index(v) for v in labels]
        refs = [self.references[i] for i in idx] if self.references else []
        atlases = [a.select([v for v in labels if v in a.labels]) for a in self.atlases if set(labels) & set(a.labels)]
        return TaskEmbedding(self.tokens[idx], list(labels), [self.names[i] for i in idx], [self.colours[i] for i in idx],
                             self.model_id, refs, atlases, self.polarity)

    def with_tokens(self, tokens: torch.Tensor) -> "TaskEmbedding":
        """The same task with other tokens (tuned, or retrieved from the memory bank)."""
        return TaskEmbedding(tokens, self.labels, self.names, self.colours, self.model_id, self.references, self.atlases,
                             self.polarity)

    def save(self, path: str | Path) -> None:
        """Writes a .safetensors file; atomic (temporary file, then rename): never a half-written task."""
        meta = {"labels": self.labels, "names": self.names, "colours": [list(c) for c in self.colours], "model_id": self.model_id,
                "references": self.references, "atlases": [a.meta() for a in self.atlases], "polarity": self.polarity}
        tensors = {"tokens": self.tokens.detach().cpu().float().contiguous()}
        for i, a in enumerate(self.atlases):
            tensors.update({k: v.contiguous() for k, v in a.tensors(f"atlas{i}.").items()})
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"task": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> "TaskEmbedding":
        p = Path(path)
        if not p.is_file():
            raise IrisInputError(f"{p}: task file not found; check the path")
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["task"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            atlases = [Atlas.from_tensors(tensors, f"atlas{i}.", m) for i, m in enumerate(meta.get("atlases", []))]
        except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as e:
            raise IrisInputError(f"{p}: not an IrisSegment task file ({e}); save one with --save-task or Save task in Slicer") from None
        return cls(tensors["tokens"], [int(v) for v in meta["labels"]], meta["names"], [tuple(c) for c in meta["colours"]],
                   meta["model_id"], meta.get("references", []), atlases, float(meta.get("polarity", 1.0)))

    @staticmethod
    def ensemble(tasks: list["TaskEmbedding"]) -> "TaskEmbedding":
        """Context ensemble: per label, the mean of the embeddings of every task that has it."""
        if not tasks:
            raise ValueError("no task embeddings to combine")
        ids = {t.model_id for t in tasks}
        if len(ids) > 1:
            raise IrisInputError(f"task embeddings come from different models {sorted(ids)}; encode all references with one model")
        if len({t.polarity for t in tasks}) > 1:
            raise IrisInputError("the references were encoded with opposite intensity polarities (their contrasts differ): "
                                 "encode them together (Segmenter.encode_references), or give references of one contrast")
        first = tasks[0]
        labels = list(dict.fromkeys(v for t in tasks for v in t.labels))
        tokens, names, colours, refs = [], [], [], []
        for v in labels:
            have = [t for t in tasks if v in t.labels]
            tokens.append(torch.stack([t.tokens[t.labels.index(v)] for t in have]).mean(0))
            src = have[0]
            names.append(src.names[src.labels.index(v)])
            colours.append(src.colours[src.labels.index(v)])
            stats = [t.references[t.labels.index(v)] for t in have if t.references]
            refs.append({k: sum(s[k] for s in stats) / len(stats) for k in stats[0]} if len(stats) == len(have) else {})
        return TaskEmbedding(torch.stack(tokens), labels, names, colours, first.model_id,
                             refs if all(refs) else [], [a for t in tasks for a in t.atlases], first.polarity)


class MemoryBank:
    """A library of named class embeddings (m+1, C): EMA updates and retrieval by cosine similarity."""

    def __init__(self, momentum: float = 0.99, model_id: str = ""):
        self.momentum = momentum
        self.model_id = model_id
        self.embeddings: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def update(self, name: str, tokens: torch.Tensor) -> None:
        """T <- a*T + (1-a)*T_new; the first sighting initialises the entry."""
        t = tokens.detach().float().cpu()
        if name in self.embeddings:
            self.embeddings[name].mul_(self.momentum).add_(t, alpha=1 - self.momentum)
        else:
            self.embeddings[name] = t.clone()
        self.counts[name] = self.counts.get(name, 0) + 1

    def retrieve(self, tokens: torch.Tensor, top_k: int = 1) -> list[list[tuple[str, float]]]:
        """For each query class (K, m+1, C): the most similar stored names with their cosine similarity."""
        if not self.embeddings:
            raise IrisInputError("the memory bank is empty")
        names = list(self.embeddings)
        bank = torch.stack([self.embeddings[n].flatten() for n in names])
        sim = F.cosine_similarity(tokens.float().cpu().flatten(1)[:, None], bank[None], dim=-1)
        out = []
        for row in sim:
            vals, idx = row.topk(min(top_k, len(names)))
            out.append([(names[i], float(v)) for v, i in zip(vals, idx)])
        return out

    def task(self, names: list[str], labels: list[int] | None = None) -> TaskEmbedding:
        """A task embedding made from stored classes, segmentation with no reference at all."""
        missing = [n for n in names if n not in self.embeddings]
        if missing:
            raise IrisInputError(f"not in the memory bank: {missing}; known: {sorted(self.embeddings)[:20]}")
        labels = labels or list(range(1, len(names) + 1))
        return TaskEmbedding(torch.stack([self.embeddings[n] for n in names]), labels, list(names), model_id=self.model_id)

    def save(self, path: str | Path) -> None:
        save_file({k: v.contiguous() for k, v in self.embeddings.items()}, str(path),
                  metadata={"momentum": str(self.momentum), "counts": json.dumps(self.counts), "model_id": self.model_id})

    @classmethod
    def load(cls, path: str | Path) -> "MemoryBank":
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            bank = cls(float(meta.get("momentum", 0.99)), meta.get("model_id", ""))
            bank.embeddings = {k: f.get_tensor(k) for k in f.keys()}
        bank.counts = json.loads(meta.get("counts", "{}"))
        return bank


def with_first_polarity(encoders: Sequence[Callable[[float | None], TaskEmbedding]],
                        polarity: float | None = None) -> list[TaskEmbedding]:
    """The tasks of `encoders` (each called with an intensity polarity; None: it chooses), every one with the polarity
    of the first, which gets `polarity`: references of one task are all segmented the same way round."""
    tasks: list[TaskEmbedding] = []
    for encode in encoders:
        tasks.append(encode(tasks[0].polarity if tasks else polarity))
    return tasks


def tune(
    segment: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    tokens: torch.Tensor,
    images: torch.Tensor,
    masks: torch.Tensor,
    steps: int = 20,
    lr: float = 1e-2,
    loss_fn: Callable | None = None,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
) -> torch.Tensor:
    """In-context tuning: optimise only the task tokens (network frozen) on labelled crops.

    `segment(images, tokens) -> logits`; images (N, 1, D, H, W), masks (N, K, D, H, W). Returns new tokens.
    `progress` is told each step done; `cancel()` is checked before each step (raises Cancelled).
    """
    from ..training.losses import dice_bce

    loss_fn = loss_fn or dice_bce
    t = tokens.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([t], lr=lr)
    valid = torch.ones(masks.shape[:2], dtype=torch.bool, device=masks.device)
    with torch.enable_grad():
        for step in range(steps):
            if cancel is not None and cancel():
                raise Cancelled("in-context tuning cancelled")
            opt.zero_grad()
            loss = loss_fn(segment(images, t), masks, valid)
            loss.backward()
            opt.step()
            if progress is not None:
                progress((step + 1) / steps, f"in-context tuning step {step + 1}/{steps}")
    return t.detach()
