"""The background training run of this machine, and pausing it while something is timed.

`train` registers its process in PIDFILE while it runs; a benchmark wraps its timed part in
`paused_training()`, which stops that process (SIGSTOP) and lets it go on afterwards (SIGCONT), so
timings are never measured on a CPU shared with training. POSIX only; elsewhere it does nothing."""
from __future__ import annotations

import os
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

PIDFILE = Path(os.environ.get("IRIS_TRAINING_PIDFILE", Path(tempfile.gettempdir()) / "iris-segment-training.pid"))


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
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


@contextmanager
def paused_training(log: Callable[[str], None] = print) -> Iterator[int | None]:
    """Within the block, the background training run (if any, and not this process) is stopped."""
    pid = running_pid() if hasattr(signal, "SIGSTOP") else None
    if pid == os.getpid():
        pid = None
    if pid is not None:
        os.kill(pid, signal.SIGSTOP)
        log(f"background training (pid {pid}) paused while timing")
    try:
        yield pid
    finally:
        if pid is not None:
            try:
                os.kill(pid, signal.SIGCONT)
                log(f"background training (pid {pid}) resumed")
            except OSError:
                pass
