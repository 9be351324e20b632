"""The validation table of `python -m benchmarks.accuracy --tables validation`: one-shot accuracy on the validation
split, against atlas registration on the same pairs.

Every validation case is a query (one case per subject first, then the others); its references are
the next cases (cyclically) of OTHER subjects of the same validation set, so nothing here was trained
on. Columns: one-shot (first reference), context ensemble and in-context tuning on all references,
memory bank (no reference), and the registration baseline (`registration.py`) warping the first
reference onto the query: the same (query, reference) pairs as the one-shot column. Label-only brains
are rendered with one synthetic contrast shared by references and queries; all their structures form
one multi-class task.

Time budget: each column gets an equal share of --minutes-per-dataset; one-shot and registration run
as one unit (two shares) so their pairs stay identical. A column takes the next query while its time
so far plus its mean time per query fits its share. Before its first query a column is expected to
take the one-shot's time (tuning: plus the run's tuning seconds per crop so far times its crops); the
first one-shot query always runs. Every column's queries are thus the first n of one list, and the
table gives n.
"""
from __future__ import annotations

import argparse
import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from IrisSegmentLib import Segmenter, TaskEmbedding
from benchmarks.common.cases import LABELS, Log, Volume, cases, load_case, query_order, reference_indices, scores
from benchmarks.common.tables import cell, n_cell
from benchmarks.registration import register_and_warp

COLUMNS = ("one-shot", "ensemble", "tuned", "bank", "registration")


def segment_options(seg: Segmenter, strategy: str | None, localise: str | None = None) -> dict:
    """Keyword arguments for `seg.segment`: the strategy and localisation asked for, where this Segmenter takes them."""
    out = {k: v for k, v in (("strategy", strategy), ("localise", localise)) if v is not None}
    missing = [k for k in out if k not in inspect.signature(seg.segment).parameters]
    if missing:
        raise SystemExit(f"--{missing[0]}: this IrisSegmentLib's Segmenter.segment has no {missing[0]}; leave it out")
    return out


@dataclass
class Budget:
    """Time shares of the budget units of one dataset (see the module docstring); total None: no limit."""

    total: float | None
    weights: dict[str, int]
    spent: dict[str, float] = field(default_factory=dict)
    runs: dict[str, int] = field(default_factory=dict)

    def allows(self, unit: str, first_guess: float) -> bool:
        """Whether `unit` may take one more query; `first_guess`: its expected seconds before it has run."""
        if self.total is None or (unit == "one-shot" and not self.runs.get(unit)):
            return True
        n = self.runs.get(unit, 0)
        expected = self.spent[unit] / n if n else first_guess
        return self.spent.get(unit, 0.0) + expected <= self.total * self.weights[unit] / sum(self.weights.values())

    def add(self, unit: str, seconds: float) -> None:
        self.spent[unit] = self.spent.get(unit, 0.0) + seconds
        self.runs[unit] = self.runs.get(unit, 0) + 1


@dataclass
class TuneRate:
    """Seconds of in-context tuning per reference crop (one per structure and reference), over the whole run."""

    seconds: float = 0.0
    crops: int = 0

    def expected(self, crops: int) -> float:
        """Expected tuning seconds for `crops` crops; 0 before any tuning was timed."""
        return self.seconds / self.crops * crops if self.crops else 0.0


def budget_units(methods: set[str]) -> dict[str, int]:
    """Budget units and their shares: one-shot (with registration, two shares), then the other columns."""
    units = {"one-shot": 1 + ("registration" in methods)}
    units.update({m: 1 for m in ("ensemble", "tuned", "bank") if m in methods})
    return units


