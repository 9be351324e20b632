"""The Slicer module without Slicer: static checks of its files, and its panel's wiring with test doubles.

3D Slicer (Qt, PythonQt, slicer.app) is not available here. The static checks read the .ui XML, the
module's Python source and the CMake lists. The wiring tests load IrisSegment.py against TEST DOUBLES
of the `qt`, `vtk` and `slicer` modules (fake widgets built from the .ui file, a fake parameter node,
a fake logic overriding the parts that would run the network): they check which buttons are enabled
for which inputs and that Apply / Save task / Segment from task call the logic with what was selected.
They do not prove that the real Qt widgets behave like the doubles.
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
import re
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULE_DIR = ROOT / "IrisSegment"
MODULE_PY = MODULE_DIR / "IrisSegment.py"
EFFECT_PY = MODULE_DIR / "SegmentEditorIrisLib" / "SegmentEditorIrisEffect.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "IrisSegment.ui"
MRML_WIDGETS = {"qMRMLNodeComboBox", "qMRMLCheckableNodeComboBox"}


def ui_widgets() -> dict[str, str]:
    """name -> class of every widget in the .ui file."""
    return {w.get("name"): w.get("class") for w in ET.parse(UI_FILE).iter("widget")}


# -- static checks ---------------------------------------------------------------------------------
def test_every_ui_name_used_in_python_exists_in_ui_file():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_PY.read_text()))
    assert used, "the module no longer uses self.ui?"
    assert sorted(used - set(ui_widgets())) == []


def test_mrml_widgets_get_the_scene_and_ui_file_is_designer_xml():
    root = ET.parse(UI_FILE).getroot()
    assert root.tag == "ui" and root.find("class").text == "IrisSegment"
    assert root.find("widget").get("class") == "qMRMLWidget" and root.find("widget").get("name") == "IrisSegment"
    connected = {c.find("receiver").text for c in root.iter("connection")
                 if c.find("signal").text == "mrmlSceneChanged(vtkMRMLScene*)" and c.find("slot").text == "setMRMLScene(vtkMRMLScene*)"}
    assert {n for n, c in ui_widgets().items() if c in MRML_WIDGETS} == connected
    custom = {c.find("class").text for c in root.iter("customwidget")}
    assert {c for c in ui_widgets().values() if not c.startswith("Q")} <= custom


def _cmake_list(text: str, variable: str) -> list[str]:
    body = re.search(rf"set\({variable}\s(.*?)\)", text, re.S).group(1)
    return [item.replace("${MODULE_NAME}", "IrisSegment") for item in body.split()]


def test_module_cmake_lists_every_script_and_resource():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    listed = set(_cmake_list(text, "MODULE_PYTHON_SCRIPTS")) | set(_cmake_list(text, "MODULE_PYTHON_RESOURCES"))
    present = {str(p.relative_to(MODULE_DIR)) for p in MODULE_DIR.rglob("*")
               if p.is_file() and p.name != "CMakeLists.txt" and "__pycache__" not in p.parts}
    assert listed == present
    assert "slicerMacroBuildScriptedModule" in text


def test_extension_cmake_metadata_and_library_packaging():
    text = (ROOT / "CMakeLists.txt").read_text()
    assert re.search(r'set\(EXTENSION_CATEGORY "Segmentation"\)', text)
    assert re.search(r'set\(EXTENSION_DEPENDS "PyTorch"\)', text)
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL", "EXTENSION_CONTRIBUTORS"):
        assert re.search(rf'set\({key} "[^"]+"\)', text), key
    assert "add_subdirectory(IrisSegment)" in text
    assert "IrisSegmentLib/*.py" in text and "Resources/Models/*" in text and "Resources/SampleData/*" in text
    assert "Slicer_EXTENSION_GENERATE_CONFIG" in text and "Slicer_EXTENSION_CPACK" in text


def test_no_torch_or_library_import_at_module_import():
    """Dependencies are installed on request only: importing the module must not need them."""
    for path in (MODULE_PY, EFFECT_PY):
        top_level = [line for line in path.read_text().splitlines() if re.match(r"(import|from) ", line)]
        assert not [line for line in top_level if "torch" in line or "IrisSegmentLib" in line], path.name


def test_effect_follows_the_scripted_effect_conventions():
    source = EFFECT_PY.read_text()
    assert "class SegmentEditorIrisEffect(AbstractScriptedSegmentEditorEffect)" in source
    assert source.count("saveStateForUndo()") == 1
    assert 'scriptedEffect.name = "IRIS"' in source
    assert "SegmentEditorIrisLib" in MODULE_PY.read_text() and 'connect("startupCompleted()", registerEditorEffect)' in MODULE_PY.read_text()


def _ui_label_of(widget_name: str) -> str:
    """The text of the QLabel in the form row of `widget_name`."""
    for layout in ET.parse(UI_FILE).iter("layout"):
        items = layout.findall("item")
        row = next((i.get("row") for i in items if i.find("widget") is not None and i.find("widget").get("name") == widget_name), None)
        if row is not None:
            label = next(i.find("widget") for i in items if i.get("row") == row and i.get("column") == "0")
            return label.find("property/string").text
    raise AssertionError(f"{widget_name} is in no form layout")


def _module_constants() -> dict:
    """Module-level constants of IrisSegment.py, read without importing it (it needs Slicer)."""
    import ast

    out = {}
    for node in ast.parse(MODULE_PY.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            with contextlib.suppress(ValueError):
                out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


def test_localisation_choice_in_panel_and_effect():
    """A "Localisation" combo box in the panel and in the effect: the engine's modes, auto first (the default),
    with a tooltip saying what auto and none do; the panel stores it in the parameter node, the effect in an
    effect parameter, and both pass it to the logic."""
    from IrisSegmentLib.config import LOCALISE_MODES

    assert ui_widgets()["localiseComboBox"] == "QComboBox" and _ui_label_of("localiseComboBox") == "Localisation:"
    constants = _module_constants()
    assert [v for v, _ in constants["LOCALISE_CHOICES"]] == list(LOCALISE_MODES) and LOCALISE_MODES[0] == "auto"
    tooltip = constants["LOCALISE_TOOLTIP"]
    assert "auto: register the reference onto the target and segment only where its structures can be" in tooltip
    assert "none: segment the whole field of view" in tooltip
    module, effect = MODULE_PY.read_text(), EFFECT_PY.read_text()
    assert '("Localise", "auto")' in module and '"localise": parameterNode.GetParameter("Localise")' in module
    assert re.search(r'def segment\(self, .*?localise="auto"', module, re.S) and "localise=localise" in module
    assert 'addLabeledOptionsWidget("Localisation:", self.localiseComboBox)' in effect
    assert 'setParameter("IrisLocalise"' in effect and 'setParameterDefault("IrisLocalise"' in effect
    assert "localise=self._localise()" in effect


def test_postprocessing_is_the_engines():
    """The panel's clean-up option maps to the engine's post-processing (no VTK connectivity filter of its own)."""
    assert ui_widgets()["postprocessCheckBox"] == "QCheckBox" and "keepLargestCheckBox" not in ui_widgets()
    lib = (ROOT / "IrisSegmentLib" / "mrml.py").read_text()
    assert "vtkImageConnectivityFilter" not in lib and "postprocess=postprocess" in lib
    assert '"postprocess": parameterNode.GetParameter("PostProcess")' in MODULE_PY.read_text()
    assert 'postprocess=options["postprocess"]' in EFFECT_PY.read_text()


def test_requirements_name_their_import():
    """Every requirement of the library maps to the module it installs (checked against this environment, which
    has them all): PyYAML is `yaml`."""
    constants = _module_constants()
    names = [re.match(r"[A-Za-z0-9_.-]+", line).group(0) for line in (MODULE_DIR / "Resources" / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert {"nibabel", "picsl_greedy"} <= set(names)
    missing = [n for n in names if importlib.util.find_spec(constants["IMPORT_NAMES"].get(n, n)) is None]
    assert missing == []


# -- test doubles ----------------------------------------------------------------------------------
class Qt:
    Unchecked, Checked = 0, 2
    UserRole = 256
    ItemIsUserCheckable = 16


class FakeListWidgetItem:
    def __init__(self, text=""):
        self.text, self._data, self._flags, self._check, self.list = text, {}, 0, Qt.Unchecked, None

    def setData(self, role, value):
        self._data[role] = value

    def data(self, role):
        return self._data.get(role)

    def flags(self):
        return self._flags

    def setFlags(self, flags):
        self._flags = flags

    def checkState(self):
        return self._check

    def setCheckState(self, state):
        self._check = state
        if self.list is not None:
            self.list.emit("itemChanged(QListWidgetItem*)", self)


def _accepted(slot, offered: int) -> int:
    """How many signal arguments PythonQt passes: as many as the slot takes."""
    params = inspect.signature(slot).parameters.values()
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return offered
    return min(offered, sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params))


class FakeWidget:
    """Stands in for any Qt widget: plain attributes for properties, recorded signal connections."""

    def __init__(self, name, cls):
        self.name, self.cls = name, cls
        self.enabled, self.visible, self.toolTip, self.text, self.checked, self.value = True, True, "", "", False, 0
        self._slots: dict[str, list] = {}
        self._blocked = False

    def connect(self, signal, slot):
        self._slots.setdefault(signal, []).append(slot)

    def emit(self, signal, *args):
        if not self._blocked:
            for slot in self._slots.get(signal, []):
                slot(*args[:_accepted(slot, len(args))])

    def blockSignals(self, blocked):
        was, self._blocked = self._blocked, blocked
        return was

    def click(self):
        assert self.enabled, f"{self.name} is disabled"
        self.emit("clicked(bool)", False)
        self.emit("clicked()")  # PythonQt connects either signature of QAbstractButton::clicked

    def setMRMLScene(self, scene):
        self.scene = scene

    def setToolTip(self, text):
        self.toolTip = text

    def addWidget(self, widget):
        pass


class FakeNodeComboBox(FakeWidget):
    def __init__(self, name, cls):
        super().__init__(name, cls)
        self._node = None

    def currentNode(self):
        return self._node

    @property
    def currentNodeID(self):
        return self._node.GetID() if self._node else ""

    def setCurrentNode(self, node):
        self._node = node

    def choose(self, node):
        """What the user does: picks a node."""
        self._node = node
        self.emit("currentNodeChanged(vtkMRMLNode*)", node)


class FakeCheckableNodeComboBox(FakeNodeComboBox):
    nodes: list = []  # the scene's nodes of the right type

    def __init__(self, name, cls):
        super().__init__(name, cls)
        self._checked = set()

    def nodeCount(self):
        return len(self.nodes)

    def nodeFromIndex(self, i):
        return self.nodes[i]

    def setCheckState(self, node, state):
        (self._checked.add if state == Qt.Checked else self._checked.discard)(node.GetID())

    def checkedNodes(self):
        return [n for n in self.nodes if n.GetID() in self._checked]

    def check(self, node):
        self.setCheckState(node, Qt.Checked)
        self.emit("checkedNodesChanged()")


class FakeListWidget(FakeWidget):
    def __init__(self, name, cls):
        super().__init__(name, cls)
        self._items: list[FakeListWidgetItem] = []

    @property
    def count(self):
        return len(self._items)

    def item(self, i):
        return self._items[i]

    def clear(self):
        self._items = []

    def addItem(self, item):
        item.list = self
        self._items.append(item)


class FakeComboBox(FakeWidget):
    def __init__(self, name, cls):
        super().__init__(name, cls)
        self._items: list[tuple[str, object]] = []
        self.currentIndex = -1

    def clear(self):
        self._items, self.currentIndex = [], -1
        self.emit("currentIndexChanged(int)", -1)

    def addItem(self, text, data=None):
        self._items.append((text, data))
        if self.currentIndex < 0:
            self.currentIndex = 0
            self.emit("currentIndexChanged(int)", 0)

    def findData(self, data):
        return next((i for i, (_, d) in enumerate(self._items) if d == data), -1)

    def findText(self, text):
        return next((i for i, (t, _) in enumerate(self._items) if t == text), -1)

    def itemData(self, i):
        return self._items[i][1] if 0 <= i < len(self._items) else None

    def setCurrentIndex(self, i):
        self.currentIndex = i

    @property
    def currentText(self):
        return self._items[self.currentIndex][0] if 0 <= self.currentIndex < len(self._items) else ""

    def choose(self, text):
        self.currentIndex = self.findText(text)
        self.emit("currentIndexChanged(int)", self.currentIndex)


WIDGET_CLASSES = {"qMRMLNodeComboBox": FakeNodeComboBox, "qMRMLCheckableNodeComboBox": FakeCheckableNodeComboBox,
                  "QListWidget": FakeListWidget, "QComboBox": FakeComboBox}


class Observable:
    """vtkObject.AddObserver stand-in for the fake MRML nodes."""

    def __init__(self):
        self._observers: list[tuple[object, object]] = []

    def observe(self, event, callback):
        self._observers.append((event, callback))

    def unobserve(self, event, callback):
        self._observers.remove((event, callback))

    def fire(self, event):
        for e, callback in list(self._observers):
            if e == event:
                callback(self, event)


class FakeParameterNode(Observable):
    """vtkMRMLScriptedModuleNode stand-in; records the MRML methods called on it."""

    MODIFIED = 33

    def __init__(self, scene):
        super().__init__()
        self.scene, self.parameters, self.references, self.called, self._batch = scene, {}, {}, set(), 0

    def __getattribute__(self, name):
        if name[0].isupper() and not name.isupper():  # MRML methods, not constants
            object.__getattribute__(self, "called").add(name)
        return object.__getattribute__(self, name)

    def _modified(self):
        if not self._batch:
            self.fire(self.MODIFIED)

    def GetParameter(self, name):
        return self.parameters.get(name, "")

    def SetParameter(self, name, value):
        self.parameters[name] = value
        self._modified()

    def SetNodeReferenceID(self, role, node_id):
        self.references[role] = [node_id] if node_id else []
        self._modified()

    def AddNodeReferenceID(self, role, node_id):
        self.references.setdefault(role, []).append(node_id)
        self._modified()

    def RemoveNodeReferenceIDs(self, role):
        self.references[role] = []
        self._modified()

    def GetNodeReferenceID(self, role):
        ids = self.references.get(role) or [None]
        return ids[0]

    def GetNodeReference(self, role):
        return self.scene.GetNodeByID(self.GetNodeReferenceID(role))

    def GetNumberOfNodeReferences(self, role):
        return len(self.references.get(role, []))

    def GetNthNodeReference(self, role, n):
        return self.scene.GetNodeByID(self.references[role][n])

    def StartModify(self):
        self._batch += 1
        return self._batch - 1

    def EndModify(self, was):
        self._batch = was
        self._modified()


class FakeSegment:
    def __init__(self, name):
        self.name = name

    def GetName(self):
        return self.name


class FakeSegmentation:
    def __init__(self, node):
        self.node, self.segments = node, {}

    def GetNumberOfSegments(self):
        return len(self.segments)

    def GetNthSegmentID(self, i):
        return list(self.segments)[i]

    def GetSegment(self, sid):
        return self.segments[sid]


class FakeNode(Observable):
    def __init__(self, scene, node_id, name, source=None):
        super().__init__()
        self.id, self.name, self.source = node_id, name, source
        self.segmentation = FakeSegmentation(self)
        scene.nodes[node_id] = self

    def GetID(self):
        return self.id

    def GetName(self):
        return self.name

    def GetSegmentation(self):
        return self.segmentation

    def GetNodeReference(self, role):
        assert role == "referenceImageGeometryRef"
        return self.source

    def add_segment(self, sid, name):
        self.segmentation.segments[sid] = FakeSegment(name)
        self.fire("SegmentAdded")


class FakeScene:
    StartCloseEvent, EndCloseEvent = "StartClose", "EndClose"

    def __init__(self):
        self.nodes = {}

    def GetNodeByID(self, node_id):
        return self.nodes.get(node_id)

    def GetFirstNodeByClass(self, cls):
        return next((n for n in self.nodes.values() if n.id.startswith("vol")), None)


def make_fake_modules(scene, errors):
    """`qt`, `vtk`, `slicer`, `slicer.util`, `slicer.ScriptedLoadableModule` doubles."""
    qt = types.ModuleType("qt")
    qt.Qt, qt.QListWidgetItem = Qt, FakeListWidgetItem
    vtk = types.ModuleType("vtk")
    vtk.vtkCommand = types.SimpleNamespace(ModifiedEvent=FakeParameterNode.MODIFIED)

    class VTKObservationMixin:
        def __init__(self):
            self.observations = []

        def addObserver(self, obj, event, callback):
            if isinstance(obj, Observable):
                obj.observe(event, callback)
            self.observations.append((obj, event, callback))

        def removeObserver(self, obj, event, callback):
            if (obj, event, callback) in self.observations:
                self.observations.remove((obj, event, callback))
                if isinstance(obj, Observable):
                    obj.unobserve(event, callback)

        def removeObservers(self):
            for obj, event, callback in list(self.observations):
                self.removeObserver(obj, event, callback)

    @contextlib.contextmanager
    def tryWithErrorDisplay(message=None, show=True, waitCursor=False):
        try:
            yield
        except Exception as e:  # as Slicer's: shown to the user, not raised
            errors.append(f"{message} {e}")

    ui_root = types.SimpleNamespace(setMRMLScene=lambda s: None)
    util = types.ModuleType("slicer.util")
    util.VTKObservationMixin = VTKObservationMixin
    util.tryWithErrorDisplay = tryWithErrorDisplay
    util.loadUI = lambda path: (Path(path) == UI_FILE or pytest.fail(f"unexpected ui file {path}")) and ui_root
    util.childWidgetVariables = lambda widget: types.SimpleNamespace(
        **{name: WIDGET_CLASSES.get(cls, FakeWidget)(name, cls) for name, cls in ui_widgets().items()})

    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = types.SimpleNamespace(isEntered=True)

        def setup(self):
            self.layout = types.SimpleNamespace(addWidget=lambda w: None)

        def resourcePath(self, name):
            return str(MODULE_DIR / "Resources" / name)

    class ScriptedLoadableModuleLogic:
        def __init__(self):
            self._parameterNode = FakeParameterNode(scene)

        def getParameterNode(self):
            return self._parameterNode

    slm.ScriptedLoadableModule, slm.ScriptedLoadableModuleWidget = ScriptedLoadableModule, ScriptedLoadableModuleWidget
    slm.ScriptedLoadableModuleLogic, slm.ScriptedLoadableModuleTest = ScriptedLoadableModuleLogic, object

    slicer = types.ModuleType("slicer")
    slicer.__path__ = []
    slicer.util, slicer.ScriptedLoadableModule, slicer.mrmlScene = util, slm, scene
    slicer.app = types.SimpleNamespace(connect=lambda *a: None, processEvents=lambda: None,
                                       slicerUserSettingsFilePath="/home/user/.config/slicer.org/Slicer.ini")
    slicer.vtkSegmentation = types.SimpleNamespace(SegmentAdded="SegmentAdded", SegmentRemoved="SegmentRemoved", SegmentModified="SegmentModified")
    slicer.vtkMRMLSegmentationNode = types.SimpleNamespace(GetReferenceImageGeometryReferenceRole=lambda: "referenceImageGeometryRef")
    return {"qt": qt, "vtk": vtk, "slicer": slicer, "slicer.util": util, "slicer.ScriptedLoadableModule": slm}


class Cancelled(RuntimeError):
    pass


@pytest.fixture()
def panel(monkeypatch):
    """The module's widget, set up against the doubles, with a fake logic that records its calls."""
    scene, errors = FakeScene(), []
    for name, module in make_fake_modules(scene, errors).items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(sys, "path", list(sys.path))
    errors_module = types.ModuleType("IrisSegmentLib.errors")
    errors_module.Cancelled = Cancelled
    monkeypatch.setitem(sys.modules, "IrisSegmentLib.errors", errors_module)
    spec = importlib.util.spec_from_file_location("IrisSegment_under_test", MODULE_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class FakeLogic(module.IrisSegmentLogic):
        missing: list[str] = []
        tasks: dict = {}

        def __init__(self):
            super().__init__()
            self.calls = []
            self.lastOutputSegmentation = FakeNode(scene, "seg_out", "target IRIS")
            self.during = None  # called inside segment(), while "running"

        def missingDependencies(self):
            return list(self.missing)

        def deviceChoices(self):
            return [("auto", "auto (GPU: Fake GPU)"), ("cuda", "GPU: Fake GPU"), ("cpu", "CPU")]

        def savedTasks(self):
            return dict(self.tasks)

        def segment(self, *args, progress=None, **kwargs):
            self.calls.append(("segment", args, kwargs))
            progress(0.5, "window 1/2")
            if self.during:
                self.during()
            return ["s1", "s2"]

        def saveTask(self, name, *args, progress=None, **kwargs):
            self.calls.append(("saveTask", (name, *args), kwargs))
            FakeLogic.tasks = {**FakeLogic.tasks, name: Path(f"/tasks/{name}.task.safetensors")}
            return name

        def requestCancel(self):
            self.calls.append(("requestCancel", (), {}))

        def statusText(self, ids):
            return f"Added {len(ids)} segments"

    monkeypatch.setattr(module, "IrisSegmentLogic", FakeLogic)
    FakeLogic.missing, FakeLogic.tasks = [], {}
    volume_ref, volume_target = FakeNode(scene, "vol_ref", "reference"), FakeNode(scene, "vol_target", "target")
    seg = FakeNode(scene, "seg_ref", "reference segmentation", source=volume_ref)
    seg.add_segment("S1", "liver")
    seg.add_segment("S2", "spleen")
    extra = FakeNode(scene, "seg_extra", "another reference", source=volume_ref)
    FakeCheckableNodeComboBox.nodes = [seg, extra]

    def make(missing=()):
        FakeLogic.missing = list(missing)
        widget = module.IrisSegmentWidget()
        widget.setup()
        return widget

    return types.SimpleNamespace(make=make, scene=scene, errors=errors, seg=seg, extra=extra, ref=volume_ref, target=volume_target,
                                 module=module)


# -- wiring ----------------------------------------------------------------------------------------
def test_missing_dependencies_offer_install_and_block_apply(panel):
    w = panel.make(missing=["torch"])
    assert w.ui.installButton.visible and "torch" in w.ui.dependenciesLabel.text
    assert [w.ui.deviceComboBox.itemData(i) for i in range(2)] == ["auto", None]  # devices need torch: not probed
    w.ui.referenceSegmentationSelector.choose(panel.seg)
    assert not w.ui.applyButton.enabled and "Install" in w.ui.applyButton.toolTip


def test_install_on_request_then_devices_listed_and_choice_kept(panel):
    w = panel.make(missing=["torch"])
    w._parameterNode.SetParameter("Device", "cpu")
    installed = []
    w.logic.installDependencies = lambda: (installed.append(True), setattr(type(w.logic), "missing", []))
    w.ui.installButton.click()
    assert installed and not w.ui.installButton.visible
    assert w.ui.deviceComboBox.currentText == "CPU" and w._parameterNode.GetParameter("Device") == "cpu"


def test_apply_enabled_only_with_valid_inputs(panel):
    w = panel.make()
    assert not w.ui.installButton.visible
    assert w._parameterNode.GetNodeReference("TargetVolume") is panel.ref  # the first volume, preselected
    w.ui.targetVolumeSelector.choose(None)
    assert not w.ui.applyButton.enabled and w.ui.applyButton.toolTip == "Select the reference volume."
    w.ui.referenceSegmentationSelector.choose(panel.seg)  # brings its source volume and checks all segments
    assert w.ui.referenceVolumeSelector.currentNode() is panel.ref
    assert [w.ui.referenceSegmentsList.item(i).text for i in range(2)] == ["liver", "spleen"]
    assert all(w.ui.referenceSegmentsList.item(i).checkState() == Qt.Checked for i in range(2))
    assert not w.ui.applyButton.enabled and w.ui.applyButton.toolTip == "Select the target volume."
    w.ui.targetVolumeSelector.choose(panel.target)
    assert w.ui.applyButton.enabled and not w.ui.cancelButton.enabled
    for i in range(2):
        w.ui.referenceSegmentsList.item(i).setCheckState(Qt.Unchecked)
    assert not w.ui.applyButton.enabled and w.ui.applyButton.toolTip == "Check at least one reference segment."
    w.ui.referenceSegmentsList.item(1).setCheckState(Qt.Checked)
    assert w.ui.applyButton.enabled
    panel.seg.add_segment("S3", "kidney")  # the list follows the segmentation; new segments start unchecked
    assert [w.ui.referenceSegmentsList.item(i).checkState() for i in range(3)] == [Qt.Unchecked, Qt.Checked, Qt.Unchecked]


def test_apply_calls_logic_with_the_selection(panel):
    w = panel.make()
    w.ui.referenceSegmentationSelector.choose(panel.seg)
    w.ui.targetVolumeSelector.choose(panel.target)
    w.ui.referenceSegmentsList.item(0).setCheckState(Qt.Unchecked)
    w.ui.extraReferencesSelector.check(panel.extra)
    w.ui.deviceComboBox.choose("CPU")
    w.ui.overlapSpinBox.value = 0.25
    w.ui.overlapSpinBox.emit("valueChanged(double)", 0.25)
    w.ui.tuningStepsSpinBox.value = 5
    w.ui.tuningStepsSpinBox.emit("valueChanged(int)", 5)
    assert w.ui.postprocessCheckBox.checked and w.ui.localiseComboBox.currentText == "auto"  # the defaults
    w.ui.postprocessCheckBox.checked = False
    w.ui.postprocessCheckBox.emit("toggled(bool)", False)
    w.ui.localiseComboBox.choose("none (whole field of view)")
    assert w._parameterNode.GetParameter("Localise") == "none"
    seen = {}

    def during():  # while running: only Cancel is enabled, progress is shown
        seen.update(apply=w.ui.applyButton.enabled, cancel=w.ui.cancelButton.enabled, bar=w.ui.progressBar.value,
                    status=w.ui.statusLabel.text, save=w.ui.saveTaskButton.enabled)
        w.ui.cancelButton.click()

    w.logic.during = during
    w.ui.applyButton.click()
    name, args, kwargs = w.logic.calls[0]
    assert name == "segment" and args == (panel.target, panel.ref, panel.seg, ["S2"], None)
    assert kwargs == {"extraReferences": [(None, panel.extra)], "device": "cpu", "localise": "none", "overlap": 0.25,
                      "tuningSteps": 5, "postprocess": False, "show3D": False}
    assert seen == {"apply": False, "cancel": True, "bar": 50, "status": "window 1/2", "save": False}
    assert w.logic.calls[1][0] == "requestCancel"
    assert w.ui.applyButton.enabled and not w.ui.cancelButton.enabled and not w.ui.progressBar.visible
    assert w._parameterNode.GetNodeReference("OutputSegmentation") is w.logic.lastOutputSegmentation
    assert w.ui.outputSegmentationSelector.currentNode() is w.logic.lastOutputSegmentation
    assert w.ui.statusLabel.text == "Added 2 segments"


def test_cancel_and_errors_are_reported_and_buttons_restored(panel):
    w = panel.make()
    w.ui.referenceSegmentationSelector.choose(panel.seg)
    w.ui.targetVolumeSelector.choose(panel.target)

    def cancelled():
        raise Cancelled("segmentation cancelled")

    w.logic.during = cancelled
    w.ui.applyButton.click()
    assert w.ui.statusLabel.text == "Cancelled: nothing was added." and not panel.errors

    def fails():
        raise ValueError("segment 'liver' is empty on 'reference'")

    w.logic.during = fails
    w.ui.applyButton.click()
    assert panel.errors == ["IrisSegment failed. segment 'liver' is empty on 'reference'"]
    assert w.ui.applyButton.enabled and not w.ui.cancelButton.enabled and not w.ui.progressBar.visible


def test_save_task_and_segment_from_saved_task(panel):
    w = panel.make()
    w.ui.referenceSegmentationSelector.choose(panel.seg)
    assert not w.ui.saveTaskButton.enabled and not w.ui.segmentFromTaskButton.enabled
    w.ui.taskNameLineEdit.text = "liver CT"
    w.ui.taskNameLineEdit.emit("textChanged(QString)", "liver CT")
    assert w.ui.saveTaskButton.enabled
    w.ui.saveTaskButton.click()
    name, args, kwargs = w.logic.calls[-1]
    assert name == "saveTask" and args == ("liver CT", panel.ref, panel.seg, ["S1", "S2"])
    assert kwargs == {"device": "auto", "extraReferences": [], "tuningSteps": 0}
    assert w.ui.savedTaskComboBox.currentText == "liver CT" and "Saved task 'liver CT'" in w.ui.statusLabel.text
    w.ui.targetVolumeSelector.choose(panel.target)
    assert w.ui.segmentFromTaskButton.enabled
    w.ui.segmentFromTaskButton.click()
    name, args, kwargs = w.logic.calls[-1]
    assert name == "segment" and args == (panel.target,)
    assert kwargs["task"] == Path("/tasks/liver CT.task.safetensors") and kwargs["outputSegmentation"] is None


def test_gui_restored_from_parameter_node(panel):
    w = panel.make()
    p = w._parameterNode
    wasModified = p.StartModify()
    p.SetNodeReferenceID("ReferenceSegmentation", "seg_ref")
    p.SetNodeReferenceID("ReferenceVolume", "vol_ref")
    p.SetNodeReferenceID("TargetVolume", "vol_target")
    p.AddNodeReferenceID("ExtraReference", "seg_extra")
    p.SetParameter("ReferenceSegments", "S2")
    p.SetParameter("Device", "cuda")
    p.SetParameter("Overlap", "0.75")
    p.SetParameter("Show3D", "true")
    p.SetParameter("Localise", "registration")
    p.SetParameter("PostProcess", "false")
    p.EndModify(wasModified)
    assert w.ui.referenceSegmentationSelector.currentNode() is panel.seg and w.ui.targetVolumeSelector.currentNode() is panel.target
    assert w.ui.extraReferencesSelector.checkedNodes() == [panel.extra]
    assert [w.ui.referenceSegmentsList.item(i).checkState() for i in range(2)] == [Qt.Unchecked, Qt.Checked]
    assert w.ui.deviceComboBox.currentText == "GPU: Fake GPU" and w.ui.overlapSpinBox.value == 0.75 and w.ui.show3DCheckBox.checked
    assert w.ui.localiseComboBox.currentText == "registration" and not w.ui.postprocessCheckBox.checked
    assert w.ui.applyButton.enabled


def test_parameter_node_calls_exist_on_the_real_mrml_node(panel, monkeypatch):
    """Every MRML method the panel called on the fake parameter node exists on vtkMRMLScriptedModuleNode
    (checked against the slicer-core wheel when it is installed)."""
    w = panel.make()
    w.ui.referenceSegmentationSelector.choose(panel.seg)
    w.ui.extraReferencesSelector.check(panel.extra)
    w.ui.targetVolumeSelector.choose(panel.target)
    w.ui.applyButton.click()
    called = w._parameterNode.called
    assert {"SetParameter", "GetParameter", "SetNodeReferenceID", "AddNodeReferenceID", "RemoveNodeReferenceIDs"} <= called
    monkeypatch.undo()  # the real modules again
    real = pytest.importorskip("slicer", reason="needs the slicer-core wheel to check the names against the real class")
    assert [name for name in called if not hasattr(real.vtkMRMLScriptedModuleNode, name)] == []


# -- the Segment Editor effect: Apply is undoable ---------------------------------------------------
class FakeScriptedEffect:
    """TEST DOUBLE of the C++ qSlicerSegmentEditorScriptedEffect the editor hands to the effect: it records
    saveStateForUndo and modifySegmentByLabelmap in a shared log (the real one stores the segmentation's
    state for Undo and writes the labelmap through the editor's masking). A parameter that changes value
    modifies the parameter set node (FakeSegmentEditorNode), as the real one does."""

    def __init__(self, log, parameter_set_node):
        self.log, self._node, self.parameters, self.name = log, parameter_set_node, {}, ""

    def saveStateForUndo(self):
        self.log.append("undo state saved")

    def modifySegmentByLabelmap(self, segmentation_node, sid, labelmap, mode):
        self.log.append(f"segment {sid} modified")

    def parameterSetNode(self):
        return self._node

    def parameter(self, name):
        return self.parameters.get(name, "")

    def setParameter(self, name, value):
        changed = self.parameters.get(name) != value
        self.parameters[name] = value
        if changed:
            self._node.modified()

    def setParameterDefault(self, name, value):
        self.parameters.setdefault(name, value)

    def addOptionsWidget(self, widget):
        pass

    def addLabeledOptionsWidget(self, label, widget):
        pass


class FakeSegmentEditorNode:
    """TEST DOUBLE of vtkMRMLSegmentEditorNode: its source volume and segmentation, and its Modified event, which
    the editor answers synchronously by calling the active effect's updateGUIFromMRML (once at the end of a
    StartModify/EndModify batch, as slicer.util.NodeModify makes)."""

    def __init__(self, source, segmentation):
        self.source, self.segmentation, self.on_modified, self._batch, self._dirty = source, segmentation, None, 0, False

    def GetSourceVolumeNode(self):
        return self.source

    def GetSegmentationNode(self):
        return self.segmentation

    def StartModify(self):
        self._batch += 1
        return self._batch - 1

    def EndModify(self, was):
        self._batch = was
        if not self._batch and self._dirty:
            self._dirty = False
            self.modified()

    def modified(self):
        if self._batch:
            self._dirty = True
        elif self.on_modified is not None:
            self.on_modified()


@contextlib.contextmanager
def node_modify(node):
    """slicer.util.NodeModify."""
    was = node.StartModify()
    try:
        yield node
    finally:
        node.EndModify(was)


@pytest.fixture()
def effect(monkeypatch):
    """SegmentEditorIrisEffect against doubles of qt, slicer, SegmentEditorEffects, the scripted effect and the
    module logic (whose compute/write record what they do instead of running the network)."""
    log, errors = [], []
    scene = FakeScene()
    source, edited = FakeNode(scene, "vol_target", "target"), FakeNode(scene, "seg_edit", "edited")
    ref_volume = FakeNode(scene, "vol_ref", "reference")
    ref_seg = FakeNode(scene, "seg_ref", "reference segmentation", source=ref_volume)
    ref_seg.add_segment("S1", "liver")
    parameter_set_node = FakeSegmentEditorNode(source, edited)
    modules = make_fake_modules(scene, errors)
    qt = modules["qt"]
    for name in ("QPushButton", "QHBoxLayout", "QProgressBar", "QLabel"):
        setattr(qt, name, lambda *a, _n=name: FakeWidget(_n, _n))
    qt.QListWidget = lambda: FakeListWidget("segmentsList", "QListWidget")
    qt.QComboBox = lambda: FakeComboBox("localiseComboBox", "QComboBox")
    qt.QIcon = lambda *a: None
    slicer = modules["slicer"]
    slicer.qMRMLNodeComboBox = lambda: FakeNodeComboBox("combo", "qMRMLNodeComboBox")
    slicer.qSlicerSegmentEditorAbstractEffect = types.SimpleNamespace(ModificationModeSet=0)
    slicer.util.showStatusMessage = lambda *a: None
    slicer.util.NodeModify = node_modify

    def add_node(cls, name):
        node = FakeNode(scene, f"preview{len(scene.nodes)}", name)
        node.GetScene = lambda: scene
        node.GetDisplayNode = lambda: types.SimpleNamespace(SetOpacity=lambda opacity: None)
        return node

    slicer.mrmlScene.AddNewNodeByClass = add_node
    slicer.mrmlScene.RemoveNode = lambda node: log.append(f"removed {node.GetName()}")
    editor_effects = types.ModuleType("SegmentEditorEffects")

    class AbstractScriptedSegmentEditorEffect:
        def __init__(self, scriptedEffect):
            self.scriptedEffect = scriptedEffect

    editor_effects.AbstractScriptedSegmentEditorEffect = AbstractScriptedSegmentEditorEffect
    modules["SegmentEditorEffects"] = editor_effects

    constants = _module_constants()

    class Logic:
        cancel = False
        LOCALISE_CHOICES, LOCALISE_TOOLTIP = constants["LOCALISE_CHOICES"], constants["LOCALISE_TOOLTIP"]
        status = ""
        computed: list = []  # the keyword arguments of each compute

        def options(self, parameterNode):
            return {"device": "cpu", "localise": "auto", "overlap": 0.5, "tuningSteps": 0, "postprocess": True, "show3D": False}

        def getParameterNode(self):
            return None

        def segmentIds(self, node):
            return list(node.GetSegmentation().segments) if node is not None else []

        def sourceVolume(self, node):
            return node.source if node is not None else None

        def compute(self, target, *args, **kwargs):
            if self.cancel:
                raise Cancelled("segmentation cancelled")
            log.append("computed")
            self.computed.append(kwargs)
            return types.SimpleNamespace(target_node=target, labels=[1, 2])

        def write(self, pending, node, add=None, show3D=False):
            ids = []
            for value in pending.labels:
                if add is not None:  # the effect's way: through the editor
                    ids.append(add(node, f"label {value}", (1, 0, 0), "labelmap"))
                else:
                    ids.append(f"new{value}")
                    node.segmentation.segments[ids[-1]] = FakeSegment(f"label {value}")
            log.append(f"written to {node.GetName()}")
            return ids

        def statusText(self, ids):
            return self.status

    logic = Logic()
    logic.computed = []
    slicer.util.getModuleLogic = lambda name: logic
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    errors_module = types.ModuleType("IrisSegmentLib.errors")
    errors_module.Cancelled = Cancelled
    monkeypatch.setitem(sys.modules, "IrisSegmentLib.errors", errors_module)
    edited.segmentation.AddEmptySegment = lambda sid, name, colour: (
        edited.segmentation.segments.__setitem__(f"added{len(edited.segmentation.segments)}", FakeSegment(name))
        or f"added{len(edited.segmentation.segments) - 1}")
    spec = importlib.util.spec_from_file_location("SegmentEditorIrisEffect_under_test", EFFECT_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    scripted = FakeScriptedEffect(log, parameter_set_node)
    fx = module.SegmentEditorIrisEffect(scripted)
    fx.setupOptionsFrame()
    fx.setMRMLDefaults()
    parameter_set_node.on_modified = fx.updateGUIFromMRML  # the editor, once the effect is active
    fx.referenceSegmentationSelector.choose(ref_seg)
    return types.SimpleNamespace(fx=fx, log=log, errors=errors, logic=logic, edited=edited, scripted=scripted)


def test_effect_apply_saves_one_undo_state_before_changing_the_segmentation(effect):
    fx, log = effect.fx, effect.log
    assert fx.applyButton.enabled
    # Preview first: computed and shown in a separate preview segmentation, no undo state for that.
    fx.previewButton.click()
    assert log == ["computed", "written to edited IRIS preview"] and not effect.errors
    log.clear()
    fx.applyButton.click()
    # One undo state, saved before the edited segmentation is touched; then the preview is removed.
    assert log == ["undo state saved", "segment added0 modified", "segment added1 modified", "written to edited",
                   "removed edited IRIS preview"]
    assert not effect.errors
    # Apply without a preview computes first, and still saves exactly one undo state per Apply.
    log.clear()
    fx.applyButton.click()
    assert log.count("undo state saved") == 1
    assert log.index("undo state saved") < min(i for i, e in enumerate(log) if e.startswith("segment "))
    assert log[0] == "computed" and log[-1] == "removed edited IRIS preview"


def test_effect_apply_cancelled_saves_no_undo_state_and_changes_nothing(effect):
    effect.logic.cancel = True
    before = dict(effect.edited.segmentation.segments)
    effect.fx.applyButton.click()
    assert effect.log == [] and effect.edited.segmentation.segments == before and not effect.errors


def test_effect_localisation_is_an_effect_parameter_passed_to_the_logic(effect):
    fx, scripted = effect.fx, effect.scripted
    assert scripted.parameter("IrisLocalise") == "auto" and fx.localiseComboBox.currentText == "auto"  # the default
    assert [fx.localiseComboBox.itemData(i) for i in range(3)] == ["auto", "registration", "none"]
    assert "whole field of view" in fx.localiseComboBox.toolTip
    fx.localiseComboBox.choose("registration")  # the user's choice, stored with the effect
    assert scripted.parameter("IrisLocalise") == "registration"
    fx.previewButton.click()
    assert effect.logic.computed[-1]["localise"] == "registration" and effect.logic.computed[-1]["postprocess"] is True
    scripted.setParameter("IrisLocalise", "none")  # e.g. restored with the scene: the GUI follows
    assert fx.localiseComboBox.currentText == "none (whole field of view)"
    fx.applyButton.click()
    fx.previewButton.click()
    assert effect.logic.computed[-1]["localise"] == "none" and not effect.errors


def test_effect_status_shows_localisation_and_warnings(effect):
    fx = effect.fx
    effect.logic.status = ("Added liver to 'edited IRIS preview' in 1.0 s on cpu.\nNot localised: segmented the whole field of view.\n"
                           "Warning: registration failed for every reference: segmenting the whole field of view")
    fx.previewButton.click()
    assert fx.statusLabel.text == effect.logic.status and fx.statusLabel.wordWrap
    effect.logic.cancel = True
    fx.previewButton.click()
    assert fx.statusLabel.text == "IRIS cancelled: nothing was added."


def test_effect_reference_choice_survives_the_gui_refresh(effect):
    """Each changed effect parameter refreshes the GUI from all of them (the editor does it synchronously): the
    parameters are set in one NodeModify batch, so picking a reference keeps its source volume and checks all its
    segments, and unchecking one keeps the choice of localisation."""
    fx, scripted = effect.fx, effect.scripted
    assert fx.referenceVolumeSelector.currentNodeID == "vol_ref" and scripted.parameter("IrisReferenceVolume") == "vol_ref"
    assert scripted.parameter("IrisReferenceSegments") == "S1" and fx._checkedIds() == ["S1"]
    fx.localiseComboBox.choose("none (whole field of view)")
    fx.segmentsList.item(0).setCheckState(Qt.Unchecked)
    assert scripted.parameter("IrisReferenceSegments") == "" and scripted.parameter("IrisLocalise") == "none"
    assert fx.localiseComboBox.currentText == "none (whole field of view)" and not fx.previewButton.enabled
