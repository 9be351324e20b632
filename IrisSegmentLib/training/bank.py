"""The memory bank shipped with a model: per class, the mean task embedding that the exported
network gives on a fixed set of reference crops of that class (every class of every collection
trained on; unaugmented; encoded one class at a time, as inference encodes references)."""
from __future__ import annotations

import torch

from ..config import TrainingConfig
from ..inference.task import MemoryBank
from .data import Case
from .sampler import MIN_REF_VOXELS, EpisodeSampler

BANK_SEED = 4321


def bank_batches(cases: list[Case], cfg: TrainingConfig, per_class: int) -> list[dict]:
    """`per_class` crops centred on each class, from cases spread over those that have it, the same
    every time; batches of cfg.batch_size with K = 1 (images float16, masks bool, to keep them small)."""
    sampler = EpisodeSampler(cases, cfg, seed=BANK_SEED, augment_images=False)
    refs = []
    for dataset in [d for d in sampler.names if d in sampler.by_dataset]:
        group = sampler.by_dataset[dataset]
        for value in sorted(set().union(*(sampler.present(c) for c in group)) - {0}):
            having = [c for c in group if value in sampler.present(c)]
            refs += [(f"{dataset}:{value}", *sampler.reference(having[i * len(having) // per_class], value))
                     for i in range(per_class)]
    batches = []
    for i in range(0, len(refs), cfg.batch_size):
        names, images, masks = zip(*refs[i : i + cfg.batch_size])
        masks = torch.stack(masks).bool()
        batches.append({"ref_image": torch.stack(images).half(), "ref_masks": masks,
                        "valid": masks.flatten(2).sum(2) >= MIN_REF_VOXELS, "names": [[n] for n in names]})
    return batches


@torch.no_grad()
def fill_bank(model, batches: list[dict], momentum: float, model_id: str, device="cpu") -> MemoryBank:
    """A bank holding, per class name, the mean of the model's tokens over every valid sighting."""
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for b in batches:
        tokens = model.encode_task(b["ref_image"].to(device).float(), b["ref_masks"].to(device).float()).float().cpu()
        for i, names in enumerate(b["names"]):
            for j, n in enumerate(names):
                if n and b["valid"][i, j]:
                    sums[n] = sums[n] + tokens[i, j] if n in sums else tokens[i, j].clone()
                    counts[n] = counts.get(n, 0) + 1
    bank = MemoryBank(momentum, model_id)
    bank.embeddings = {n: sums[n] / counts[n] for n in sorted(sums)}
    bank.counts = {n: counts[n] for n in sorted(counts)}
    return bank
