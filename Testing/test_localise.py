"""Localisation (registration prior), the engine's public stages, and post-processing on arrays.

Registration runs the real Greedy (picsl-greedy) in its child process on analytic phantoms: an image defined
in world coordinates, sampled on each grid, so every grid shows exactly the same anatomy."""
from __future__ import annotations

import dataclasses
import time
import warnings

import numpy as np
import psutil
import pytest
import torch

from conftest import REPO_ROOT, dice, ellipsoid_mask, make_affine, rot_x, rot_y, rot_z, voxel_world
from IrisSegmentLib import Cancelled, IrisInputError, Segmenter, TaskEmbedding
from IrisSegmentLib.inference import greedy as greedy_module
from IrisSegmentLib.inference import localise as localise_module
from IrisSegmentLib.inference.body import grown_box
from IrisSegmentLib.inference.localise import block_factor, body_box, coarse_affine, coarsen
from IrisSegmentLib.inference.postprocess import pieces, postprocess

SHARED = REPO_ROOT.parent / "shared" / "data"
STRUCTURE = ((12.0, -6.0, 4.0), (13.0, 9.0, 7.0))  # world centre, radii (mm)


def phantom(shape, affine, shift=(0.0, 0.0, 0.0), scale=1.0):
    """A textured 'body' (sphere of 45 mm, three blobs) and one ellipsoid structure, moved by `shift` mm
    and scaled by `scale` about the origin; (image, structure mask)."""
    w = (voxel_world(shape, affine) - np.asarray(shift)) / scale
    r = np.linalg.norm(w, axis=-1)
    img = 100.0 * (r < 45)
    for c, s, a in (((-20, 10, 0), 9, 300), ((5, 25, -10), 7, 200), ((-5, -25, 15), 10, 150)):
        img += a * np.exp(-((w - np.asarray(c)) ** 2).sum(-1) / (2 * s**2))
    centre, radii = STRUCTURE
    mask = ellipsoid_mask(shape, make_affine(affine[:3, :3] / scale, (affine[:3, 3] - np.asarray(shift)) / scale), centre, radii)
    img += 250.0 * mask
    return img.astype(np.float32), mask


REF_AFFINE = make_affine(rot_z(20) @ np.diag([1.2, 1.2, 3.0]), [-50.0, -48.0, -55.0])  # oblique, anisotropic
TARGET_AFFINE = make_affine(rot_x(-12) @ rot_y(8) @ np.diag([1.6, 1.4, 1.5]), [-58.0, -50.0, -52.0])


@pytest.fixture(scope="module")
def seg(tiny_cfg):
    from conftest import OracleModel

    return Segmenter(OracleModel(), tiny_cfg, "cpu")


@pytest.fixture(scope="module")
def reference(seg):
    img, mask = phantom((80, 80, 36), REF_AFFINE)
    return img, REF_AFFINE, mask.astype(np.uint8)


@pytest.fixture(scope="module")
def task(seg, reference):
    return seg.encode(*reference, confidence=False)


def target_truth_on_working_grid(prepared, shape, affine, **kw) -> np.ndarray:
    """The structure of `phantom(shape, affine, **kw)` sampled on the target's working grid."""
    return phantom(prepared.work.shape[1:], prepared.grid.working_affine, **kw)[1]


def test_registration_keeps_world_positions_on_oblique_anisotropic_grids(seg, task):
    shape, kw = (72, 80, 70), {"shift": (6.0, -5.0, 4.0), "scale": 1.08}
    img, _ = phantom(shape, TARGET_AFFINE, **kw)
    target = seg.prepare(img, TARGET_AFFINE)
    messages = []
    loc = seg.localise(target, task, "registration", progress=lambda f, m: messages.append(m))
    assert loc.method == "registration" and loc.warnings == []
    truth = target_truth_on_working_grid(target, shape, TARGET_AFFINE, **kw)
    prior = loc.prior[0].numpy() >= 0.5
    assert dice(prior, truth) > 0.75  # an 8 % scaling and a shift, on smooth anatomy, with a 3 mm blur
    world = lambda m: voxel_world(m.shape, target.grid.working_affine)[m].mean(0)  # noqa: E731
    assert np.linalg.norm(world(prior) - world(truth)) < 2.0  # mm
    assert loc.region[torch.from_numpy(truth)].all()  # windows cover the whole structure
    assert any("registering" in m for m in messages)


