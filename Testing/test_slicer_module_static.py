"""The Slicer module without Slicer: static checks of its files, and its panel's wiring with test doubles.

3D Slicer (Qt, PythonQt, slicer.app) is not available here. The static checks read the .ui XML, the
module's Python source and the CMake lists. The wiring tests load IrisSegment.py against TEST DOUBLES
of the `qt`, `vtk` and `slicer` modules (fake widgets built from the .ui file, a fake parameter node, a fake
progress dialog, a fake logic overriding the parts that would run the network or install packages): they check
which buttons are enabled for which inputs, that Apply / Save task / Segment from task call the logic with what
was selected, and that the progress dialog's Cancel reaches the logic. They do not prove that the real Qt widgets
behave like the doubles. The Segment Editor effect and the logic run against the real MRML classes in
test_slicer_first_run.py.
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
SUPPORT_DIR = MODULE_DIR / "IrisSegmentSupport"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "IrisSegment.ui"
MRML_WIDGETS = {"qMRMLNodeComboBox", "qMRMLCheckableNodeComboBox"}


def ui_widgets() -> dict[str, str]:
    """name -> class of every widget in the .ui file."""
    return {w.get("name"): w.get("class") for w in ET.parse(UI_FILE).iter("widget")}


# -- static checks ---------------------------------------------------------------------------------
def test_every_ui_name_used_in_python_exists_in_ui_file():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_PY.read_text(encoding="utf-8")))
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
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    listed = set(_cmake_list(text, "MODULE_PYTHON_SCRIPTS")) | set(_cmake_list(text, "MODULE_PYTHON_RESOURCES"))
    present = {str(p.relative_to(MODULE_DIR)) for p in MODULE_DIR.rglob("*")
               if p.is_file() and p.name != "CMakeLists.txt" and "__pycache__" not in p.parts}
    assert listed == present
    assert "slicerMacroBuildScriptedModule" in text


def _cmake_value(text: str, key: str) -> str:
    return re.search(rf'set\({key} "([^"]*)"\)', text).group(1)


def test_extension_cmake_metadata_and_library_packaging():
    """Every field of the extension description is filled; the addresses share the module's HOMEPAGE, which is
    marked as a placeholder until the project has a public home; icon and screenshots are files of this checkout."""
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert _cmake_value(text, "EXTENSION_CATEGORY") == "Segmentation" and _cmake_value(text, "EXTENSION_DEPENDS") == "PyTorch"
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL", "EXTENSION_CONTRIBUTORS", "EXTENSION_SCREENSHOTURLS"):
        assert _cmake_value(text, key), key
    homepage = _module_constants()["HOMEPAGE"]
    assert _cmake_value(text, "EXTENSION_HOMEPAGE") == homepage and "PLACEHOLDER" in homepage
    assert "PLACEHOLDER" in text and "PLACEHOLDER" in MODULE_PY.read_text(encoding="utf-8").split("HOMEPAGE =")[0]  # said where it is set
    raw = "https://raw.githubusercontent.com/" + homepage.removeprefix("https://github.com/") + "/main/"
    for url in [_cmake_value(text, "EXTENSION_ICONURL"), *_cmake_value(text, "EXTENSION_SCREENSHOTURLS").split()]:
        assert url.startswith(raw) and (ROOT / url.removeprefix(raw)).is_file(), url
    assert "add_subdirectory(IrisSegment)" in text
    assert "IrisSegmentLib/*.py" in text and "Resources/Models/*" in text and "Resources/SampleData/*" in text
    assert "Slicer_EXTENSION_GENERATE_CONFIG" in text and "Slicer_EXTENSION_CPACK" in text


def test_no_torch_or_library_import_at_module_import():
    """Dependencies are installed on request only: importing the module, the effect or their support package must
    not need them (IrisSegmentLib imports torch as soon as it is imported)."""
    for path in (MODULE_PY, EFFECT_PY, *SUPPORT_DIR.glob("*.py")):
        top_level = [line for line in path.read_text(encoding="utf-8").splitlines() if re.match(r"(import|from) ", line)]
        assert not [line for line in top_level if "torch" in line or "IrisSegmentLib" in line], path.name


def test_checkout_library_path_is_appended_never_first():
    source = MODULE_PY.read_text(encoding="utf-8")
    assert "sys.path.append(str(_HERE.parent))" in source and "sys.path.insert" not in source


def test_minimum_slicer_version_stated_and_its_python_in_ci():
    """The minimum Slicer is stated in the module, its help and the README; CI compiles the module and the library
    with the Python of that Slicer (5.10 and later: 3.12)."""
    minimum = _module_constants()["MINIMUM_SLICER"]
    assert minimum == "5.10"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"3D Slicer {minimum} or later" in readme and "MINIMUM_SLICER" in MODULE_PY.read_text(encoding="utf-8").split("helpText")[1]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "python -m pytest Testing -q" in ci and re.search(r"compileall .*IrisSegment .*IrisSegmentLib", ci) and "3.12" in ci


def test_help_links_the_readme():
    assert 'README_URL = HOMEPAGE + "#3d-slicer-extension"' in MODULE_PY.read_text(encoding="utf-8")
    assert '<a href="{README_URL}">README</a>' in MODULE_PY.read_text(encoding="utf-8")
    assert "\n## 3D Slicer extension\n" in (ROOT / "README.md").read_text(encoding="utf-8")  # the anchor the link points to


def test_license_is_permissive_and_names_the_data_licences():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0" in text
    assert "CC BY-SA 4.0" in text and "Resources/SampleData" in text  # the bundled sample keeps its own licence
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")


def test_effect_follows_the_scripted_effect_conventions():
    source = EFFECT_PY.read_text(encoding="utf-8")
    assert "class SegmentEditorIrisEffect(AbstractScriptedSegmentEditorEffect)" in source
    assert source.count("saveStateForUndo()") == 1
    assert 'scriptedEffect.name = "IRIS"' in source
    assert "SegmentEditorIrisLib" in MODULE_PY.read_text(encoding="utf-8") and 'connect("startupCompleted()", registerEditorEffect)' in MODULE_PY.read_text(encoding="utf-8")


def _ui_label_of(widget_name: str) -> str:
    """The text of the QLabel in the form row of `widget_name`."""
    for layout in ET.parse(UI_FILE).iter("layout"):
        items = layout.findall("item")
        row = next((i.get("row") for i in items if i.find("widget") is not None and i.find("widget").get("name") == widget_name), None)
        if row is not None:
            label = next(i.find("widget") for i in items if i.get("row") == row and i.get("column") == "0")
            return label.find("property/string").text
    raise AssertionError(f"{widget_name} is in no form layout")


def _module_constants(path: Path = MODULE_PY) -> dict:
    """Module-level constants of IrisSegment.py (or `path`), read without importing it (it needs Slicer)."""
    import ast

    out = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            with contextlib.suppress(ValueError):
                out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


LOGIC_PY = SUPPORT_DIR / "logic.py"


def _logic_constants() -> dict:
    return _module_constants(LOGIC_PY)


def test_localisation_choice_in_panel_and_effect():
    """A "Localisation" combo box in the panel and in the effect: the engine's modes, auto first (the default),
    with a tooltip saying what auto and none do; the panel stores it in the parameter node, the effect in an
    effect parameter, and both pass it to the logic."""
    from IrisSegmentLib.config import LOCALISE_MODES

    assert ui_widgets()["localiseComboBox"] == "QComboBox" and _ui_label_of("localiseComboBox") == "Localisation:"
    constants = _logic_constants()
    assert [v for v, _ in constants["LOCALISE_CHOICES"]] == list(LOCALISE_MODES) and LOCALISE_MODES[0] == "auto"
    tooltip = constants["LOCALISE_TOOLTIP"]
    assert "auto: register the reference onto the target and segment only where its structures can be" in tooltip
    assert "none: segment the whole field of view" in tooltip
    module, effect = LOGIC_PY.read_text(encoding="utf-8"), EFFECT_PY.read_text(encoding="utf-8")
    assert '("Localise", "auto")' in module and '"localise": parameterNode.GetParameter("Localise")' in module
    assert re.search(r'def segment\(self, .*?localise="auto"', module, re.S) and "localise=localise" in module
    assert 'addLabeledOptionsWidget("Localisation:", self.localiseComboBox)' in effect
    assert "setParameter(LOCALISE," in effect and "setParameterDefault(LOCALISE," in effect
    assert "localise=self._localise()" in effect


def test_postprocessing_is_the_engines():
    """The panel's clean-up option maps to the engine's post-processing (no VTK connectivity filter of its own)."""
    assert ui_widgets()["postprocessCheckBox"] == "QCheckBox" and "keepLargestCheckBox" not in ui_widgets()
    lib = "".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "IrisSegmentLib" / "mrml").glob("*.py")))
    assert "vtkImageConnectivityFilter" not in lib and "postprocess=postprocess" in lib
    assert '"postprocess": parameterNode.GetParameter("PostProcess")' in LOGIC_PY.read_text(encoding="utf-8")
    assert 'postprocess=options["postprocess"]' in EFFECT_PY.read_text(encoding="utf-8")


def test_requirements_name_their_import_and_torch_matches_the_library():
    """Every requirement maps to the module it installs (checked against this environment, which has them all:
    PyYAML is `yaml`), and the torch the extension asks for is the library's own minimum."""
    import tomllib

    from IrisSegmentSupport import dependencies
    requirements = dependencies.load(MODULE_DIR / "Resources" / "requirements.txt")
    assert {"torch", "nibabel", "picsl_greedy", "PyYAML", "safetensors"} <= {r.name for r in requirements}
    assert [r.name for r in requirements if importlib.util.find_spec(r.module) is None] == []
    library = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    torch = next(r for r in requirements if r.name == "torch")
    assert f"torch>={torch.minimum}" in library


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

    def disconnect(self, signal, slot):
        self._slots[signal].remove(slot)

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


