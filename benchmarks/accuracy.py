"""One-shot accuracy on the validation split, against atlas registration on the same pairs.

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

    python benchmarks/accuracy.py [--model iris-small] [--data ../shared/data] [--datasets la2018,acdc,...]
        [--methods ensemble,tuned,bank,registration] [--minutes-per-dataset 6] [--max-queries N]
        [--strategy coarse-to-fine|full] [--threads N] [--json results.json]
        [--tables validation,generalisation,calibration,wholescan] [--holdout-model DIR] [--pairs 3] [--fit]
        [--localise auto|registration|none]

`--tables generalisation` prints the second table (`generalisation.py`): unseen classes (with
--holdout-model, a model trained without them), unseen contrasts and unseen acquisition geometry.
`--tables wholescan` the whole-scan table (`wholescan.py`): IRIS alone, registration alone and localise + segment
on the same pairs, and a left-atrium query embedded in a 512 x 512 x 300 field.
`--tables calibration` the third (`calibration.py`): estimated against true Dice per segment; with
`--fit` it also writes the model folder's confidence.json.
"""
from __future__ import annotations

import argparse
import inspect
import json
import shlex
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from IrisSegmentLib import Segmenter, TaskEmbedding  # noqa: E402
from IrisSegmentLib.io import read_image  # noqa: E402
from IrisSegmentLib.training import synth  # noqa: E402
from IrisSegmentLib.training.data import BRAIN_VAL, BTCV_VAL, HIPPO_VAL_SUBJECTS  # noqa: E402
from registration import register_and_warp, set_threads  # noqa: E402  (same folder)

BRAIN_STRUCTURES = {2: "L cerebral WM", 3: "L cortex", 4: "L lateral ventricle", 10: "L thalamus",
                    16: "brain-stem", 17: "L hippocampus", 41: "R cerebral WM", 49: "R thalamus"}
LABELS = {
    "hippocampus": {1: "anterior", 2: "posterior"},
    "la2018": {1: "left atrium"},
    "acdc": {1: "RV cavity", 2: "LV myocardium", 3: "LV cavity"},
    "btcv": {1: "spleen", 2: "R kidney", 3: "L kidney", 4: "gallbladder", 5: "esophagus", 6: "liver",
             7: "stomach", 8: "aorta", 9: "IVC", 10: "portal/splenic vein"},
    "brain": BRAIN_STRUCTURES,
}
COLUMNS = ("one-shot", "ensemble", "tuned", "bank", "registration")
MODALITY_SEED = 7  # the one synthetic contrast of every rendered brain
BRAIN_MARGIN = 8  # background voxels kept around a brain's labels

Volume = tuple[np.ndarray, np.ndarray, np.ndarray]  # image, affine, label map
Log = Callable[[str], None]


@dataclass(frozen=True)
class Case:
    id: str
    subject: str
    image: Path | None  # None: label map only, rendered synthetically
    label: Path