class Query:
    """One query with its references: runs each column and records Dice and seconds."""

    def __init__(self, seg: Segmenter, dataset: str, volumes: Callable[[int], Volume], tasks: Callable[[int], tuple[TaskEmbedding, float]],
                 qi: int, refs: list[int], options: dict):
        self.seg, self.dataset, self.volumes, self.tasks, self.options = seg, dataset, volumes, tasks, options
        self.query, self.refs = volumes(qi), refs
        self.dice: dict[str, dict[int, float]] = {}
        self.seconds: dict[str, float] = {}

    def _segment(self, column: str, task: TaskEmbedding, seconds_before: float) -> float:
        t0 = time.perf_counter()
        res = self.seg.segment(self.query[0], self.query[1], task, **self.options)
        self.seconds[column] = seconds_before + time.perf_counter() - t0
        self.dice[column] = scores(res.label_map, self.query[2], task.labels)
        return self.seconds[column]

    def run(self, unit: str, with_registration: bool, rate: TuneRate) -> float:
        """Runs a budget unit (a column, or one-shot with registration); returns its seconds."""
        if unit == "one-shot":
            return self.one_shot() + (self.registration() if with_registration else 0.0)
        return self.tuned(rate) if unit == "tuned" else getattr(self, unit)()

    def one_shot(self) -> float:
        task, secs = self.tasks(self.refs[0])
        return self._segment("one-shot", task, secs)

    def registration(self) -> float:
        r_img, r_aff, r_lab = self.volumes(self.refs[0])
        warped, secs = register_and_warp(r_img, r_aff, r_lab, self.query[0], self.query[1])
        self.seconds["registration"] = secs
        self.dice["registration"] = scores(warped, self.query[2], self.tasks(self.refs[0])[0].labels)
        return secs

    def _ensemble(self) -> tuple[TaskEmbedding, float]:
        encoded = [self.tasks(r) for r in self.refs]
        return TaskEmbedding.ensemble([t for t, _ in encoded]), sum(s for _, s in encoded)

    def ensemble(self) -> float:
        return self._segment("ensemble", *self._ensemble())

    def tuned(self, rate: TuneRate) -> float:
        task, secs = self._ensemble()
        t0 = time.perf_counter()
        tuned = self.seg.tune(task, [self.volumes(r) for r in self.refs])
        rate.seconds += time.perf_counter() - t0
        rate.crops += sum(len(self.tasks(r)[0].labels) for r in self.refs)
        return self._segment("tuned", tuned, secs + time.perf_counter() - t0)

    def bank(self) -> float:
        known = [v for v in LABELS[self.dataset] if f"{self.dataset}:{v}" in self.seg.bank.embeddings]
        if not known:
            return 0.0
        return self._segment("bank", self.seg.bank.task([f"{self.dataset}:{v}" for v in known], known), 0.0)


def evaluate(seg: Segmenter, root: Path, dataset: str, methods: set[str], n_refs: int = 3, minutes: float | None = None,
             max_queries: int | None = None, strategy: str | None = None, rate: TuneRate | None = None,
             log: Log = lambda m: None, localise: str | None = None) -> dict:
    """Per-query Dice and seconds of every column on one dataset, within the time budget. `rate`: the
    tuning speed measured on earlier datasets of the run (updated here)."""
    t_start = time.perf_counter()
    items = cases(root, dataset)
    labels = list(LABELS[dataset])
    volume_cache: dict[int, Volume] = {}
    task_cache: dict[int, tuple[TaskEmbedding, float]] = {}

    def volumes(i: int) -> Volume:
        if i not in volume_cache:
            volume_cache[i] = load_case(items[i])
        return volume_cache[i]

    def tasks(i: int) -> tuple[TaskEmbedding, float]:
        """Task embedding of reference i (its labels among the dataset's) and the seconds it took."""
        if i not in task_cache:
            img, aff, lab = volumes(i)
            t0 = time.perf_counter()
            task = seg.encode(img, aff, lab, labels=[v for v in labels if (lab == v).any()])
            task_cache[i] = task, time.perf_counter() - t0
        return task_cache[i]

    budget = Budget(minutes * 60 if minutes else None, budget_units(methods))
    options = segment_options(seg, strategy, localise)
    rate = rate if rate is not None else TuneRate()
    records, one_shot_seconds = [], []

    def allowed(unit: str, refs: list[int]) -> bool:
        """Within budget; before its first query a column is expected to take the one-shot's time, plus for
        tuning the run's tuning seconds per crop times the crops (structures of the first reference x references)."""
        guess = float(np.mean(one_shot_seconds)) if one_shot_seconds else 0.0
        if unit == "tuned" and rate.crops:
            guess += rate.expected(len(tasks(refs[0])[0].labels) * len(refs))
        return budget.allows(unit, guess)

    for qi in query_order(items)[:max_queries]:
        refs = reference_indices(items, qi, n_refs)
        if not any(allowed(u, refs) for u in budget.weights):
            break
        q = Query(seg, dataset, volumes, tasks, qi, refs, options)
        for unit in budget.weights:
            if allowed(unit, refs):
                budget.add(unit, q.run(unit, "registration" in methods, rate))
                if unit == "one-shot":
                    one_shot_seconds.append(q.seconds["one-shot"])
        records.append({"query": items[qi].id, "references": [items[r].id for r in refs], "dice": q.dice, "seconds": q.seconds})
        log(f"{dataset} {items[qi].id}: " + ", ".join(f"{m} {np.mean(list(d.values())):.3f} ({q.seconds[m]:.0f} s)"
                                                     for m, d in q.dice.items() if d))
    return {"cases": len(items), "queries": records, "seconds": time.perf_counter() - t_start}


