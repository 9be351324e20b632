"""The generalisation benchmark: domain shifts (benchmarks/shifts.py) and the second accuracy table
(benchmarks/generalisation.py), on a tiny synthetic la2018 with the seeded tiny model (untrained:
these tests check the shifts, the pairs and the table, not accuracy)."""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from conftest import ellipsoid_mask, make_affine, write_la2018_val
from IrisSegmentLib import Segmenter
from benchmarks import generalisation, shifts

AFFINE = make_affine(np.diag([1.5, 1.5, 1.5]), [0.0, 0.0, 0.0])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """la2018/val with three subjects (shifted ellipsoids on one grid)."""
    root = tmp_path_factory.mktemp("data")
    write_la2018_val(root)
    return root


def _blob(shape=(30, 26, 22), affine=AFFINE):
    rng = np.random.default_rng(1)
    lab = ellipsoid_mask(shape, affine, (20.0, 16.0, 14.0), (7, 6, 5)).astype(np.uint8)
    img = (50 + 300 * lab.astype(np.float32) + rng.normal(0, 5, shape)).astype(np.float32)
    return img, affine, lab


def test_contrast_shifts():
    img, _, lab = _blob()
    assert np.allclose(shifts.invert(shifts.invert(img, lab, 0), lab, 0), img, atol=1e-3)
    assert shifts.invert(img, lab, 0)[lab > 0].mean() < shifts.invert(img, lab, 0)[lab == 0].mean()
    c = shifts.cosine(img, lab, 0)
    assert c.min() >= -1 and c.max() <= 1
    ramp = np.linspace(0, 1, 301, dtype=np.float32).reshape(1, 1, -1)
    steps = np.sign(np.diff(shifts.cosine(ramp, np.zeros_like(ramp, dtype=np.uint8), 0).ravel()))
    assert (np.diff(steps[steps != 0]) != 0).sum() == 2  # three monotonic pieces
    r1, r2 = shifts.rendered(img, lab, 3), shifts.rendered(img, lab, 3)
    assert np.array_equal(r1, r2) and not np.array_equal(r1, shifts.rendered(img, lab, 4))  # noise seed
    assert abs(r1[lab > 0].mean() - r1[lab == 0].mean()) > 0.1  # the structure has its own intensity


def test_reslice_identity_and_world_position():
    img, aff, lab = _blob()
    same = shifts.reslice(img, aff, lab, shifts.Geometry(in_plane=1.5, slice=1.5), slab_samples=1)
    assert same[0].shape == img.shape and np.allclose(same[0], img, atol=1e-3) and np.array_equal(same[2], lab)
    assert np.allclose(same[1], aff)

    def centroid_mm(a, label):
        return (a @ np.r_[np.argwhere(label > 0).mean(0), 1])[:3]

    for geo in shifts.GEOMETRY.values():
        if geo.fov < 1:
            continue
        s_img, s_aff, s_lab = shifts.reslice(img, aff, lab, geo)
        ml = lab.sum() * abs(np.linalg.det(aff[:3, :3]))
        assert abs(s_lab.sum() * abs(np.linalg.det(s_aff[:3, :3])) - ml) < 0.2 * ml
        assert np.linalg.norm(centroid_mm(s_aff, s_lab) - centroid_mm(aff, lab)) < geo.slice
        assert np.allclose(np.linalg.norm(s_aff[:3, :3], axis=0), [geo.in_plane, geo.in_plane, geo.slice])
    sag = shifts.new_grid(img.shape, aff, shifts.GEOMETRY["sagittal 4 mm slices, 15° tilt"])[1]
    assert abs(sag[0, 2]) == pytest.approx(4.0 * np.cos(np.radians(15)))  # the slice axis: left-right, tilted 15°


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    seg = Segmenter.load(str(tiny_model_dir), "cpu")
    held = Segmenter.load(str(tiny_model_dir), "cpu")
    held.config = dataclasses.replace(held.config, training=dataclasses.replace(held.config.training, holdout={"la2018": [1]}))
    return seg, held


def test_unseen_structures_from_the_training_config(models):
    held = models[1].config.training
    assert generalisation.unseen_structures(held) == {"la2018": [1]}
    both = dataclasses.replace(held, holdout={"btcv": [6, 1]}, dataset_weights={"hippocampus": 0.0})
    assert generalisation.unseen_structures(both) == {"hippocampus": [1, 2], "btcv": [1, 6]}


def test_table_rows_pairs_and_registration_on_the_shifted_pairs(models, root, monkeypatch):
    seg, held = models
    warped = []

    def identity(ref_image, ref_affine, ref_label, qry_image, qry_affine):
        warped.append(qry_image.shape)
        return np.zeros(qry_image.shape, np.int32), 0.0

    monkeypatch.setattr(generalisation, "register_and_warp", identity)
    # the whole field of view: registration (Greedy) is not bit-reproducible, and two rows are compared for equality
    records = generalisation.evaluate(seg, held, root, pairs=2, options={"localise": "none"})
    n_shifts = 1 + len(shifts.INTENSITY) + len(shifts.GEOMETRY)
    assert len(records) == 2 * n_shifts == len(warped)
    assert [(r["query"], r["reference"]) for r in records[:2]] == [("A", "B"), ("B", "C")]
    geo = [r for r in records if r["section"] == "unseen site/geometry"]
    assert {w for w in warped[-len(geo):]} != {(24, 24, 20)}  # registration ran on the resliced queries
    for r in records:
        assert set(r["dice"]) == {"shifted", "baseline", "registration"} and r["dice"]["registration"] == {"1": 0.0}
    lines = generalisation.table(records).splitlines()
    assert len(lines) == 2 + n_shifts and all(line.count("|") == 9 for line in lines)
    assert lines[2].startswith("| unseen classes | la2018 | left atrium (unseen (held-out model) vs seen (product model)) |")
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[5] == f"{100 * (float(cells[3]) - float(cells[4])):+.1f}" and cells[6] == "0.000" and cells[7] == "2"
    # the same weights for "held-out" and "product": the unseen-class rows cannot differ
    assert cells[3] == cells[4]
    text = generalisation.verdict(records)
    assert text.startswith("Targets: unseen-class mean ") and re.search(rf"beats registration on \d+ of {n_shifts} rows", text)
    assert "No --holdout-model" in generalisation.caption(seg, None, 2)


def test_no_registration_column_when_not_asked(models, root):
    records = generalisation.evaluate(models[0], None, root, pairs=1, options={}, registration=False)
    assert {r["section"] for r in records} == {"unseen modality", "unseen site/geometry"}
    assert all(set(r["dice"]) == {"shifted", "baseline"} for r in records)
    assert all(line.endswith("| – | 1 |") for line in generalisation.table(records).splitlines()[2:])
