"""The Slicer extension's first run against the real MRML classes (the slicer-core wheel, no Qt, no Slicer app):
the Segment Editor effect and the module logic on a real scene, the dependency checks and the Sample Data entry.

Real here: the MRML scene and nodes (vtkMRMLSegmentEditorNode holds the effect's parameters and node references),
the segmentations logic, slicer.util (createProgressDialog, errorDisplay, NodeModify, WaitCursor, computeChecksum),
IrisSegmentLib with its worker thread, and the effect/logic/dependency code itself.
TEST DOUBLES, only for what cannot run here: Qt widgets (those of test_slicer_module_static plus its progress
dialog double), the Slicer application object (processEvents, testing mode), the C++ scripted effect
(qSlicerSegmentEditorScriptedEffect: its parameter and node-reference methods re-implemented over the real editor
node as its C++ source does, including the error it logs for a parameter never set), Slicer's
ScriptedLoadableModuleLogic.getParameterNode (as its Python source does), SegmentEditorEffects' abstract base, and
the PyTorch extension's installer (PyTorchUtils), whose install is simulated.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
import types
import urllib.request
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install 'slicer-core>=5.13') for a real MRML scene")

from conftest import TINY_CONFIG, dice  # noqa: E402
from test_mrml import SHIFT, TARGET_SHAPE, TARGET_WORLD, SlowOracle, case, core, segment_ids, truth  # noqa: E402,F401 (case, core: fixtures)
from test_slicer_module_static import (  # noqa: E402
    EFFECT_PY, MODULE_DIR, FakeComboBox, FakeListWidget, FakeListWidgetItem, FakeNodeComboBox, FakeProgressDialog, FakeWidget,
    Qt, fresh_support_modules)

from IrisSegmentLib.config import BundleConfig  # noqa: E402
from IrisSegmentLib.errors import Cancelled  # noqa: E402
from IrisSegmentLib.inference.segmenter import Segmenter  # noqa: E402

SAMPLE = MODULE_DIR.parent / "Resources" / "SampleData"


# -- doubles ---------------------------------------------------------------------------------------
class AppDouble:
    """slicer.app: testing mode (message boxes return their default), `processEvents` runs the test's `hooks` (what
    the user does while a computation runs: the real one delivers their clicks there)."""

    def __init__(self, settings: Path):
        self.slicerUserSettingsFilePath = str(settings / "Slicer.ini")
        self.hooks: list = []
        self.events = 0

    def processEvents(self):
        self.events += 1
        for hook in list(self.hooks):
            hook()

    def testingEnabled(self):
        return True

    def topLevelWidgets(self):
        return []

    def connect(self, *args):
        pass

    def setOverrideCursor(self, cursor):
        pass

    def restoreOverrideCursor(self):
        pass


class ScriptedLoadableModuleLogic:
    """slicer.ScriptedLoadableModule.ScriptedLoadableModuleLogic: its singleton parameter node, as Slicer's source makes it."""

    def __init__(self, parent=None):
        self.moduleName = self.__class__.__name__.removesuffix("Logic")

    def getParameterNode(self):
        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)
            node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            node = slicer.mrmlScene.AddNode(node)
        return node