def test_registration_is_the_same_on_every_run(seg, task):
    """Greedy's random image noise and sample jitter are off and its affine stages run on one thread: a pair
    registers the same way every time (it did not: now and then into a wrong minimum)."""
    img, _ = phantom((72, 80, 70), TARGET_AFFINE, shift=(6.0, -5.0, 4.0), scale=1.08)
    target = seg.prepare(img, TARGET_AFFINE)
    first, second = (seg.localise(target, task, "registration") for _ in range(2))
    assert first.method == second.method == "registration"
    assert np.abs(first.warped - second.warped).max() < 0.02 and first.inside == pytest.approx(second.inside, abs=1e-3)


def test_inside_is_the_share_of_the_structures_in_the_targets_field_of_view(seg, task, reference):
    """A target that shows half of the reference's structure: the registration says half of it landed inside."""
    img, aff, mask = reference
    nz = np.argwhere(mask)
    cut = int(np.median(nz[:, 0]))
    target = seg.prepare(img[:cut], aff)
    fixed = (target.work[0].numpy(), target.grid.working_affine)
    atlas = task.atlases[0]
    _, warped, _, inside, each = localise_module.run_greedy(fixed, atlas, seg.config.localise, "ncc", 2, lambda f, m: None, None)
    assert 0.35 < inside < 0.65 and each == [pytest.approx(inside)]  # one structure: its share is the whole share
    _, _, _, whole, _ = localise_module.run_greedy((seg.prepare(img, aff).work[0].numpy(), seg.prepare(img, aff).grid.working_affine),
                                                atlas, seg.config.localise, "ncc", 2, lambda f, m: None, None)
    assert whole > 0.9


def test_a_failed_affine_is_retried_as_a_similarity_transform(seg, task, monkeypatch):
    real = localise_module.register
    calls = []

    def register(*args, dof=12, start="intensity", **kw):
        calls.append((dof, start))
        out = real(*args, dof=dof, start=start, **kw)
        return out if dof == 7 else (*out[:3], "registration scaled volumes by 9 (as if)")

    monkeypatch.setattr(localise_module, "register", register)
    img, _ = phantom((72, 80, 70), TARGET_AFFINE, shift=(6.0, -5.0, 4.0))
    messages = []
    loc = seg.localise(seg.prepare(img, TARGET_AFFINE), task, "registration", progress=lambda f, m: messages.append((f, m)))
    assert calls == [(12, "intensity"), (7, "intensity")] and loc.method == "registration" and loc.warnings == []
    assert any("again with a similarity transform" in m for _, m in messages)
    assert [f for f, _ in messages] == sorted(f for f, _ in messages)  # progress never goes back


def test_then_started_from_the_image_edges_and_else_the_first_problem_is_said(seg, task, monkeypatch):
    """An inverted contrast pulls the intensity-weighted moments start off: the last try starts from the gradient
    magnitude of both images (the same for a contrast and its inverse); where every try fails, the first one's
    problem is said."""
    real = localise_module.register
    calls = []

    def register(*args, dof=12, start="intensity", **kw):
        calls.append((dof, start))
        out = real(*args, dof=dof, start=start, **kw)
        return out if start == "edges" else (*out[:3], f"registration scaled volumes by {dof} (as if)")

    monkeypatch.setattr(localise_module, "register", register)
    img, _ = phantom((72, 80, 70), TARGET_AFFINE, shift=(6.0, -5.0, 4.0))
    messages = []
    loc = seg.localise(seg.prepare(img, TARGET_AFFINE), task, "registration", progress=lambda f, m: messages.append((f, m)))
    assert calls == [(12, "intensity"), (7, "intensity"), (12, "edges")] and loc.method == "registration"
    assert any("again from the image edges" in m for _, m in messages)
    assert [f for f, _ in messages] == sorted(f for f, _ in messages) and messages[-1][0] <= 1.0

    monkeypatch.setattr(localise_module, "register", lambda *a, dof=12, start="intensity", **kw: (
        *real(*a, dof=dof, start=start, **kw)[:3], f"problem of the {dof}-dof {start} try"))
    loc = seg.localise(seg.prepare(img, TARGET_AFFINE), task, "registration")
    assert loc.method == "none" and any("problem of the 12-dof intensity try" in w for w in loc.warnings)
    assert not any("edges try" in w for w in loc.warnings)


