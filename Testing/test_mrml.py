"""IrisSegmentLib.mrml against a real MRML scene (the `slicer-core` wheel, no Qt, no Slicer application).

The scene is set up as trame-slicer's SlicerApp does: scene + application logic + segmentations logic.
Volumes have oblique, anisotropic IJK-to-RAS matrices (one under a linear transform); the reference
segmentation has a third geometry of its own, a shared labelmap and a parent transform. The engine
runs with an oracle (BandOracle: keeps the intensity band of each reference structure, so positions
can be checked) and with the tiny network (seeded random weights, not a trained model: mechanics only).
"""
from __future__ import annotations

import dataclasses
import threading
import time
import warnings

import numpy as np
import pytest
import torch

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install 'slicer-core>=5.13') for a real MRML scene")
vtk = pytest.importorskip("vtk")
from vtk.util import numpy_support  # noqa: E402

from conftest import TINY_CONFIG, dice, make_affine, rot_x, rot_y, rot_z, voxel_world  # noqa: E402

from IrisSegmentLib import mrml  # noqa: E402
from IrisSegmentLib.config import BundleConfig  # noqa: E402
from IrisSegmentLib.errors import Cancelled, IrisInputError  # noqa: E402
from IrisSegmentLib.inference.segmenter import Segmenter  # noqa: E402
from IrisSegmentLib.inference.confidence import Calibration  # noqa: E402
from IrisSegmentLib.inference.task import TaskEmbedding  # noqa: E402

LIVER_TERM = "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^"

# World phantom: (name, centre RAS mm, radius mm, intensity). The target subject is shifted.
STRUCTURES = [("liver", np.array([4.0, -3.0, 2.0]), 11.0, 100.0), ("spleen", np.array([-9.0, 7.0, -4.0]), 8.0, -100.0)]
SHIFT = np.array([3.0, -2.0, 4.0])
COLOURS = {"liver": (0.85, 0.4, 0.3), "spleen": (0.55, 0.2, 0.8)}


# -- scene and geometry helpers ------------------------------------------------------------------
class SlicerCore:
    """Scene + application logic + segmentations logic + subject hierarchy, as trame-slicer's SlicerApp sets them up."""

    def __init__(self):
        from vtkmodules.vtkCommonCore import vtkCollection

        self.scene = slicer.vtkMRMLScene()
        self.app_logic = slicer.vtkSlicerApplicationLogic()
        self.app_logic.SetMRMLScene(self.scene)
        self.app_logic.GetColorLogic().SetMRMLScene(self.scene)
        self.app_logic.GetColorLogic().AddDefaultColorNodes()
        self.app_logic.SetSliceLogics(vtkCollection())
        self.app_logic.SetViewLogics(vtkCollection())
        self.segmentation_logic = slicer.vtkSlicerSegmentationsModuleLogic()
        self.segmentation_logic.SetMRMLScene(self.scene)
        self.segmentation_logic.SetMRMLApplicationLogic(self.app_logic)
        self.app_logic.SetModuleLogic("Segmentations", self.segmentation_logic)
        self.subject_hierarchy_logic = slicer.vtkSlicerSubjectHierarchyModuleLogic()
        self.subject_hierarchy_logic.SetMRMLScene(self.scene)
        self.subject_hierarchy_logic.SetMRMLApplicationLogic(self.app_logic)


def grid(directions: np.ndarray, spacing, shape, centre) -> np.ndarray:
    """IJK-to-RAS with the volume's centre voxel at `centre`."""
    linear = directions @ np.diag(spacing)
    return make_affine(linear, np.asarray(centre) - linear @ ((np.asarray(shape) - 1) / 2))


def truth(shape, ijk_to_world, shift=np.zeros(3)) -> dict[str, np.ndarray]:
    p = voxel_world(shape, ijk_to_world)
    return {n: np.linalg.norm(p - (c + shift), axis=-1) <= r for n, c, r, _ in STRUCTURES}


def phantom(shape, ijk_to_world, shift=np.zeros(3)) -> np.ndarray:
    out = np.zeros(shape, np.int16)
    masks = truth(shape, ijk_to_world, shift)
    for name, _, _, value in STRUCTURES:
        out[masks[name]] = value
    return out


def vtk_matrix(a: np.ndarray):
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, a[r, c])
    return m


