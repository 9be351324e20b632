"""A run of the logic behind a modal progress dialog whose Cancel works, for the panel and the effect.

The dialog (slicer.util.createProgressDialog) shows each progress report; its Cancel asks the logic to stop and
says truthfully when that takes effect (IrisSegmentLib.progress). Errors the user can act on are shown as a
message, without traceback; anything else is shown with its details and logged as a bug.
"""
from __future__ import annotations

import logging
import traceback
from typing import Callable

import slicer

from .logic import failure_kind

CANCELLED = "Cancelled: nothing was added."


class ProgressRun:
    """`run(work)` calls work(progress) while a modal progress dialog shows it; `status` says how it ended."""

    def __init__(self, logic, title: str, onStatus: Callable[[str], None] | None = None):
        self.logic = logic
        self.title = title
        self.onStatus = onStatus or (lambda text: None)
        self.status = ""
        self._last = ""
        self.dialog = None

    def run(self, work: Callable[[Callable[[float, str], None]], object]):
        """work(progress)'s result, or None when it was cancelled or failed (then `status` says why)."""
        self.dialog = slicer.util.createProgressDialog(windowTitle=self.title, labelText="Starting...", maximum=100)
        self.dialog.connect("canceled()", self.onCancel)
        try:
            return work(self.progress)
        except Exception as e:
            self._failed(e)
            return None
        finally:
            self.dialog.disconnect("canceled()", self.onCancel)
            self.dialog.close()
            self.dialog = None

    def progress(self, fraction: float, message: str) -> None:
        self._last = message
        if not self.logic.cancelRequested:  # once cancelled the dialog is gone: do not bring it back
            self.dialog.labelText = message
            self.dialog.value = int(round(100 * fraction))
            slicer.util.showStatusMessage(f"{self.title}: {message}")

    def onCancel(self) -> None:
        from IrisSegmentLib.progress import cancelling_text

        self.logic.requestCancel()
        self._say(cancelling_text(self._last))

    def _failed(self, error: Exception) -> None:
        kind = failure_kind(error)
        if kind == "cancelled":
            self._say(CANCELLED)
        elif kind == "input":
            self._say(f"{self.title} failed: {error}")
            slicer.util.errorDisplay(f"{self.title} failed: {error}", windowTitle=self.title)
        else:
            logging.error(f"{self.title} failed", exc_info=error)
            self._say(f"{self.title} failed: {error}")
            slicer.util.errorDisplay(f"{self.title} failed: {error}", windowTitle=self.title,
                                     detailedText="".join(traceback.format_exception(error)))

    def _say(self, text: str) -> None:
        self.status = text
        slicer.util.showStatusMessage(text, 5000)
        self.onStatus(text)
