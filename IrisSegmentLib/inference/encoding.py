"""Reference encoding: window crops around each structure -> task tokens, the context ensemble, in-context tuning.

`ReferenceEncoding` is the part of `Segmenter` that turns references into a `TaskEmbedding`; it uses the segmenter's
config, model, runtime and `prepare` stage."""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import Cancelled, IrisInputError
from ..progress import Cancel, Progress
from .geometry import WorkingGrid
from .localise import make_atlas
from .postprocess import pieces
from .prepare import Prepared, check_volume, finite
from .task import Colour, TaskEmbedding, tune, with_first_polarity


def reference_crops(mask: torch.Tensor, window: Sequence[int], max_crops: int) -> list[tuple[int, int, int]]:
    """Window origins centred on a structure; several tiling its extent when it exceeds one window (at most
    `max_crops`, evenly chosen)."""
    pts = torch.nonzero(mask > 0)
    lo, hi = pts.min(0).values.tolist(), pts.max(0).values.tolist()
    per_axis = []
    for a, b, w in zip(lo, hi, window):
        ext = b - a + 1
        if ext <= w:
            per_axis.append([(a + b) // 2 - w // 2])
        else:
            n = int(np.ceil(ext / w))
            per_axis.append([int(round(a + i * (ext - w) / max(n - 1, 1))) for i in range(n)])
    origins = [(x, y, z) for x in per_axis[0] for y in per_axis[1] for z in per_axis[2]]
    if len(origins) > max_crops:
        idx = np.linspace(0, len(origins) - 1, max_crops).round().astype(int)
        origins = [origins[i] for i in idx]
    return origins


def extract(volume: torch.Tensor, origin, window, fill: float) -> torch.Tensor:
    """(C, X, Y, Z) -> (C, *window) at `origin` (may lie partly outside), padded with `fill`."""
    out = volume.new_full((volume.shape[0], *window), fill)
    src = [slice(max(o, 0), min(o + w, n)) for o, w, n in zip(origin, window, volume.shape[1:])]
    dst = [slice(s.start - o, s.stop - o) for s, o in zip(src, origin)]
    out[(slice(None), *dst)] = volume[(slice(None), *src)]
    return out


def working_masks(grid: WorkingGrid, label: np.ndarray, labels: list[int]) -> torch.Tensor:
    """Binary masks on the working grid (trilinear, then >= 0.5; any overlap for structures that would vanish)."""
    soft = grid.to_working(torch.from_numpy(np.stack([(label == v) for v in labels]).astype(np.float32)))
    hard = soft >= 0.5
    tiny = ~hard.flatten(1).any(1)
    hard[tiny] = soft[tiny] > 0
    return hard.float()


class ReferenceEncoding:
    """Encoding and tuning of task embeddings, mixed into `Segmenter`."""

    def _crops(self, mask: torch.Tensor) -> list[tuple[int, int, int]]:
        return reference_crops(mask, self.config.model.window, self.config.inference.max_reference_crops)

    def encode(self, image, affine, label, labels: list[int] | None = None, names: list[str] | None = None,
               colours: list[Colour] | None = None, modality: str = "auto", confidence: bool = True,
               progress: Progress | None = None, cancel: Cancel | None = None, polarity: float | None = None) -> TaskEmbedding:
        """Task embedding of the structures `labels` (default: every non-zero value) in one reference;
        `confidence`: also segment the reference crops with it (self-Dice: a confidence feature, the localised
        engine's gate (`Segmenter.trusted`; without it every structure is trusted) and what `choose_polarity`
        decides by). `polarity`: 1 (as is) or -1 (intensities inverted), None: chosen.
        `progress` is told each structure; `cancel()` is checked before each (raises Cancelled)."""
        img = check_volume(image, "reference image")
        lab = check_volume(label, "reference label")
        if img.shape != lab.shape:
            raise IrisInputError(f"reference image {img.shape} and label {lab.shape} differ in shape; give the label map drawn on this image")
        lab = np.rint(finite(lab, "reference label")).astype(np.int64)
        present = [int(v) for v in np.unique(lab) if v != 0]
        if not present:
            raise IrisInputError("the reference label map is empty: draw the structures to segment on the reference first")
        labels = list(labels) if labels else present
        missing = [v for v in labels if v not in present]
        if missing:
            raise IrisInputError(f"label(s) {missing} not in the reference label map (it has {present}): pick from those, or draw it on the reference first")
        ref = self.prepare(img, affine, modality, "reference image", polarity or 1.0)
        if ref.constant:
            warnings.warn("reference image is constant: its task embedding carries no appearance information")
        masks = working_masks(ref.grid, lab, labels)
        report = progress or (lambda f, m: None)
        if polarity is None:
            polarity, tokens, stats = self.choose_polarity(ref, masks, labels, confidence, report, cancel)
        else:
            tokens, stats = self.encode_structures(ref.work, masks, labels, confidence, report, cancel)
        atlas = make_atlas(ref, masks, labels, self.config.localise, float(self.config.model.spacing[0]))
        return TaskEmbedding(torch.stack(tokens), labels, list(names or []), list(colours or []), self.model_id, stats, [atlas],
                             float(polarity))

    def choose_polarity(self, ref: Prepared, masks: torch.Tensor, labels: list[int], confidence: bool, report: Progress,
                        cancel: Cancel | None) -> tuple[float, list[torch.Tensor], list[dict]]:
        """(polarity, tokens, stats): as is, unless the network cannot segment the reference's structures (mean self-Dice
        below `localise.min_self_dice`) and can with the intensities inverted (mean self-Dice at least that, and higher):
        a contrast the network knows the other way round (an inverted or T2-like sequence). MR only (CT's Hounsfield
        units have one sense); with `confidence` (the self-Dice) and `inference.polarity` "auto". `ref.work` is negated in
        place, and left so where -1 is chosen."""
        tokens, stats = self.encode_structures(ref.work, masks, labels, confidence, report, cancel)
        floor = self.config.localise.min_self_dice
        if not confidence or ref.modality == "ct" or self.config.inference.polarity != "auto":
            return 1.0, tokens, stats
        as_is = float(np.mean([s.get("self_dice", 0.0) for s in stats]))
        if as_is >= floor:
            return 1.0, tokens, stats

        def inverted_report(f: float, m: str) -> None:
            report(1.0, f"{m}, intensities inverted")

        ref.work.neg_()
        probe = self.encode_structures(ref.work, masks, labels, True, inverted_report, cancel, first_crop_only=True)[1]
        inverted = float(np.mean([s.get("self_dice", 0.0) for s in probe]))
        if inverted < floor or inverted <= as_is:
            ref.work.neg_()
            return 1.0, tokens, stats
        warnings.warn(f"the network segments the reference better with its intensities inverted (self-Dice {inverted:.2f} "
                      f"against {as_is:.2f}): reference and target are segmented so (inference.polarity: keep turns this off)")
        inv_tokens, inv_stats = self.encode_structures(ref.work, masks, labels, False, inverted_report, cancel)
        return -1.0, inv_tokens, [{**s, "self_dice": p["self_dice"]} for s, p in zip(inv_stats, probe)]

    def encode_structures(self, work: torch.Tensor, masks: torch.Tensor, labels: list[int], check: bool, report: Progress,
                          cancel: Cancel | None, first_crop_only: bool = False) -> tuple[list[torch.Tensor], list[dict]]:
        """Per structure, its task tokens (mean over its window crops, or its first crop's alone) and statistics
        ({"ml", "pieces"}, with `check` also "self_dice": the task segmenting its first crop)."""
        win = self.config.model.window
        fill = float(work.min())
        tokens, stats = [], []
        voxel_ml = float(np.prod(self.config.model.spacing)) / 1000.0
        with torch.inference_mode():
            for k in range(len(labels)):
                if cancel is not None and cancel():
                    raise Cancelled("encoding cancelled")
                report(k / len(labels), f"encoding structure {k + 1}/{len(labels)}")
                crops, stat = [], {"ml": float(masks[k].sum()) * voxel_ml, "pieces": float(pieces(masks[k].numpy() > 0))}
                for origin in self._crops(masks[k]):
                    im = extract(work, origin, win, fill)[None]
                    mk = extract(masks[k : k + 1], origin, win, 0.0)[None]
                    if float(mk.sum()) > 0:
                        t, self_dice = self._encode_crop(im, mk, check and "self_dice" not in stat)  # first crop only
                        crops.append(t)
                        if self_dice is not None:
                            stat["self_dice"] = self_dice
                        if first_crop_only:
                            break
                if not crops:
                    raise IrisInputError(f"label {labels[k]} is too small to see at the working spacing {self.config.model.spacing} mm: draw it larger, or use another reference")
                tokens.append(torch.stack(crops).mean(0))
                stats.append(stat)
        return tokens, stats

    def _until_fits(self, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        """`run()`, retried on the CPU after CUDA out of memory (a single window cannot be split)."""
        while True:
            try:
                return run()
            except torch.cuda.OutOfMemoryError:
                self.runtime = self.runtime.after_oom(batch=1)
                if isinstance(self.model, torch.nn.Module):
                    self.model.to(self.device)

    def _encode_crop(self, image: torch.Tensor, mask: torch.Tensor, check: bool = False) -> tuple[torch.Tensor, float | None]:
        """One window's task tokens and, with `check`, the Dice of that task on its own window (a confidence
        feature: one more window's forward); on CUDA out of memory, continues on the CPU (one window cannot be split)."""
        tokens = self._until_fits(lambda: self.model.encode_task(image.to(self.device), mask.to(self.device))[0, 0].float().cpu())
        if not check:
            return tokens, None
        pred = self._until_fits(lambda: self.runtime.forward(self.model, [image[0]], tokens[None]))[0, 0] >= 0.5
        truth = mask[0, 0] > 0
        return tokens, 2.0 * float((pred & truth).sum()) / max(float(pred.sum() + truth.sum()), 1.0)

    def encode_references(self, references: list[tuple], labels: list[int] | None = None, names=None, colours=None,
                          modality: str = "auto", progress: Progress | None = None, cancel: Cancel | None = None) -> TaskEmbedding:
        """Context ensemble: the mean task embedding of several (image, affine, label) references, all encoded with
        the intensity polarity chosen for the first."""
        report, n = progress or (lambda f, m: None), len(references)
        return TaskEmbedding.ensemble(with_first_polarity([
            lambda polarity, j=j, i=i, a=a, l=l: self.encode(
                i, a, l, labels, names, colours, modality, cancel=cancel, polarity=polarity,
                progress=lambda f, m: report((j + f) / n, f"reference {j + 1}/{n}: {m}"))
            for j, (i, a, l) in enumerate(references)]))

    def tune(self, task: TaskEmbedding, references: list[tuple], steps: int = 20, lr: float = 1e-2, modality: str = "auto",
             progress: Progress | None = None, cancel: Cancel | None = None) -> TaskEmbedding:
        """In-context tuning: optimise the task tokens on labelled references, network frozen; `progress` is told
        each step, `cancel()` is checked before each (raises Cancelled)."""
        win = self.config.model.window
        ims, mks = [], []
        for image, affine, label in references:
            prepared = self.prepare(image, affine, modality, "tuning image", task.polarity)
            work, grid = prepared.work, prepared.grid
            lab = np.rint(np.asarray(label)).astype(np.int64)
            masks = working_masks(grid, lab, task.labels)
            for k in range(len(task.labels)):
                if masks[k].max() > 0:
                    origin = self._crops(masks[k])[0]
                    ims.append(extract(work, origin, win, float(work.min())))
                    mks.append(extract(masks, origin, win, 0.0))
        if not ims:
            raise IrisInputError("in-context tuning needs at least one image where the task's labels are present")
        tokens = self._until_fits(lambda: tune(self.model.segment, task.tokens.to(self.device)[None], torch.stack(ims).to(self.device),
                                               torch.stack(mks).to(self.device), steps, lr, progress=progress,
                                               cancel=cancel))
        return task.with_tokens(tokens[0].cpu())