def add_volume(scene, name: str, array: np.ndarray, world: np.ndarray, transform=None):
    """A scalar volume whose voxel (i, j, k) = array[i, j, k] lies at `world` @ ijk (through `transform` if given)."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    image = vtk.vtkImageData()
    image.SetDimensions(*array.shape)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(array.transpose(2, 1, 0)).ravel(), deep=True))
    node.SetAndObserveImageData(image)
    local = world
    if transform is not None:
        node.SetAndObserveTransformNodeID(transform.GetID())
        local = np.linalg.inv(mrml.to_world(node)) @ world
    node.SetIJKToRASMatrix(vtk_matrix(local))
    node.CreateDefaultDisplayNodes()
    return node


def add_transform(scene, matrix: np.ndarray):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetMatrixTransformToParent(vtk_matrix(matrix))
    return node


def segment_world_mask(seg_node, segment_id: str, shape, ijk_to_world) -> np.ndarray:
    """A segment resampled onto a world grid (its label value, parent transforms applied)."""
    return mrml.segment_masks(seg_node, [segment_id], shape, ijk_to_world)[0]


def internal_labelmap(seg_node, segment_id: str) -> tuple[np.ndarray, np.ndarray, tuple]:
    rep = seg_node.GetSegmentation().GetSegment(segment_id).GetRepresentation(mrml.BINARY_LABELMAP)
    m = vtk.vtkMatrix4x4()
    rep.GetImageToWorldMatrix(m)
    scalars = rep.GetPointData().GetScalars()
    data = numpy_support.vtk_to_numpy(scalars).copy() if scalars is not None else np.zeros(0)
    return data, mrml.matrix_array(m), tuple(rep.GetExtent())


def centroid(mask: np.ndarray, ijk_to_world: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(mask).mean(0)
    return ijk_to_world[:3, :3] @ ijk + ijk_to_world[:3, 3]


def segment_ids(seg_node) -> list[str]:
    s = seg_node.GetSegmentation()
    return [s.GetNthSegmentID(i) for i in range(s.GetNumberOfSegments())]


class BandOracle:
    """A stand-in network for two structures, one brighter and one darker than the background: the
    task token is the reference structure's mean normalised intensity, and segmentation keeps the
    voxels within `width` of it. Counts how often it encodes."""

    def __init__(self, width: float = 0.9):
        self.width = width
        self.encodes = 0

    def encode_task(self, ref_image: torch.Tensor, ref_masks: torch.Tensor) -> torch.Tensor:
        self.encodes += 1
        m = (ref_masks > 0.5).float()
        mean = (ref_image * m).sum((2, 3, 4)) / m.sum((2, 3, 4)).clamp_min(1)  # (B, K)
        return mean[..., None, None].expand(-1, -1, 2, 4).clone()  # (B, K, m+1, C)

    def segment(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        mu = tokens[:, :, 0, 0][..., None, None, None]  # (1, K, 1, 1, 1)
        return 20 * (self.width - (image - mu).abs())


# -- fixtures ------------------------------------------------------------------------------------
REF_SHAPE, TARGET_SHAPE, SEG_SHAPE = (54, 46, 30), (38, 60, 40), (60, 62, 58)
REF_WORLD = grid(rot_z(20) @ rot_x(15), [0.9, 1.1, 1.6], REF_SHAPE, [-2, 2, -1])
TARGET_WORLD = grid(rot_y(-30) @ rot_x(20) @ np.diag([-1, -1, 1]), [1.3, 0.8, 1.2], TARGET_SHAPE, SHIFT + [-2, 2, -1])  # LPS-like, oblique
SEG_WORLD = grid(np.eye(3), [0.7, 0.7, 0.7], SEG_SHAPE, [-2.5, 1.5, -1.0])
TARGET_TRANSFORM = make_affine(rot_x(10), [5, -4, 3])
SEG_TRANSFORM = make_affine(rot_z(-15), [-3, 2, 1])


@pytest.fixture(scope="module")
def core():
    return SlicerCore()


@pytest.fixture()
def case(core):
    """Reference volume + reference segmentation (own geometry, shared labelmap, parent transform) + target volume."""
    scene = core.scene
    scene.Clear(0)
    ref = add_volume(scene, "reference", phantom(REF_SHAPE, REF_WORLD), REF_WORLD)
    target = add_volume(scene, "target", phantom(TARGET_SHAPE, TARGET_WORLD, SHIFT), TARGET_WORLD, add_transform(scene, TARGET_TRANSFORM))
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reference segmentation")
    seg_node.CreateDefaultDisplayNodes()
    seg_node.SetAndObserveTransformNodeID(add_transform(scene, SEG_TRANSFORM).GetID())
    masks = truth(SEG_SHAPE, SEG_WORLD)
    labels = np.zeros(SEG_SHAPE, np.uint8)
    labels[masks["liver"]] = 1
    labels[masks["spleen"]] = 2
    shared = mrml.oriented_image(labels, np.linalg.inv(SEG_TRANSFORM) @ SEG_WORLD)
    for value, (name, *_rest) in enumerate(STRUCTURES, 1):
        segment = slicer.vtkSegment()
        segment.SetName(name)
        segment.SetColor(*COLOURS[name])
        if name == "liver":
            segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), LIVER_TERM)
        segment.AddRepresentation(mrml.BINARY_LABELMAP, shared)
        segment.SetLabelValue(value)
        seg_node.GetSegmentation().AddSegment(segment, f"ref_{name}")
    assert seg_node.GetSegmentation().GetNumberOfLayers() == 1
    return scene, ref, seg_node, target


@pytest.fixture()
def band_oracle():
    model = BandOracle()
    return model, mrml.Engine(Segmenter(model, BundleConfig.load(TINY_CONFIG), "cpu", model_id="oracle"))


# -- tests ---------------------------------------------------------------------------------------
def test_volume_array_is_ijk_with_world_matrix(case):
    scene, ref, _, target = case
    image, affine = mrml.volume_array(target)
    assert image.shape == TARGET_SHAPE
    np.testing.assert_allclose(affine, TARGET_WORLD, atol=1e-6)
    np.testing.assert_array_equal(image, phantom(TARGET_SHAPE, TARGET_WORLD, SHIFT))
    numpy_support.vtk_to_numpy(target.GetImageData().GetPointData().GetScalars())[:] = 7
    assert image.max() == 100  # a copy: later edits of the volume do not reach a running computation


def test_reference_segments_read_in_reference_geometry(case):
    _, ref, seg_node, _ = case
    reference, infos = mrml.read_reference(ref, seg_node, ["liver", "ref_spleen"])  # a name and an ID
    expected = truth(REF_SHAPE, REF_WORLD)
    assert [i.name for i in infos] == ["liver", "spleen"]
    assert infos[0].terminology == LIVER_TERM
    assert infos[1].terminology == seg_node.GetSegmentation().GetSegment("ref_spleen").GetTerminology()  # Slicer's default
    assert dice(reference.masks[0], expected["liver"]) > 0.95
    assert dice(reference.masks[1], expected["spleen"]) > 0.93
    assert not np.logical_and(*reference.masks).any()  # the shared labelmap is split by label value


def test_oracle_segments_land_at_right_positions_in_target_geometry(case, band_oracle):
    scene, ref, seg_node, target = case
    model, engine = band_oracle
    ids = mrml.segment_volume(target, ref, seg_node, ["liver", "spleen"], None, "cpu", engine=engine, show_3d=True)
    outputs = [n for n in scene.GetNodesByClass("vtkMRMLSegmentationNode") if n is not seg_node]
    assert len(outputs) == 1
    out = outputs[0]
    assert out.GetParentTransformNode() is target.GetParentTransformNode()
    assert out.GetSegmentation().ContainsRepresentation("Closed surface") and out.GetDisplayNode() is not None
    segmentation = out.GetSegmentation()
    assert [segmentation.GetSegment(s).GetName() for s in ids] == ["liver", "spleen"]
    for sid, name in zip(ids, ["liver", "spleen"]):
        assert segmentation.GetSegment(sid).GetColor() == pytest.approx(COLOURS[name])
    tag = vtk.reference("")
    assert segmentation.GetSegment(ids[0]).GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), tag) and str(tag) == LIVER_TERM
    # Stored exactly on the target's grid, in the output's (transformed) coordinates.
    _, matrix, extent = internal_labelmap(out, ids[0])
    np.testing.assert_allclose(matrix, np.linalg.inv(TARGET_TRANSFORM) @ TARGET_WORLD, atol=1e-6)
    assert extent == (0, 37, 0, 59, 0, 39)
    # At the right world positions: compare with the shifted phantom on the target grid.
    expected = truth(TARGET_SHAPE, TARGET_WORLD, SHIFT)
    for sid, (name, centre, _, _) in zip(ids, STRUCTURES):
        got = segment_world_mask(out, sid, TARGET_SHAPE, TARGET_WORLD)
        assert dice(got, expected[name]) > 0.85, name
        np.testing.assert_allclose(centroid(got, TARGET_WORLD), centre + SHIFT, atol=1.0)
    assert model.encodes > 0


def test_existing_segments_untouched_and_name_clash_renamed(case, band_oracle):
    scene, ref, seg_node, target = case
    _, engine = band_oracle
    out = mrml.create_output_segmentation(target, "results")
    old = out.GetSegmentation().AddEmptySegment("", "liver", [0.1, 0.9, 0.1])
    blob = np.zeros((20, 20, 20), np.uint8)
    blob[4:16, 4:16, 4:16] = 1  # overlaps where the new liver will be
    old_world = grid(np.eye(3), [1.5, 1.5, 1.5], [20, 20, 20], STRUCTURES[0][1] + SHIFT)
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        mrml.oriented_image(blob, np.linalg.inv(TARGET_TRANSFORM) @ old_world), out, old, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    before = internal_labelmap(out, old)
    ids = mrml.segment_volume(target, ref, seg_node, None, out, "cpu", engine=engine)
    segmentation = out.GetSegmentation()
    assert segment_ids(out) == [old, *ids]
    assert [segmentation.GetSegment(s).GetName() for s in segment_ids(out)] == ["liver", "liver (2)", "spleen"]
    after = internal_labelmap(out, old)
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_allclose(after[1], before[1])
    assert after[2] == before[2]
    assert segmentation.GetSegment(old).GetColor() == pytest.approx((0.1, 0.9, 0.1))
    assert segment_world_mask(out, old, (20, 20, 20), old_world).sum() == blob.sum()
    # The reference segmentation is untouched too.
    assert segment_ids(seg_node) == ["ref_liver", "ref_spleen"]


def test_cancel_adds_nothing(case, band_oracle):
    scene, ref, seg_node, target = case
    _, engine = band_oracle
    out = mrml.create_output_segmentation(target)
    nodes = scene.GetNumberOfNodes()
    with pytest.raises(Cancelled):
        mrml.segment_volume(target, ref, seg_node, None, out, "cpu", cancel=lambda: True, engine=engine)
    with pytest.raises(Cancelled):
        mrml.segment_volume(target, ref, seg_node, None, None, "cpu", cancel=lambda: True, engine=engine)
    assert out.GetSegmentation().GetNumberOfSegments() == 0
    assert scene.GetNumberOfNodes() == nodes


def _scene_state(scene, out) -> tuple:
    """Node IDs in the scene, and each segment of `out` with its name, colour and stored labelmap."""
    nodes = tuple(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))
    segmentation = out.GetSegmentation()
    segments = []
    for sid in segment_ids(out):
        data, matrix, extent = internal_labelmap(out, sid)
        segment = segmentation.GetSegment(sid)
        segments.append((sid, segment.GetName(), tuple(segment.GetColor()), data.tobytes(), matrix.tobytes(), extent))
    return nodes, tuple(segments)


class SlowOracle(BandOracle):
    """The oracle at `delay` seconds per encoded structure and per batch of windows, so that a caller waiting in 1 ms
    slices sees each step's progress (the worker relays only the latest report of each slice)."""

    def __init__(self, delay: float = 0.02):
        super().__init__()
        self.delay = delay

    def encode_task(self, ref_image, ref_masks):
        time.sleep(self.delay)
        return super().encode_task(ref_image, ref_masks)

    def segment(self, image, tokens):
        time.sleep(self.delay)
        return super().segment(image, tokens)