class ScriptedEffectDouble:
    """qSlicerSegmentEditorScriptedEffect over the real vtkMRMLSegmentEditorNode: parameters are attributes and node
    references named "<effect>.<name>" (common ones without prefix), every change invokes EffectParameterModified, and
    reading a parameter never set logs "Parameter named ... cannot be found" (kept in `critical`), as the C++ does."""

    def __init__(self, editor_node):
        self.node, self.name, self.title, self.perSegment, self.requireSegments = editor_node, "", "", True, True
        self.critical: list[str] = []
        self.log: list[str] = []

    def parameterSetNode(self):
        return self.node

    def parameter(self, name):
        value = self.node.GetAttribute(f"{self.name}.{name}")
        value = self.node.GetAttribute(name) if value is None else value
        if value is None:
            self.critical.append(f"Parameter named {name} cannot be found for effect {self.name}")
            return ""
        return value

    def parameterDefined(self, name):
        return bool(self.node.GetAttribute(f"{self.name}.{name}"))

    def setParameter(self, name, value):
        self.setCommonParameter(f"{self.name}.{name}", value)

    def setParameterDefault(self, name, value):
        if not self.parameterDefined(name):
            self.setParameter(name, value)

    def setCommonParameter(self, name, value):
        value, old = str(value), self.node.GetAttribute(name)
        if (old is None and value == "") or value == old:
            return
        disabled = self.node.GetDisableModifiedEvent()
        self.node.SetDisableModifiedEvent(1)
        self.node.SetAttribute(name, value)
        self.node.SetDisableModifiedEvent(disabled)
        self.node.InvokeCustomModifiedEvent(slicer.vtkMRMLSegmentEditorNode.EffectParameterModified)

    def nodeReference(self, name):
        return self.node.GetNodeReference(f"{self.name}.{name}") or self.node.GetNodeReference(name)

    def setNodeReference(self, name, node):
        role = f"{self.name}.{name}"
        if node is self.node.GetNodeReference(role):
            return
        self.node.SetNodeReferenceID(role, node.GetID() if node is not None else None)
        self.node.InvokeCustomModifiedEvent(slicer.vtkMRMLSegmentEditorNode.EffectParameterModified)

    def saveStateForUndo(self):
        self.log.append("undo state saved")

    def modifySegmentByLabelmap(self, segmentation_node, segment_id, labelmap, mode):
        self.log.append(f"segment {segment_id} set through the editor")
        assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            labelmap, segmentation_node, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)

    def addOptionsWidget(self, widget):
        pass

    def addLabeledOptionsWidget(self, label, widget):
        pass


def fake_qt(app: AppDouble) -> types.ModuleType:
    qt = types.ModuleType("qt")
    qt.Qt, qt.QListWidgetItem = Qt, FakeListWidgetItem
    qt.QProgressDialog = lambda parent=None: FakeProgressDialog(app)
    qt.QPushButton = lambda text="": FakeWidget(text, "QPushButton")
    qt.QLabel = lambda text="": FakeWidget(text, "QLabel")
    qt.QHBoxLayout = lambda: FakeWidget("layout", "QHBoxLayout")
    qt.QListWidget = lambda: FakeListWidget("segmentsList", "QListWidget")
    qt.QComboBox = lambda: FakeComboBox("localiseComboBox", "QComboBox")
    qt.QIcon = lambda *a: None
    qt.QMessageBox = types.SimpleNamespace(Ok=0x400, Cancel=0x400000, Critical=3, Warning=2, Information=1, Question=4)
    qt.QApplication = types.SimpleNamespace(setOverrideCursor=lambda cursor: None, restoreOverrideCursor=lambda: None)
    qt.Qt.WaitCursor = 3
    return qt


@pytest.fixture()
def env(monkeypatch, tmp_path, core):
    """A real scene as slicer.mrmlScene, the doubles installed, IrisSegmentSupport imported against them."""
    core.scene.Clear(0)
    app = AppDouble(tmp_path)
    monkeypatch.setattr(slicer, "mrmlScene", core.scene, raising=False)
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(slicer, "qMRMLNodeComboBox", lambda: FakeNodeComboBox("combo", "qMRMLNodeComboBox"), raising=False)
    monkeypatch.setattr(slicer, "qSlicerSegmentEditorAbstractEffect", types.SimpleNamespace(ModificationModeSet=0), raising=False)
    qt = fake_qt(app)
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    slm.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    editor_effects = types.ModuleType("SegmentEditorEffects")
    editor_effects.AbstractScriptedSegmentEditorEffect = type(
        "AbstractScriptedSegmentEditorEffect", (), {"__init__": lambda self, scriptedEffect: setattr(self, "scriptedEffect", scriptedEffect)})
    for name, module in {"qt": qt, "slicer.ScriptedLoadableModule": slm, "SegmentEditorEffects": editor_effects}.items():
        monkeypatch.setitem(sys.modules, name, module)
    fresh_support_modules(monkeypatch)
    from IrisSegmentSupport import dependencies

    return types.SimpleNamespace(scene=core.scene, app=app, dependencies=dependencies)


def oracle() -> Segmenter:
    # 30 ms per step: slow enough that the GUI thread, waiting in 1 ms slices, sees every step's progress
    return Segmenter(SlowOracle(delay=0.03), BundleConfig.load(TINY_CONFIG), "cpu", model_id="oracle")


