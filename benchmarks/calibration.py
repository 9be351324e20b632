"""The calibration table of `python -m benchmarks.accuracy --tables calibration`: how well the per-segment confidence
(IrisSegmentLib/inference/confidence.py) predicts the true Dice, and what it costs.

Pairs: every validation query in query order (`common/cases.py`) (as far as the time budget goes), each with
its next `references` references of other subjects ("right" pairs), and one "wrong" pair: a reference
of another dataset whose structures stand in for the query's (its first structure for the query's
first, ...), the mistake of picking the wrong reference segments. Each segment gives the features and
its true Dice. The calibration is judged out of fold: 5 folds grouped by query (no query in its own
fit); `--fit` then fits on all rows and writes confidence.json into the model folder, bound to the
weights by their SHA-256. Cost: Apply (encode + segment) with and without the confidence, timed on the
first pair of every query (which of the two runs first alternates between queries).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from IrisSegmentLib import Segmenter
from IrisSegmentLib.inference.confidence import CALIBRATION_FILE, Calibration
from IrisSegmentLib.io import file_sha256
from benchmarks.common.cases import LABELS, Log, Volume, cases, load_case, query_order, reference_indices, scores

FOLDS = 5


def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(a):
        a = np.asarray(a, dtype=np.float64)
        order = np.argsort(a, kind="mergesort")
        r = np.empty(len(a))
        r[order] = np.arange(len(a))
        for v in np.unique(a):
            tie = a == v
            r[tie] = r[tie].mean()
        return r

    if len(x) < 3:
        return float("nan")
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _apply(seg: Segmenter, ref: Volume, qry: Volume, labels: list[int], confidence: bool, options: dict):
    t0 = time.perf_counter()
    task = seg.encode(ref[0], ref[1], ref[2], labels=labels, confidence=confidence)
    res = seg.segment(qry[0], qry[1], task, confidence=confidence, **options)
    return res, time.perf_counter() - t0


def collect(seg: Segmenter, root: Path, datasets: list[str], references: int, minutes: float | None, options: dict,
            log: Log = lambda m: None) -> dict:
    """Rows (one per segment: dataset, query, reference, kind, label, features, dice) and Apply seconds
    with / without the confidence."""
    rows, timing = [], []
    for d_i, ds in enumerate(datasets):
        items = cases(root, ds)
        other = datasets[(d_i + 1) % len(datasets)]
        others = cases(root, other) if other != ds else []
        labels = sorted(LABELS[ds])
        cache: dict[tuple[str, int], Volume] = {}

        def volume(name: str, i: int) -> Volume:
            if (name, i) not in cache:
                cache[(name, i)] = load_case((items if name == ds else others)[i])
            return cache[(name, i)]

        t_start = time.perf_counter()
        for n, qi in enumerate(query_order(items)):
            if minutes and time.perf_counter() - t_start > minutes * 60:
                break
            qry = volume(ds, qi)
            pairs = [("right", ds, r) for r in reference_indices(items, qi, references)]
            if others:
                pairs.append(("wrong", other, n % len(others)))
            for j, (kind, name, ri) in enumerate(pairs):
                ref = volume(name, ri)
                if kind == "wrong":  # the other dataset's structures, in order, stand in for this one's
                    src = sorted(v for v in LABELS[name] if (ref[2] == v).any())[: len(labels)]
                    lab = np.zeros_like(ref[2])
                    for a, b in zip(src, labels):
                        lab[ref[2] == a] = b
                    ref = (ref[0], ref[1], lab)
                present = [v for v in labels if (ref[2] == v).any()]
                if not present:
                    continue
                if j == 0 and n % 2:  # timed pair, order alternating between queries
                    without_s = _apply(seg, ref, qry, present, False, options)[1]
                res, with_s = _apply(seg, ref, qry, present, True, options)
                if j == 0:
                    if not n % 2:
                        without_s = _apply(seg, ref, qry, present, False, options)[1]
                    timing.append((ds, with_s, without_s))
                truth = scores(res.label_map, qry[2], present)
                for v, d in truth.items():
                    rows.append({"dataset": ds, "query": items[qi].id, "reference": f"{name}/{ri}", "kind": kind, "label": v,
                                 "features": res.confidence_features[v], "dice": d, "estimated": res.confidence.get(v)})
                log(f"calibration {ds} {items[qi].id} {kind} {name}/{ri}: " + ", ".join(
                    f"{v}: Dice {d:.2f} est {res.confidence.get(v, float('nan')):.2f}" for v, d in truth.items()))
    return {"rows": rows, "timing": timing}


def out_of_fold(rows: list[dict]) -> list[float]:
    """Each row's estimated Dice from a calibration fitted without its query (FOLDS folds by query)."""
    queries = sorted({r["query"] for r in rows})
    fold = {q: i % FOLDS for i, q in enumerate(queries)}
    est = [float("nan")] * len(rows)
    for f in range(FOLDS):
        train = [r for r in rows if fold[r["query"]] != f]
        test = [i for i, r in enumerate(rows) if fold[r["query"]] == f]
        if not test or len(train) < 10:
            continue
        cal = Calibration.fit([r["features"] for r in train], [r["dice"] for r in train])
        for i, e in zip(test, cal.predict([rows[i]["features"] for i in test])):
            est[i] = e
    return est