def small_windows() -> BundleConfig:
    cfg = BundleConfig.load(TINY_CONFIG)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, window=(16, 16, 16)))  # many windows to cancel between


@pytest.mark.parametrize("step", ["loading", "encoding", "tuning", "registration", "windows", "writing"])
def test_cancel_at_every_step_leaves_the_scene_as_it_was(case, tiny_model_dir, step):
    """Cancel, set on the calling thread (as the GUI's Cancel does) when a step's progress arrives, stops in that step
    (no later step starts) and adds nothing: no segment, no node, existing segments as they were."""
    from IrisSegmentLib.progress import step_of
    from IrisSegmentLib.worker import CancelToken

    scene, ref, seg_node, target = case
    model = tiny_model_dir if step == "loading" else Segmenter(SlowOracle(), small_windows(), "cpu", model_id="oracle")
    engine = mrml.Engine(model, wait=lambda: None, slice_s=0.001)
    out = mrml.create_output_segmentation(target, "results")
    old = out.GetSegmentation().AddEmptySegment("", "liver", [0.1, 0.9, 0.1])
    blob = np.zeros((20, 20, 20), np.uint8)
    blob[4:16, 4:16, 4:16] = 1
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        mrml.oriented_image(blob, np.linalg.inv(TARGET_TRANSFORM) @ grid(np.eye(3), [1.5] * 3, [20] * 3, SHIFT)),
        out, old, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    before = _scene_state(scene, out)
    token, steps = CancelToken(), []

    def progress(fraction, message):
        steps.append(step_of(message))
        if steps[-1] == step:
            token.set()

    with pytest.raises(Cancelled):
        mrml.segment_volume(target, ref, seg_node, None, out, "cpu", engine=engine, progress=progress, cancel=token,
                            tuning_steps=3 if step == "tuning" else 0, localise="registration" if step == "registration" else "none")
    first = steps.index(step)
    assert set(steps[first:]) <= {step, "other"}, steps[first:]
    assert _scene_state(scene, out) == before
    token.clear()  # the same call without cancel adds the segments (so the test above could have seen them)
    assert len(mrml.segment_volume(target, ref, seg_node, None, out, "cpu", engine=engine, localise="none")) == 2


