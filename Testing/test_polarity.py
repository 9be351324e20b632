"""Intensity polarity (`encoding.choose_polarity`): a reference whose structures the network segments only with its
intensities inverted is encoded so, and its targets are inverted alike; everything else is left as is."""
from __future__ import annotations

import dataclasses
import types
import warnings

import numpy as np
import pytest

from conftest import REPO_ROOT, dice, ellipsoid_mask, make_affine
from IrisSegmentLib import IrisInputError, Segmenter, TaskEmbedding
from IrisSegmentLib.inference.task import with_first_polarity
from benchmarks import shifts
from benchmarks.common.cases import cases, load_case, query_order, reference_indices

SHARED = REPO_ROOT.parent / "shared" / "data"
AFFINE = make_affine(np.diag([1.5, 1.5, 1.5]), [-30.0, -20.0, 10.0])
SHAPE = (48, 44, 40)


def scene(centre, seed: int, dark: bool) -> tuple[np.ndarray, np.ndarray]:
    """An ellipsoid in a field, noisy: dark in a bright field (`dark`), or bright in a dark one."""
    mask = ellipsoid_mask(SHAPE, AFFINE, centre, (9.0, 7.5, 6.0))
    rng = np.random.default_rng(seed)
    lo, hi = (100.0, 900.0) if not dark else (900.0, 100.0)
    image = np.where(mask, hi, lo) + rng.normal(0, 20.0, SHAPE)
    return image.astype(np.float32), mask.astype(np.uint8)


def centre(offset) -> np.ndarray:
    return AFFINE[:3, :3] @ ((np.array(SHAPE) - 1) / 2) + AFFINE[:3, 3] + np.asarray(offset, float)


def test_oracle_reference_known_the_other_way_round_is_inverted_with_its_target(tiny_cfg, oracle):
    """The oracle thresholds at half the structure's mean intensity: a dark structure in a bright field fails its
    own reference (it takes the field) and succeeds inverted. Reference and target are then inverted alike."""
    seg = Segmenter(oracle, tiny_cfg, "cpu")
    ref, ref_mask = scene(centre((0, 0, 0)), 0, dark=True)
    target, truth = scene(centre((4.0, -3.0, 2.0)), 1, dark=True)
    with pytest.warns(UserWarning, match="intensities inverted"):
        task = seg.encode(ref, AFFINE, ref_mask)
    assert task.polarity == -1.0 and task.references[0]["self_dice"] > 0.9
    assert task.atlases[0].image.max() > -task.atlases[0].image.min()  # the atlas image inverted too: bright structure
    result = seg.segment(target, AFFINE, task, localise="none", confidence=False)
    assert dice(result.label_map == 1, truth > 0) > 0.85

    as_is = Segmenter(oracle, dataclasses.replace(tiny_cfg, inference=dataclasses.replace(tiny_cfg.inference, polarity="keep")), "cpu")
    kept = as_is.encode(ref, AFFINE, ref_mask)
    assert kept.polarity == 1.0 and kept.references[0]["self_dice"] < 0.5
    assert dice(as_is.segment(target, AFFINE, kept, localise="none", confidence=False).label_map == 1, truth > 0) < 0.5


