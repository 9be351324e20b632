"""Measurements in fresh child processes: one runner for every benchmark that needs one, one peak-memory method
(VmHWM), and the CPU's name for the captions."""
from __future__ import annotations

import multiprocessing
import os
import platform
import tempfile
import warnings
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class ChildFailed(RuntimeError):
    """A child process that gave no result: its exit code and everything it wrote."""

    def __init__(self, exitcode: int | None, output: str):
        self.exitcode, self.output = exitcode, output
        last = (output.strip().splitlines() or [""])[-1]
        super().__init__(f"exit {exitcode}" + (f": {last}" if last else ""))


def _child(conn: Connection, fn: Callable[..., Any], args: tuple, log: str, threads: int | None) -> None:
    """In the fresh process: stdout and stderr into `log`, warnings off, `threads` threads; sends fn(*args) back."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ["PYTHONWARNINGS"] = "ignore"  # here and in the processes it starts
    warnings.simplefilter("ignore")
    if threads:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    conn.send(fn(*args))


def run_child(fn: Callable[..., T], *args: Any, threads: int | None = None) -> T:
    """`fn(*args)` in a fresh Python process (multiprocessing "spawn": none of this process's memory, threads or
    state; `fn` and `args` must pickle), and its result. `threads`: the child's torch threads and the
    OMP_NUM_THREADS of the processes it starts. Raises ChildFailed where the child gives no result (an exception,
    a crash, a kill), with what it wrote."""
    ctx = multiprocessing.get_context("spawn")
    with tempfile.NamedTemporaryFile(prefix="benchmark-child-", suffix=".log") as log:
        receive, send = ctx.Pipe(duplex=False)
        process = ctx.Process(target=_child, args=(send, fn, args, log.name, threads))
        process.start()
        send.close()
        try:
            result = receive.recv()
        except EOFError:
            process.join()
            raise ChildFailed(process.exitcode, Path(log.name).read_text(errors="replace")) from None
        finally:
            receive.close()
        process.join()
        return result


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise OSError(f"no {key} in /proc/self/status: memory is measured on Linux only")


def peak_rss_mib() -> float:
    """Peak resident memory (MiB) of this process since it started or since `reset_peak_rss`: VmHWM, which starts
    afresh in a new program (ru_maxrss keeps the parent's peak across fork and exec)."""
    return _status_mib("VmHWM")


def reset_peak_rss() -> float:
    """Sets the peak resident memory to the current one (where the kernel allows it); returns the current MiB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_mib("VmRSS")


def cpu_model() -> str:
    """The CPU's model name."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor() or "CPU")
