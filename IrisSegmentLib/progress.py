"""What a progress message says about the step running, and what Cancel will do in that step.

The engine's steps report progress as (fraction, message). A front end that offers Cancel must say truthfully
when it takes effect: the registration stops at once, the network between two batches of windows, encoding and
tuning between two structures or steps, loading only once the model has loaded. Nothing is ever added or written.
"""
from __future__ import annotations

from typing import Callable

Progress = Callable[[float, str], None]  # (fraction done, message), called by every long step
Cancel = Callable[[], bool]  # True once the user asked to stop

# (message keyword, step, when Cancel takes effect in that step), first match wins
STEPS: tuple[tuple[str, str, str], ...] = (
    ("loading", "loading", "once the model has loaded"),
    ("encoding", "encoding", "after the current reference structure"),
    ("tuning", "tuning", "after the current tuning step"),
    ("preparing", "preparing", "once the target is prepared"),
    ("registering", "registration", "now: the registration is stopped"),
    ("window", "windows", "before the next batch of windows"),
    ("adding", "writing", "before anything is added"),
    ("saving", "writing", "before anything is written"),
    ("done", "finishing", "when the result is ready"),
)
OTHER = ("", "other", "when the current step ends")


def step_of(message: str) -> str:
    """The step a progress message belongs to ("other" when none matches)."""
    return _match(message)[1]


def cancelling_text(message: str) -> str:
    """What the GUI shows once Cancel is clicked while `message` was the last progress message."""
    return f"Cancelling {_match(message)[2]}; nothing will be added or written."


def _match(message: str) -> tuple[str, str, str]:
    text = message.lower()
    return next((s for s in STEPS if s[0] in text), OTHER)


def span(report: Progress, lo: float, hi: float, prefix: str = "") -> Progress:
    """`report` for one step that fills [lo, hi] of the whole run; messages get `prefix`."""
    return lambda fraction, message: report(lo + (hi - lo) * min(max(fraction, 0.0), 1.0), prefix + message)
