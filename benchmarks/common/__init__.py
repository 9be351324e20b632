"""What the benchmarks share: the validation cases and Dice (`cases`), table cells (`tables`), and fresh child
processes with their peak memory (`processes`)."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
DATA = ROOT.parent / "shared" / "data"  # the datasets' default folder
CONFIGS = ROOT / "Resources" / "Configs"


def command(module: str) -> str:
    """This run's command line, as `python -m <module> ...` (for the captions)."""
    return shlex.join(["python", "-m", module, *sys.argv[1:]])
