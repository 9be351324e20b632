"""OUT/results.csv, the completeness check that decides what a rerun skips, atomic writes and the output-folder lock.

results.csv has one row per study, read and written by column name (never by position):
    id, path, output, status, reason, seconds, device, worker, finished, task, output_sha256, warnings,
    then per structure `<name>_ml`, `<name>_voxels` and `<name>_estimated_dice` (in the task's order; the estimate is
    empty where the model has no confidence calibration, IrisSegmentLib/inference/confidence.py).
status: `ok`, `failed` (reason: the one-line message), or `skipped` (reason: why it was not segmented: its output is
the user's and is kept, or the run was interrupted before it finished). Columns this version does not know (e.g. a
a later `<name>_...`) are kept, after the known ones, when the file is rewritten; readers should ignore columns
they do not know. The file is rewritten atomically (temporary file in the same folder, fsync, os.replace) as studies
finish (run.SAVE_EVERY), so a crash keeps every row saved before it.

A study is done, and skipped by a rerun, when (checked, not assumed):
  its row says ok for the same task key, the output exists with the sha256 recorded in that row, and the output's
  shape and voxel-to-world matrix match the target's current ones.
Otherwise it is segmented again, except that an output the batch did not write is never replaced without --overwrite:
  - an output that exists while results.csv has no row for the study (it was there before the batch), and
  - an output that still reads as NIfTI but differs from the recorded sha256 (edited by hand?)
are kept, and the study is reported `skipped` with a reason starting `kept:`. An output that no longer reads (truncated,
corrupt) is the batch's own damaged file and is redone.
"""
from __future__ import annotations

import csv
import io as _io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import TEMP_PREFIX, write_atomic
from ..errors import IrisInputError
from ..io import file_sha256
from .formats import read_geometry

RESULTS = "results.csv"
LOCK = ".iris-batch.lock"
FIXED = ("id", "path", "output", "status", "reason", "seconds", "device", "worker", "finished", "task", "output_sha256",
         "warnings")
OK, FAILED, SKIPPED = "ok", "failed", "skipped"
KEPT = "kept:"  # reason prefix of a skipped study whose output belongs to the user
NOT_FINISHED = "not finished (the run stopped before this study): run the same command again to resume"
INTERRUPTED = "interrupted (Ctrl-C) before this study finished: run the same command again to resume"
DONE, RUN = "done", "run"  # verdicts besides KEPT


# -- files -------------------------------------------------------------------------------------------------------
def remove_stray_temporaries(out_dir: str | Path) -> list[Path]:
    """Deletes the temporary files (.iris-*) an interrupted run left in the output folder; returns them."""
    gone = []
    for p in Path(out_dir).rglob(TEMP_PREFIX + "*"):
        if p.is_file() and p.name != LOCK:
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


