"""Endless batches of training episodes, sampled in the main process or by DataLoader workers."""
from __future__ import annotations

from typing import Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import TrainingConfig
from .data import Case
from .registrations import Registration
from .sampler import EpisodeSampler


class EpisodeStream(IterableDataset):
    """Collated batches of `cfg.batch_size` episodes, forever. Worker w (0 in the main process)
    samples with seed + w; a DataLoader takes batches from its workers in turn, so the sequence
    depends only on the seed and the number of workers."""

    def __init__(self, cases: list[Case], cfg: TrainingConfig, seed: int, registrations: dict[str, list[Registration]] | None = None):
        self.cases, self.cfg, self.seed, self.registrations = cases, cfg, seed, registrations

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        sampler = EpisodeSampler(self.cases, self.cfg, self.seed + (info.id if info else 0), registrations=self.registrations)
        while True:
            yield sampler.batch(self.cfg.batch_size)


def episode_batches(cases: list[Case], cfg: TrainingConfig, seed: int, workers: int = 0, pin_memory: bool = False,
                    registrations: dict[str, list[Registration]] | None = None) -> Iterator[dict]:
    """Batches from `workers` forked processes (0: this process); close() stops the workers."""
    stream = EpisodeStream(cases, cfg, seed, registrations)
    if workers == 0:
        yield from stream
    else:
        yield from DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                              prefetch_factor=4, multiprocessing_context="fork")
