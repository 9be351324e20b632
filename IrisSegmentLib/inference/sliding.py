"""Stage 3, run windows: batches of window crops through the network into a `GaussianBlend`."""
from __future__ import annotations

import torch

from ..errors import Cancelled
from ..progress import Cancel, Progress
from .merge import GaussianBlend
from .runtime import Runtime


def run_windows(model, runtime: Runtime, padded: torch.Tensor, origins: list, tokens: torch.Tensor, blend: GaussianBlend,
                report: Progress, cancel: Cancel | None = None, span: tuple[float, float] = (0.0, 1.0),
                prior: torch.Tensor | None = None) -> tuple[Runtime, int]:
    """Runs the windows at `origins` of `padded` (1, X, Y, Z) and adds them to `blend`; windows holding a constant
    image are not run (probability 0). `prior` (K, X, Y, Z) on the same padded grid: each window's crop of it goes
    in with the window (a network that takes a prior refines it). Checks `cancel` before every batch (raises
    Cancelled) and reports progress within `span`. Returns the runtime after any out-of-memory fallback (the model
    moved to its device) and the windows run."""
    lo, hi = span
    window = blend.window
    ran, done, pending = 0, 0, list(origins)
    while pending:
        if cancel is not None and cancel():
            raise Cancelled("segmentation cancelled")
        chunk = pending[: runtime.batch_size]
        places = [(slice(None), *(slice(a, a + w) for a, w in zip(o, window))) for o in chunk]
        crops = [padded[p] for p in places]
        live = [i for i, c in enumerate(crops) if float(c.max() - c.min()) > 0]
        priors = None if prior is None else [prior[places[i]] for i in live]
        try:
            probs = runtime.forward(model, [crops[i] for i in live], tokens, priors) if live else None
        except torch.cuda.OutOfMemoryError:
            runtime = runtime.after_oom(len(live))
            if isinstance(model, torch.nn.Module):
                model.to(runtime.device)
            continue
        for i, o in enumerate(chunk):
            blend.add(o, probs[live.index(i)] if i in live else None)
        pending = pending[len(chunk):]
        ran += len(live)
        done += len(chunk)
        report(lo + (hi - lo) * done / len(origins), f"window {done}/{len(origins)}")
    return runtime, ran