def test_progress_is_truthful_over_a_whole_run(case):
    """Every step reports (loading is instant for a model in memory): fractions never go back, each message names a
    known step, in the order the run takes them, and the run ends at 1.0 with "done"."""
    from IrisSegmentLib.progress import step_of

    scene, ref, seg_node, target = case
    engine = mrml.Engine(Segmenter(SlowOracle(), small_windows(), "cpu", model_id="oracle"), wait=lambda: None, slice_s=0.001)
    reports = []
    mrml.segment_volume(target, ref, seg_node, None, None, "cpu", engine=engine, tuning_steps=2, localise="registration",
                        progress=lambda f, m: reports.append((f, m)))
    fractions = [f for f, _ in reports]
    assert fractions == sorted(fractions) and reports[-1] == (1.0, "done")
    steps = [step_of(m) for _, m in reports]
    assert "other" not in steps, [m for (_, m), s in zip(reports, steps) if s == "other"]
    order = list(dict.fromkeys(steps))
    assert order == ["encoding", "tuning", "preparing", "registration", "windows", "finishing", "writing"], order


def test_vtk_and_mrml_only_on_the_main_thread_postprocessing_included(case):
    """Read and write on the calling thread; on the worker (torch, registration, post-processing: largest piece and
    holes, on arrays) not one VTK or MRML call. Every call on new threads is profiled; the worker's torch calls show
    the profiler sees it. A stray blob of liver intensity far from the liver is removed: post-processing ran there."""
    scene, ref, seg_node, target = case
    array = phantom(TARGET_SHAPE, TARGET_WORLD, SHIFT)
    blob = _stray_blob(TARGET_SHAPE, TARGET_WORLD)
    array[blob] = STRUCTURES[0][3]
    stray = add_volume(scene, "target with a stray blob", array, TARGET_WORLD)
    main = threading.get_ident()
    off_main, worker_calls = [], []

    def profile(frame, event, arg):
        if threading.get_ident() == main:
            return
        if event == "c_call":  # a C function or method: VTK/MRML objects are wrapped C++ objects of vtkmodules/slicer_core
            owner = getattr(arg, "__self__", None)
            where = f"{getattr(arg, '__module__', '') or ''} {type(owner).__module__ if owner is not None else ''}"
        elif event == "call" and frame.f_code.co_name != "find_spec":  # vtkmodules' import hook sees every import: not VTK use
            where = frame.f_globals.get("__name__", "")
        else:
            return
        worker_calls.append(where)
        if any(part.startswith(("vtk", "slicer", "MRML")) for part in where.split()):  # vtkmodules.*, slicer_core.*, slicer.util
            off_main.append(where)

    threading.setprofile(profile)
    try:
        engine = mrml.Engine(Segmenter(BandOracle(), BundleConfig.load(TINY_CONFIG), "cpu", model_id="oracle"),
                             wait=lambda: None, slice_s=0.001)  # its worker thread starts now, profiled
        pending = mrml.compute_segments(stray, ref, seg_node, None, "cpu", engine=engine, localise="registration", postprocess=True)
    finally:
        threading.setprofile(None)
    assert off_main == [], sorted(set(off_main))
    assert any("torch" in w for w in worker_calls) and any("postprocess" in w for w in worker_calls)
    assert (pending.label_map[blob] == 0).all()
    out = mrml.create_output_segmentation(stray)
    assert len(mrml.write_segments(pending, out)) == 2


