"""`python -m benchmarks.ablations --quick`: the machinery of the ablation, sensitivity and cost tables
(synthetic data, a few steps: the numbers mean nothing, the shape of the report does)."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from benchmarks import ablations

COMMAND = [sys.executable, "-m", "benchmarks.ablations"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    work = tmp_path_factory.mktemp("ablations")
    p = subprocess.run([*COMMAND, "--quick", "--work", str(work), "--docs", str(work)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO_ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout, work


def _squash(text: str) -> str:
    return re.sub(r"\n\s*\n+", "\n\n", text).strip()


def _dice_cell(cell: str) -> float:
    m = re.fullmatch(r"(-?[\d.]+) ± ([\d.]+|nan)", cell)
    assert m, cell
    return float(m.group(1))


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
    doc = "\n".join(l for l in (work / "ablations.md").read_text(encoding="utf-8").splitlines() if not l.startswith("<!-- "))
    assert _squash(doc).endswith(_squash(md))  # the report, as printed (docs/ablations.md marks its sections)
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


def test_prior_rows_every_comparison_with_engine_numbers(quick):
    md, work = quick
    rows = _table(md, "comparison")
    assert all(len(r) == 10 for r in rows)
    groups = [r[0] for r in rows]
    assert groups[0] == "prior design" and groups.count("prior input") == 1 and groups.count("prior dropout") == 1
    labels = [r[1] for r in rows if r[0] == "prior simulation"]
    assert "no simulated error: the blurred truth only" in labels
    for error in ("affine", "elastic", "morph", "missing", "spurious"):
        assert f"every simulated error but {error}" in labels
    for r in rows:
        assert r[2] == "2", r  # both quick seeds ran
        assert all(0 <= _dice_cell(c) <= 100 for c in r[3:7]), r  # episode Dice and the three engine columns
    params = {r[1]: int(r[7].replace(",", "")) for r in rows}
    assert params["no prior input (prior_channels 0; the same episodes)"] < params[rows[0][1]]  # the fusion's weights
    assert re.search(r"Registration alone .*: [\d.]+ % .*\d+ of \d+ registrations failed", md)
    verdicts = [l for l in md.splitlines() if l.startswith("- **prior ")]
    assert len(verdicts) == len(rows) - 1 and all("Dice points" in l or "identical" in l for l in verdicts)
    assert list((work / "localisations").glob("*/*.pt"))  # made once per pair (per registration version), reused


def test_speed_tables(quick):
    md, _ = quick
    steps = _table(md, "network @ crop (batch 2, prior input, one AdamW step)")
    assert {(r[1], r[2]) for r in steps} >= {("fp32", "contiguous"), ("bf16", "channels-last")}
    assert all(float(r[5]) > 0 and int(r[4]) >= 1 for r in steps)
    phases = {r[0].split(":")[0]: r for r in _table(md, "phase (tiny@16, batch 2, episodes of the training set)")}
    assert {"data", "forward", "backward", "optimiser", "total"} <= set(phases)
    assert abs(sum(float(phases[p][1]) for p in ("data", "forward", "backward", "optimiser")) - float(phases["total"][1])) < 3e-3
    assert len(_table(md, "operator (tiny@16/bf16, one step, torch.profiler)")) >= 3
    loop = _table(md, "episode workers (tiny@16, bf16)")
    assert sorted(int(r[0]) for r in loop) == [0, 1] and all(float(r[2]) > 0 for r in loop)
    acc = _table(md, "speed option")
    assert [r[0] for r in acc] == ["prior design"] + ["training speed"] * 4 and all(r[2] == "2" for r in acc)
    assert "- **equal CPU time**, 32³ crops, 3x the steps" in md


def test_docs_sections_are_kept_or_replaced(tmp_path):
    doc = tmp_path / "ablations.md"
    doc.write_text("# old title\n\nold intro\n\nMini-benchmark: old grid\n\n## Ablations (the nine gaps)\n\n| gap |\n",
                   encoding="utf-8")
    text = ablations.write_docs(doc, {"prior": "## prior A"})  # a file from before the marks: all of it is issue 11's
    assert "Mini-benchmark: old grid" in text and "## prior A" in text and "old intro" not in text
    assert text.index("old grid") < text.index("## prior A")
    text = ablations.write_docs(doc, {"speed": "## speed B"})
    assert "old grid" in text and "## prior A" in text and text.index("## prior A") < text.index("## speed B")
    text = ablations.write_docs(doc, {"prior": "## prior C"})
    assert "## prior A" not in text and "## prior C" in text and "## speed B" in text and "old grid" in text
    assert doc.read_text(encoding="utf-8") == text


def test_resumes_without_rerunning(quick):
    md, work = quick
    stale = work / "results" / "prior-dropout-0-s1.json"
    row = json.loads(stale.read_text(encoding="utf-8"))
    row["engine"]["version"] = "older"  # as if the registration code had changed since this row was evaluated
    stale.write_text(json.dumps(row), encoding="utf-8")
    before = {p.name: p.stat().st_mtime for p in (work / "results").glob("*.json") if p != stale}
    p = subprocess.run([*COMMAND, "--quick", "--work", str(work), "--parts", "ablations,prior"], capture_output=True, text=True,
                       timeout=120, cwd=REPO_ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "already done" in p.stderr and "1 to evaluate again" in p.stderr
    assert {q.name: q.stat().st_mtime for q in (work / "results").glob("*.json") if q != stale} == before
    again = json.loads(stale.read_text(encoding="utf-8"))  # the engine again from the saved weights, training kept
    assert again["engine"]["version"] != "older" and "reevaluated_cpu_s" in again
    assert again["final_loss"] == row["final_loss"] and again["episode_dice"] == row["episode_dice"]


def test_verdict_rule():
    assert "within noise" in ablations.verdict("design", [0.50, 0.52, 0.48], "alt", [0.51, 0.49, 0.53], paired=False)
    assert "design better" in ablations.verdict("design", [0.50, 0.51, 0.49], "alt", [0.30, 0.31, 0.29], paired=False)
    assert "alt better" in ablations.verdict("design", [0.30, 0.31, 0.29], "alt", [0.50, 0.51, 0.49], paired=False)
    # paired: a small but consistent difference on the same networks is real
    assert "alt better" in ablations.verdict("design", [0.30, 0.50, 0.70], "alt", [0.32, 0.52, 0.72 + 1e-3], paired=True)
    assert "identical" in ablations.verdict("design", [0.3, 0.5], "alt", [0.3, 0.5], paired=True)
    assert "too few" in ablations.verdict("design", [0.3], "alt", [0.4], paired=False)
    m, s, n = ablations._ms([0.1, 0.3, math.nan])
    assert n == 2 and abs(m - 0.2) < 1e-12 and abs(s - math.sqrt(0.02)) < 1e-12