class OutputLock:
    """An exclusive lock on the output folder for the run (flock: released by the OS if the process dies)."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LOCK
        self.file = None

    def __enter__(self) -> "OutputLock":
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        self.file = open(self.path, "a")
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.close()
            self.file = None
            raise IrisInputError(f"{self.path.parent}: another iris-segment batch is writing into this folder; wait for it "
                                 "to finish, or give another --output-dir") from None
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()  # closing releases the lock
            self.file = None


# -- the table ---------------------------------------------------------------------------------------------------
Structure = tuple[int, str, str, str]  # label, volume column, voxel-count column, estimated-Dice column


def structure_columns(labels: list[int], names: list[str]) -> list[Structure]:
    """Per structure: its label and the columns `<name>_ml`, `<name>_voxels`, `<name>_estimated_dice`; a repeated
    name gets its label value appended."""
    out = []
    for v, n in zip(labels, names):
        name = n if names.count(n) == 1 else f"{n} ({v})"
        out.append((v, f"{name}_ml", f"{name}_voxels", f"{name}_estimated_dice"))
    return out


class ResultsTable:
    """results.csv in memory: rows by study id, in file order; unknown columns are carried through."""

    def __init__(self, path: str | Path, structures: list[Structure]):
        self.path = Path(path)
        self.structures = structures
        self.rows: dict[str, dict[str, str]] = {}
        self.extra: list[str] = []  # columns of the existing file this run does not write

    @classmethod
    def load(cls, path: str | Path, structures: list[Structure]) -> "ResultsTable":
        t = cls(path, structures)
        if not t.path.exists():
            return t
        try:
            with open(t.path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                fields = list(reader.fieldnames or [])
                rows = list(reader)
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise IrisInputError(f"{t.path}: cannot be read ({e}); move it away, or pass --overwrite to start over") from None
        if rows and not {"id", "status"} <= set(fields):
            raise IrisInputError(f"{t.path}: not a results table of iris-segment batch (no id and status columns); move it "
                                 "away, or give another --output-dir")
        known = set(FIXED) | {c for _, *cols in structures for c in cols}
        t.extra = [c for c in fields if c not in known and c is not None]
        for r in rows:
            r.pop(None, None)  # cells beyond the header
            t.rows[r["id"]] = {k: (v or "") for k, v in r.items()}
        return t

    @property
    def columns(self) -> list[str]:
        return [*FIXED, *(c for _, *cols in self.structures for c in cols), *self.extra]

    def get(self, study_id: str) -> dict[str, str] | None:
        return self.rows.get(study_id)

    def set(self, row: dict[str, str]) -> None:
        for c in row:
            if c not in self.columns:
                self.extra.append(c)
        self.rows[row["id"]] = row

    def counts(self, ids) -> dict[str, int]:
        out = {OK: 0, FAILED: 0, SKIPPED: 0}
        for i in ids:
            s = self.rows.get(i, {}).get("status")
            if s in out:
                out[s] += 1
        return out

    def save(self) -> None:
        buf = _io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns, restval="", extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(self.rows.values())
        write_atomic(self.path, buf.getvalue())


def format_row(raw: dict, structures: list[Structure]) -> dict[str, str]:
    """A results row (strings) from what a worker returns: volumes in ml = voxels x voxel volume (mm^3) / 1000."""
    row = {k: "" if raw.get(k) is None else str(raw[k]) for k in FIXED}
    if raw.get("seconds") is not None:
        row["seconds"] = f"{raw['seconds']:.2f}"
    voxels = raw.get("voxels")
    if voxels is not None:
        estimated = raw.get("estimated_dice") or {}
        for v, ml, vx, est in structures:
            n = int(voxels.get(v, 0))
            row[vx] = str(n)
            row[ml] = f"{n * raw['voxel_mm3'] / 1000:.4f}"
            row[est] = f"{estimated[v]:.3f}" if v in estimated else ""
    return row


def skipped_row(study, output: Path, reason: str, task: str) -> dict[str, str]:
    row = dict.fromkeys(FIXED, "")
    row.update(id=study.id, path=str(study.path), output=str(output), status=SKIPPED, reason=reason, task=task)
    return row


# -- the completeness check --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    state: str  # DONE: skip it; RUN: segment it; KEPT: the output is the user's, leave it
    reason: str = ""


def _nifti(path: Path, with_data: bool):
    import nibabel

    img = nibabel.load(str(path))
    if with_data:
        np.asanyarray(img.dataobj)  # decompresses everything: a truncated file fails here
    return img


def _same_geometry(img, target: Path) -> str:
    """'' when the label map lies on the target's grid, else what differs."""
    try:
        shape, affine = read_geometry(target)
    except IrisInputError as e:
        return f"the target cannot be read now ({e})"
    if tuple(img.shape[:3]) != tuple(shape[:3]):
        return f"the target's shape is now {tuple(shape[:3])}, the output's {tuple(img.shape[:3])}"
    if not np.allclose(np.asarray(img.affine), affine, rtol=0, atol=1e-3):
        return "the target's voxel-to-world matrix changed since the output was written"
    return ""


def check_study(study, output: Path, row: dict[str, str] | None, task: str) -> Verdict:
    """What a run does with a study whose previous row is `row` (None: no row): see the module docstring."""
    if not output.exists():
        return Verdict(RUN, "output missing" if row and row.get("status") == OK else "")
    kept = f"{KEPT} {output} existed before this batch wrote it; pass --overwrite to replace it"
    if row is None:
        return Verdict(KEPT, kept)
    if row.get("status") == SKIPPED and row.get("reason", "").startswith(KEPT):
        return Verdict(KEPT, row["reason"])
    if row.get("status") != OK or row.get("task") != task or output.is_dir():
        return Verdict(RUN, "")
    try:
        same = file_sha256(output) == row.get("output_sha256")
        img = _nifti(output, with_data=not same)
    except Exception as e:  # unreadable: the batch's own damaged file
        return Verdict(RUN, f"output unreadable ({type(e).__name__})")
    if not same:
        return Verdict(KEPT, f"{KEPT} {output} changed since this batch wrote it (edited?); pass --overwrite to replace it")
    differs = _same_geometry(img, study.path)
    return Verdict(RUN, differs) if differs else Verdict(DONE)
