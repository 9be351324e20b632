"""Long computations off the GUI thread, without Slicer: one worker thread, progress relayed to the waiting
thread, and a cancel flag that only the waiting thread sets.

The waiting thread (Slicer's main thread) calls `wait()` every `slice_s` seconds while the worker runs (in
Slicer: process GUI events, so the progress dialog and its Cancel button stay live) and receives every progress
report itself, so the GUI, VTK and MRML are only ever touched from the waiting thread.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable

from .progress import Progress


class CancelToken:
    """A cancel request: set by the GUI thread, read by the worker (`token()` is True once set)."""

    def __init__(self):
        self._event = threading.Event()

    def __call__(self) -> bool:
        return self._event.is_set()

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()


class Worker:
    """One long-lived daemon thread that runs submitted functions in order (the model stays on it)."""

    def __init__(self):
        self._jobs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="IrisSegment worker", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            fn, box, done = self._jobs.get()
            try:
                box["result"] = fn()
            except BaseException as e:  # handed to the waiting thread, which re-raises it
                box["error"] = e
            finally:
                done.set()

    def submit(self, fn: Callable[[], object]) -> tuple[dict, threading.Event]:
        box, done = {}, threading.Event()
        self._jobs.put((fn, box, done))
        return box, done

    def run(self, fn: Callable[[Progress], object], progress: Progress, wait: Callable[[], None], slice_s: float = 0.05):
        """fn(report) on this worker; here, `wait()` every `slice_s` seconds and each report passed to `progress`
        (the latest one of each slice). Returns fn's result or raises its exception, here."""
        latest: list = []
        lock = threading.Lock()

        def relay(fraction: float, message: str) -> None:
            with lock:
                latest[:] = [(fraction, message)]

        def deliver() -> None:
            with lock:
                reports, latest[:] = list(latest), []
            for fraction, message in reports:
                progress(fraction, message)

        box, done = self.submit(lambda: fn(relay))
        while not done.wait(slice_s):
            deliver()
            wait()
        deliver()
        if "error" in box:
            raise box["error"]
        return box["result"]