def test_oracle_reference_it_can_segment_and_ct_stay_as_they_are(tiny_cfg, oracle):
    seg = Segmenter(oracle, tiny_cfg, "cpu")
    ref, ref_mask = scene(centre((0, 0, 0)), 0, dark=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert seg.encode(ref, AFFINE, ref_mask).polarity == 1.0
    dark_ref, dark_mask = scene(centre((0, 0, 0)), 0, dark=True)
    assert seg.encode(dark_ref - 1000.0, AFFINE, dark_mask, modality="ct").polarity == 1.0  # Hounsfield units: one sense
    assert seg.encode(dark_ref, AFFINE, dark_mask, confidence=False).polarity == 1.0  # no self-check, no choice


def test_polarity_is_saved_shared_by_references_and_never_mixed(tiny_cfg, oracle, tmp_path):
    seg = Segmenter(oracle, tiny_cfg, "cpu")
    dark, dark_mask = scene(centre((0, 0, 0)), 0, dark=True)
    bright, bright_mask = scene(centre((2.0, 0, 0)), 2, dark=False)
    with pytest.warns(UserWarning, match="intensities inverted"):
        inverted = seg.encode(dark, AFFINE, dark_mask)
    inverted.save(tmp_path / "t.safetensors")
    assert TaskEmbedding.load(tmp_path / "t.safetensors").polarity == -1.0
    assert inverted.select([1]).polarity == inverted.with_tokens(inverted.tokens).polarity == -1.0
    with pytest.raises(IrisInputError, match="opposite intensity polarities"):
        TaskEmbedding.ensemble([inverted, seg.encode(bright, AFFINE, bright_mask)])
    with pytest.warns(UserWarning, match="intensities inverted"):
        both = seg.encode_references([(dark, AFFINE, dark_mask), (bright, AFFINE, bright_mask)])
    assert both.polarity == -1.0 and len(both.atlases) == 2  # the second reference follows the first's choice


def test_every_reference_takes_the_polarity_the_first_chose_or_was_given():
    asked = []

    def encoder(choice: float):
        def encode(polarity):
            asked.append(polarity)
            return types.SimpleNamespace(polarity=choice if polarity is None else polarity)
        return encode

    assert [t.polarity for t in with_first_polarity([encoder(-1.0), encoder(1.0), encoder(1.0)])] == [-1.0] * 3
    assert asked == [None, -1.0, -1.0]
    asked.clear()
    assert [t.polarity for t in with_first_polarity([encoder(-1.0), encoder(-1.0)], 1.0)] == [1.0, 1.0]
    assert asked == [1.0, 1.0]


def test_bundled_network_segments_an_inverted_hippocampus_as_its_own_contrast():
    """Real weights, real scans: reference and target in the inverted contrast of the generalisation benchmark are
    encoded inverted back, and the target is segmented as well as in its own contrast (measured: 0.786 / 0.785)."""
    seg = Segmenter.load(None, "cpu")
    items = cases(SHARED, "hippocampus")
    qi = query_order(items)[0]
    ref, qry = load_case(items[reference_indices(items, qi, 1)[0]]), load_case(items[qi])
    own = seg.encode(ref[0], ref[1], ref[2], labels=[1, 2])
    assert own.polarity == 1.0
    native = seg.segment(qry[0], qry[1], own, confidence=False).label_map
    inv = [(shifts.invert(v[0], v[2], 0), v[1], v[2]) for v in (ref, qry)]
    with pytest.warns(UserWarning, match="intensities inverted"):
        task = seg.encode(*inv[0], labels=[1, 2])
    assert task.polarity == -1.0 and min(r["self_dice"] for r in task.references) >= seg.config.localise.min_self_dice
    shifted = seg.segment(inv[1][0], inv[1][1], task, confidence=False).label_map
    for v in (1, 2):
        assert dice(shifted == v, qry[2] == v) > dice(native == v, qry[2] == v) - 0.05


def test_command_line_says_it_and_the_saved_task_keeps_it(tmp_path, capsys):
    """`iris-segment segment` on an inverted hippocampus pair (real files, bundled model): the warning is printed,
    the saved task carries the polarity, and segmenting again from that task inverts the new target alike."""
    from conftest import read_nifti, write_nifti
    from IrisSegmentLib.cli import main

    items = cases(SHARED, "hippocampus")
    qi = query_order(items)[0]
    ref, qry = load_case(items[reference_indices(items, qi, 1)[0]]), load_case(items[qi])
    write_nifti(tmp_path / "ref.nii.gz", shifts.invert(ref[0], ref[2], 0), ref[1])
    write_nifti(tmp_path / "ref_label.nii.gz", ref[2].astype(np.uint8), ref[1])
    write_nifti(tmp_path / "target.nii.gz", shifts.invert(qry[0], qry[2], 0), qry[1])
    args = ["segment", "--target", str(tmp_path / "target.nii.gz"), "--device", "cpu"]
    assert main(args + ["--output", str(tmp_path / "a.nii.gz"), "--reference-image", str(tmp_path / "ref.nii.gz"),
                        "--reference-label", str(tmp_path / "ref_label.nii.gz"), "--save-task", str(tmp_path / "t.safetensors")]) == 0
    assert "intensities inverted" in capsys.readouterr().err
    assert TaskEmbedding.load(tmp_path / "t.safetensors").polarity == -1.0
    assert main(args + ["--output", str(tmp_path / "b.nii.gz"), "--task", str(tmp_path / "t.safetensors")]) == 0
    for name in ("a", "b"):
        labels = read_nifti(tmp_path / f"{name}.nii.gz")[0]
        assert dice(labels > 0, qry[2] > 0) > 0.7
