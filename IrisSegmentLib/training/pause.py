"""The background training run of this machine, and pausing it while something is timed.

`train` registers its process in PIDFILE while it runs; a benchmark wraps its timed part in
`paused_training()`, which stops that process (SIGSTOP) and lets it go on afterwards (SIGCONT), so
timings are never measured on a CPU shared with training. Pauses nest, across processes too (two benchmarks run
side by side): each marks itself in PAUSERS, and the run goes on only when the last live one ends. POSIX only;
elsewhere it does nothing."""
from __future__ import annotations

import itertools
import os
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

PIDFILE = Path(os.environ.get("IRIS_TRAINING_PIDFILE", Path(tempfile.gettempdir()) / "iris-segment-training.pid"))
PAUSERS = PIDFILE.with_name(PIDFILE.name + ".pausers")  # one file "<pid>-<n>" per pause in progress
_PAUSES = itertools.count()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def register() -> None:
    """Records this process as the background training run."""
    PIDFILE.write_text(str(os.getpid()))


def unregister() -> None:
    """Forgets this process (if it is the one recorded)."""
    if running_pid() == os.getpid():
        PIDFILE.unlink(missing_ok=True)


def running_pid() -> int | None:
    """The recorded training process, if it is still alive."""
    try:
        pid = int(PIDFILE.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


@contextmanager
def paused_training(log: Callable[[str], None] = print) -> Iterator[int | None]:
    """Within the block, the background training run (if any, and not this process) is stopped; it goes on at the
    end of the block unless another pause (of this or another live process) is still in progress."""
    pid = running_pid() if hasattr(signal, "SIGSTOP") else None
    if pid is None or pid == os.getpid():
        yield None
        return
    PAUSERS.mkdir(exist_ok=True)
    mark = PAUSERS / f"{os.getpid()}-{next(_PAUSES)}"
    mark.touch()
    os.kill(pid, signal.SIGSTOP)
    log(f"background training (pid {pid}) paused while timing")
    try:
        yield pid
    finally:
        mark.unlink(missing_ok=True)
        others = [m.name for m in PAUSERS.iterdir() if _alive(int(m.name.split("-")[0]))]
        if others:
            log(f"background training (pid {pid}) stays paused: {len(others)} other timing(s) in progress")
        else:
            try:
                os.kill(pid, signal.SIGCONT)
                log(f"background training (pid {pid}) resumed")
            except OSError:
                pass
