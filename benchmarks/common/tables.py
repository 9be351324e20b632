"""Cells of the benchmarks' Markdown tables."""
from __future__ import annotations

import numpy as np


def cell(values: list[float]) -> str:
    """mean ± sd; the mean alone for one value; a dash for none."""
    if len(values) < 2:
        return f"{values[0]:.3f}" if values else "–"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def n_cell(counts: list[int]) -> str:
    """One number where the columns agree, else one per column."""
    return str(counts[0]) if len(set(counts)) == 1 else " / ".join(map(str, counts))


def fmt(value: float | int | None, spec: str = ".1f") -> str:
    """`value` formatted with `spec`; a dash where it is missing (None or NaN)."""
    return "—" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, spec)
