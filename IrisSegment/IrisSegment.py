"""IRIS Segment: segment a scan like the segments drawn on another scan (in-context segmentation).

The panel and the Segment Editor effect only gather inputs; IrisSegmentSupport.logic (no Qt, no torch) and
IrisSegmentLib.mrml do the work. Nothing here imports torch or IrisSegmentLib at import time: torch loads on the
first segmentation, and dependencies are installed only when the user asks for it.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

_HERE = Path(__file__).resolve().parent
if not (_HERE / "IrisSegmentLib").is_dir() and (_HERE.parent / "IrisSegmentLib" / "__init__.py").is_file():
    # A source checkout added through "Additional module paths": the library sits beside this folder. Appended, never
    # put first, so that nothing in the checkout can shadow a package of Slicer's own Python.
    if str(_HERE.parent) not in sys.path:
        sys.path.append(str(_HERE.parent))

from IrisSegmentSupport import dependencies, sampledata  # noqa: E402  (beside this file; Slicer puts it on sys.path)
from IrisSegmentSupport.logic import IrisSegmentLogic  # noqa: E402
from IrisSegmentSupport.progressdialog import ProgressRun  # noqa: E402

MINIMUM_SLICER = "5.10"  # Python 3.12; IrisSegmentLib needs Python 3.10 or newer (Slicer 5.8 and older ship 3.9)
# PLACEHOLDER: the project has no public repository yet; replace this address (and the ones in ../CMakeLists.txt)
# with the real one before submitting the extension to the Slicer Extensions Index.
HOMEPAGE = "https://github.com/PLACEHOLDER-OWNER/IrisSegment"
README_URL = HOMEPAGE + "#3d-slicer-extension"
SEGMENT_SEPARATOR = ";"


#
# IrisSegment
#
class IrisSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "IRIS Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["IrisSegment contributors"]
        self.parent.helpText = (
            "Segment a scan like the segments drawn on another scan (IRIS in-context segmentation): pick a reference "
            "volume and its segmentation, check the segments, pick the target volume and click Apply. Results are "
            "added as new segments named and coloured like the reference. Localisation 'auto' first registers the "
            "reference onto the target and segments only where its structures can be; the status says whether it "
            "did, and shows any warning (e.g. a failed registration). Also available as the 'IRIS' effect of "
            "the Segment Editor and from Python: slicer.util.getModuleLogic('IrisSegment').segment(...). "
            "Try it on the sample pair 'IRIS hippocampus pair' of the Sample Data module. "
            f'Needs Slicer {MINIMUM_SLICER} or later and PyTorch (Install dependencies). '
            f'<p>Instructions, limits and the model card: <a href="{README_URL}">README</a>.</p>'
        )
        self.parent.acknowledgementText = (
            "Based on IRIS (Gao et al., CVPR 2025, 'Show and Segment: Universal Medical Image Segmentation via "
            "In-Context Learning'). Sample data: Medical Segmentation Decathlon, Task04_Hippocampus (CC BY-SA 4.0)."
        )
        slicer.app.connect("startupCompleted()", registerEditorEffect)
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerEditorEffect() -> None:
    """Adds the 'IRIS' effect to the Segment Editor (as Slicer's effect extensions do, once the application started)."""
    import qSlicerSegmentationsEditorEffectsPythonQt as effects

    instance = effects.qSlicerSegmentEditorScriptedEffect(None)
    instance.setPythonSource(str(_HERE / "SegmentEditorIrisLib" / "SegmentEditorIrisEffect.py").replace("\\", "/"))
    instance.self().register()


def registerSampleData() -> None:
    """Adds the bundled sample pair to the Sample Data module (loaded from the bundled files, no download)."""
    import SampleData

    try:
        source = sampledata.source(_HERE, _HERE / "Resources" / "Icons" / "IrisSegmentSampleData.png")
    except OSError as e:
        logging.warning(f"IrisSegment: the sample pair is not in the Sample Data module ({e})")
        return
    SampleData.SampleDataLogic.registerCustomSampleDataSource(**source)


#
# IrisSegmentWidget
#
class IrisSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: keeps the parameter node and the GUI in step, enables buttons, runs the logic behind a progress dialog."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._updatingGUI = False
        self._running = False
        self._problems: list[dependencies.Problem] = []
        self._observedSegmentation = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/IrisSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = IrisSegmentLogic()
        for value, label in self.logic.LOCALISE_CHOICES:
            self.ui.localiseComboBox.addItem(label, value)
        self.ui.localiseComboBox.toolTip = self.logic.LOCALISE_TOOLTIP

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        for selector in (self.ui.referenceVolumeSelector, self.ui.referenceSegmentationSelector,
                         self.ui.targetVolumeSelector, self.ui.outputSegmentationSelector):
            selector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.extraReferencesSelector.connect("checkedNodesChanged()", self.updateParameterNodeFromGUI)
        self.ui.referenceSegmentsList.connect("itemChanged(QListWidgetItem*)", self.updateParameterNodeFromGUI)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.localiseComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.overlapSpinBox.connect("valueChanged(double)", self.updateParameterNodeFromGUI)
        self.ui.tuningStepsSpinBox.connect("valueChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.postprocessCheckBox.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        self.ui.show3DCheckBox.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        self.ui.taskNameLineEdit.connect("textChanged(QString)", self.updateButtons)
        self.ui.savedTaskComboBox.connect("currentIndexChanged(int)", self.updateButtons)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.saveTaskButton.connect("clicked(bool)", self.onSaveTask)
        self.ui.segmentFromTaskButton.connect("clicked(bool)", self.onSegmentFromTask)
        self.ui.installButton.connect("clicked(bool)", self.onInstallDependencies)

        self.refreshDependencies()
        self.initializeParameterNode()

    def cleanup(self):
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- parameter node ------------------------------------------------------------------------
    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        if not p.GetNodeReference("TargetVolume"):
            target = self.logic.defaultTarget(slicer.mrmlScene, p.GetNodeReference("ReferenceVolume"))
            if target is not None:
                p.SetNodeReferenceID("TargetVolume", target.GetID())

    def setParameterNode(self, parameterNode):
        if parameterNode:
            self.logic.setDefaultParameters(parameterNode)
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = parameterNode
        if self._parameterNode is not None:
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None):
        if self._parameterNode is None or self._updatingGUI:
            return
        self._updatingGUI = True
        try:
            p = self._parameterNode
            self.ui.referenceVolumeSelector.setCurrentNode(p.GetNodeReference("ReferenceVolume"))
            self.ui.referenceSegmentationSelector.setCurrentNode(p.GetNodeReference("ReferenceSegmentation"))
            self.ui.targetVolumeSelector.setCurrentNode(p.GetNodeReference("TargetVolume"))
            self.ui.outputSegmentationSelector.setCurrentNode(p.GetNodeReference("OutputSegmentation"))
            extras = [p.GetNthNodeReference("ExtraReference", i) for i in range(p.GetNumberOfNodeReferences("ExtraReference"))]
            for i in range(self.ui.extraReferencesSelector.nodeCount()):
                node = self.ui.extraReferencesSelector.nodeFromIndex(i)
                self.ui.extraReferencesSelector.setCheckState(node, qt.Qt.Checked if node in extras else qt.Qt.Unchecked)
            self._observeSegmentation(p.GetNodeReference("ReferenceSegmentation"))
            self._fillSegmentList(p.GetNodeReference("ReferenceSegmentation"), self._checkedSegmentIds())
            index = self.ui.deviceComboBox.findData(p.GetParameter("Device"))
            self.ui.deviceComboBox.setCurrentIndex(max(index, 0))
            self.ui.localiseComboBox.setCurrentIndex(max(self.ui.localiseComboBox.findData(p.GetParameter("Localise")), 0))
            self.ui.overlapSpinBox.value = float(p.GetParameter("Overlap"))
            self.ui.tuningStepsSpinBox.value = int(p.GetParameter("TuningSteps"))
            self.ui.postprocessCheckBox.checked = p.GetParameter("PostProcess") != "false"
            self.ui.show3DCheckBox.checked = p.GetParameter("Show3D") == "true"
        finally:
            self._updatingGUI = False
        self.updateButtons()

    def updateParameterNodeFromGUI(self, caller=None, event=None):
        if self._parameterNode is None or self._updatingGUI:
            return
        p = self._parameterNode
        wasModified = p.StartModify()
        try:
            newSegmentation = self.ui.referenceSegmentationSelector.currentNodeID != (p.GetNodeReferenceID("ReferenceSegmentation") or "")
            p.SetNodeReferenceID("ReferenceVolume", self.ui.referenceVolumeSelector.currentNodeID)
            p.SetNodeReferenceID("ReferenceSegmentation", self.ui.referenceSegmentationSelector.currentNodeID)
            p.SetNodeReferenceID("TargetVolume", self.ui.targetVolumeSelector.currentNodeID)
            p.SetNodeReferenceID("OutputSegmentation", self.ui.outputSegmentationSelector.currentNodeID)
            p.RemoveNodeReferenceIDs("ExtraReference")
            for node in self.ui.extraReferencesSelector.checkedNodes():
                p.AddNodeReferenceID("ExtraReference", node.GetID())
            segmentation = self.ui.referenceSegmentationSelector.currentNode()
            if newSegmentation:  # a newly chosen reference: all its segments, and its source volume
                ids = self.logic.segmentIds(segmentation)
                volume = self.logic.sourceVolume(segmentation)
                if volume is not None:
                    p.SetNodeReferenceID("ReferenceVolume", volume.GetID())
            else:
                items = [self.ui.referenceSegmentsList.item(i) for i in range(self.ui.referenceSegmentsList.count)]
                ids = [item.data(qt.Qt.UserRole) for item in items if item.checkState() == qt.Qt.Checked]
            reference = p.GetNodeReference("ReferenceVolume")
            if reference is not None and p.GetNodeReference("TargetVolume") is reference:  # never segment the reference itself
                other = self.logic.defaultTarget(slicer.mrmlScene, reference)
                p.SetNodeReferenceID("TargetVolume", other.GetID() if other is not None else None)
            p.SetParameter("ReferenceSegments", SEGMENT_SEPARATOR.join(ids))
            p.SetParameter("Device", self.ui.deviceComboBox.itemData(self.ui.deviceComboBox.currentIndex) or "auto")
            p.SetParameter("Localise", self.ui.localiseComboBox.itemData(self.ui.localiseComboBox.currentIndex) or "auto")
            p.SetParameter("Overlap", str(self.ui.overlapSpinBox.value))
            p.SetParameter("TuningSteps", str(self.ui.tuningStepsSpinBox.value))
            p.SetParameter("PostProcess", "true" if self.ui.postprocessCheckBox.checked else "false")
            p.SetParameter("Show3D", "true" if self.ui.show3DCheckBox.checked else "false")
        finally:
            p.EndModify(wasModified)

    def _checkedSegmentIds(self) -> list[str]:
        return [s for s in self._parameterNode.GetParameter("ReferenceSegments").split(SEGMENT_SEPARATOR) if s]

    def _fillSegmentList(self, segmentationNode, checked: list[str]) -> None:
        self.ui.referenceSegmentsList.clear()
        if segmentationNode is None:
            return
        segmentation = segmentationNode.GetSegmentation()
        for sid in self.logic.segmentIds(segmentationNode):
            item = qt.QListWidgetItem(segmentation.GetSegment(sid).GetName())
            item.setData(qt.Qt.UserRole, sid)
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            item.setCheckState(qt.Qt.Checked if sid in checked else qt.Qt.Unchecked)
            self.ui.referenceSegmentsList.addItem(item)

    def _observeSegmentation(self, segmentationNode) -> None:
        """Keeps the segment list in step with the reference segmentation's segments."""
        if segmentationNode is self._observedSegmentation:
            return
        events = (slicer.vtkSegmentation.SegmentAdded, slicer.vtkSegmentation.SegmentRemoved, slicer.vtkSegmentation.SegmentModified)
        for event in events:
            if self._observedSegmentation is not None:
                self.removeObserver(self._observedSegmentation, event, self.updateGUIFromParameterNode)
            if segmentationNode is not None:
                self.addObserver(segmentationNode, event, self.updateGUIFromParameterNode)
        self._observedSegmentation = segmentationNode

    # -- buttons -------------------------------------------------------------------------------
    def _missingForReference(self) -> str:
        """What the user still has to choose before the reference can be used ("" when ready)."""
        p = self._parameterNode
        if self._problems:
            return "Install the dependencies first."
        if not p.GetNodeReference("ReferenceVolume"):
            return "Select the reference volume."
        if not p.GetNodeReference("ReferenceSegmentation"):
            return "Select the reference segmentation."
        if not self._checkedSegmentIds():
            return "Check at least one reference segment."
        return ""

    def updateButtons(self, *args):
        if self._parameterNode is None:
            return
        idle = not self._running
        hasTarget = self._parameterNode.GetNodeReference("TargetVolume") is not None
        missing = self._missingForReference() or ("" if hasTarget else "Select the target volume.")
        self.ui.applyButton.enabled = idle and not missing
        self.ui.applyButton.toolTip = missing or "Segment the target like the checked reference segments."
        missingTask = self._missingForReference() or ("" if self.ui.taskNameLineEdit.text.strip() else "Type a task name.")
        self.ui.saveTaskButton.enabled = idle and not missingTask
        self.ui.saveTaskButton.toolTip = missingTask or "Save the task embedding of the checked reference segments."
        self.ui.segmentFromTaskButton.enabled = idle and hasTarget and bool(self.ui.savedTaskComboBox.currentText) and not self._problems

    def refreshDependencies(self):
        """Says what is missing, too old or broken (each package is imported to see that it loads) with the install
        button; when all is well, lists the devices and saved tasks."""
        self._problems = self.logic.dependencyProblems(probe=True)
        self.ui.installButton.visible = bool(self._problems)
        self.ui.dependenciesLabel.visible = bool(self._problems)
        self.ui.dependenciesLabel.text = dependencies.message(self._problems)
        wasBlocked = self.ui.deviceComboBox.blockSignals(True)  # refilling is not a user choice
        self.ui.deviceComboBox.clear()
        for value, label in ([("auto", "auto")] if self._problems else self.logic.deviceChoices()):
            self.ui.deviceComboBox.addItem(label, value)
        self.ui.deviceComboBox.blockSignals(wasBlocked)
        self.refreshSavedTasks()
        self.updateGUIFromParameterNode()

    def refreshSavedTasks(self):
        self.ui.savedTaskComboBox.clear()
        for name in ([] if self._problems else self.logic.savedTasks()):
            self.ui.savedTaskComboBox.addItem(name)

    # -- actions -------------------------------------------------------------------------------
    def _extraReferences(self) -> list:
        p = self._parameterNode
        return [(None, p.GetNthNodeReference("ExtraReference", i)) for i in range(p.GetNumberOfNodeReferences("ExtraReference"))]

    def _run(self, title: str, work):
        """work(progress) behind a modal progress dialog with a working Cancel; None when cancelled or failed (the
        status says which; a failure the user can act on is shown without traceback)."""
        self._running = True
        self.updateButtons()
        try:
            return ProgressRun(self.logic, title, self._setStatus).run(work)
        finally:
            self._running = False
            self.updateButtons()

    def _setStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text

    def onApply(self):
        p = self._parameterNode
        ids = self._run("IRIS Segment", lambda progress: self.logic.segment(
            p.GetNodeReference("TargetVolume"), p.GetNodeReference("ReferenceVolume"), p.GetNodeReference("ReferenceSegmentation"),
            self._checkedSegmentIds(), p.GetNodeReference("OutputSegmentation"), extraReferences=self._extraReferences(),
            progress=progress, **self.logic.options(p)))
        self._showResult(ids)

    def onSegmentFromTask(self):
        p = self._parameterNode
        task = self.logic.savedTasks()[self.ui.savedTaskComboBox.currentText]
        ids = self._run("IRIS Segment", lambda progress: self.logic.segment(
            p.GetNodeReference("TargetVolume"), outputSegmentation=p.GetNodeReference("OutputSegmentation"), task=task,
            progress=progress, **self.logic.options(p)))
        self._showResult(ids)

    def _showResult(self, ids) -> None:
        if ids is None:
            return
        self._parameterNode.SetNodeReferenceID("OutputSegmentation", self.logic.lastOutputSegmentation.GetID())
        self.ui.statusLabel.text = self.logic.statusText(ids)

    def onSaveTask(self):
        p = self._parameterNode
        name = self.ui.taskNameLineEdit.text.strip()
        options = self.logic.options(p)
        saved = self._run("Save IRIS task", lambda progress: self.logic.saveTask(
            name, p.GetNodeReference("ReferenceVolume"), p.GetNodeReference("ReferenceSegmentation"), self._checkedSegmentIds(),
            device=options["device"], extraReferences=self._extraReferences(), tuningSteps=options["tuningSteps"], progress=progress))
        if saved is not None:
            self.refreshSavedTasks()
            self.ui.savedTaskComboBox.setCurrentIndex(self.ui.savedTaskComboBox.findText(saved))
            self.ui.statusLabel.text = f"Saved task '{saved}' in {self.logic.tasksFolder}"

    def onInstallDependencies(self):
        """The install offer: torch through the PyTorch extension, the rest with pip; then the panel is ready (or says
        to restart Slicer, when an old torch was already loaded)."""
        from IrisSegmentSupport.logic import DependencyError

        try:
            with slicer.util.WaitCursor():
                text = self.logic.installDependencies(self._problems)
        except DependencyError as e:
            text = str(e)
            slicer.util.errorDisplay(text, windowTitle="IRIS Segment")
        self.refreshDependencies()
        self.ui.statusLabel.text = text


#
# IrisSegmentTest
#
class IrisSegmentTest(ScriptedLoadableModuleTest):
    """Runs the module's logic on the bundled sample data (two hippocampus MRIs), inside Slicer."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SampleDataEntry()
        self.setUp()
        self.test_SegmentSampleData()
        self.setUp()
        self.test_CancelAddsNothing()
        self.setUp()
        self.test_LocaliseNone()

    def _load(self):
        from IrisSegmentLib.resources import sample_data_dir

        data = sample_data_dir()
        reference = slicer.util.loadVolume(str(data / "hippocampus_001_image.nii.gz"))
        label = slicer.util.loadLabelVolume(str(data / "hippocampus_001_label.nii.gz"))
        target = slicer.util.loadVolume(str(data / "hippocampus_003_image.nii.gz"))
        referenceSegmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reference labels")
        slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(label, referenceSegmentation)
        segmentation = referenceSegmentation.GetSegmentation()
        for i, name in enumerate(["anterior hippocampus", "posterior hippocampus"]):
            segmentation.GetNthSegment(i).SetName(name)
        return reference, referenceSegmentation, target

    def _logic(self):
        """The bundled model when it is there, else the test-sized network with seeded random weights (mechanics only)."""
        import torch
        from IrisSegmentLib import Segmenter
        from IrisSegmentLib.config import BundleConfig
        from IrisSegmentLib.model import build_iris
        from IrisSegmentLib.resources import DEFAULT_MODEL, resources_dir

        logic = IrisSegmentLogic()
        if not (resources_dir() / "Models" / DEFAULT_MODEL).is_dir():
            cfg = BundleConfig.load(resources_dir() / "Configs" / "tiny.yaml")
            torch.manual_seed(0)
            logic.model = Segmenter(build_iris(cfg.model), cfg, "cpu")
        return logic

    def test_SampleDataEntry(self):
        """The Sample Data module loads the bundled pair: two volumes and the segmentation, whose volume is found."""
        import SampleData

        registerSampleData()
        reference, segmentation, target = SampleData.SampleDataLogic().downloadSample(sampledata.SAMPLE_NAME)
        self.assertEqual([n.GetName() for n in (reference, segmentation, target)], [n for _, n, _ in sampledata.FILES])
        self.assertEqual(IrisSegmentLogic.sourceVolume(segmentation), reference)
        self.assertEqual(IrisSegmentLogic.defaultTarget(slicer.mrmlScene, reference), target)
        self.delayDisplay("Test passed")

    def test_SegmentSampleData(self):
        self.delayDisplay("Segmenting hippocampus_003 like hippocampus_001")
        reference, referenceSegmentation, target = self._load()
        output = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "results")
        output.GetSegmentation().AddEmptySegment("", "anterior hippocampus", [0, 1, 0])
        logic = self._logic()
        reports = []
        ids = logic.segment(target, reference, referenceSegmentation, ["anterior hippocampus", "posterior hippocampus"], output,
                            device="cpu", progress=lambda f, m: reports.append(f))
        segmentation = output.GetSegmentation()
        self.assertEqual([segmentation.GetSegment(s).GetName() for s in ids], ["anterior hippocampus (2)", "posterior hippocampus"])
        self.assertEqual(segmentation.GetNumberOfSegments(), 3)
        self.assertEqual(segmentation.GetSegment(ids[1]).GetColor(), referenceSegmentation.GetSegmentation().GetNthSegment(1).GetColor())
        self.assertTrue(reports and reports[-1] == 1.0)
        # Stored on the target's grid.
        ijkToRas, labelmapToRas = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        target.GetIJKToRASMatrix(ijkToRas)
        segmentation.GetSegment(ids[0]).GetRepresentation("Binary labelmap").GetImageToWorldMatrix(labelmapToRas)
        for r in range(3):
            for c in range(4):
                self.assertAlmostEqual(ijkToRas.GetElement(r, c), labelmapToRas.GetElement(r, c), places=5)
        self.assertIn("Added anterior hippocampus (2), posterior hippocampus", logic.statusText(ids))
        self.assertRegex(logic.statusText(ids), "Localised by registration|Not localised")  # auto: registered, or why not
        if logic.model is None:  # the trained model finds both structures
            for sid in ids:
                self.assertGreater(slicer.util.arrayFromSegmentBinaryLabelmap(output, sid, target).sum(), 0)
        self.delayDisplay("Test passed")

    def test_LocaliseNone(self):
        self.delayDisplay("Segmenting the whole field of view (no localisation)")
        reference, referenceSegmentation, target = self._load()
        logic = self._logic()
        ids = logic.segment(target, reference, referenceSegmentation, None, device="cpu", localise="none")
        self.assertEqual(len(ids), 2)
        self.assertIn("Not localised: segmented the whole field of view.", logic.statusText(ids))
        self.delayDisplay("Test passed")

    def test_CancelAddsNothing(self):
        from IrisSegmentLib.errors import Cancelled

        reference, referenceSegmentation, target = self._load()
        logic = self._logic()
        segmentations = len(slicer.util.getNodesByClass("vtkMRMLSegmentationNode"))
        with self.assertRaises(Cancelled):
            logic.segment(target, reference, referenceSegmentation, None, device="cpu", progress=lambda f, m: logic.requestCancel())
        self.assertEqual(len(slicer.util.getNodesByClass("vtkMRMLSegmentationNode")), segmentations)
        self.delayDisplay("Test passed")