def fine_grained(logic, model) -> None:
    """`logic` runs `model`, its waiting thread looking at the worker every millisecond."""
    logic.model = model
    logic.engine.slice_s = 0.001


def make_effect(env, case):
    """The IRIS effect on the edited segmentation of `case`'s target, active in a real segment editor node, with the
    oracle as its model; the editor refreshes the effect's GUI on each parameter change, as qMRMLSegmentEditorWidget does."""
    scene, ref, seg_node, target = case
    edited = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "edited")
    edited.CreateDefaultDisplayNodes()
    editor = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor.SetAndObserveSegmentationNode(edited)
    editor.SetAndObserveSourceVolumeNode(target)
    scripted = ScriptedEffectDouble(editor)
    spec = importlib.util.spec_from_file_location("SegmentEditorIrisEffect_under_test", EFFECT_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fx = module.SegmentEditorIrisEffect(scripted)
    fine_grained(fx.logic, oracle())
    fx.setupOptionsFrame()
    fx.setMRMLDefaults()
    editor.AddObserver(slicer.vtkMRMLSegmentEditorNode.EffectParameterModified, lambda caller, event: fx.updateGUIFromMRML())
    fx.activate()
    fx.updateGUIFromMRML()
    return types.SimpleNamespace(fx=fx, scripted=scripted, editor=editor, edited=edited, module=module, ref=ref, seg=seg_node,
                                 target=target, scene=scene)


def scene_nodes(scene) -> list[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def preview_nodes(scene) -> list:
    return [n for n in scene.GetNodesByClass("vtkMRMLSegmentationNode") if n.GetName().endswith("IRIS preview")]


def cancel_when(app, step: str):
    """The user clicks the progress dialog's Cancel once it shows a message of `step` (IrisSegmentLib.progress)."""
    from IrisSegmentLib.progress import step_of

    def hook():
        dialog = FakeProgressDialog.last
        if dialog is not None and not dialog.wasCanceled and step_of(dialog.labelText) == step:
            dialog.cancel()

    app.hooks.append(hook)


@pytest.fixture(autouse=True)
def track_dialogs(monkeypatch):
    """FakeProgressDialog.last: the dialog shown most recently."""
    FakeProgressDialog.last = None
    original = FakeProgressDialog.__init__

    def init(self, app=None):
        original(self, app)
        FakeProgressDialog.last = self

    monkeypatch.setattr(FakeProgressDialog, "__init__", init)


# -- dependencies (no Slicer) ----------------------------------------------------------------------
def test_requirements_parse_and_versions_compare(env):
    deps = env.dependencies
    reqs = deps.parse("# comment\ntorch>=2.2\nPyYAML >= 6  # yaml\nnibabel\n")
    assert [(r.name, r.minimum, r.module) for r in reqs] == [("torch", "2.2", "torch"), ("PyYAML", "6", "yaml"), ("nibabel", None, "nibabel")]
    assert str(reqs[0]) == "torch>=2.2" and str(reqs[2]) == "nibabel"
    with pytest.raises(ValueError, match="only 'name' or 'name>=version'"):
        deps.parse("torch<3")
    assert deps.version_tuple("2.1.0+cu121") == (2, 1, 0) and deps.version_tuple("2.3.0rc1") == (2, 3, 0)
    assert deps.version_tuple("2.10.0") > deps.version_tuple("2.2")  # numeric, not text, comparison


def test_missing_outdated_and_broken_packages_are_told_apart(env, monkeypatch, tmp_path):
    deps = env.dependencies
    real = deps.installed_version
    versions = {"torch": None, "PyYAML": "5.4.1", "brokenpkg": "1.0"}
    monkeypatch.setattr(deps, "installed_version", lambda name: versions[name] if name in versions else real(name))
    (tmp_path / "brokenpkg").mkdir()
    (tmp_path / "brokenpkg" / "__init__.py").write_text("raise OSError('libtorch_cpu.so: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reqs = deps.parse("torch>=2.2\nPyYAML>=6\nbrokenpkg\nnibabel>=5\n")
    assert deps.check(reqs) == [deps.Problem(reqs[0]), deps.Problem(reqs[1], "5.4.1")]  # metadata only: brokenpkg not imported
    problems = deps.check(reqs, probe=("brokenpkg",))
    assert [p.kind for p in problems] == ["missing", "outdated", "broken"]
    assert [p.text() for p in problems] == [
        "torch is not installed", "PyYAML 5.4.1 is installed, IrisSegment needs PyYAML>=6",
        "brokenpkg 1.0 is installed but does not load (OSError: libtorch_cpu.so: cannot open shared object file)"]
    message = deps.message(problems)
    assert message.startswith("IrisSegment cannot run yet: torch is not installed; PyYAML 5.4.1") and "Click Install dependencies" in message
    assert deps.message([]) == ""
    args = deps.pip_arguments(problems, "/tmp/c.txt")
    assert args == ["-c", "/tmp/c.txt", "PyYAML>=6", "brokenpkg"]  # torch never through plain pip
    assert deps.pip_arguments([problems[0]], "/tmp/c.txt") == [] and deps.torch_problem(problems) is problems[0]


def test_constraints_pin_what_slicer_ships(env):
    lines = env.dependencies.constraints().splitlines()
    assert lines == [f"{name}=={importlib.metadata.version(name)}" for name in ("numpy", "scipy", "SimpleITK")]


# -- sample data -----------------------------------------------------------------------------------
def test_sample_pair_is_a_sample_data_source_that_loads(env, tmp_path):
    """The Sample Data entry: file:// addresses (SampleData downloads with urllib.request.urlretrieve) with checksums
    as slicer.util checks them; the files load as two volumes and a segmentation with named segments holding the
    label map's voxels; the reference volume is found for the segmentation, the target defaults to the other one."""
    from IrisSegmentSupport import sampledata
    from IrisSegmentSupport.logic import IrisSegmentLogic

    from IrisSegmentLib.resources import sample_data_dir

    assert sampledata.sample_data_dir(MODULE_DIR) == sample_data_dir()
    source = sampledata.source(MODULE_DIR, MODULE_DIR / "Resources" / "Icons" / "IrisSegmentSampleData.png")
    assert Path(source["thumbnailFileName"]).is_file() and source["category"] == "IRIS Segment"
    assert len({len(source[k]) for k in ("uris", "fileNames", "nodeNames", "loadFileTypes", "checksums")}) == 1
    nodes = {}
    for uri, name, node_name, kind, checksum in zip(*(source[k] for k in ("uris", "fileNames", "nodeNames", "loadFileTypes", "checksums"))):
        path = tmp_path / name
        urllib.request.urlretrieve(uri, path)
        algo, digest = slicer.util.extractAlgoAndDigest(checksum)
        assert slicer.util.computeChecksum(algo, str(path)) == digest
        cls, storage = (("vtkMRMLScalarVolumeNode", "vtkMRMLVolumeArchetypeStorageNode") if kind == "VolumeFile"
                        else ("vtkMRMLSegmentationNode", "vtkMRMLSegmentationStorageNode"))
        node = env.scene.AddNewNodeByClass(cls, node_name)
        reader = env.scene.AddNewNodeByClass(storage)
        reader.SetFileName(str(path))
        assert reader.ReadData(node), name
        nodes[node_name] = node
    segmentation = nodes["hippocampus_001 reference labels"]
    assert [segmentation.GetSegmentation().GetSegment(s).GetName() for s in segment_ids(segmentation)] == [
        "anterior hippocampus", "posterior hippocampus"]
    import nibabel as nib

    from IrisSegmentLib import mrml

    label = np.asarray(nib.load(SAMPLE / "hippocampus_001_label.nii.gz").dataobj)
    image, affine = mrml.volume_array(nodes["hippocampus_001_image"])
    for value, mask in enumerate(mrml.segment_masks(segmentation, segment_ids(segmentation), image.shape, affine), 1):
        np.testing.assert_array_equal(mask, label == value)
    assert IrisSegmentLogic.sourceVolume(segmentation) is nodes["hippocampus_001_image"]  # by geometry: no reference recorded
    assert IrisSegmentLogic.defaultTarget(env.scene) is nodes["hippocampus_003_image"]
    assert IrisSegmentLogic.defaultTarget(env.scene, nodes["hippocampus_003_image"]) is nodes["hippocampus_001_image"]


def test_default_target_is_not_the_reference(env, case):
    from IrisSegmentSupport.logic import IrisSegmentLogic

    scene, ref, seg_node, target = case
    seg_node.SetNodeReferenceID(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole(), ref.GetID())
    scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "a label map")  # never a target
    assert IrisSegmentLogic.defaultTarget(scene) is target  # the volume no segmentation was drawn on
    assert IrisSegmentLogic.defaultTarget(scene, target) is ref  # the only other volume
    scene.RemoveNode(target)
    assert IrisSegmentLogic.defaultTarget(scene, ref) is None


# -- the effect -----------------------------------------------------------------------------------
def test_effect_defaults_and_no_error_log(env, case):
    """setMRMLDefaults stores the localisation; GUI refreshes read no parameter that was never set (Slicer would log
    an error for each); node parameters are node references on the editor node; title and name are set."""
    e = make_effect(env, case)
    fx, scripted, editor = e.fx, e.scripted, e.editor
    assert scripted.name == "IRIS" and scripted.title == "IRIS" and not scripted.perSegment
    assert editor.GetAttribute("IRIS.Localise") == "auto" and fx.localiseComboBox.currentText == "auto"
    for _ in range(3):
        fx.updateGUIFromMRML()
    assert scripted.critical == []
    assert not fx.previewButton.enabled and not fx.dependenciesLabel.visible and not fx.installButton.visible
    fx.referenceSegmentationSelector.choose(e.seg)  # no source volume recorded, none with its geometry: pick it
    assert editor.GetNodeReference("IRIS.ReferenceSegmentation") is e.seg and fx._checkedIds() == ["ref_liver", "ref_spleen"]
    assert not fx.previewButton.enabled
    fx.referenceVolumeSelector.choose(e.ref)
    assert editor.GetNodeReference("IRIS.ReferenceVolume") is e.ref and fx.previewButton.enabled
    fx.localiseComboBox.choose("none (whole field of view)")
    fx.segmentsList.item(0).setCheckState(Qt.Unchecked)  # one refresh from all parameters keeps every choice
    assert editor.GetAttribute("IRIS.ReferenceSegments") == "ref_spleen" and editor.GetAttribute("IRIS.Localise") == "none"
    assert fx.localiseComboBox.currentText == "none (whole field of view)" and fx._checkedIds() == ["ref_spleen"]
    assert scripted.critical == []
    scripted.parameter("NeverSet")  # the double does log what Slicer logs
    assert scripted.critical == ["Parameter named NeverSet cannot be found for effect IRIS"]


def _ready(e):
    e.fx.referenceSegmentationSelector.choose(e.seg)
    e.fx.referenceVolumeSelector.choose(e.ref)
    assert e.fx.previewButton.enabled


def test_effect_preview_then_apply_with_one_undo_state(env, case):
    e = make_effect(env, case)
    fx = e.fx
    _ready(e)
    fx.localiseComboBox.choose("none (whole field of view)")
    fx.previewButton.click()
    preview = e.editor.GetNodeReference("IRIS.PreviewSegmentation")
    assert preview is not None and preview_nodes(e.scene) == [preview] and fx.pending.run.localisation == "none"
    expected = truth(TARGET_SHAPE, TARGET_WORLD, SHIFT)
    assert dice(fx.pending.label_map == 1, expected["liver"]) > 0.85
    assert fx.statusLabel.text.startswith("Added liver, spleen to 'edited IRIS preview'") and FakeProgressDialog.last.closed
    assert e.scripted.log == [] and e.edited.GetSegmentation().GetNumberOfSegments() == 0
    fx.applyButton.click()
    assert e.scripted.log[0] == "undo state saved" and e.scripted.log.count("undo state saved") == 1
    assert [x for x in e.scripted.log[1:]] == [f"segment {s} set through the editor" for s in segment_ids(e.edited)]
    assert [e.edited.GetSegmentation().GetSegment(s).GetName() for s in segment_ids(e.edited)] == ["liver", "spleen"]
    assert preview_nodes(e.scene) == [] and e.editor.GetNodeReference("IRIS.PreviewSegmentation") is None and fx.pending is None
    assert e.scripted.critical == []


@pytest.mark.parametrize("how", ["cancel", "deactivate", "scene close"])
def test_effect_preview_removed(env, case, how):
    e = make_effect(env, case)
    _ready(e)
    e.fx.localiseComboBox.choose("none (whole field of view)")
    e.fx.previewButton.click()
    assert len(preview_nodes(e.scene)) == 1 and e.fx.cancelButton.enabled
    if how == "cancel":
        e.fx.cancelButton.click()
    elif how == "deactivate":
        e.fx.deactivate()
    else:
        e.scene.InvokeEvent(e.scene.StartCloseEvent)  # what Slicer's scene close announces first
    assert preview_nodes(e.scene) == [] and e.editor.GetNodeReference("IRIS.PreviewSegmentation") is None
    assert e.fx.pending is None and not e.fx.cancelButton.enabled


@pytest.mark.parametrize("step", ["encoding", "windows", "writing"])
def test_effect_cancel_during_preview_leaves_the_scene_as_it_was(env, case, step):
    e = make_effect(env, case)
    _ready(e)
    e.fx.localiseComboBox.choose("none (whole field of view)")
    before = scene_nodes(e.scene)
    cancel_when(env.app, step)
    e.fx.previewButton.click()
    dialog = FakeProgressDialog.last
    assert dialog.wasCanceled and dialog.closed
    assert scene_nodes(e.scene) == before and e.fx.pending is None and e.editor.GetNodeReference("IRIS.PreviewSegmentation") is None
    assert e.fx.statusLabel.text == "Cancelled: nothing was added."
    env.app.hooks.clear()
    e.fx.previewButton.click()  # and the same preview without Cancel does make one
    assert len(preview_nodes(e.scene)) == 1


def test_effect_deactivated_during_a_running_preview_leaves_nothing(env, case):
    e = make_effect(env, case)
    _ready(e)
    before = scene_nodes(e.scene)
    done = []

    def deactivate_once():
        if not done and FakeProgressDialog.last is not None and "window" in FakeProgressDialog.last.labelText:
            done.append(True)
            e.fx.deactivate()

    env.app.hooks.append(deactivate_once)
    e.fx.previewButton.click()
    assert done and scene_nodes(e.scene) == before and e.fx.pending is None


def test_effect_without_torch_offers_install_then_gives_a_result(env, case, monkeypatch, caplog):
    """First use with no torch: the effect says so and offers the install (no torch import, no traceback); Install
    goes through the PyTorch extension (simulated here) and Preview then gives a result; nothing logged as an error."""
    deps = env.dependencies
    real = deps.installed_version
    installed = {"torch": None}
    monkeypatch.setattr(deps, "installed_version", lambda name: installed.get(name, real(name)) if name in installed else real(name))
    calls = []

    class PyTorchUtilsLogic:  # TEST DOUBLE of SlicerPyTorch's logic: records the request, "installs" torch
        def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                         torchvisionVersionRequirement=None):
            calls.append((askConfirmation, torchVersionRequirement))
            installed.pop("torch")
            return sys.modules["torch"]

        def uninstallTorch(self, askConfirmation=False, forceComputationBackend=None):
            calls.append("uninstall")

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    probes = []
    check = deps.check
    monkeypatch.setattr(deps, "check", lambda requirements, probe=(): probes.append(probe) or check(requirements, probe))
    e = make_effect(env, case)
    fx = e.fx
    fx.referenceSegmentationSelector.choose(e.seg)
    fx.referenceVolumeSelector.choose(e.ref)
    assert fx.installButton.visible and fx.dependenciesLabel.visible and "torch is not installed" in fx.dependenciesLabel.text
    assert not fx.previewButton.enabled and probes == [()]  # checked from metadata only: torch not imported
    fx.installButton.click()
    assert calls == [(True, ">=2.2")] and fx.statusLabel.text == "Dependencies installed: IrisSegment is ready."
    assert not fx.installButton.visible and fx.previewButton.enabled
    fx.localiseComboBox.choose("none (whole field of view)")
    fx.previewButton.click()
    assert len(preview_nodes(e.scene)) == 1 and fx.statusLabel.text.startswith("Added liver, spleen")
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")] and "Traceback" not in caplog.text


def test_effect_broken_torch_found_at_preview_is_said_without_traceback(env, case, monkeypatch, caplog):
    from IrisSegmentSupport import dependencies

    e = make_effect(env, case)
    _ready(e)
    broken = dependencies.Problem(dependencies.Requirement("torch", "2.2"), "2.3.0", "OSError: libc10.so: cannot open")
    monkeypatch.setattr(type(e.fx.logic), "dependencyProblems", lambda self, probe=False: [broken] if probe else [])
    before = scene_nodes(e.scene)
    e.fx.previewButton.click()
    assert scene_nodes(e.scene) == before
    assert "torch 2.3.0 is installed but does not load (OSError: libc10.so: cannot open)" in e.fx.statusLabel.text
    assert e.fx.installButton.visible and not e.fx.previewButton.enabled
    assert "Traceback" not in caplog.text


def test_effect_cleanup_disconnects_everything(env, case):
    e = make_effect(env, case)
    widgets = [w for w, _, _ in e.fx._connections]
    assert widgets and all(w._slots for w in widgets)
    e.fx.cleanup()
    assert all(not slots for w in widgets for slots in w._slots.values())
    e.scene.InvokeEvent(e.scene.StartCloseEvent)  # no observer left: nothing runs
    assert e.fx._sceneObserver is None


# -- the logic -------------------------------------------------------------------------------------
def _logic(model=None):
    from IrisSegmentSupport.logic import IrisSegmentLogic

    logic = IrisSegmentLogic()
    fine_grained(logic, model or oracle())
    return logic


@pytest.mark.parametrize("step", ["loading", "encoding", "tuning", "writing"])
def test_save_task_cancelled_writes_no_file(env, case, tiny_model_dir, step):
    """Cancel at each step of Save task (the user's click reaches the logic while its progress shows that step)."""
    from IrisSegmentLib.progress import step_of

    scene, ref, seg_node, target = case
    logic = _logic(tiny_model_dir if step == "loading" else None)  # a model folder is loaded; the oracle is in memory
    seen = []

    def progress(fraction, message):
        seen.append(step_of(message))
        if seen[-1] == step:
            logic.requestCancel()

    with pytest.raises(Cancelled):
        logic.saveTask("liver", ref, seg_node, tuningSteps=3, progress=progress)
    assert step in seen and not logic.tasksFolder.exists()
    assert logic.saveTask("liver", ref, seg_node) == "liver" and logic.savedTasks() == {"liver": logic.tasksFolder / "liver.task.safetensors"}


def test_logic_install_pins_slicer_packages_and_says_restart_for_a_loaded_old_torch(env, monkeypatch):
    from IrisSegmentSupport.logic import DependencyError

    deps = env.dependencies
    logic = _logic()
    reqs = {r.name: r for r in logic.requirements()}
    pip, asked = [], []
    monkeypatch.setattr(slicer.util, "pip_install", lambda args: pip.append((args, Path(args[1]).read_text(encoding="utf-8"))))
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **kwargs: asked.append(text) or True)  # the user: OK
    message = logic.installDependencies([deps.Problem(reqs["PyYAML"], "5.1")])
    assert asked == ["IrisSegment will install PyYAML>=6 into Slicer's Python with pip. The packages Slicer ships "
                     "(numpy, scipy, SimpleITK) are kept as they are."]
    assert pip[0][0][2:] == ["PyYAML>=6"] and pip[0][0][0] == "-c" and "numpy==" in pip[0][1] and "SimpleITK==" in pip[0][1]
    assert message == "Dependencies installed: IrisSegment is ready."
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **kwargs: False)  # the user: Cancel
    with pytest.raises(DependencyError, match="PyYAML>=6 not installed"):
        logic.installDependencies([deps.Problem(reqs["PyYAML"], "5.1")])
    assert len(pip) == 1

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation=False, torchVersionRequirement=None, **kwargs):
            return sys.modules["torch"]

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    old = deps.Problem(reqs["torch"], "1.13.1")
    assert logic.installDependencies([old]).startswith("PyTorch was updated: restart Slicer")  # torch is loaded here
    PyTorchUtilsLogic.installTorch = lambda self, **kwargs: None  # the user declined
    with pytest.raises(DependencyError, match="PyTorch was not installed"):
        logic.installDependencies([old])
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # the PyTorch extension is not installed: its import fails
    with pytest.raises(DependencyError, match="needs the PyTorch extension: install it in the Extensions Manager"):
        logic.installDependencies([old])