def test_reference_segmentation_outside_the_reference_volume(case, band_oracle):
    scene, ref, seg_node, target = case
    _, engine = band_oracle
    far = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn elsewhere")
    sid = far.GetSegmentation().AddEmptySegment("", "liver", [1, 0, 0])
    blob = np.ones((10, 10, 10), np.uint8)
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        mrml.oriented_image(blob, grid(np.eye(3), [1.0] * 3, [10] * 3, [400.0, 0.0, 0.0])), far, sid,
        slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    empty = far.GetSegmentation().AddEmptySegment("", "kidney", [0, 0, 1])
    out = mrml.create_output_segmentation(target)
    with pytest.raises(IrisInputError, match="'liver' of 'drawn elsewhere' lies outside the reference volume 'reference'") as e:
        mrml.segment_volume(target, ref, far, ["liver"], out, "cpu", engine=engine)
    assert "do not overlap in space" in str(e.value) and "pick the volume it was drawn on" in str(e.value)
    with pytest.raises(IrisInputError, match="'kidney' is empty on 'reference'"):
        mrml.segment_volume(target, ref, far, [empty], out, "cpu", engine=engine)
    assert out.GetSegmentation().GetNumberOfSegments() == 0


def test_errors_add_nothing_and_say_what_to_do(case, band_oracle):
    scene, ref, seg_node, target = case
    _, engine = band_oracle
    out = mrml.create_output_segmentation(target)
    empty = seg_node.GetSegmentation().AddEmptySegment("", "kidney", [0, 0, 1])
    with pytest.raises(IrisInputError, match="'kidney' is empty"):
        mrml.segment_volume(target, ref, seg_node, ["liver", empty], out, "cpu", engine=engine)
    with pytest.raises(IrisInputError, match="'pancreas' is not in"):
        mrml.segment_volume(target, ref, seg_node, ["pancreas"], out, "cpu", engine=engine)
    grid_transform = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    target.SetAndObserveTransformNodeID(grid_transform.GetID())
    with pytest.raises(IrisInputError, match="non-linear transform .* harden"):
        mrml.segment_volume(target, ref, seg_node, None, out, "cpu", engine=engine)
    assert out.GetSegmentation().GetNumberOfSegments() == 0


def test_write_failure_rolls_back(case, band_oracle):
    _, ref, seg_node, target = case
    _, engine = band_oracle
    pending = mrml.compute_segments(target, ref, seg_node, None, "cpu", engine=engine)
    out = mrml.create_output_segmentation(target)
    calls = []

    def add(node, name, colour, labelmap):
        if calls:
            raise RuntimeError("disk full")
        calls.append(name)
        return node.GetSegmentation().AddEmptySegment("", name, colour)

    with pytest.raises(RuntimeError, match="disk full"):
        mrml.write_segments(pending, out, add=add)
    assert calls == ["liver"] and out.GetSegmentation().GetNumberOfSegments() == 0


def test_add_hook_gets_binary_labelmaps_on_target_grid(case, band_oracle):
    """The Segment Editor effect's path: one binary labelmap per segment, in the output's coordinates."""
    _, ref, seg_node, target = case
    _, engine = band_oracle
    pending = mrml.compute_segments(target, ref, seg_node, None, "cpu", engine=engine)
    out = mrml.create_output_segmentation(target)
    seen = {}

    def add(node, name, colour, labelmap):
        seen[name] = internal_labelmap_of(labelmap)
        sid = node.GetSegmentation().AddEmptySegment("", name, colour)
        slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(labelmap, node, sid, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
        return sid

    ids = mrml.write_segments(pending, out, add=add)
    assert list(seen) == ["liver", "spleen"]
    for values, matrix in seen.values():
        assert set(np.unique(values)) <= {0, 1}
        np.testing.assert_allclose(matrix, np.linalg.inv(TARGET_TRANSFORM) @ TARGET_WORLD, atol=1e-6)
    tag = vtk.reference("")
    assert out.GetSegmentation().GetSegment(ids[0]).GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), tag)


def internal_labelmap_of(image) -> tuple[np.ndarray, np.ndarray]:
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).copy(), mrml.matrix_array(m)