class FakeProgressDialog(FakeWidget):
    """QProgressDialog double: labels and values shown, `cancel()` is the user's click on its Cancel button (Qt then
    emits canceled()); setting `value` processes events, as a modal QProgressDialog's setValue does."""

    def __init__(self, app=None):
        self.app, self.labels, self.closed, self.wasCanceled, self._value = None, [], False, False, 0
        super().__init__("progressDialog", "QProgressDialog")
        self.app = app

    @property
    def labelText(self):
        return self.labels[-1] if self.labels else ""

    @labelText.setter
    def labelText(self, text):
        self.labels.append(text)

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, v):
        self._value = v
        if self.app is not None:
            self.app.processEvents()

    def cancel(self):
        self.wasCanceled = True
        self.emit("canceled()")

    def close(self):
        self.closed = True


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
    util.dialogs = []

    def createProgressDialog(**kwargs):
        dialog = FakeProgressDialog()
        for key, value in kwargs.items():
            setattr(dialog, key, value)
        util.dialogs.append(dialog)
        return dialog

    util.createProgressDialog = createProgressDialog
    util.showStatusMessage = lambda *a: None
    util.errorDisplay = lambda text, **kwargs: errors.append((text, kwargs.get("detailedText", "")))
    util.WaitCursor = contextlib.nullcontext

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


