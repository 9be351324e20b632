"""The generalisation table of `python -m benchmarks.accuracy --tables generalisation`: one-shot Dice where the
model meets something it was not trained on, against the same pairs without that shift and against registration.

- Unseen classes: the structures that a held-out model (trained with them set to background in every
  training label map, `training.holdout`, or without their collection, weight 0) segments from one
  reference, next to the product model, which saw them in training, on the same pairs.
- Unseen modality: reference and query in one new contrast (`shifts.INTENSITY`), next to the same
  pairs in their own contrast.
- Unseen site/geometry: the query resliced to another voxel size, slice thickness, orientation and
  field of view (`shifts.GEOMETRY`), the reference as it is; Dice on the query's new grid.

Pairs: per dataset the first `pairs` queries in query order (`common/cases.py`), each with its first
reference (another subject). Registration (`registration.py`) runs on exactly the shifted pairs.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from IrisSegmentLib import Segmenter
from IrisSegmentLib.config import TrainingConfig
from benchmarks import shifts
from benchmarks.common.cases import LABELS, Log, Volume, cases, load_case, query_order, reference_indices, render_seed, scores
from benchmarks.registration import register_and_warp

EXTRA_NAMES = {"brain": {53: "R hippocampus", 18: "L amygdala", 54: "R amygdala"}}
MODALITY_DATASETS = ("la2018", "hippocampus", "acdc")
GEOMETRY_DATASETS = ("la2018", "hippocampus")
TARGETS = {"unseen_mean": 0.55, "unseen_gap": 0.20, "contrast_cost": 0.05}


def structure_name(dataset: str, value: int) -> str:
    return {**LABELS.get(dataset, {}), **EXTRA_NAMES.get(dataset, {})}.get(value, str(value))


def unseen_structures(training: TrainingConfig) -> dict[str, list[int]]:
    """Per validation dataset, the structures a model trained with `training` never saw."""
    out = {}
    for ds in LABELS:
        if training.dataset_weights.get(ds, 1.0) == 0:
            out[ds] = sorted(LABELS[ds])
        elif training.holdout.get(ds):
            out[ds] = sorted(int(v) for v in training.holdout[ds])
    return out


class Pairs:
    """The (query, reference) pairs of one dataset, volumes loaded once."""

    def __init__(self, root: Path, dataset: str, n: int):
        self.dataset = dataset
        self.items = cases(root, dataset)
        self.pairs = [(qi, reference_indices(self.items, qi, 1)[0]) for qi in query_order(self.items)[:n]]
        self._cache: dict[int, Volume] = {}

    def volume(self, i: int) -> Volume:
        if i not in self._cache:
            self._cache[i] = load_case(self.items[i])
        return self._cache[i]

    def ids(self, qi: int, ri: int) -> tuple[str, str]:
        return self.items[qi].id, self.items[ri].id


def one_shot(seg: Segmenter, ref: Volume, qry: Volume, labels: list[int], options: dict) -> dict[int, float]:
    """Dice per structure present in both, from one reference."""
    labels = [v for v in labels if (ref[2] == v).any()]
    if not labels:
        return {}
    task = seg.encode(ref[0], ref[1], ref[2], labels=labels)
    return scores(seg.segment(qry[0], qry[1], task, **options).label_map, qry[2], labels)


def registered(ref: Volume, qry: Volume, labels: list[int]) -> dict[int, float]:
    labels = [v for v in labels if (ref[2] == v).any()]
    warped, _ = register_and_warp(ref[0], ref[1], ref[2], qry[0], qry[1])
    return scores(warped, qry[2], labels)


def contrast(volume: Volume, shift: Callable, case_id: str) -> Volume:
    image, affine, label = volume
    return shift(image, label, render_seed(case_id)), affine, label


SECTIONS = ("unseen classes", "unseen modality", "unseen site/geometry")


def evaluate(seg: Segmenter, held: Segmenter | None, root: Path, pairs: int, options: dict,
             registration: bool = True, log: Log = lambda m: None, sections=SECTIONS) -> list[dict]:
    """One record per (section, dataset, shift, pair): Dice per structure of each column."""
    records = []

    def add(section: str, dataset: str, shift: str, ids: tuple[str, str], columns: dict[str, dict[int, float]], t0: float) -> None:
        records.append({"section": section, "dataset": dataset, "shift": shift, "query": ids[0], "reference": ids[1],
                        "dice": {k: {str(v): d for v, d in c.items()} for k, c in columns.items()},
                        "seconds": time.perf_counter() - t0})
        log(f"{section} {dataset} {shift} {ids[0]}<-{ids[1]}: " + ", ".join(
            f"{k} {np.mean(list(c.values())):.3f}" for k, c in columns.items() if c))

    if held is not None and "unseen classes" in sections:
        for ds, labels in unseen_structures(held.config.training).items():
            p = Pairs(root, ds, pairs)
            for qi, ri in p.pairs:
                t0 = time.perf_counter()
                ref, qry = p.volume(ri), p.volume(qi)
                cols = {"shifted": one_shot(held, ref, qry, labels, options), "baseline": one_shot(seg, ref, qry, labels, options)}
                if registration:
                    cols["registration"] = registered(ref, qry, labels)
                add("unseen classes", ds, "unseen", p.ids(qi, ri), cols, t0)
    def contrast_pair(fn):
        return lambda p, qi, ri: (contrast(p.volume(ri), fn, p.items[ri].id), contrast(p.volume(qi), fn, p.items[qi].id))

    def geometry_pair(geo):
        return lambda p, qi, ri: (p.volume(ri), shifts.reslice(*p.volume(qi), geo))

    shifted = {"unseen modality": (MODALITY_DATASETS, {n: contrast_pair(f) for n, f in shifts.INTENSITY.items()}),
               "unseen site/geometry": (GEOMETRY_DATASETS, {n: geometry_pair(g) for n, g in shifts.GEOMETRY.items()})}
    loaded: dict[str, Pairs] = {}
    baselines: dict[tuple[str, int, int], dict[int, float]] = {}  # the unshifted one-shot, once per pair
    for section, (datasets, makers) in shifted.items():
        if section not in sections:
            continue
        for ds in datasets:
            if ds not in loaded:
                loaded[ds] = Pairs(root, ds, pairs)
            p = loaded[ds]
            labels = sorted(LABELS[ds])
            for qi, ri in p.pairs:
                if (ds, qi, ri) not in baselines:
                    baselines[(ds, qi, ri)] = one_shot(seg, p.volume(ri), p.volume(qi), labels, options)
                for name, make in makers.items():
                    t0 = time.perf_counter()
                    ref, qry = make(p, qi, ri)
                    cols = {"shifted": one_shot(seg, ref, qry, labels, options), "baseline": baselines[(ds, qi, ri)]}
                    if registration:
                        cols["registration"] = registered(ref, qry, labels)
                    add(section, ds, name, p.ids(qi, ri), cols, t0)
    return records


def _rows(records: list[dict]) -> list[tuple[str, str, str, dict[str, list[float]]]]:
    """(section, dataset, row name, column -> per-pair Dice) in record order: unseen-class rows per
    structure, the other rows per shift with each pair's mean over the dataset's structures."""
    rows: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    for r in records:
        per_structure = r["section"] == "unseen classes"
        for name in (sorted(r["dice"]["shifted"], key=int) if per_structure else [r["shift"]]):
            cols = rows.setdefault((r["section"], r["dataset"], name), {})
            for col, d in r["dice"].items():
                vals = ([d[name]] if name in d else []) if per_structure else list(d.values())
                if vals:
                    cols.setdefault(col, []).append(float(np.mean(vals)))
    return [(s, ds, structure_name(ds, int(n)) if s == "unseen classes" else n, cols) for (s, ds, n), cols in rows.items()]


def _mean(values: list[float]) -> float:
    v = [x for x in values if not np.isnan(x)]
    return float(np.mean(v)) if v else float("nan")


def table(records: list[dict]) -> str:
    """Markdown: per row the shifted Dice, the same pairs without the shift (seen / own contrast / own
    grid), the difference in Dice points, registration on the shifted pairs, n pairs."""
    head = {"unseen classes": ("unseen (held-out model)", "seen (product model)"),
            "unseen modality": ("new contrast", "own contrast"), "unseen site/geometry": ("resliced query", "own grid")}
    lines = ["| section | dataset | row | IrisSegment, shifted | IrisSegment, no shift | difference (points) | registration, shifted | n |",
             "|---|---|---|---|---|---|---|---|"]
    for section, ds, name, cols in _rows(records):
        s, b, reg = _mean(cols.get("shifted", [])), _mean(cols.get("baseline", [])), _mean(cols.get("registration", []))
        label = f"{name} ({head[section][0]} vs {head[section][1]})" if section == "unseen classes" else name
        lines.append(f"| {section} | {ds} | {label} | {s:.3f} | {b:.3f} | {100 * (s - b):+.1f} | "
                     + (f"{reg:.3f}" if not np.isnan(reg) else "–") + f" | {len(cols.get('shifted', []))} |")
    return "\n".join(lines)


def verdict(records: list[dict]) -> str:
    """The issue's targets, checked on these results."""
    rows = _rows(records)
    parts = []
    unseen = [r for r in rows if r[0] == "unseen classes"]
    if unseen:
        u = _mean([_mean(r[3]["shifted"]) for r in unseen])
        s = _mean([_mean(r[3]["baseline"]) for r in unseen])
        parts.append(f"unseen-class mean {u:.3f} (target >= {TARGETS['unseen_mean']}: {'met' if u >= TARGETS['unseen_mean'] else 'not met'}), "
                     f"{100 * (s - u):.1f} points below seen (target <= {100 * TARGETS['unseen_gap']:.0f}: "
                     f"{'met' if s - u <= TARGETS['unseen_gap'] else 'not met'})")
    for name in shifts.INTENSITY:
        r = [x for x in rows if x[0] == "unseen modality" and x[2] == name]
        if r:
            cost = _mean([_mean(x[3]["baseline"]) - _mean(x[3]["shifted"]) for x in r])
            parts.append(f"{name} costs {100 * cost:.1f} points (target <= {100 * TARGETS['contrast_cost']:.0f}: "
                         f"{'met' if cost <= TARGETS['contrast_cost'] else 'not met'})")
    with_reg = [r for r in rows if r[3].get("registration")]
    if with_reg:
        wins = sum(_mean(r[3]["shifted"]) > _mean(r[3]["registration"]) for r in with_reg)
        parts.append(f"IrisSegment beats registration on {wins} of {len(with_reg)} rows")
    return "Targets: " + "; ".join(parts) + "." if parts else "No target applies to these rows (geometry has none)."


def caption(seg: Segmenter, held: Segmenter | None, pairs: int) -> str:
    """What the table shows and which models made it."""
    parts = [f"One-shot Dice (mean over pairs; up to {pairs} per dataset, each query with one reference of another "
             "subject). Difference: shifted minus no shift, in Dice points. Registration: the same shifted pairs."]
    if held is None:
        parts.append("No --holdout-model: no unseen-class rows.")
    elif not unseen_structures(held.config.training):
        parts.append(f"The --holdout-model {held.model_id} holds no structure out (training.holdout is empty): no unseen-class rows.")
    else:
        held_out = "; ".join(f"{ds} {', '.join(structure_name(ds, v) for v in vs)}" for ds, vs in unseen_structures(held.config.training).items())
        parts.append(f"Unseen classes: held-out model {held.model_id} (never trained on: {held_out}) against the product model "
                     f"{seg.model_id}, which was trained on them.")
    parts.append("Contrasts (reference and query alike): " + ", ".join(shifts.INTENSITY) + "; geometries (query only): "
                 + ", ".join(shifts.GEOMETRY) + " (benchmarks/shifts.py).")
    return " ".join(parts)
