"""The Dask cluster a batch runs on: a LocalCluster sized to this machine, or a Client to a running scheduler.

Local sizing: one worker process per GPU when the device is a GPU (worker i uses GPU i); on the CPU a pool of
processes with the cores split between them so that workers x torch threads <= cores: by default one worker per
CPU_THREADS_PER_WORKER cores, at most one per WORKER_MEMORY_GIB of available memory, at least one. `--workers N`
overrides the count (threads = cores // N, at least 1). Each worker runs one study at a time (one Dask thread).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ..errors import IrisInputError

CPU_THREADS_PER_WORKER = 4
WORKER_MEMORY_GIB = 3.0  # the model, one large target and its working-grid arrays (README, Memory)
CONNECT_TIMEOUT = 10  # seconds to reach a scheduler
WORKER_WAIT = 60  # seconds to wait for a scheduler's first worker


@dataclass(frozen=True)
class LocalPlan:
    workers: int
    threads: int  # torch threads per worker
    gpus: int  # GPUs used (0: a CPU pool)

    def describe(self) -> str:
        where = f"{self.gpus} GPU(s)" if self.gpus else "the CPU"
        return f"{self.workers} local worker process(es) on {where}, {self.threads} torch thread(s) each"


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def available_memory_gib() -> float:
    import psutil

    return psutil.virtual_memory().available / 2**30


def local_plan(device: str, workers: int | None = None, cores: int | None = None, gpus: int | None = None,
               memory_gib: float | None = None) -> LocalPlan:
    """How many worker processes, and torch threads each, a LocalCluster gets on this machine for `device`."""
    from ..inference.segmenter import resolve_device

    cores = cores or available_cores()
    if workers is not None and workers < 1:
        raise IrisInputError(f"--workers must be at least 1, not {workers}")
    if gpus is None:
        import torch

        d = resolve_device(device)
        gpus = 0 if d.type != "cuda" else 1 if d.index is not None else torch.cuda.device_count()
    if workers is None:
        if gpus:
            workers = gpus
        else:
            memory_gib = available_memory_gib() if memory_gib is None else memory_gib
            workers = max(1, min(cores // CPU_THREADS_PER_WORKER, int(memory_gib // WORKER_MEMORY_GIB)))
    return LocalPlan(workers, max(1, cores // workers), gpus)


def connect(scheduler: str | None, plan: LocalPlan | None):
    """(Client, LocalCluster or None). With `scheduler`, a Client to it that has at least one worker."""
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError, ValueError) as e:
            raise IrisInputError(f"cannot reach the Dask scheduler at {scheduler} ({' '.join(str(e).split()) or type(e).__name__}); "
                                 f"start one with `dask scheduler` and workers with `dask worker {scheduler}`") from None
        try:
            client.wait_for_workers(1, timeout=WORKER_WAIT)
        except TimeoutError:
            client.close()
            raise IrisInputError(f"no Dask worker joined the scheduler at {scheduler} within {WORKER_WAIT} s; start them "
                                 f"with `dask worker {scheduler} --nworkers 1 --nthreads 1` (one per GPU)") from None
        return client, None
    cluster = LocalCluster(n_workers=plan.workers, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.CRITICAL)  # per-study errors are rows; shutdown noise is not news
    try:
        return Client(cluster), cluster
    except BaseException:
        cluster.close()
        raise