def test_a_target_showing_a_small_part_of_the_reference_starts_from_the_translation_search(seg, task, monkeypatch):
    """A 48 mm crop around the structure holds a tenth of the reference's field of view: the centres of mass are
    different anatomy (from them every try is refused), so the first try starts from the translation search
    (`search.py`) and finds the structure."""
    real = localise_module.register
    calls = []

    def register(*args, dof=12, start="intensity", **kw):
        calls.append((dof, start))
        return real(*args, dof=dof, start=start, **kw)

    monkeypatch.setattr(localise_module, "register", register)
    affine = make_affine(rot_z(-7) @ np.diag([1.5, 1.5, 1.5]), np.asarray(STRUCTURE[0]) - 24.0)
    img, _ = phantom((32, 32, 32), affine)
    target = seg.prepare(img, affine)
    loc = seg.localise(target, task, "registration")
    assert calls == [(12, "search")] and loc.method == "registration"
    truth = target_truth_on_working_grid(target, (32, 32, 32), affine)
    assert dice(loc.warped_masks()[0].numpy() > 0.5, truth) > 0.75
    centres = dataclasses.replace(seg.config, localise=dataclasses.replace(seg.config.localise, search_fov_ratio=0.0))
    calls.clear()
    assert Segmenter(seg.model, centres, "cpu").localise(target, task, "registration").method == "none"
    assert calls == [(12, "intensity"), (7, "intensity"), (12, "edges")]


def test_localised_segment_runs_windows_only_near_the_prior(seg, task):
    """The oracle 'network' fires on every bright blob; localised, nothing is found outside the prior's region,
    and with the prior's weight at 1 the result is the registration's."""
    img, _ = phantom((72, 80, 70), TARGET_AFFINE, shift=(6.0, -5.0, 4.0))
    full = seg.segment(img, TARGET_AFFINE, task, localise="none", confidence=False, postprocess=False)
    local = seg.segment(img, TARGET_AFFINE, task, localise="registration", confidence=False, keep_prior=True, postprocess=False)
    assert local.localisation == "registration" and full.localisation == "none"
    assert local.windows < full.windows
    assert local.prior.shape == (1, *img.shape) and local.prior.dtype == np.float16
    assert set(local.stage_seconds) == {"prepare", "localise", "windows", "merge", "label map", "post-process"}
    assert local.stage_seconds["localise"] > 0 and full.stage_seconds["localise"] < 0.1
    truth = phantom(img.shape, TARGET_AFFINE, shift=(6.0, -5.0, 4.0))[1]
    assert (local.label_map == 1).sum() < (full.label_map == 1).sum() / 2
    from scipy.ndimage import distance_transform_edt

    far = distance_transform_edt(local.prior[0] < 0.05, sampling=(1.6, 1.4, 1.5)) > seg.config.localise.margin_mm * 3**0.5 + 3.0  # a cube
    assert far.any() and not (local.label_map[far] == 1).any()  # nothing beyond the margin around the prior
    only_prior = Segmenter(seg.model, dataclasses.replace(seg.config, localise=dataclasses.replace(
        seg.config.localise, prior_weight=1.0, merge_sigma_depth=0.0)), "cpu")  # the merge's prior is then the one kept
    registered = only_prior.segment(img, TARGET_AFFINE, task, localise="registration", confidence=False, keep_prior=True)
    assert np.array_equal(registered.label_map == 1, registered.prior[0] >= 0.5) or dice(registered.label_map == 1, registered.prior[0] >= 0.5) > 0.98
    assert dice(registered.label_map == 1, truth) > 0.6


