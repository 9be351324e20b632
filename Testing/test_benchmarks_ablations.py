"""benchmarks/ablations.py --quick: the machinery of the ablation, sensitivity and cost tables
(synthetic data, a few steps: the numbers mean nothing, the shape of the report does)."""
from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "ablations.py"


def _module():
    spec = importlib.util.spec_from_file_location("ablations_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    work = tmp_path_factory.mktemp("ablations")
    p = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--work", str(work), "--docs", str(work)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout, work


def _table(md: str, first_header: str) -> list[list[str]]:
    lines = md.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def test_every_gap_has_the_design_and_an_alternative_with_numbers(quick):
    md, work = quick
    assert (work / "ablations.md").read_text().strip().endswith(md.strip())  # the report, as printed
    rows = _table(md, "gap")
    assert all(len(r) == 8 for r in rows)
    assert rows[0][0] == "design" and rows[0][2] == "2"
    for g in range(1, 10):
        alts = [r for r in rows if r[0] == f"gap {g}"]
        assert alts, f"gap {g} has no alternative row"
        for r in alts:
            assert r[2] == "2", r  # both quick seeds ran
            dice = r[3] if "design's networks" not in r[3] else r[4]
            m = re.fullmatch(r"(-?[\d.]+) ± ([\d.]+|nan)", dice)
            assert m and 0 <= float(m.group(1)) <= 100, r
    # trained alternatives report their own parameter count and step time
    trained = [r for r in rows if "design's networks" not in r[3]]
    assert len(trained) >= 9 and all(int(r[5].replace(",", "")) > 0 and float(r[6]) > 0 for r in trained)
    counts = {r[1]: int(r[5].replace(",", "")) for r in trained}
    assert counts["context from the mask area-pooled to 1/8 (no shuffle)"] < counts["design (every gap as in DESIGN.md)"]


def test_a_verdict_line_per_gap(quick):
    md, _ = quick
    for g in range(1, 10):
        line = next(l for l in md.splitlines() if l.startswith(f"- **Gap {g} "))
        assert "Dice points" in line or "identical" in line


def test_sensitivity_grid(quick):
    md, _ = quick
    rows = _table(md, "parameter")
    params = {}
    for r in rows:
        params.setdefault(r[0], []).append(r)
    assert set(params) == {"learning rate", "context queries m", "working spacing", "window size", "references"}
    assert all(len(v) >= 2 and any("(design)" in r[1] for r in v) for v in params.values())
    assert all(r[2] == "2" for v in params.values() for r in v)


def test_cost_tables_and_plots(quick):
    md, work = quick
    assert _table(md, "target (1.5 mm, working grid = target)")
    for header in ("classes K", "reference images", "sliding-window choice (4 classes)"):
        rows = _table(md, header)
        assert len(rows) >= 2 and all(float(r[-2 if header.startswith("sliding") else 4]) >= 0 for r in rows)
    assert "Fit: segment CPU s =" in md
    for png in ("ablations_dice.png", "cost_size.png", "cost_classes_references.png"):
        data = (work / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_resumes_without_rerunning(quick):
    md, work = quick
    before = {p.name: p.stat().st_mtime for p in (work / "results").glob("*.json")}
    p = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--work", str(work), "--parts", "ablations"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "already done" in p.stderr
    assert {q.name: q.stat().st_mtime for q in (work / "results").glob("*.json")} == before


def test_verdict_rule():
    ab = _module()
    assert "within noise" in ab.verdict("design", [0.50, 0.52, 0.48], "alt", [0.51, 0.49, 0.53], paired=False)
    assert "design better" in ab.verdict("design", [0.50, 0.51, 0.49], "alt", [0.30, 0.31, 0.29], paired=False)
    assert "alt better" in ab.verdict("design", [0.30, 0.31, 0.29], "alt", [0.50, 0.51, 0.49], paired=False)
    # paired: a small but consistent difference on the same networks is real
    assert "alt better" in ab.verdict("design", [0.30, 0.50, 0.70], "alt", [0.32, 0.52, 0.72 + 1e-3], paired=True)
    assert "identical" in ab.verdict("design", [0.3, 0.5], "alt", [0.3, 0.5], paired=True)
    assert "too few" in ab.verdict("design", [0.3], "alt", [0.4], paired=False)
    m, s, n = ab._ms([0.1, 0.3, math.nan])
    assert n == 2 and abs(m - 0.2) < 1e-12 and abs(s - math.sqrt(0.02)) < 1e-12