def column_values(records: list[dict], column: str, label: int) -> list[float]:
    """The Dice values of one structure in one column, over the queries that ran it."""
    return [r["dice"][column][label] for r in records if label in r["dice"].get(column, {})]


def heading(column: str, n_refs: int) -> str:
    return {"ensemble": f"ensemble of {n_refs}", "tuned": f"tuned on {n_refs}", "bank": "memory bank"}.get(column, column)


def table(results: dict[str, dict], columns: list[str], n_refs: int) -> str:
    """Markdown table: Dice mean ± sd per structure and column, a mean row per dataset, n per row."""
    lines = ["| dataset | structure | " + " | ".join(heading(c, n_refs) for c in columns) + " | n |",
             "|---|---|" + "---|" * (len(columns) + 1)]
    for ds, res in results.items():
        recs, means = res["queries"], {c: [] for c in columns}
        for v, name in LABELS[ds].items():
            vals = [column_values(recs, c, v) for c in columns]
            if not any(vals):
                continue
            for c, x in zip(columns, vals):
                if x:
                    means[c].append(float(np.mean(x)))
            cells = [cell(x) for x in vals]
            lines.append(f"| {ds} | {name} | " + " | ".join(cells) + f" | {n_cell([len(x) for x in vals])} |")
        cells = [f"**{np.mean(means[c]):.3f}**" if means[c] else "–" for c in columns]
        ran = [sum(1 for r in recs if r["dice"].get(c)) for c in columns]
        lines.append(f"| {ds} | **mean** | " + " | ".join(cells) + f" | {n_cell(ran)} of {res['cases']} |")
    return "\n".join(lines)


def seconds_line(results: dict[str, dict], columns: list[str]) -> str:
    """Mean seconds per query of each IrisSegment column (encode + tune + segment) and per registration pair."""
    parts = []
    for ds, res in results.items():
        t = {c: [r["seconds"][c] for r in res["queries"] if c in r["seconds"] and r["dice"].get(c)] for c in columns}
        parts.append(f"{ds}: " + ", ".join(f"{c} {np.mean(x):.1f}" for c, x in t.items() if x))
    return ("Seconds per query (IrisSegment: encoding the references, tuning and segmenting; registration: "
            "registering and warping one pair): " + "; ".join(parts) + ".")


def caption(seg: Segmenter, args: argparse.Namespace, strategy: str, command: str) -> str:
    """What the table shows and the exact command that produced it."""
    budget = f"{args.minutes_per_dataset:g} minutes per dataset" if args.minutes_per_dataset else "no time limit"
    parts = ["Dice per structure (mean ± sd over queries; the value alone where n = 1). Every query segmented with "
             "references from other subjects; one-shot and registration use the same (query, first reference) pairs.",
             "n: queries per cell (per column, in column order, where they differ), each column on the first n queries of "
             "one list, as far as its share of the time budget went; mean row: mean of the structures, queries run of "
             "the validation cases."]
    if "registration" in args.methods.split(","):
        parts.append("Registration: SimpleITK affine + B-spline (mesh 5), Mattes mutual information (5,000 samples), "
                     "large images block-averaged to ~2 mm, reference label map warped onto the query.")
    if "brain" in args.datasets.split(","):
        parts.append("Brain: label maps rendered with one synthetic contrast for references and queries, "
                     "8 structures in one task.")
    parts.append(f"Model {seg.model_id} on {seg.device}, strategy {strategy}, threads {torch.get_num_threads()}, {budget}. "
                 f"Command: `{command}`")
    return " ".join(parts)