def test_a_scan_inside_a_large_empty_field_is_found_normalised_and_segmented_on_its_own(seg, task):
    """The target's body box is found on the raw scan, before normalisation: MR percentiles of a mostly empty field
    would otherwise clip the scan flat. The label map comes back on the whole field, the structure in place."""
    img, truth = phantom((72, 80, 70), TARGET_AFFINE, shift=(6.0, -5.0, 4.0))
    at, shape = (150, 30, 90), (300, 150, 260)
    rng = np.random.default_rng(0)
    field = np.abs(rng.normal(0.0, 5.0, shape)).astype(np.float32)
    box = tuple(slice(a, a + n) for a, n in zip(at, img.shape))
    field[box] = img
    affine = TARGET_AFFINE.copy()
    affine[:3, 3] -= TARGET_AFFINE[:3, :3] @ np.asarray(at, dtype=np.float64)
    found = seg.body(field, affine)
    nz = np.argwhere(truth) + np.asarray(at)
    assert all(f.start <= lo and f.stop > hi for f, lo, hi in zip(found, nz.min(0), nz.max(0)))  # the structure is in
    assert np.prod([f.stop - f.start for f in found]) < 0.1 * field.size
    res = seg.segment(field, affine, task, confidence=False, postprocess=False, keep_prior=True)
    assert res.localisation == "registration" and res.label_map.shape == res.prior.shape[1:] == shape
    whole_truth = np.zeros(shape, bool)
    whole_truth[box] = truth
    assert dice(res.prior[0] >= 0.5, whole_truth) > 0.65  # registered in place
    outside = np.ones(shape, bool)
    outside[box] = False
    assert not res.label_map[outside].any()
    # why: normalised over the whole field (mostly noise) the scan's intensities depend on the field (clipped flat,
    # or, as here, stretched by the noise's small spread); over its body box they are as if it were given alone
    from IrisSegmentLib.inference.body import crop_affine

    def structure_contrast(prepared):
        inside = target_truth_on_working_grid(prepared, None, prepared.grid.working_affine, shift=(6.0, -5.0, 4.0))
        w = prepared.work[0].numpy()
        return float(w[inside].mean() - w[~inside].mean())

    alone = structure_contrast(seg.prepare(img, TARGET_AFFINE))
    assert abs(structure_contrast(seg.prepare(field[found], crop_affine(affine, found))) - alone) < 0.25 * alone
    assert abs(structure_contrast(seg.prepare(field, affine)) - alone) > alone


def test_unlocalised_segment_is_not_cropped(seg, task, monkeypatch):
    """--localise none is the engine of before: the whole field of view, no body box."""
    img, _ = phantom((40, 44, 36), TARGET_AFFINE)
    before = seg.segment(img, TARGET_AFFINE, task, localise="none", confidence=False, postprocess=False)

    def no_body(*a):
        raise AssertionError("body box looked for without localisation")

    monkeypatch.setattr(seg, "body", no_body)
    again = seg.segment(img, TARGET_AFFINE, task, localise="none", confidence=False, postprocess=False)
    assert np.array_equal(again.label_map, before.label_map)
    with pytest.raises(AssertionError, match="body box"):
        seg.segment(img, TARGET_AFFINE, task, localise="registration", confidence=False)