def test_seg_nrrd_round_trip_keeps_masks(case, band_oracle, tmp_path):
    scene, ref, seg_node, target = case
    _, engine = band_oracle
    out = mrml.create_output_segmentation(target)
    existing = out.GetSegmentation().AddEmptySegment("", "existing", [1, 1, 0])
    blob = np.zeros(TARGET_SHAPE, np.uint8)
    blob[10:20, 20:40, 15:25] = 1  # overlaps the new liver: the file keeps two layers
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        mrml.oriented_image(blob, np.linalg.inv(TARGET_TRANSFORM) @ TARGET_WORLD), out, existing, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    ids = mrml.segment_volume(target, ref, seg_node, None, out, "cpu", engine=engine)
    masks = {out.GetSegmentation().GetSegment(s).GetName(): segment_world_mask(out, s, TARGET_SHAPE, TARGET_WORLD) for s in [existing, *ids]}
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(tmp_path / "results.seg.nrrd"))
    assert storage.WriteData(out)
    loaded = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "loaded")
    loaded.SetAndObserveTransformNodeID(out.GetTransformNodeID())
    reader = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    reader.SetFileName(str(tmp_path / "results.seg.nrrd"))
    assert reader.ReadData(loaded)
    segmentation = loaded.GetSegmentation()
    names = {segmentation.GetSegment(s).GetName(): s for s in segment_ids(loaded)}
    assert set(names) == {"existing", "liver", "spleen"}
    for name, mask in masks.items():
        assert mask.any()
        np.testing.assert_array_equal(segment_world_mask(loaded, names[name], TARGET_SHAPE, TARGET_WORLD), mask)
        assert segmentation.GetSegment(names[name]).GetColor() == pytest.approx(COLOURS.get(name, (1, 1, 0)))


def test_output_placed_beside_target_in_subject_hierarchy(case, band_oracle):
    scene, ref, seg_node, target = case
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = hierarchy.CreateFolderItem(hierarchy.GetSceneItemID(), "study")
    hierarchy.CreateItem(study, target)
    out = mrml.create_output_segmentation(target)
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(out)) == study
    assert mrml.source_volume(out) is target


def test_model_and_task_cached_between_runs(case, band_oracle):
    _, ref, seg_node, target = case
    model, engine = band_oracle
    mrml.compute_segments(target, ref, seg_node, None, "cpu", engine=engine)
    encodes = model.encodes
    assert engine.last.reused_task is False
    mrml.compute_segments(target, ref, seg_node, None, "cpu", engine=engine)
    assert model.encodes == encodes and engine.last.reused_task is True
    seg_node.GetSegmentation().GetSegment("ref_spleen").SetName("big spleen")  # a different task now
    mrml.compute_segments(target, ref, seg_node, None, "cpu", engine=engine)
    assert model.encodes > encodes and engine.last.reused_task is False


def test_context_ensemble(case, band_oracle):
    scene, ref, seg_node, target = case
    _, engine = band_oracle
    world2 = grid(rot_z(60), [1.0, 1.0, 1.4], [50, 50, 34], [-2, 2, -1])
    ref2 = add_volume(scene, "reference 2", phantom((50, 50, 34), world2), world2)
    seg2 = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reference 2 segmentation")
    seg2.SetNodeReferenceID(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole(), ref2.GetID())
    sid = seg2.GetSegmentation().AddEmptySegment("", "Liver ", [1, 0, 0])  # matched by name, case and spaces aside
    labels = truth((50, 50, 34), world2)["liver"].astype(np.uint8)
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(mrml.oriented_image(labels, world2), seg2, sid, 0)
    pending = mrml.compute_segments(target, ref, seg_node, None, "cpu", extra_references=[(None, seg2)], engine=engine)
    expected = truth(TARGET_SHAPE, TARGET_WORLD, SHIFT)
    assert dice(pending.label_map == 1, expected["liver"]) > 0.85
    assert dice(pending.label_map == 2, expected["spleen"]) > 0.85
    lonely = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "unrelated")
    lonely.GetSegmentation().AddEmptySegment("", "heart", [1, 0, 0])
    with pytest.raises(IrisInputError, match="has none of the segments"):
        mrml.compute_segments(target, ref, seg_node, None, "cpu", extra_references=[(ref2, lonely)], engine=engine)


def _stray_blob(shape, ijk_to_world, size: int = 6) -> tuple[slice, slice, slice]:
    """A cube of voxels at least 8 mm from every phantom structure (and 3 voxels from the faces)."""
    p = voxel_world(shape, ijk_to_world)
    far = np.ones(shape, bool)
    for _, centre, radius, _ in STRUCTURES:
        far &= np.linalg.norm(p - (centre + SHIFT), axis=-1) > radius + 8
    for i, j, k in np.argwhere(far):
        box = tuple(slice(int(a), int(a) + size) for a in (i, j, k))
        if all(3 <= b.start and b.stop <= n - 3 for b, n in zip(box, shape)) and far[box].all():
            return box
    raise AssertionError("no room for a blob")


def test_postprocessing_is_the_engines(case, band_oracle):
    """Clean-up is the engine's post-processing (largest piece of a one-piece reference structure), switched by
    `postprocess`: a stray blob of liver-like intensity far from the liver is dropped, or kept when it is off."""
    scene, ref, seg_node, target = case
    _, engine = band_oracle
    assert not hasattr(mrml, "keep_largest_component")  # no VTK filtering of its own any more
    array = phantom(TARGET_SHAPE, TARGET_WORLD, SHIFT)
    blob = _stray_blob(TARGET_SHAPE, TARGET_WORLD)
    array[blob] = STRUCTURES[0][3]
    stray = add_volume(scene, "target with a stray blob", array, TARGET_WORLD)
    expected = truth(TARGET_SHAPE, TARGET_WORLD, SHIFT)["liver"]
    kept = mrml.compute_segments(stray, ref, seg_node, None, "cpu", localise="none", postprocess=False, engine=engine)
    cleaned = mrml.compute_segments(stray, ref, seg_node, None, "cpu", localise="none", postprocess=True, engine=engine)
    assert (kept.label_map[blob] == 1).mean() > 0.5
    assert (cleaned.label_map[blob] == 0).all()
    assert dice(cleaned.label_map == 1, expected) > 0.85 and dice(cleaned.label_map == 1, expected) >= dice(kept.label_map == 1, expected)


