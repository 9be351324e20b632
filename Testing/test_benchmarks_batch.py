"""`python -m benchmarks.batch --quick` (tiny random network, 4 synthetic studies): the table holds the loop and
both batch rows with consistent numbers, every study written by every row. The machinery, not the numbers."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

from benchmarks import batch


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[str, dict]:
    out = tmp_path_factory.mktemp("batch-bench") / "batch.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "benchmarks.batch", "--quick", "--workers", "2", "--json", str(out)],
                       capture_output=True, text=True, env=env, timeout=600, cwd=REPO_ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout, json.loads(out.read_text(encoding="utf-8"))


def table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| row ")]


def test_quick_table_rows_are_consistent(quick):
    text, results = quick
    rows = table_rows(text)
    assert [r[0].split(" (")[0] for r in rows] == ["loop of `iris-segment segment`", "`iris-segment batch --workers 1`",
                                                 "`iris-segment batch --workers 2`"]
    loop = results["rows"][0]["seconds"]
    for cells, r in zip(rows, results["rows"]):
        assert r["studies"] == batch.QUICK_STUDIES and r["ok"] == batch.QUICK_STUDIES and r["note"] == "", r
        assert int(cells[1]) == r["studies"] and float(cells[2]) == pytest.approx(r["seconds"], abs=0.05)
        assert r["seconds"] > 0 and float(cells[3]) == pytest.approx(r["studies"] / r["seconds"] * 60, abs=0.05)
        assert float(cells[4].rstrip("×")) == pytest.approx(loop / r["seconds"], abs=0.005)
    assert [r["workers"] for r in results["rows"]] == [None, 1, 2]
    assert all(r["identical"] is not None and 0 <= r["identical"] <= r["studies"] for r in results["rows"][1:])


def test_quick_caption(quick):
    text, _ = quick
    for words in ("Command: `python -m benchmarks.batch --quick", "Device: cpu", "load average", "Cohort: 4 synthetic",
                  "Label maps equal to the loop's, voxel for voxel: --workers 1: ", "numbers mean nothing"):
        assert words in text, words
