"""`python -m benchmarks.speed`: its resampling, and a --quick run (tiny random network, small BTCV volumes) whose
table must hold every scenario's every row with consistent numbers. Needs ../shared/data/btcv."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, make_tiny_model

from IrisSegmentLib import Segmenter
from benchmarks import speed

DATA = REPO_ROOT.parent / "shared" / "data"


def test_resample_keeps_world_positions():
    """A voxel moved onto a finer, shifted, flipped grid lands at the same world point; outside is filled."""
    affine = np.diag([-2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = [10.0, -4.0, 5.0]
    label = np.zeros((10, 12, 8), np.uint8)
    label[4, 7, 2] = 1
    world = affine[:3, :3] @ [4, 7, 2] + affine[:3, 3]
    out, out_affine = speed.resample(label, affine, (30, 30, 30), (1.0, 1.0, 1.0), world, nearest=True, fill=9)
    hit = np.argwhere(out == 1)
    centre = out_affine[:3, :3] @ hit.mean(0) + out_affine[:3, 3]
    np.testing.assert_allclose(centre, world, atol=0.5)
    assert out[0, 0, 0] == 9  # 14.5 mm from the centre along i: 3.25 voxels before the source's first
    ramp = np.broadcast_to(np.arange(10, dtype=np.float32)[:, None, None], (10, 2, 2))
    lin, _ = speed.resample(ramp, np.eye(4), (19, 2, 2), (0.5, 1.0, 1.0), np.array([4.5, 0.5, 0.5]), nearest=False, fill=-1)
    np.testing.assert_allclose(lin[:, 0, 0], np.arange(19) * 0.5)


@pytest.mark.parametrize("bf16", [False, True])
def test_monai_predictor_is_the_product_forward_pass(tiny_cfg, bf16):
    """The MONAI row's predictor computes what the product's window pass does (same autocast), bit for bit."""
    seg = Segmenter(make_tiny_model(tiny_cfg), tiny_cfg, "cpu")
    seg.runtime = dataclasses.replace(seg.runtime, cpu_bf16=bf16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, *tiny_cfg.model.window, generator=g)
    tokens = torch.randn(3, tiny_cfg.model.num_queries + 1, tiny_cfg.model.token_dim, generator=g)
    assert torch.equal(speed.probabilities(seg, x, tokens[None]), seg.runtime.forward(seg.model, list(x), tokens))


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[str, dict]:
    if not (DATA / "btcv").is_dir():
        pytest.skip(f"{DATA / 'btcv'} not found: the speed benchmark reads BTCV")
    out = tmp_path_factory.mktemp("speed") / "speed.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--quick", "--device", "cpu", "--runs", "1", "--threads", "1",
                        "--data", str(DATA), "--json", str(out)], capture_output=True, text=True, env=env, timeout=900, cwd=REPO_ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout, json.loads(out.read_text(encoding="utf-8"))


def table_rows(text: str) -> dict[tuple[int, str], list[str]]:
    """(scenario, method cell) -> cells of the Markdown table."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].isdigit():
            rows[int(cells[0]), cells[1]] = cells
    return rows


@pytest.mark.parametrize("row", list(speed.ROWS))
@pytest.mark.parametrize("scenario", [1, 2, 3])
def test_quick_table_has_every_row(quick, scenario, row):
    text, results = quick
    found = [cells for (n, label), cells in table_rows(text).items() if n == scenario and label.startswith(speed.ROWS[row])]
    assert len(found) == 1, text
    if row == "monai" and importlib.util.find_spec("monai") is None:
        assert "MONAI not installed" in found[0][1]
        pytest.skip("MONAI is not installed here: its row says so and is not measured (pip install -e '.[bench]')")
    r = next(r for r in results["rows"] if r["scenario"] == scenario and r["row"] == row)
    assert r["seconds"] > 0 and r["windows"] > 0, r
    assert float(found[0][4]) == pytest.approx(r["windows"] / r["seconds"], rel=0.05, abs=0.05)
    assert r["floor_s"] > 0 and r["passes"] == (len(results["sizes"]["query_classes" if scenario == 1 else "ct_classes"])
                                                 if row == "per-class" else 1)
    if "extrapolated" not in r["note"]:
        assert r["host_mib"] > 0 and r["dice_truth"] is not None


def test_quick_caption_names_command_device_and_floor(quick):
    text, _ = quick
    for words in ("Command: `python -m benchmarks.speed --quick", "Device: cpu", "thread(s)", "Floor:", "GFLOP/s",
                  "Issue 5 targets (cpu)"):
        assert words in text, words
