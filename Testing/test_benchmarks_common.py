"""benchmarks.common.processes: a benchmark's child process is fresh, gives back its result or why it failed, runs
with the threads asked for, and measures its own peak memory, not its parent's."""
from __future__ import annotations

import os

import pytest

from benchmarks.common.processes import ChildFailed, peak_rss_mib, run_child

MIB = 2**20


def _allocate(mib: int) -> tuple[float, float]:
    """Peak resident memory before and after filling `mib` MiB, in the process that runs it."""
    before = peak_rss_mib()
    block = b"\x01" * (mib * MIB)
    after = peak_rss_mib()
    del block
    return before, after


def _threads() -> tuple[str, int]:
    import torch

    return os.environ["OMP_NUM_THREADS"], torch.get_num_threads()


def test_child_is_a_fresh_process_with_its_own_peak_memory():
    ballast = b"\x01" * (200 * MIB)  # the parent's peak: a child that kept it (ru_maxrss across fork and exec) would show it
    assert run_child(os.getpid) != os.getpid()
    before, after = run_child(_allocate, 64)
    assert before + 150 < peak_rss_mib() and after - before >= 60
    del ballast


def test_child_threads():
    assert run_child(_threads, threads=1) == ("1", 1)


def test_child_failure_says_why():
    with pytest.raises(ChildFailed) as failed:
        run_child(int, "not a number")
    assert failed.value.exitcode == 1 and "ValueError" in str(failed.value) and "Traceback" in failed.value.output