class IrisInputError(ValueError):
    pass


def fresh_support_modules(monkeypatch) -> None:
    """IrisSegmentSupport (beside the module, on pytest's pythonpath as on Slicer's sys.path) imported anew against
    this test's doubles."""
    for name in [m for m in sys.modules if m == "IrisSegmentSupport" or m.startswith("IrisSegmentSupport.")]:
        monkeypatch.delitem(sys.modules, name)


TORCH_MISSING = "torch"


@pytest.fixture()
def panel(monkeypatch):
    """The module's widget, set up against the doubles, with a fake logic that records its calls."""
    scene, errors = FakeScene(), []
    modules = make_fake_modules(scene, errors)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    fresh_support_modules(monkeypatch)
    errors_module = types.ModuleType("IrisSegmentLib.errors")
    errors_module.Cancelled, errors_module.IrisInputError = Cancelled, IrisInputError
    monkeypatch.setitem(sys.modules, "IrisSegmentLib.errors", errors_module)
    spec = importlib.util.spec_from_file_location("IrisSegment_under_test", MODULE_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from IrisSegmentSupport import dependencies

    class FakeLogic(module.IrisSegmentLogic):
        missing: list[str] = []  # names of the requirements reported as not installed
        tasks: dict = {}

        def __init__(self):
            super().__init__()
            self.calls = []
            self.lastOutputSegmentation = FakeNode(scene, "seg_out", "target IRIS")
            self.during = None  # called inside segment(), while "running"
            self.cancelled = False

        def dependencyProblems(self, probe=False):
            return [dependencies.Problem(r) for r in self.requirements() if r.name in self.missing]

        def deviceChoices(self):
            return [("auto", "auto (GPU: Fake GPU)"), ("cuda", "GPU: Fake GPU"), ("cpu", "CPU")]

        def savedTasks(self):
            return dict(self.tasks)

        @classmethod
        def defaultTarget(cls, scene, reference=None):  # stand-in: the real one is tested on a real scene
            return next((n for n in scene.nodes.values() if n.id.startswith("vol") and n is not reference), None)

        def segment(self, *args, progress=None, **kwargs):
            self.calls.append(("segment", args, kwargs))
            self.cancelled = False
            progress(0.5, "window 1/2")
            if self.during:
                self.during()
            if self.cancelled:
                raise Cancelled("segmentation cancelled")
            return ["s1", "s2"]

        def saveTask(self, name, *args, progress=None, **kwargs):
            self.calls.append(("saveTask", (name, *args), kwargs))
            FakeLogic.tasks = {**FakeLogic.tasks, name: Path(f"/tasks/{name}.task.safetensors")}
            return name

        def requestCancel(self):
            self.calls.append(("requestCancel", (), {}))
            self.cancelled = True

        @property
        def cancelRequested(self):
            return self.cancelled

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
                                 module=module, dialogs=modules["slicer.util"].dialogs)


