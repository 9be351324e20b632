"""The validation table of `python -m benchmarks.accuracy` (benchmarks/validation.py) on a tiny synthetic validation
set with the seeded tiny model (untrained: these tests check pairs, n counts, the time budget, the table and the brain
rendering, not accuracy)."""
from __future__ import annotations

import functools

import numpy as np
import pytest

from conftest import ellipsoid_mask, make_affine, read_nifti, write_la2018_val, write_nifti
from IrisSegmentLib import Segmenter
from benchmarks import registration, validation
from benchmarks.common.cases import (BRAIN_MARGIN, BRAIN_STRUCTURES, BRAIN_VAL, Case, cases, dice, load_case, query_order,
                                     reference_indices, render_seed)

LA_CASES = ("A", "B", "C")
AFFINE = make_affine(np.diag([1.5, 1.5, 1.5]), [0.0, 0.0, 0.0])
COLUMNS = ["one-shot", "ensemble", "tuned", "bank", "registration"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """la2018/val with three subjects (shifted ellipsoids, same grid) and the four brain label maps."""
    root = tmp_path_factory.mktemp("data")
    write_la2018_val(root, LA_CASES)
    brain = root / "synthseg_brain_labels"
    brain.mkdir()
    for k, cid in enumerate(BRAIN_VAL):
        lab = np.zeros((40, 36, 36), np.int32)
        for j, v in enumerate(BRAIN_STRUCTURES):  # one slab per structure, shifted per subject
            lab[10 + 2 * j + k % 2 : 12 + 2 * j + k % 2, 10:26, 8 + k : 24 + k] = v
        write_nifti(brain / f"{cid}.nii.gz", lab, np.eye(4))
    return root


@pytest.fixture(scope="module")
def seg(tiny_model_dir, root):
    """The tiny model, with a memory-bank entry for the left atrium; in-context tuning takes 1 step (fast)."""
    s = Segmenter.load(str(tiny_model_dir), "cpu")
    s.tune = functools.partial(Segmenter.tune, s, steps=1)
    img, aff, lab = load_case(cases(root, "la2018")[0])
    s.bank.update("la2018:1", s.encode(img, aff, lab).tokens[0])
    return s


@pytest.fixture()
def warps(monkeypatch):
    """Registration replaced by the identity (the la2018 cases share one grid); counts its calls."""
    calls = []

    def identity(ref_image, ref_affine, ref_label, qry_image, qry_affine):
        calls.append(1)
        return ref_label.copy(), 0.0

    monkeypatch.setattr(validation, "register_and_warp", identity)
    return calls


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip("|").split("|")]


def label(root, cid: str) -> np.ndarray:
    return np.rint(read_nifti(root / "la2018" / "val" / f"{cid}_label.nii.gz")[0]).astype(int)


def test_every_column_on_each_query_and_registration_on_the_one_shot_pairs(seg, root, warps):
    res = validation.evaluate(seg, root, "la2018", set(COLUMNS[1:]), n_refs=2, max_queries=2)
    recs = res["queries"]
    assert res["cases"] == 3 and [r["query"] for r in recs] == ["A", "B"]
    for r in recs:
        assert set(r["dice"]) == set(COLUMNS) and all(set(d) == {1} for d in r["dice"].values())
        assert r["query"] not in r["references"] and len(r["references"]) == 2
        # the identity warp scores the query against its first reference: the one-shot pair
        first_ref = label(root, r["references"][0])
        assert r["dice"]["registration"][1] == pytest.approx(dice(first_ref == 1, label(root, r["query"]) == 1))
    assert len(warps) == 2
    lines = validation.table({"la2018": res}, COLUMNS, 2).splitlines()
    assert lines[0] == "| dataset | structure | one-shot | ensemble of 2 | tuned on 2 | memory bank | registration | n |"
    assert len(lines) == 4 and all(line.count("|") == 9 for line in lines)
    assert lines[2].startswith("| la2018 | left atrium | ") and lines[2].endswith(" | 2 |")
    assert lines[3].startswith("| la2018 | **mean** | ") and lines[3].endswith(" | 2 of 3 |")
    assert "la2018: one-shot " in validation.seconds_line({"la2018": res}, COLUMNS)


def test_budget_cut_off_keeps_the_first_one_shot_pair_and_says_so(seg, root, warps):
    res = validation.evaluate(seg, root, "la2018", {"ensemble", "bank", "registration"}, n_refs=2, minutes=1e-9)
    assert [set(r["dice"]) for r in res["queries"]] == [{"one-shot", "registration"}]
    lines = validation.table({"la2018": res}, ["one-shot", "ensemble", "bank", "registration"], 2).splitlines()
    structure, mean = cells(lines[2]), cells(lines[3])
    assert structure[3:5] == mean[3:5] == ["–", "–"] and 0 <= float(structure[2]) <= 1 and 0 <= float(structure[5]) <= 1
    assert structure[6] == "1 / 0 / 0 / 1" and mean[6] == "1 / 0 / 0 / 1 of 3"