def test_localise_option_reaches_the_engine(case, band_oracle, monkeypatch):
    """"none" segments the whole field of view; "registration" registers the reference (Greedy in a child process)
    and says so in the status; each reaches Segmenter.segment as given; an unknown one is refused before any work."""
    scene, ref, seg_node, target = case
    model, engine = band_oracle
    seen = []
    segment = Segmenter.segment

    def spy(self, *args, **kwargs):
        seen.append((kwargs["localise"], kwargs["postprocess"]))
        return segment(self, *args, **kwargs)

    monkeypatch.setattr(Segmenter, "segment", spy)
    expected = truth(TARGET_SHAPE, TARGET_WORLD, SHIFT)
    runs = {}
    for mode in ("none", "registration"):
        reports = []
        pending = mrml.compute_segments(target, ref, seg_node, None, "cpu", localise=mode, engine=engine,
                                        progress=lambda f, m: reports.append(m))
        runs[mode] = pending.run
        assert pending.run is engine.last and pending.run.warnings == []
        assert dice(pending.label_map == 1, expected["liver"]) > 0.85 and dice(pending.label_map == 2, expected["spleen"]) > 0.85
        if mode == "none":
            assert not any(m.startswith("registering") for m in reports)
    assert seen == [("none", True), ("registration", True)]
    assert runs["none"].localisation == "none" and runs["registration"].localisation == "registration"
    assert runs["registration"].stage_seconds["localise"] > runs["none"].stage_seconds["localise"]
    out = mrml.create_output_segmentation(target)
    ids = mrml.write_segments(pending, out)
    status = mrml.status_text(runs["registration"], out, ids).splitlines()
    assert status[0].startswith("Added liver, spleen to ") and status[1].startswith("Localised by registration (")
    assert mrml.status_text(runs["none"], out, ids).splitlines()[1] == "Not localised: segmented the whole field of view."
    mrml.compute_segments(target, ref, seg_node, None, "cpu", engine=engine)  # the model's default
    assert seen[-1] == (None, True)
    nodes = scene.GetNumberOfNodes()
    with pytest.raises(IrisInputError, match="unknown localisation 'rigid': use one of auto, registration, none"):
        mrml.compute_segments(target, ref, seg_node, None, "cpu", localise="rigid", engine=engine)
    assert len(seen) == 3 and scene.GetNumberOfNodes() == nodes


def test_failed_registration_warns_in_the_status(case, band_oracle, monkeypatch, tmp_path):
    """A registration that fails (here: the Greedy child process exits with an error) falls back to the whole
    field of view; the engine's warnings reach the run info and the status, also from the worker thread."""
    from IrisSegmentLib.inference import greedy as greedy_module

    scene, ref, seg_node, target = case
    model, _ = band_oracle
    job = tmp_path / "failing_greedy_job.py"
    job.write_text('print("stage 1/4", flush=True)\nprint("error: simulated Greedy failure", flush=True)\nraise SystemExit(1)\n')
    monkeypatch.setattr(greedy_module, "JOB", job)
    engine = mrml.Engine(Segmenter(model, BundleConfig.load(TINY_CONFIG), "cpu", model_id="oracle"), wait=lambda: None, slice_s=0.001)
    pending = mrml.compute_segments(target, ref, seg_node, None, "cpu", localise="auto", engine=engine)
    run = pending.run
    assert run.localisation == "none"
    assert "reference 1: registration failed: simulated Greedy failure" in run.warnings
    fallback = [w for w in run.warnings if w.startswith("registration failed for every reference: segmenting the whole field of view")]
    assert len(fallback) == 1 and len(run.warnings) == len(set(run.warnings))  # reported once though also warned
    expected = truth(TARGET_SHAPE, TARGET_WORLD, SHIFT)
    assert dice(pending.label_map == 1, expected["liver"]) > 0.85  # segmented all the same
    out = mrml.create_output_segmentation(target)
    status = mrml.status_text(run, out, mrml.write_segments(pending, out)).splitlines()
    assert status[1] == "Not localised: segmented the whole field of view."
    assert "Warning: reference 1: registration failed: simulated Greedy failure" in status
    assert f"Warning: {fallback[0]}" in status
    # A warning only issued through `warnings` (not in the result) reaches the status too; other packages' do not.
    flat = add_volume(scene, "blank", np.zeros((20, 20, 20), np.int16), grid(np.eye(3), [1.0] * 3, [20] * 3, [0, 0, 0]))
    with pytest.warns(UserWarning, match="from another package"):  # shown as usual
        blank = mrml.compute_segments(flat, ref, seg_node, None, "cpu", localise="none", engine=engine,
                                      progress=lambda f, m: warnings.warn("from another package"))
    assert "target image is constant: nothing can be segmented; the result is empty" in blank.run.warnings
    assert not any("another package" in w for w in blank.run.warnings)
    assert not blank.label_map.any()


