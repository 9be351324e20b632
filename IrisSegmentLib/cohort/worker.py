"""What runs on the Dask workers: the model, loaded once per worker and kept, and one study per task.

`SegmenterPlugin` is a Dask WorkerPlugin. The client registers it once; Dask sends it (with the task embedding
inside, a few kB) to every worker, also to workers that join later, and calls `setup` there, which loads the model
onto the worker's device. A study task (`segment_study`) carries only paths: the worker reads the target itself,
segments it with the plugin's model and task, writes the label map atomically and returns a small dict (status,
seconds, device, voxel counts). Every failure of a study becomes a `failed` row with a one-line reason; the worker
and the rest of the cohort go on.
"""
from __future__ import annotations

import signal
import threading
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from distributed import WorkerPlugin, get_worker

from .. import io
from ..errors import IrisInputError
from ..inference.task import TaskEmbedding
from . import formats
from ..io import file_sha256
from .results import FAILED, OK
from .settings import Options


def worker_device(device: str, worker_name) -> str:
    """The device a worker uses: `device` resolved on this machine; with several GPUs and no index given, the local
    cluster's worker i takes GPU i modulo the number of GPUs (remote workers see one GPU, CUDA_VISIBLE_DEVICES)."""
    import torch

    from ..inference.segmenter import resolve_device

    d = resolve_device(device)
    if d.type == "cuda" and d.index is None and isinstance(worker_name, int) and torch.cuda.device_count() > 1:
        d = torch.device("cuda", worker_name % torch.cuda.device_count())
    if d.type == "cuda":
        torch.cuda.set_device(d if d.index is not None else 0)
    return str(d)


def worker_threads(address: str, workers_per_host: dict[str, int]) -> int:
    """Torch threads for a worker of a running cluster: its machine's cores shared by the cluster's workers on that
    machine (Dask's Nanny starts workers with OMP_NUM_THREADS=1, which would leave torch one thread)."""
    from distributed.comm import get_address_host

    from .cluster import available_cores

    return max(1, available_cores() // max(1, workers_per_host.get(get_address_host(address), 1)))


def count_labels(label_map: np.ndarray, labels: list[int]) -> dict[int, int]:
    """Voxels per label value."""
    flat = label_map.ravel()
    if label_map.dtype in (np.uint8, np.uint16):
        counts = np.bincount(flat)
        return {v: int(counts[v]) if 0 <= v < len(counts) else 0 for v in labels}
    values, counts = np.unique(flat, return_counts=True)
    found = dict(zip(values.tolist(), counts.tolist()))
    return {v: int(found.get(v, 0)) for v in labels}


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class SegmenterPlugin(WorkerPlugin):
    """The model on one worker (loaded in `setup`, kept until `teardown`) and the run's task embedding."""

    def __init__(self, name: str, options: Options, task: TaskEmbedding, task_key: str, threads: int | None = None,
                 local: bool = False, workers_per_host: dict[str, int] | None = None):
        self.name = name  # unique per run: several runs may share a cluster
        self.options = options
        self.task = task
        self.task_key = task_key
        self.threads = threads  # torch threads per worker (local cluster); None: from workers_per_host
        self.local = local  # a worker of our own LocalCluster: it ignores Ctrl-C (the client stops it)
        self.workers_per_host = workers_per_host or {}  # a running cluster's workers on each host, when registered
        self.segmenter = None
        self.error: str | None = None

    def setup(self, worker) -> None:
        import torch

        self.lock = threading.Lock()  # one study at a time per worker, even with --nthreads > 1
        self.worker_label = str(worker.name)
        if self.local and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            torch.set_num_threads(self.threads or worker_threads(worker.address, self.workers_per_host))
            from ..inference.segmenter import Segmenter

            self.segmenter = Segmenter.load(self.options.model, worker_device(self.options.device, worker.name))
            self.segmenter.check_task(self.task)
            self.error = None
        except IrisInputError as e:
            self.error = str(e)
        except Exception as e:  # reported to the client as one line by `status`, never raised inside Dask
            self.error = _one_line(e)

    def teardown(self, worker) -> None:
        self.segmenter = None
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def status(self) -> dict:
        import torch

        return {"error": self.error, "device": str(self.segmenter.device) if self.segmenter else None,
                "threads": torch.get_num_threads()}

    def segment(self, study_id: str, path: str, output: str) -> dict:
        """Reads, segments and writes one study; returns its raw results row (never raises for a bad study)."""
        t0 = time.perf_counter()
        o = self.options
        raw = {"id": study_id, "path": path, "output": output, "task": self.task_key, "worker": self.worker_label,
               "device": str(self.segmenter.device) if self.segmenter else ""}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                if self.error:
                    raise IrisInputError(self.error)
                image, affine, header = formats.read_image(path)
                with self.lock:
                    result = self.segmenter.segment(image, affine, self.task, modality=o.modality, overlap=o.overlap,
                                                    strategy=o.strategy, localise=o.localise)
                del image
                out = Path(output)
                out.parent.mkdir(parents=True, exist_ok=True)
                io.write_label_map(out, result.label_map, affine, header, overwrite=True)
                raw.update(status=OK, device=result.device, output_sha256=file_sha256(out),
                           voxels=count_labels(result.label_map, result.labels), estimated_dice=dict(result.confidence),
                           voxel_mm3=float(abs(np.linalg.det(np.asarray(affine)[:3, :3]))))
            except IrisInputError as e:
                raw.update(status=FAILED, reason=str(e))
            except MemoryError:
                raw.update(status=FAILED, reason="out of memory on this worker: use fewer --workers, or crop the image")
            except Exception as e:  # a bad study must not stop the cohort: its row says what happened
                raw.update(status=FAILED, reason=_one_line(e))
        raw["warnings"] = "; ".join(dict.fromkeys(str(w.message) for w in caught))
        raw["seconds"] = time.perf_counter() - t0
        raw["finished"] = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        return raw


def plugin_status(name: str, dask_worker=None) -> dict | None:
    """Run on every worker by the client after registration: the plugin's error, device and threads."""
    plugin = dask_worker.plugins.get(name)
    return plugin.status() if plugin is not None else None


def segment_study(plugin_name: str, study_id: str, path: str, output: str) -> dict:
    """The Dask task for one study (arguments are plain strings: paths travel, not arrays)."""
    worker = get_worker()
    plugin = worker.plugins.get(plugin_name)
    if plugin is None:
        return {"id": study_id, "path": path, "output": output, "status": FAILED, "worker": str(worker.name),
                "reason": f"worker {worker.name} has no IrisSegment model loaded (plugin {plugin_name} missing)"}
    return plugin.segment(study_id, path, output)
