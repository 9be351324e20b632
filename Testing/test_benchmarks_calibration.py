"""The calibration table (benchmarks/calibration.py): pairs, wrong references, out-of-fold estimates,
the table and the fitted file, on a tiny synthetic validation set with the seeded tiny model."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import write_la2018_val, write_nifti
from IrisSegmentLib import Segmenter
from IrisSegmentLib.inference.confidence import FEATURES
from benchmarks import calibration



@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """la2018/val with three subjects and four hippocampus crops (two subjects, labels 1 and 2)."""
    root = tmp_path_factory.mktemp("data")
    write_la2018_val(root)
    rng = np.random.default_rng(0)
    (root / "msd_hippocampus").mkdir()
    for n in range(1, 5):
        lab = np.zeros((20, 24, 20), np.uint8)
        lab[6:12, 8:16, 6:14] = 1
        lab[12:16, 8:16, 6:14] = 2
        img = (50 + 80 * lab + rng.normal(0, 5, lab.shape)).astype(np.float32)
        write_nifti(root / "msd_hippocampus" / f"hippocampus_{n:03d}_image.nii.gz", img, np.eye(4))
        write_nifti(root / "msd_hippocampus" / f"hippocampus_{n:03d}_label.nii.gz", lab, np.eye(4))
    return root


def test_right_and_wrong_pairs_with_features_and_timing(tiny_model_dir, root):
    seg = Segmenter.load(str(tiny_model_dir), "cpu")
    got = calibration.collect(seg, root, ["la2018", "hippocampus"], references=2, minutes=None, options={})
    rows = got["rows"]
    la = [r for r in rows if r["dataset"] == "la2018"]
    assert [r["kind"] for r in la] == ["right", "right", "wrong"] * 3  # 3 queries: 2 references + 1 wrong each
    assert {r["reference"] for r in la if r["kind"] == "wrong"} <= {f"hippocampus/{i}" for i in range(4)}
    hippo_wrong = [r for r in rows if r["dataset"] == "hippocampus" and r["kind"] == "wrong"]
    # the atrium stands in for the first hippocampus label only (one structure to give)
    assert hippo_wrong and {r["label"] for r in hippo_wrong} == {1}
    assert all(0 <= r["dice"] <= 1 for r in rows)
    untried = {"voxels", *FEATURES} - {"disagreement", "prior_agreement"}  # a structure no window ran for (segmenter)
    for r in rows:
        f = r["features"]
        assert set(f) == {"voxels", *FEATURES} or (set(f) == untried and f["self_dice"] < seg.config.localise.min_self_dice)
    assert [t[0] for t in got["timing"]] == ["la2018"] * 3 + ["hippocampus"] * 4
    assert all(w > 0 and wo > 0 for _, w, wo in got["timing"])
    assert calibration.cost_line(got).startswith("Cost of the confidence: ") and "all 7 pairs x" in calibration.cost_line(got)


def _synthetic(n_queries=20, seed=0):
    """Rows whose Dice follows self_dice (right pairs) or is low (wrong pairs)."""
    rng = np.random.default_rng(seed)
    rows = []
    for q in range(n_queries):
        for kind in ("right", "right", "wrong"):
            f = {k: float(rng.uniform()) for k in FEATURES}
            f["voxels"] = 100.0
            d = float(np.clip(f["self_dice"] * (1.0 if kind == "right" else 0.3) + rng.normal(0, 0.02), 0, 1))
            rows.append({"dataset": "a" if q % 2 else "b", "query": f"q{q}", "kind": kind, "label": 1, "features": f, "dice": d})
    return rows


def test_out_of_fold_estimates_never_fit_on_their_own_query():
    rows = _synthetic()
    est = calibration.out_of_fold(rows)
    assert not any(np.isnan(est))
    assert calibration.spearman(est, [r["dice"] for r in rows]) > 0.6
    # moving one query's Dice does not move that query's own estimates
    changed = [dict(r, dice=1.0 - r["dice"]) if r["query"] == "q3" else r for r in rows]
    again = calibration.out_of_fold(changed)
    assert [e for e, r in zip(again, rows) if r["query"] == "q3"] == [e for e, r in zip(est, rows) if r["query"] == "q3"]


def test_spearman():
    assert calibration.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert calibration.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert calibration.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(np.corrcoef([1.5, 1.5, 3], [1, 2, 3])[0, 1])
    assert np.isnan(calibration.spearman([1, 2], [1, 2])) and np.isnan(calibration.spearman([1, 1, 1], [1, 2, 3]))


def test_table_and_fitted_file(tiny_model_dir, tmp_path):
    rows = _synthetic()
    lines = calibration.table({"rows": rows}, 0.5).splitlines()
    assert lines[0].startswith("| dataset | segments (right + wrong) | Spearman, right pairs |")
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["b", "a", "**all**"]
    assert lines[-1].split("|")[2].strip() == "40 + 20"
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    path = calibration.fit_and_save(d, {"rows": rows}, 0.5)
    seg = Segmenter.load(str(d), "cpu")
    assert path.name == "confidence.json" and seg.calibration is not None
    assert seg.calibration.fitted_on == {"segments": 60, "datasets": ["a", "b"], "queries": 20}