def test_tuning_is_skipped_where_the_runs_tuning_speed_says_it_would_not_fit(seg, root):
    assert validation.TuneRate(10.0, 5).expected(3) == 6.0 and validation.TuneRate().expected(3) == 0.0
    slow = validation.TuneRate(seconds=1e6, crops=1)  # as if tuning had taken 1e6 s per crop on an earlier dataset
    res = validation.evaluate(seg, root, "la2018", {"tuned"}, n_refs=2, minutes=1.0, rate=slow)
    assert [set(r["dice"]) for r in res["queries"]] == [{"one-shot"}] * 3


def test_budget_shares():
    b = validation.Budget(total=12.0, weights={"one-shot": 2, "ensemble": 1})  # shares 8 s and 4 s
    assert b.allows("one-shot", 0.0) and not b.allows("ensemble", 5.0) and b.allows("ensemble", 4.0)
    b.add("one-shot", 3.0)
    assert b.allows("one-shot", 0.0)  # 3 spent + 3 expected <= 8
    b.add("one-shot", 3.0)
    assert not b.allows("one-shot", 0.0)  # 6 + 3 > 8
    assert validation.Budget(None, {"ensemble": 1}).allows("ensemble", 1e9)
    assert validation.budget_units({"registration", "bank"}) == {"one-shot": 2, "bank": 1}


def test_queries_span_subjects_and_references_are_other_subjects():
    items = [Case(f"p{s}_f{f}", f"p{s}", None, None) for s in (1, 2, 3) for f in (1, 2)][:5]
    assert query_order(items) == [0, 2, 4, 1, 3]
    for qi in range(5):
        refs = reference_indices(items, qi, 3)
        assert len(refs) == 3 and all(items[r].subject != items[qi].subject for r in refs)


def test_brain_is_one_multiclass_task_with_all_structures(seg, root, warps):
    res = validation.evaluate(seg, root, "brain", {"registration"}, max_queries=1)
    (r,) = res["queries"]
    assert len(r["references"]) == 3
    assert set(r["dice"]["one-shot"]) == set(r["dice"]["registration"]) == set(BRAIN_STRUCTURES)


def test_brain_rendering_is_deterministic(root):
    items = cases(root, "brain")
    img, aff, lab = load_case(items[1])
    assert np.array_equal(img, load_case(items[1])[0])
    assert not np.array_equal(img, load_case(items[3])[0])  # another subject: other noise
    # the noise seed is the same in every process (Python's hash() of a string is not, unless PYTHONHASHSEED is set)
    assert render_seed(items[1].id) == render_seed("training_seg_18") == 1896151173
    # cropped to the labels' box (x 11-26, y 10-25, z 9-24) plus BRAIN_MARGIN = 8 voxels, nothing lost
    assert BRAIN_MARGIN == 8 and lab.shape == img.shape == (32, 32, 32) and aff[:3, 3].tolist() == [3.0, 2.0, 1.0]
    assert np.array_equal(np.unique(lab, return_counts=True)[1][1:], np.full(8, 2 * 16 * 16))


def test_strategy_is_passed_only_to_a_segmenter_that_takes_it():
    class Before:
        def segment(self, image, affine, task, modality="auto"):
            pass

    class After:
        def segment(self, image, affine, task, modality="auto", strategy=None):
            pass

    assert validation.segment_options(Before(), None) == {} == validation.segment_options(After(), None)
    assert validation.segment_options(After(), "full") == {"strategy": "full"}
    with pytest.raises(SystemExit):
        validation.segment_options(Before(), "full")


def test_registration_aligns_a_shifted_structure_across_grids():
    """Reference RAS 1.5 mm; query flipped in i and j (LPS-like), anisotropic, structure 4 mm away (unregistered
    overlap: Dice 0.53). A few iterations (about 1 s) must bring the warped label onto the query's."""
    pytest.importorskip("SimpleITK")
    rng = np.random.default_rng(0)
    r_aff, q_aff = AFFINE, make_affine(np.diag([-1.2, -1.3, 2.0]), [40.0, 40.0, 0.0])
    r_lab = ellipsoid_mask((28, 28, 24), r_aff, (20, 21, 18), (9, 7, 6)).astype(np.uint8)
    q_lab = ellipsoid_mask((32, 30, 18), q_aff, (24, 18, 17), (9, 7, 6)).astype(np.uint8)
    r_img, q_img = ((100 + 400 * m.astype(np.float32) + rng.normal(0, 10, m.shape)).astype(np.float32) for m in (r_lab, q_lab))
    warped, secs = registration.register_and_warp(r_img, r_aff, r_lab, q_img, q_aff, samples=1000, affine_iterations=30,
                                                  bspline_iterations=5)
    assert warped.shape == q_lab.shape and secs > 0
    assert dice(warped == 1, q_lab == 1) > 0.8