# -- wiring ----------------------------------------------------------------------------------------
def test_missing_dependencies_offer_install_and_block_apply(panel):
    w = panel.make(missing=["torch"])
    assert w.ui.installButton.visible and w.ui.dependenciesLabel.visible
    assert "torch is not installed" in w.ui.dependenciesLabel.text and "Click Install dependencies" in w.ui.dependenciesLabel.text
    assert [w.ui.deviceComboBox.itemData(i) for i in range(2)] == ["auto", None]  # devices need torch: not probed
    w.ui.referenceSegmentationSelector.choose(panel.seg)
    w.ui.targetVolumeSelector.choose(panel.target)
    assert not w.ui.applyButton.enabled and "Install" in w.ui.applyButton.toolTip


def test_panel_opens_with_a_broken_torch_and_says_so(panel, monkeypatch):
    """torch installed but failing to load (the panel imports it to see): the panel still opens, names the error and
    offers the install; nothing that needs torch (devices, saved tasks) is asked for."""
    from IrisSegmentSupport import dependencies

    broken = dependencies.Problem(dependencies.Requirement("torch", "2.2"), "2.3.0", "OSError: [WinError 126] c10.dll not found")
    probes = []
    monkeypatch.setattr(panel.module.IrisSegmentLogic, "dependencyProblems", lambda self, probe=False: probes.append(probe) or [broken])
    monkeypatch.setattr(panel.module.IrisSegmentLogic, "deviceChoices", lambda self: pytest.fail("devices need torch"))
    monkeypatch.setattr(panel.module.IrisSegmentLogic, "savedTasks", lambda self: pytest.fail("saved tasks need torch"))
    w = panel.make()
    assert probes == [True] and w.ui.installButton.visible
    assert "torch 2.3.0 is installed but does not load (OSError: [WinError 126] c10.dll not found)" in w.ui.dependenciesLabel.text
    assert [w.ui.deviceComboBox.itemData(i) for i in range(2)] == ["auto", None]


def test_first_use_without_torch_install_offer_then_a_result(panel, caplog):
    """No torch: the panel opens with the install offer; Install (here the fake logic's, which reports success the
    way the real one does) lists the devices, and Apply gives a result; no error shown, nothing logged as an error."""
    w = panel.make(missing=["torch"])
    w._parameterNode.SetParameter("Device", "cpu")
    offered = []

    def install(problems):
        offered.append([p.text() for p in problems])
        type(w.logic).missing = []
        return "Dependencies installed: IrisSegment is ready."

    w.logic.installDependencies = install
    w.ui.installButton.click()
    assert offered == [["torch is not installed"]] and not w.ui.installButton.visible
    assert w.ui.statusLabel.text == "Dependencies installed: IrisSegment is ready."
    assert w.ui.deviceComboBox.currentText == "CPU" and w._parameterNode.GetParameter("Device") == "cpu"
    w.ui.referenceSegmentationSelector.choose(panel.seg)
    w.ui.targetVolumeSelector.choose(panel.target)
    w.ui.applyButton.click()
    assert w.ui.statusLabel.text == "Added 2 segments" and panel.errors == []
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


def test_failed_install_is_said_without_traceback(panel):
    from IrisSegmentSupport.logic import DependencyError

    w = panel.make(missing=["torch"])

    def install(problems):
        raise DependencyError("IrisSegment needs the PyTorch extension: install it in the Extensions Manager")

    w.logic.installDependencies = install
    w.ui.installButton.click()
    assert panel.errors == [("IrisSegment needs the PyTorch extension: install it in the Extensions Manager", "")]
    assert w.ui.installButton.visible and w.ui.statusLabel.text.startswith("IrisSegment needs the PyTorch extension")