def test_saved_task_segments_without_reference(case, band_oracle, tmp_path):
    scene, ref, seg_node, target = case
    _, engine = band_oracle
    task = mrml.encode_task(ref, seg_node, ["liver"], "cpu", engine=engine)
    path = mrml.save_task(task, tmp_path / "tasks", "Liver / CT")
    assert mrml.saved_tasks(tmp_path / "tasks") == {"Liver _ CT": path}
    with pytest.raises(IrisInputError, match="name"):
        mrml.save_task(task, tmp_path / "tasks", " / ")
    out = mrml.create_output_segmentation(target)
    ids = mrml.segment_volume(target, None, None, None, out, "cpu", task=path, engine=engine)
    got = segment_world_mask(out, ids[0], TARGET_SHAPE, TARGET_WORLD)
    assert out.GetSegmentation().GetSegment(ids[0]).GetName() == "liver"
    assert dice(got, truth(TARGET_SHAPE, TARGET_WORLD, SHIFT)["liver"]) > 0.85
    assert isinstance(TaskEmbedding.load(path), TaskEmbedding)


def test_worker_thread_waits_and_relays_progress_on_calling_thread(case, band_oracle):
    _, ref, seg_node, target = case
    model, _ = band_oracle
    waits, reports = [], []
    engine = mrml.Engine(Segmenter(model, BundleConfig.load(TINY_CONFIG), "cpu", model_id="oracle"), wait=lambda: waits.append(1), slice_s=0.001)
    main = threading.get_ident()
    pending = mrml.compute_segments(target, ref, seg_node, None, "cpu", engine=engine,
                                    progress=lambda f, m: reports.append((threading.get_ident(), f, m)))
    assert pending.label_map.shape == TARGET_SHAPE
    assert reports and all(t == main for t, _, _ in reports) and reports[-1][1:] == (mrml.WRITE_AT, "done")
    assert waits
    with pytest.raises(Cancelled):  # the worker's exception reaches the caller
        mrml.compute_segments(target, ref, seg_node, None, "cpu", engine=engine, cancel=lambda: True)


def test_tiny_model_end_to_end(case, tiny_model_dir):
    scene, ref, seg_node, target = case
    engine = mrml.Engine(tiny_model_dir)
    assert engine.segmenter("cpu") is engine.segmenter("cpu")  # loaded once
    out = mrml.create_output_segmentation(target)
    # the whole field of view: the untrained tiny network is trusted with no structure, so a localised run has no window
    ids = mrml.segment_volume(target, ref, seg_node, ["liver", "spleen"], out, "cpu", engine=engine, tuning_steps=2,
                              localise="none")
    segmentation = out.GetSegmentation()
    assert [segmentation.GetSegment(s).GetName() for s in ids] == ["liver", "spleen"]
    assert engine.last.device == "cpu" and engine.last.windows > 0 and engine.last.seconds > 0
    _, matrix, extent = internal_labelmap(out, ids[0])
    np.testing.assert_allclose(matrix, np.linalg.inv(TARGET_TRANSFORM) @ TARGET_WORLD, atol=1e-6)
    assert extent == (0, 37, 0, 59, 0, 39)
    oracle_task = TaskEmbedding(torch.zeros(1, 2, 4), [1], ["x"], model_id="another-model")
    with pytest.raises(IrisInputError, match="encode the reference again"):
        mrml.segment_volume(target, None, None, None, out, "cpu", task=oracle_task, engine=engine)


def test_estimated_dice_in_segment_tags_survives_seg_nrrd_round_trip(case, band_oracle, tmp_path):
    scene, ref, seg_node, target = case
    _, engine = band_oracle
    segmenter = engine.segmenter("cpu")
    segmenter.calibration = Calibration(mean=[0.5, 0.1, 0.5, 0.5, 0.5], std=[0.2] * 5, weights=[1.0, -1.0, -0.5, -0.5, 0.5],
                                        bias=0.3, flag_below=0.999,
                                        features=("mean_prob", "disagreement", "boundary", "volume_ratio", "self_dice"))
    pending = mrml.compute_segments(target, ref, seg_node, None, "cpu", engine=engine)
    assert sorted(pending.confidence) == [1, 2] and pending.flag_below == 0.999
    out = mrml.create_output_segmentation(target)
    ids = mrml.write_segments(pending, out)
    listed = mrml.segment_confidence(out, ids)
    assert [(n, e) for n, e, _ in listed] == [("liver", round(pending.confidence[1], 3)), ("spleen", round(pending.confidence[2], 3))]
    assert all(low for _, _, low in listed)  # every estimate is below 0.999
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(tmp_path / "results.seg.nrrd"))
    assert storage.WriteData(out)
    loaded = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "loaded")
    reader = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    reader.SetFileName(str(tmp_path / "results.seg.nrrd"))
    assert reader.ReadData(loaded)
    assert mrml.segment_confidence(loaded, segment_ids(loaded)) == listed
    segmenter.calibration = None  # no calibration: no tags, nothing listed
    plain = mrml.write_segments(mrml.compute_segments(target, ref, seg_node, None, "cpu", engine=engine), out)
    assert [e for _, e, _ in mrml.segment_confidence(out, plain)] == [None, None]