def cases(root: Path, dataset: str) -> list[Case]:
    """The validation cases of a dataset, in file order."""
    if dataset in ("la2018", "acdc"):
        out = []
        for p in sorted((root / dataset / "val").glob("*_label.nii.gz")):
            cid = p.name[: -len("_label.nii.gz")]
            out.append(Case(cid, cid.split("_")[0], p.with_name(cid + "_image.nii.gz"), p))
        return out
    if dataset == "btcv":
        return [Case(c, c, root / "btcv" / f"{c}_image.nii.gz", root / "btcv" / f"{c}_label.nii.gz") for c in BTCV_VAL]
    if dataset == "hippocampus":
        out = []
        for n in range(1, 2 * HIPPO_VAL_SUBJECTS + 1):
            img = root / "msd_hippocampus" / f"hippocampus_{n:03d}_image.nii.gz"
            if img.exists():
                out.append(Case(f"hippocampus_{n:03d}", str((n + 1) // 2), img, img.with_name(f"hippocampus_{n:03d}_label.nii.gz")))
        return out
    if dataset == "brain":
        return [Case(c, c, None, root / "synthseg_brain_labels" / f"{c}.nii.gz") for c in BRAIN_VAL]
    raise ValueError(f"unknown dataset {dataset!r}; use {', '.join(LABELS)}")


def query_order(items: list[Case]) -> list[int]:
    """Case indices with each subject's first case before any subject's second: a cut list spans subjects."""
    seen: dict[str, int] = {}
    rank = []
    for c in items:
        rank.append(seen.get(c.subject, 0))
        seen[c.subject] = rank[-1] + 1
    return sorted(range(len(items)), key=lambda i: (rank[i], i))


def reference_indices(items: list[Case], qi: int, n: int) -> list[int]:
    """The next `n` cases after `qi` (cyclically) of other subjects."""
    after = [(qi + d) % len(items) for d in range(1, len(items))]
    return [i for i in after if items[i].subject != items[qi].subject][:n]


def render_seed(case_id: str) -> int:
    """Noise seed of a rendered case: the same in every process (unlike hash())."""
    return zlib.crc32(case_id.encode())


def crop_to_labels(label: np.ndarray, affine: np.ndarray, margin: int) -> tuple[tuple[slice, ...], np.ndarray]:
    """The box of the non-zero labels plus `margin` voxels, and the affine of that box."""
    nz = np.argwhere(label > 0)
    lo = np.maximum(nz.min(0) - margin, 0)
    hi = np.minimum(nz.max(0) + margin + 1, label.shape)
    out = np.array(affine, dtype=np.float64)
    out[:3, 3] = out[:3, :3] @ lo + out[:3, 3]
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi)), out


def render(label: np.ndarray, case_id: str) -> np.ndarray:
    """Synthetic image of a label map: contrast MODALITY_SEED, noise seeded by the case id."""
    means, stds = synth.random_modality(int(label.max()) + 1, torch.Generator().manual_seed(MODALITY_SEED))
    noise = torch.Generator().manual_seed(render_seed(case_id))
    return synth.render(torch.from_numpy(label), means, stds, noise).numpy()


def load_case(case: Case) -> Volume:
    """(image, affine, integer label map); a label-only case is cropped to its labels and rendered."""
    lab, aff, _ = read_image(case.label)
    lab = np.rint(np.asarray(lab, dtype=np.float32)).astype(np.int32)
    if case.image is None:
        box, aff = crop_to_labels(lab, aff, BRAIN_MARGIN)
        lab = np.ascontiguousarray(lab[box])
        return render(lab, case.id), aff, lab
    img, _, _ = read_image(case.image)
    return np.asarray(img, dtype=np.float32), aff, lab


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two masks; NaN where the truth is empty (the structure is not in the query)."""
    t = int(truth.sum())
    return float("nan") if t == 0 else 2.0 * int(np.logical_and(pred, truth).sum()) / (int(pred.sum()) + t)


def scores(label_map: np.ndarray, truth: np.ndarray, labels: list[int]) -> dict[int, float]:
    """Dice per label present in the query."""
    out = {v: dice(label_map == v, truth == v) for v in labels}
    return {v: d for v, d in out.items() if not np.isnan(d)}


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


def n_cell(counts: list[int]) -> str:
    """One number where the columns agree, else one per column."""
    return str(counts[0]) if len(set(counts)) == 1 else " / ".join(map(str, counts))


def cell(values: list[float]) -> str:
    """mean ± sd; the mean alone for one value; a dash for none."""
    if len(values) < 2:
        return f"{values[0]:.3f}" if values else "–"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


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


def caption(seg: Segmenter, args: argparse.Namespace, strategy: str) -> str:
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
                 f"Command: `python benchmarks/accuracy.py {shlex.join(sys.argv[1:])}`")
    return " ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--datasets", default=",".join(LABELS))
    ap.add_argument("--references", type=int, default=3)
    ap.add_argument("--methods", default="ensemble,tuned,bank,registration",
                    help="besides one-shot, any of: ensemble, tuned (in-context tuning), bank (memory bank, no reference), "
                         "registration (SimpleITK baseline)")
    ap.add_argument("--minutes-per-dataset", type=float, default=6.0, help="time budget per dataset (0: none)")
    ap.add_argument("--max-queries", type=int, default=None)
    ap.add_argument("--strategy", default=None, help="Segmenter.segment strategy, where it takes one (default: the model's)")
    ap.add_argument("--localise", default=None, choices=("auto", "registration", "none"),
                    help="Segmenter.segment localisation for the validation, generalisation and calibration tables (default: the model's)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch and SimpleITK")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None, help="also write the raw per-query results here")
    ap.add_argument("--tables", default="validation,generalisation,calibration",
                    help="any of validation, generalisation, calibration, wholescan")
    ap.add_argument("--fit", action="store_true", help="calibration: fit on every pair and write confidence.json into the model folder")
    ap.add_argument("--holdout-model", default=None,
                    help="model folder trained with structures held out (training.holdout): the unseen-class rows")
    ap.add_argument("--pairs", type=int, default=3, help="generalisation and whole-scan tables: (query, reference) pairs per dataset")
    ap.add_argument("--no-embedded", action="store_true", help="whole-scan table: leave out the embedded left-atrium row")
    ap.add_argument("--sections", default="unseen classes,unseen modality,unseen site/geometry",
                    help="generalisation table: which sections")
    a = ap.parse_args()
    methods = set(a.methods.split(",")) - {""}
    if methods - set(COLUMNS):
        ap.error(f"unknown method(s) {sorted(methods - set(COLUMNS))}")
    if a.threads:
        torch.set_num_threads(a.threads)
        set_threads(a.threads)
    seg = Segmenter.load(a.model, a.device)
    strategy = a.strategy or getattr(seg.config.inference, "strategy", "full")
    print(f"model {seg.model_id} on {seg.device}, strategy {strategy}", file=sys.stderr)
    tables = set(a.tables.split(",")) - {""}
    known = {"validation", "generalisation", "calibration", "wholescan"}
    if tables - known:
        ap.error(f"unknown table(s) {sorted(tables - known)}")
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    out, raw = [], {}
    if "validation" in tables:
        rate = TuneRate()
        results = {ds: evaluate(seg, Path(a.data), ds, methods, a.references, a.minutes_per_dataset, a.max_queries, a.strategy,
                                rate, log, a.localise) for ds in a.datasets.split(",")}
        columns = [c for c in COLUMNS if c == "one-shot" or c in methods]
        out += [table(results, columns, a.references), seconds_line(results, columns), caption(seg, a, strategy)]
        raw["validation"] = results
    if "wholescan" in tables:
        import wholescan

        records = wholescan.evaluate(seg, Path(a.data), a.datasets.split(","), a.pairs, segment_options(seg, a.strategy), not a.no_embedded,
                                     log)
        out += [wholescan.table(records), wholescan.verdict(records),
                wholescan.caption(seg, a.pairs, f"python benchmarks/accuracy.py {shlex.join(sys.argv[1:])}")]
        raw["wholescan"] = records
    if "generalisation" in tables:
        import generalisation

        held = Segmenter.load(a.holdout_model, a.device) if a.holdout_model else None
        sections = a.sections.split(",")
        if set(sections) - set(generalisation.SECTIONS):
            ap.error(f"unknown section(s) {sorted(set(sections) - set(generalisation.SECTIONS))}")
        records = generalisation.evaluate(seg, held, Path(a.data), a.pairs, segment_options(seg, a.strategy, a.localise),
                                          "registration" in methods, log, sections)
        out += [generalisation.table(records), generalisation.verdict(records), generalisation.caption(seg, held, a.pairs)]
        raw["generalisation"] = records
    if "calibration" in tables:
        import calibration

        collected = calibration.collect(seg, Path(a.data), a.datasets.split(","), a.references, a.minutes_per_dataset,
                                        segment_options(seg, a.strategy, a.localise), log)
        flag = seg.calibration.flag_below if seg.calibration else 0.5
        out += [calibration.table(collected, flag), calibration.cost_line(collected),
                f"Calibration of model {seg.model_id}: out of fold ({calibration.FOLDS} folds by query). "
                f"Command: `python benchmarks/accuracy.py {shlex.join(sys.argv[1:])}`"]
        raw["calibration"] = collected
        if a.fit:
            from IrisSegmentLib.resources import model_dir

            out.append(f"Wrote {calibration.fit_and_save(model_dir(a.model), collected, flag)}.")
    print("\n\n".join(out))
    if a.json:
        Path(a.json).write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