def table(collected: dict, flag_below: float = 0.5) -> str:
    """Per dataset and overall: segments, Spearman (estimated vs true Dice, out of fold) on the right
    pairs and on all, mean estimated and true Dice, and how often a flagged segment is truly below 0.5."""
    rows = collected["rows"]
    est = out_of_fold(rows)
    lines = ["| dataset | segments (right + wrong) | Spearman, right pairs | Spearman, all | mean estimated | mean true | "
             f"flagged (< {flag_below}) | of those truly < 0.5 |", "|---|---|---|---|---|---|---|---|"]
    groups = {ds: [i for i, r in enumerate(rows) if r["dataset"] == ds] for ds in dict.fromkeys(r["dataset"] for r in rows)}
    groups["**all**"] = list(range(len(rows)))
    for ds, idx in groups.items():
        idx = [i for i in idx if not np.isnan(est[i])]
        right = [i for i in idx if rows[i]["kind"] == "right"]
        flagged = [i for i in idx if est[i] < flag_below]
        low = sum(rows[i]["dice"] < 0.5 for i in flagged)
        lines.append(f"| {ds} | {len(right)} + {len(idx) - len(right)} | {spearman([est[i] for i in right], [rows[i]['dice'] for i in right]):.2f} | "
                     f"{spearman([est[i] for i in idx], [rows[i]['dice'] for i in idx]):.2f} | "
                     f"{np.mean([est[i] for i in idx]):.3f} | {np.mean([rows[i]['dice'] for i in idx]):.3f} | {len(flagged)} | "
                     + (f"{low} ({100 * low / len(flagged):.0f} %)" if flagged else "–") + " |")
    return "\n".join(lines)


def cost_line(collected: dict) -> str:
    """Apply time with / without the confidence per dataset (cropped volumes pay one extra window per
    structure, relatively more than a whole scan) and overall."""
    timing = collected["timing"]
    if not timing:
        return ""
    parts = []
    for ds in dict.fromkeys(t[0] for t in timing):
        w, wo = sum(t[1] for t in timing if t[0] == ds), sum(t[2] for t in timing if t[0] == ds)
        parts.append(f"{ds} x{w / wo:.2f} ({wo / sum(t[0] == ds for t in timing):.1f} s per Apply without)")
    w, wo = sum(t[1] for t in timing), sum(t[2] for t in timing)
    return ("Cost of the confidence: Apply (encode + segment) with it against without, first pair of each query: "
            + "; ".join(parts) + f"; all {len(timing)} pairs x{w / wo:.2f}.")


def fit_and_save(seg_dir: Path, collected: dict, flag_below: float = 0.5) -> Path:
    """Fits on every row and writes the model folder's confidence.json."""
    from IrisSegmentLib.weights import WEIGHTS

    rows = collected["rows"]
    cal = Calibration.fit([r["features"] for r in rows], [r["dice"] for r in rows], weights_sha256=file_sha256(seg_dir / WEIGHTS),
                          flag_below=flag_below,
                          fitted_on={"segments": len(rows), "datasets": sorted({r["dataset"] for r in rows}),
                                     "queries": len({r["query"] for r in rows})})
    cal.save(seg_dir / CALIBRATION_FILE)
    return seg_dir / CALIBRATION_FILE