def test_apply_enabled_only_with_valid_inputs(panel):
    w = panel.make()
    assert not w.ui.installButton.visible
    assert w._parameterNode.GetNodeReference("TargetVolume") is panel.ref  # the logic's default target (no reference yet)
    w.ui.targetVolumeSelector.choose(None)
    assert not w.ui.applyButton.enabled and w.ui.applyButton.toolTip == "Select the reference volume."
    w.ui.referenceSegmentationSelector.choose(panel.seg)  # brings its source volume and checks all segments
    assert w.ui.referenceVolumeSelector.currentNode() is panel.ref
    assert [w.ui.referenceSegmentsList.item(i).text for i in range(2)] == ["liver", "spleen"]
    assert all(w.ui.referenceSegmentsList.item(i).checkState() == Qt.Checked for i in range(2))
    assert not w.ui.applyButton.enabled and w.ui.applyButton.toolTip == "Select the target volume."
    w.ui.targetVolumeSelector.choose(panel.target)
    assert w.ui.applyButton.enabled
    for i in range(2):
        w.ui.referenceSegmentsList.item(i).setCheckState(Qt.Unchecked)
    assert not w.ui.applyButton.enabled and w.ui.applyButton.toolTip == "Check at least one reference segment."
    w.ui.referenceSegmentsList.item(1).setCheckState(Qt.Checked)
    assert w.ui.applyButton.enabled
    panel.seg.add_segment("S3", "kidney")  # the list follows the segmentation; new segments start unchecked
    assert [w.ui.referenceSegmentsList.item(i).checkState() for i in range(3)] == [Qt.Unchecked, Qt.Checked, Qt.Unchecked]


def test_target_never_stays_the_reference(panel):
    """The first volume was preselected as target; picking the reference drawn on it moves the target to another."""
    w = panel.make()
    assert w._parameterNode.GetNodeReference("TargetVolume") is panel.ref
    w.ui.referenceSegmentationSelector.choose(panel.seg)  # its source volume is panel.ref
    assert w._parameterNode.GetNodeReference("ReferenceVolume") is panel.ref
    assert w._parameterNode.GetNodeReference("TargetVolume") is panel.target
    assert w.ui.targetVolumeSelector.currentNode() is panel.target and w.ui.applyButton.enabled


def test_apply_calls_logic_with_the_selection_and_the_dialog_cancels(panel):
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

    def during():  # while running: the modal dialog shows the step; its Cancel reaches the logic and says when
        dialog = panel.dialogs[-1]
        seen.update(apply=w.ui.applyButton.enabled, save=w.ui.saveTaskButton.enabled, value=dialog.value,
                    label=dialog.labelText, title=dialog.windowTitle)
        dialog.cancel()
        seen["status"] = w.ui.statusLabel.text

    w.logic.during = during
    w.ui.applyButton.click()
    name, args, kwargs = w.logic.calls[0]
    assert name == "segment" and args == (panel.target, panel.ref, panel.seg, ["S2"], None)
    assert kwargs == {"extraReferences": [(None, panel.extra)], "device": "cpu", "localise": "none", "overlap": 0.25,
                      "tuningSteps": 5, "postprocess": False, "show3D": False}
    assert seen == {"apply": False, "save": False, "value": 50, "label": "window 1/2", "title": "IRIS Segment",
                    "status": "Cancelling before the next batch of windows; nothing will be added or written."}
    assert w.logic.calls[1][0] == "requestCancel"
    assert w.ui.statusLabel.text == "Cancelled: nothing was added." and panel.dialogs[-1].closed and not panel.errors
    assert w.ui.applyButton.enabled and w._parameterNode.GetNodeReference("OutputSegmentation") is None
    w.logic.during = None
    w.ui.applyButton.click()
    assert w._parameterNode.GetNodeReference("OutputSegmentation") is w.logic.lastOutputSegmentation
    assert w.ui.outputSegmentationSelector.currentNode() is w.logic.lastOutputSegmentation
    assert w.ui.statusLabel.text == "Added 2 segments"


def test_errors_are_reported_without_traceback_unless_a_bug(panel):
    w = panel.make()
    w.ui.referenceSegmentationSelector.choose(panel.seg)
    w.ui.targetVolumeSelector.choose(panel.target)

    def bad_input():
        raise IrisInputError("segment 'liver' is empty on 'reference': draw it on this volume first")

    w.logic.during = bad_input
    w.ui.applyButton.click()
    assert panel.errors == [("IRIS Segment failed: segment 'liver' is empty on 'reference': draw it on this volume first", "")]
    assert w.ui.applyButton.enabled and panel.dialogs[-1].closed

    def bug():
        raise KeyError("oops")

    w.logic.during = bug
    w.ui.applyButton.click()
    text, details = panel.errors[-1]
    assert text == "IRIS Segment failed: 'oops'" and "Traceback" in details and "KeyError" in details
    assert w.ui.applyButton.enabled and panel.dialogs[-1].closed


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
