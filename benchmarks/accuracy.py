"""The accuracy tables of IrisSegment on the validation split, each against registration on the same pairs:

- `validation` (`validation.py`): one-shot, context ensemble, in-context tuning and memory bank per structure;
- `generalisation` (`generalisation.py`): unseen classes (with --holdout-model, a model trained without them),
  unseen contrasts and unseen acquisition geometry;
- `calibration` (`calibration.py`): estimated against true Dice per segment; with `--fit` it also writes the model
  folder's confidence.json;
- `wholescan` (`wholescan.py`): IRIS alone, registration alone and localise + segment on the same pairs, and a
  left-atrium query embedded in a 512 x 512 x 300 field; with --baseline-model DIR also that model's localise +
  segment on the same pairs, and which of the two to keep (issue 20's rule).

    python -m benchmarks.accuracy [--model iris-small] [--data ../shared/data] [--datasets la2018,acdc,...]
        [--methods ensemble,tuned,bank,registration] [--minutes-per-dataset 6] [--max-queries N]
        [--strategy coarse-to-fine|full] [--threads N] [--json results.json]
        [--tables validation,generalisation,calibration,wholescan] [--holdout-model DIR] [--pairs 3] [--fit]
        [--localise auto|registration|none] [--baseline-model DIR] [--no-embedded]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from IrisSegmentLib import Segmenter
from benchmarks import calibration, generalisation, validation, wholescan
from benchmarks.common import DATA, command
from benchmarks.common.cases import LABELS
from benchmarks.registration import set_threads
from benchmarks.validation import COLUMNS, TuneRate, segment_options


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", default=str(DATA))
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
    ap.add_argument("--baseline-model", default=None,
                    help="whole-scan table: also localise + segment with this model folder on the same pairs, and say which to keep")
    ap.add_argument("--no-embedded", action="store_true", help="whole-scan table: leave out the embedded left-atrium row")
    ap.add_argument("--sections", default="unseen classes,unseen modality,unseen site/geometry",
                    help="generalisation table: which sections")
    a = ap.parse_args()
    made_by = command("benchmarks.accuracy")
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
        results = {ds: validation.evaluate(seg, Path(a.data), ds, methods, a.references, a.minutes_per_dataset, a.max_queries,
                                           a.strategy, rate, log, a.localise) for ds in a.datasets.split(",")}
        columns = [c for c in COLUMNS if c == "one-shot" or c in methods]
        out += [validation.table(results, columns, a.references), validation.seconds_line(results, columns),
                validation.caption(seg, a, strategy, made_by)]
        raw["validation"] = results
    if "wholescan" in tables:
        from IrisSegmentLib.training.pause import paused_training

        baseline = Segmenter.load(a.baseline_model, a.device) if a.baseline_model else None
        with paused_training(log):  # the table has seconds per pair
            records = wholescan.evaluate(seg, Path(a.data), a.datasets.split(","), a.pairs, segment_options(seg, a.strategy),
                                         not a.no_embedded, log, baseline)
        out += [wholescan.table(records), wholescan.verdict(records), *([wholescan.keep_verdict(records)] if baseline else []),
                wholescan.caption(seg, a.pairs, made_by)]
        raw["wholescan"] = records
    if "generalisation" in tables:
        held = Segmenter.load(a.holdout_model, a.device) if a.holdout_model else None
        sections = a.sections.split(",")
        if set(sections) - set(generalisation.SECTIONS):
            ap.error(f"unknown section(s) {sorted(set(sections) - set(generalisation.SECTIONS))}")
        records = generalisation.evaluate(seg, held, Path(a.data), a.pairs, segment_options(seg, a.strategy, a.localise),
                                          "registration" in methods, log, sections)
        out += [generalisation.table(records), generalisation.verdict(records), generalisation.caption(seg, held, a.pairs)]
        raw["generalisation"] = records
    if "calibration" in tables:
        collected = calibration.collect(seg, Path(a.data), a.datasets.split(","), a.references, a.minutes_per_dataset,
                                        segment_options(seg, a.strategy, a.localise), log)
        flag = seg.calibration.flag_below if seg.calibration else 0.5
        out += [calibration.table(collected, flag), calibration.cost_line(collected),
                f"Calibration of model {seg.model_id}: out of fold ({calibration.FOLDS} folds by query). "
                f"Command: `{made_by}`"]
        raw["calibration"] = collected
        if a.fit:
            from IrisSegmentLib.resources import model_dir

            out.append(f"Wrote {calibration.fit_and_save(model_dir(a.model), collected, flag)}.")
    print("\n\n".join(out))
    if a.json:
        Path(a.json).write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
