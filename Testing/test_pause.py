"""Pausing the background training run while something is timed (IrisSegmentLib/training/pause.py), with a real
child process standing in for the training run."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from IrisSegmentLib.training import pause

pytestmark = pytest.mark.skipif(not hasattr(pause.signal, "SIGSTOP"), reason="POSIX signals")


def stopped(pid: int) -> bool:
    """Whether the process is stopped ('T' in /proc/<pid>/stat)."""
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] in "Tt"


def wait_for(pid: int, is_stopped: bool) -> bool:
    """Whether the process reaches that state within 2 s (signals are delivered asynchronously)."""
    for _ in range(200):
        if stopped(pid) == is_stopped:
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def training(tmp_path, monkeypatch):
    monkeypatch.setattr(pause, "PIDFILE", tmp_path / "training.pid")
    monkeypatch.setattr(pause, "PAUSERS", tmp_path / "training.pid.pausers")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    pause.PIDFILE.write_text(str(child.pid))
    yield child.pid
    child.kill()
    child.wait()


def test_nested_pauses_resume_only_at_the_last(training):
    logs: list[str] = []
    with pause.paused_training(logs.append) as pid:
        assert pid == training and wait_for(training, is_stopped=True)
        with pause.paused_training(logs.append):
            assert wait_for(training, is_stopped=True)
        assert wait_for(training, is_stopped=True)  # the outer timing still runs
        assert "stays paused" in logs[-1]
    assert wait_for(training, is_stopped=False)
    assert logs[-1].endswith("resumed")


def test_a_pause_of_another_live_process_keeps_it_stopped(training, tmp_path):
    pause.PAUSERS.mkdir()
    (pause.PAUSERS / f"{os.getppid()}-0").touch()  # another benchmark, still running
    (pause.PAUSERS / "999999999-0").touch()  # one that died without cleaning up: ignored
    with pause.paused_training(lambda m: None):
        assert wait_for(training, is_stopped=True)
    assert wait_for(training, is_stopped=True)
    (pause.PAUSERS / f"{os.getppid()}-0").unlink()
    with pause.paused_training(lambda m: None):
        pass
    assert wait_for(training, is_stopped=False)


def test_no_training_run_is_nothing_to_pause(tmp_path, monkeypatch):
    monkeypatch.setattr(pause, "PIDFILE", tmp_path / "none.pid")
    with pause.paused_training(lambda m: None) as pid:
        assert pid is None
