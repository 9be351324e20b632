"""Finding the studies of a cohort: a folder searched recursively by glob pattern, or a CSV of paths.

Folder: every file matching a pattern (default *.nii.gz and *.nii) below the folder; a matching folder is a DICOM
series (its files are not studies of their own). Hidden files and folders (name starting with '.') are skipped, and
so is the output folder when it lies inside the targets folder. Study id: the path relative to the targets folder,
without the image suffix ('site2/case07' for site2/case07.nii.gz); the output is OUT/<id>.nii.gz.

CSV: a header row naming a `path` column (and optionally `id`; other columns are ignored), or no header and one path
per row. Relative paths are relative to the CSV's folder. Without an id column the id is the file name without its
suffix. Every path must exist: missing ones are listed (row numbers) before any work starts.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import IrisInputError
from .formats import image_suffix

DEFAULT_PATTERNS = ("*.nii.gz", "*.nii")
OUTPUT_SUFFIX = ".nii.gz"
SHOWN = 5  # problems listed by name before "and N more"


@dataclass(frozen=True)
class Study:
    id: str  # unique; a relative POSIX path without suffix, used for the output file name
    path: Path  # absolute: a file, or a folder holding one DICOM series

    def output(self, out_dir: str | Path) -> Path:
        return Path(out_dir) / (self.id + OUTPUT_SUFFIX)


def _strip_suffix(name: str) -> str:
    s = image_suffix(name)
    return name[: -len(s)] if s else name


def _listing(items: list[str]) -> str:
    more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more


def check_id(study_id: str, where: str) -> str:
    """An id usable as a relative file name inside the output folder."""
    parts = PurePosixPath(study_id).parts
    bad = (not study_id.strip() or study_id.startswith("/") or "\\" in study_id or "\0" in study_id
           or any(p in ("..", ".") or p.startswith(".") for p in parts))
    if bad:
        raise IrisInputError(f"{where}: id {study_id!r} cannot be used as a file name inside the output folder; use letters, "
                             "digits, '-', '_' and '.' (not at the start), and '/' for subfolders")
    return study_id


def _unique(studies: list[Study], source: str, fix: str) -> list[Study]:
    seen: dict[str, list[Study]] = {}
    for s in studies:
        seen.setdefault(s.id, []).append(s)
    dups = [f"{k!r} ({', '.join(str(s.path) for s in v)})" for k, v in seen.items() if len(v) > 1]
    if dups:
        raise IrisInputError(f"{source}: {len(dups)} study id(s) given to more than one target: {_listing(dups)}; {fix}")
    return sorted(studies, key=lambda s: s.id)


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def from_folder(folder: str | Path, patterns: tuple[str, ...] = DEFAULT_PATTERNS, exclude: str | Path | None = None) -> list[Study]:
    """Studies below `folder` matching any of `patterns` (recursive glob); nothing below `exclude`."""
    root = Path(folder).resolve()
    skip = Path(exclude).resolve() if exclude is not None else None
    skip = skip if skip is not None and skip != root and _inside(skip, root) else None
    found: dict[Path, None] = {}
    for pattern in patterns:
        for p in root.rglob(pattern):
            rel = p.relative_to(root)
            if any(part.startswith(".") for part in rel.parts) or (skip is not None and _inside(p, skip)):
                continue
            if p.is_file() or p.is_dir():
                found[p] = None
    series = [p for p in found if p.is_dir()]
    paths = [p for p in found if not any(p != d and _inside(p, d) for d in series)]
    studies = [Study(_strip_suffix(p.relative_to(root).as_posix()), p) for p in paths]
    return _unique(studies, str(folder), "rename one of them, or list the targets in a CSV with an id column")


def _header(row: list[str]) -> dict[str, int] | None:
    names = [c.strip().lower() for c in row]
    return {n: i for i, n in enumerate(names)} if "path" in names else None


def _cell(row: list[str], cols: dict[str, int] | None, name: str) -> str:
    """The named cell of a row (headerless CSV: the path is the only column, there is no id)."""
    if cols is None:
        return row[0].strip() if name == "path" else ""
    i = cols.get(name)
    return row[i].strip() if i is not None and i < len(row) else ""


def from_csv(path: str | Path) -> list[Study]:
    """Studies listed in a CSV file (see the module's docstring for the layout)."""
    p = Path(path)
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            rows = [(n, r) for n, r in enumerate(csv.reader(f), 1) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise IrisInputError(f"{p}: cannot be read as a CSV file ({e})") from None
    if not rows:
        raise IrisInputError(f"{p}: no rows; list one target path per row (optionally with a header: id,path)")
    cols = _header(rows[0][1])
    if cols is not None:
        rows = rows[1:]
    elif max(len([c for c in r if c.strip()]) for _, r in rows) > 1:
        raise IrisInputError(f"{p}: rows have more than one column but no header; add a header row naming the `path` "
                             "column (and `id` if there is one), e.g. id,path")
    base = p.resolve().parent
    studies, missing = [], []
    for n, r in rows:
        text = _cell(r, cols, "path")
        if not text:
            raise IrisInputError(f"{p} row {n}: empty path")
        target = Path(os.path.expanduser(text))
        target = target if target.is_absolute() else base / target
        if not target.exists():
            missing.append(f"row {n}: {target}")
            continue
        given = _cell(r, cols, "id")
        sid = check_id(given, f"{p} row {n}") if given else _strip_suffix(target.name)
        studies.append(Study(sid, target.resolve()))
    if missing:
        raise IrisInputError(f"{p}: {len(missing)} target(s) not found ({_listing(missing)}); check the paths (relative "
                             "paths are read from the CSV's folder)")
    if not studies:
        raise IrisInputError(f"{p}: a header but no target rows")
    return _unique(studies, str(p), "add an id column to the CSV to name each study")


def find_targets(source: str | Path, patterns: list[str] | tuple[str, ...] | None = None,
                 exclude: str | Path | None = None) -> list[Study]:
    """The studies of `source`: a folder (recursive, by `patterns`) or a .csv file. At least one, or a message."""
    p = Path(source)
    if not p.exists():
        raise IrisInputError(f"{p}: --targets not found; give a folder of images or a CSV file listing them")
    if p.is_file():
        if patterns:
            raise IrisInputError("--pattern applies to a targets folder, not to a CSV file; list the files in the CSV")
        if p.suffix.lower() != ".csv":
            raise IrisInputError(f"{p}: --targets must be a folder or a .csv file listing the target paths "
                                 "(for a single image use iris-segment segment)")
        return from_csv(p)
    pats = tuple(patterns) if patterns else DEFAULT_PATTERNS
    studies = from_folder(p, pats, exclude)
    if not studies:
        raise IrisInputError(f"{p}: no targets matching {', '.join(pats)} in this folder or below; "
                             "use --pattern for other names (e.g. --pattern '*.nrrd')")
    return studies