def test_auto_without_reference_image_or_engine_falls_back(seg, task, monkeypatch):
    img, _ = phantom((40, 40, 40), TARGET_AFFINE)
    bare = TaskEmbedding(task.tokens, task.labels, model_id=task.model_id)  # like a memory-bank task
    with pytest.warns(UserWarning, match="no reference image"):
        res = seg.segment(img, TARGET_AFFINE, bare, confidence=False)
    assert res.localisation == "none"
    with pytest.raises(IrisInputError, match="no reference image"):
        seg.segment(img, TARGET_AFFINE, bare, localise="registration")
    monkeypatch.setattr(localise_module.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.warns(UserWarning, match="picsl-greedy"):
        assert seg.segment(img, TARGET_AFFINE, task, confidence=False).localisation == "none"
    with pytest.raises(IrisInputError, match="pip install picsl-greedy"):
        seg.segment(img, TARGET_AFFINE, task, localise="registration")
    with pytest.raises(IrisInputError, match="unknown localise mode"):
        seg.segment(img, TARGET_AFFINE, task, localise="atlas")


@pytest.mark.skipif(not (SHARED / "la2018" / "val").is_dir(), reason="needs ../shared/data")
@pytest.mark.parametrize("reference, found", [("hippocampus", False), ("la2018", True)])
def test_reference_of_another_region_is_flagged_and_falls_back(seg, reference, found):
    """Real scans: a hippocampus crop (brain MR) as the reference of a left-atrium scan (heart MR) is flagged and
    the whole field of view is segmented; another left atrium registers."""
    from IrisSegmentLib.io import read_image

    la = sorted((SHARED / "la2018" / "val").glob("*_image.nii.gz"))
    ref_image = SHARED / "msd_hippocampus" / "hippocampus_001_image.nii.gz" if reference == "hippocampus" else la[1]
    img, aff, _ = read_image(ref_image)
    lab, _, _ = read_image(str(ref_image).replace("_image.nii.gz", "_label.nii.gz"))
    task = seg.encode(img, aff, np.rint(lab), confidence=False)
    timg, taff, _ = read_image(la[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = seg.segment(timg, taff, task, confidence=False)
    assert res.localisation == ("registration" if found else "none")
    if not found:
        assert any("another body region" in w for w in res.warnings)
        assert any("whole field of view" in str(c.message) for c in caught)


def test_cancel_during_registration_stops_the_child_at_once(seg, task):
    img, _ = phantom((72, 80, 70), TARGET_AFFINE, shift=(6.0, -5.0, 4.0))
    target = seg.prepare(img, TARGET_AFFINE)
    before = {p.pid for p in psutil.Process().children(recursive=True)}  # e.g. workers of earlier tests
    t0 = time.monotonic()
    started = []

    def cancel() -> bool:
        started.extend(p.pid for p in psutil.Process().children(recursive=True) if p.pid not in before)
        return time.monotonic() - t0 > 0.5

    with pytest.raises(Cancelled):
        seg.localise(target, task, "registration", cancel=cancel)
    assert time.monotonic() - t0 < 3.0
    assert started, "the registration child never started"
    assert not [p for p in psutil.Process().children(recursive=True) if p.pid in started]


def test_failed_greedy_is_a_warning_not_a_traceback(seg, task, monkeypatch, tmp_path):
    bad = tmp_path / "greedy_job.py"
    bad.write_text("print('error: Unknown parameter -bogus', flush=True)\nraise SystemExit(1)\n")
    monkeypatch.setattr(greedy_module, "JOB", bad)
    img, _ = phantom((40, 40, 40), TARGET_AFFINE)
    with pytest.warns(UserWarning, match="registration failed: Unknown parameter -bogus"):
        res = seg.segment(img, TARGET_AFFINE, task, confidence=False)
    assert res.localisation == "none" and any("whole field of view" in w for w in res.warnings)


def test_task_file_carries_the_reference_for_registration(seg, task, tmp_path):
    task.save(tmp_path / "t.safetensors")
    back = TaskEmbedding.load(tmp_path / "t.safetensors")
    assert len(back.atlases) == 1 and back.atlases[0].labels == task.labels
    a, b = task.atlases[0], back.atlases[0]
    assert np.allclose(a.affine, b.affine) and np.abs(a.image - b.image).max() < 0.01 and np.abs(a.masks - b.masks).max() <= 1 / 255
    both = TaskEmbedding.ensemble([task, back])
    assert len(both.atlases) == 2  # multi-atlas: the priors are averaged
    assert both.select(task.labels).atlases[0].masks.shape[0] == 1


def test_body_box_finds_a_scan_in_a_large_noisy_field():
    rng = np.random.default_rng(0)
    field = np.abs(rng.normal(0, 0.1, (120, 100, 90))).astype(np.float32)
    field[40:70, 30:55, 20:40] = rng.normal(2.0, 0.5, (30, 25, 20))
    box = body_box(torch.from_numpy(field)[None], 1.5, 0.0)
    lo, hi = [b.start for b in box], [b.stop for b in box]
    assert all(a <= s and b >= e for a, b, s, e in zip(lo, hi, (40, 30, 20), (70, 55, 40)))
    assert all(s - a <= 4 and b - e <= 4 for a, b, s, e in zip(lo, hi, (40, 30, 20), (70, 55, 40)))  # 4x coarse steps
    crop = body_box(torch.from_numpy(field[40:70, 30:55, 20:40].copy())[None], 1.5, 0.0)
    assert [(b.start, b.stop) for b in crop] == [(0, 30), (0, 25), (0, 20)]  # no background: its own box


def test_grown_box_scales_widens_and_clips():
    found = (np.array([2, 0, 5]), np.array([6, 3, 9]))
    assert grown_box(found, 4, 1, (40, 40, 40)) == (slice(7, 25), slice(0, 13), slice(19, 37))
    assert grown_box(found, 4, np.array([0, 2, 9]), (30, 30, 36), slack=4) == (slice(4, 28), slice(0, 18), slice(7, 36))


def test_coarse_grid_maps_back_exactly():
    """Block averaging by f and trilinear upsampling by f (align_corners=False) are the same world grid."""
    work = torch.arange(2 * 9 * 10 * 7, dtype=torch.float32).reshape(2, 9, 10, 7)
    box = (slice(1, 9), slice(2, 10), slice(0, 7))
    f = block_factor([8, 8, 7], 100)
    assert f == 2
    aff = make_affine(np.diag([1.5, 1.5, 1.5]), [3.0, -2.0, 1.0])
    c = coarse_affine(aff, box, f)
    assert np.allclose(c[:3, 3], aff[:3, :3] @ np.array([1.5, 2.5, 0.5]) + aff[:3, 3])  # centre of voxels 1-2, 2-3, 0-1
    coarse = coarsen(work, box, f)
    assert coarse.shape == (2, 4, 4, 4)
    assert torch.isclose(coarse[0, 0, 0, 0], work[0, 1:3, 2:4, 0:2].mean())


def test_postprocess_keeps_the_largest_piece_and_fills_holes():
    lab = np.zeros((30, 30, 30), np.uint8)
    lab[2:12, 2:12, 2:12] = 1
    lab[6, 6, 6] = 0  # a hole
    lab[20:23, 20:23, 20:23] = 1  # a stray piece
    lab[15:25, 2:10, 2:10] = 2
    lab[15:17, 20:22, 20:22] = 2  # a second piece of a structure that has two in the reference
    lab[18:26, 14:19, 14:19] = 3
    lab[21, 16, 16] = 2  # another structure's voxel inside 3: not a hole of 3 to fill over
    before = lab.copy()
    postprocess(lab, [1, 2, 3], [True, False, True])
    assert lab[6, 6, 6] == 1 and not (lab[20:23, 20:23, 20:23] == 1).any()
    assert (lab[15:17, 20:22, 20:22] == 2).all()  # kept: the reference's structure 2 is in two pieces
    assert lab[21, 16, 16] == 2 and ((lab == 3) == (before == 3)).all()
    assert pieces(before == 1, 0.0) == 2 and pieces(before == 1) == 1  # fragments < 5 % do not count


def test_postprocess_is_used_and_can_be_left_out(seg, task):
    img, _ = phantom((72, 80, 70), TARGET_AFFINE, shift=(6.0, -5.0, 4.0))
    w = voxel_world(img.shape, TARGET_AFFINE)
    img = img + 400.0 * (np.linalg.norm(w - np.array([-30.0, -30.0, -30.0]), axis=-1) < 4)  # a bright stray blob
    raw = seg.segment(img, TARGET_AFFINE, task, localise="none", confidence=False, postprocess=False)
    clean = seg.segment(img, TARGET_AFFINE, task, localise="none", confidence=False)
    assert pieces(raw.label_map == 1, 0.0) > 1 and pieces(clean.label_map == 1, 0.0) == 1
    assert task.references[0]["pieces"] == 1.0


def test_a_class_the_network_cannot_do_gets_the_registration_refined_by_appearance(seg, task):
    """Where the network segments its own reference crop worse than `min_self_dice`, the class is the warped masks
    (the oracle's bright blobs do not leak in), refined by the target's intensities (`appearance.py`: at least as
    close to the truth), or as warped with `appearance_iterations` 0; a trusted class mixes network and prior."""
    from IrisSegmentLib.inference.labelmap import to_label_map

    img, _ = phantom((72, 80, 70), TARGET_AFFINE, shift=(6.0, -5.0, 4.0))
    truth = phantom((72, 80, 70), TARGET_AFFINE, shift=(6.0, -5.0, 4.0))[1]
    weak = TaskEmbedding(task.tokens, task.labels, model_id=task.model_id, references=[{"self_dice": 0.1}], atlases=task.atlases)
    strong = TaskEmbedding(task.tokens, task.labels, model_id=task.model_id, references=[{"self_dice": 0.9}], atlases=task.atlases)
    assert seg.trusted(weak) == [False] and seg.trusted(strong) == [True]
    target = seg.prepare(img, TARGET_AFFINE)
    loc = seg.localise(target, weak, "registration")
    registered = to_label_map(loc.warped_masks(), target.grid, task.labels, 0.5)
    refined = seg.segment(img, TARGET_AFFINE, weak, localise="registration", confidence=False, postprocess=False)
    assert dice(refined.label_map == 1, truth) >= dice(registered == 1, truth) - 0.01
    as_warped = Segmenter(seg.model, dataclasses.replace(seg.config, localise=dataclasses.replace(
        seg.config.localise, appearance_iterations=0)), "cpu")
    res = as_warped.segment(img, TARGET_AFFINE, weak, localise="registration", confidence=False, postprocess=False)
    assert dice(res.label_map == 1, registered == 1) > 0.95  # two registrations: Greedy threads round differently
    mixed = seg.segment(img, TARGET_AFFINE, strong, localise="registration", confidence=False, postprocess=False)
    assert (mixed.label_map == 1).sum() > (res.label_map == 1).sum()  # the oracle fires beyond the prior's core
    assert refined.windows == res.windows == 0 and mixed.windows > 0  # no window for a structure that takes the masks


def test_windows_run_only_where_a_trusted_structure_can_be():
    """`Localisation.region_of`: the dilated prior of the given classes only; all of them is `region`, none is empty."""
    from IrisSegmentLib.inference.localise import Localisation, dilate

    prior = torch.zeros((2, 60, 40, 40))
    prior[0, 5:15, 15:25, 15:25] = 1.0
    prior[1, 45:55, 15:25, 15:25] = 1.0
    whole = (slice(0, 60), slice(0, 40), slice(0, 40))
    loc = Localisation(prior, dilate(prior.amax(0) > 0.05, 4, whole), "registration", [], [1.0], [1.0], 0.0, None, whole, 1)
    first = loc.region_of([0], 6.0, 1.5)  # 6 mm at 1.5 mm: 4 voxels
    assert first[5:15, 15:25, 15:25].all() and first[1:19, 11:29, 11:29].all() and not first[20:].any()
    assert torch.equal(loc.region_of([0, 1], 6.0, 1.5), loc.region) and not loc.region_of([], 6.0, 1.5).any()


def test_command_line_localises_and_saves_the_prior(reference, tiny_model_dir, tmp_path, capsys):
    from conftest import read_nifti, write_nifti
    from IrisSegmentLib.cli import main

    img, aff, lab = reference
    write_nifti(tmp_path / "ref.nii.gz", img, aff)
    write_nifti(tmp_path / "ref_label.nii.gz", lab, aff)
    timg, _ = phantom((72, 80, 70), TARGET_AFFINE, shift=(6.0, -5.0, 4.0))
    write_nifti(tmp_path / "target.nii.gz", timg, TARGET_AFFINE)
    args = ["segment", "--reference-image", str(tmp_path / "ref.nii.gz"), "--reference-label", str(tmp_path / "ref_label.nii.gz"),
            "--target", str(tmp_path / "target.nii.gz"), "--output", str(tmp_path / "out.nii.gz"), "--model", str(tiny_model_dir),
            "--device", "cpu", "--localise", "registration", "--save-prior", str(tmp_path / "prior.nii.gz")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "localised by registration" in out and "prior.nii.gz" in out
    prior, prior_aff = read_nifti(tmp_path / "prior.nii.gz")[:2]
    assert prior.shape == (72, 80, 70, 1) and np.allclose(prior_aff, TARGET_AFFINE, atol=1e-4)
    truth = phantom((72, 80, 70), TARGET_AFFINE, shift=(6.0, -5.0, 4.0))[1]
    assert dice(prior[..., 0] >= 0.5, truth) > 0.7  # blurred 3 mm: thinner at 0.5 than the structure
    assert main(args) == 2  # the prior file is the user's now: not replaced without --overwrite
    assert "exists" in capsys.readouterr().err
    assert main([*args[:-4], "--localise", "none"] + ["--overwrite"]) == 0
    assert "whole field of view" in capsys.readouterr().out


def test_pyramid_drops_levels_that_small_images_cannot_have():
    """Greedy's coarsest levels halve the grid: on a small image they would fall below ITK's four voxels (its
    Gaussian then fails with an ITK error); they are dropped, and an image thinner than NCC's patch is said."""
    from IrisSegmentLib.config import LocaliseConfig
    from IrisSegmentLib.inference.greedy import greedy_commands, pyramid

    assert pyramid("100x50x20", 64) == "100x50x20"  # 16 voxels at the coarsest level
    assert pyramid("100x50x20", 12) == "50x20"  # 3 at a quarter, 6 at a half
    assert pyramid("100x50x0", 5) == "0"
    cfg = LocaliseConfig()
    assert "-n 50x0 " in dict(greedy_commands(cfg, "ncc", 1, shortest=12))["rigid"]
    with pytest.raises(RuntimeError, match=f"only 8 voxel.*fewer than the {2 * cfg.ncc_radius + 1}"):
        greedy_commands(cfg, "ncc", 1, shortest=8)
    assert greedy_commands(cfg, "nmi", 1, shortest=8)  # NMI compares no patches


def test_a_crop_passes_the_inside_check_when_one_structure_lies_whole_in_it(task, monkeypatch):
    """A crop around one organ of a whole-abdomen reference holds a third of the structures' volume but all of that
    organ: from the search start it passes; from the moments (like fields of view) the 50 % rule stands; a share
    above 1.1 (a structure almost wholly outside both grids, interpolated) does not count."""
    from IrisSegmentLib.config import LocaliseConfig

    image = np.random.default_rng(0).random((24, 24, 24)).astype(np.float32)
    warped = np.zeros((2, 24, 24, 24), np.float32)
    warped[0, 8:16, 8:16, 8:16] = 1.0

    def outcome(start: str, each: list[float]) -> str | None:
        monkeypatch.setattr(localise_module, "run_greedy", lambda *a, **k: (image, warped, np.eye(4), 0.3, each))
        return localise_module.register((image, np.eye(4)), task.atlases[0], LocaliseConfig(), "ncc", 1,
                                        lambda f, m: None, None, start=start)[3]

    assert outcome("search", [0.95, 0.05]) is None
    assert "only 30%" in outcome("intensity", [0.95, 0.05])
    assert "only 30%" in outcome("search", [0.85, 0.05]) and "only 30%" in outcome("search", [148.0, 0.05])


def test_the_search_start_replaces_the_moments_stage():
    from IrisSegmentLib.config import LocaliseConfig
    from IrisSegmentLib.inference.greedy import greedy_commands

    stages = greedy_commands(LocaliseConfig(), "ncc", 1, start="search")
    assert [n for n, _ in stages][:2] == ["rigid", "affine"] and "-ia search.mat" in stages[0][1]
    assert "-ia moments.mat" in dict(greedy_commands(LocaliseConfig(), "ncc", 1))["rigid"]
    with pytest.raises(ValueError, match="search_fov_ratio"):
        LocaliseConfig(search_fov_ratio=1.5).validate()


def test_the_deformable_stage_compares_its_own_patch_size():
    """The rigid and affine stages compare (2 ncc_radius + 1)^3 patches, the deformable one its own radius's."""
    from IrisSegmentLib.config import LocaliseConfig
    from IrisSegmentLib.inference.greedy import greedy_commands

    stages = dict(greedy_commands(LocaliseConfig(ncc_radius=4, deformable_ncc_radius=2), "ncc", 1))
    assert "-m NCC 4x4x4 " in stages["rigid"] and "-m NCC 4x4x4 " in stages["affine"]
    assert "-m NCC 2x2x2 " in stages["deformable"]
    with pytest.raises(ValueError, match="deformable_ncc_radius"):
        LocaliseConfig(deformable_ncc_radius=0).validate()


def test_the_merge_blurs_each_structure_in_proportion_to_its_depth():
    """A thin structure's warped mask is blurred less than a thick one's in the merge's prior (the network's prior
    input keeps `prior_sigma_mm`); `merge_sigma_depth` 0 gives that input prior back."""
    from IrisSegmentLib.config import LocaliseConfig
    from IrisSegmentLib.inference.localise import Localisation, mean_depth_mm

    grid = np.indices((48, 48, 48)).astype(np.float32)
    small = (((grid - np.array([12, 24, 24])[:, None, None, None]) ** 2).sum(0) <= 3**2).astype(np.float32)
    large = (((grid - np.array([32, 24, 24])[:, None, None, None]) ** 2).sum(0) <= 12**2).astype(np.float32)
    warped = np.stack([small, large])
    depths = mean_depth_mm(warped, 1.5)
    assert 0 < depths[0] < depths[1] / 2 and mean_depth_mm(np.zeros((1, 4, 4, 4)), 1.5) == [0.0]
    prior = torch.zeros((2, 48, 48, 48))
    loc = Localisation(prior, prior[0] >= 0, "registration", [], [0.9], [1.0], 0.0, warped, (slice(0, 48),) * 3, 1)
    merged = loc.merge_prior(LocaliseConfig(), 1.5).numpy()
    assert merged.shape == (2, 48, 48, 48)
    assert merged[0, 12, 24, 24] > 0.85 and merged[1, 32, 24, 24] > 0.99  # the cores kept
    outside = 2  # voxels beyond each boundary, along the first axis
    assert merged[1, 32 - 12 - outside, 24, 24] > merged[0, 12 + 3 + outside, 24, 24] + 0.05
    assert loc.merge_prior(LocaliseConfig(merge_sigma_depth=0.0), 1.5) is prior
    only_large = loc.merge_prior(LocaliseConfig(), 1.5, [1]).numpy()
    assert not only_large[0].any() and np.allclose(only_large[1], merged[1])
    with pytest.raises(ValueError, match="merge_sigma_depth"):
        LocaliseConfig(merge_sigma_depth=-1.0).validate()
