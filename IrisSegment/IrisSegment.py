"""IRIS Segment: segment a scan like the segments drawn on another scan (in-context segmentation).

The panel and the Segment Editor effect only gather inputs; the work is done by IrisSegmentLib.mrml
(reading the scene, writing segments) and its engine. Nothing here imports torch or IrisSegmentLib at
import time: dependencies are installed only when the user asks for it.
"""
from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

_HERE = Path(__file__).resolve().parent
if not (_HERE / "IrisSegmentLib").is_dir() and (_HERE.parent / "IrisSegmentLib" / "__init__.py").is_file():
    # A source checkout added through "Additional module paths": the library sits beside this folder.
    sys.path.insert(0, str(_HERE.parent))

TORCH_REQUIREMENT = ">=2.2"
# Packages the library needs besides torch (from the PyTorch extension) and numpy/vtk (shipped with Slicer).
REQUIREMENTS_FILE = _HERE / "Resources" / "requirements.txt"
# Requirement names whose import name differs.
IMPORT_NAMES = {"PyYAML": "yaml"}
SEGMENT_SEPARATOR = ";"
# Localisation (IrisSegmentLib.inference.localise): (value passed to the engine, label shown), default first.
LOCALISE_CHOICES = [("auto", "auto"), ("registration", "registration"), ("none", "none (whole field of view)")]
LOCALISE_TOOLTIP = (
    "auto: register the reference onto the target and segment only where its structures can be (falls back to the "
    "whole field of view, with a warning, when registration fails or cannot run). registration: the same, but an "
    "error when it cannot run. none: segment the whole field of view, no registration.")


def _requirements() -> list[str]:
    return [line.strip() for line in REQUIREMENTS_FILE.read_text().splitlines() if line.strip() and not line.startswith("#")]


def _installed(requirement: str) -> bool:
    name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)
    return importlib.util.find_spec(IMPORT_NAMES.get(name, name)) is not None


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
            "the Segment Editor and from Python: slicer.util.getModuleLogic('IrisSegment').segment(...)."
        )
        self.parent.acknowledgementText = (
            "Based on IRIS (Gao et al., CVPR 2025, 'Show and Segment: Universal Medical Image Segmentation via "
            "In-Context Learning'). Sample data: Medical Segmentation Decathlon, Task04_Hippocampus (CC BY-SA 4.0)."
        )
        slicer.app.connect("startupCompleted()", registerEditorEffect)


def registerEditorEffect() -> None:
    """Adds the 'IRIS' effect to the Segment Editor (as Slicer's effect extensions do, once the application started)."""
    import qSlicerSegmentationsEditorEffectsPythonQt as effects

    instance = effects.qSlicerSegmentEditorScriptedEffect(None)
    instance.setPythonSource(str(_HERE / "SegmentEditorIrisLib" / "SegmentEditorIrisEffect.py").replace("\\", "/"))
    instance.self().register()


#
# IrisSegmentWidget
#
class IrisSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: keeps the parameter node and the GUI in step, enables buttons, calls the logic."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._updatingGUI = False
        self._running = False
        self._missingDependencies: list[str] = []
        self._observedSegmentation = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/IrisSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = IrisSegmentLogic()
        self.ui.progressBar.visible = False
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
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
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
        if not self._parameterNode.GetNodeReference("TargetVolume"):
            volume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if volume:
                self._parameterNode.SetNodeReferenceID("TargetVolume", volume.GetID())

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
        if self._missingDependencies:
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
        self.ui.segmentFromTaskButton.enabled = idle and hasTarget and bool(self.ui.savedTaskComboBox.currentText) and not self._missingDependencies
        self.ui.cancelButton.enabled = self._running

    def refreshDependencies(self):
        """Shows the install button when packages are missing; otherwise lists devices and saved tasks."""
        self._missingDependencies = self.logic.missingDependencies()
        self.ui.installButton.visible = bool(self._missingDependencies)
        self.ui.dependenciesLabel.visible = bool(self._missingDependencies)
        self.ui.dependenciesLabel.text = (
            f"IrisSegment needs the Python packages {', '.join(self._missingDependencies)}." if self._missingDependencies else "")
        wasBlocked = self.ui.deviceComboBox.blockSignals(True)  # refilling is not a user choice
        self.ui.deviceComboBox.clear()
        for value, label in ([("auto", "auto")] if self._missingDependencies else self.logic.deviceChoices()):
            self.ui.deviceComboBox.addItem(label, value)
        self.ui.deviceComboBox.blockSignals(wasBlocked)
        self.refreshSavedTasks()
        self.updateGUIFromParameterNode()

    def refreshSavedTasks(self):
        self.ui.savedTaskComboBox.clear()
        for name in self.logic.savedTasks():
            self.ui.savedTaskComboBox.addItem(name)

    # -- actions -------------------------------------------------------------------------------
    def _extraReferences(self) -> list:
        p = self._parameterNode
        return [(None, p.GetNthNodeReference("ExtraReference", i)) for i in range(p.GetNumberOfNodeReferences("ExtraReference"))]

    def _run(self, work):
        """Runs work(progress) with Cancel enabled and the progress bar shown; errors are displayed."""
        from IrisSegmentLib.errors import Cancelled

        self._running = True
        self.updateButtons()
        self.ui.progressBar.value = 0
        self.ui.progressBar.visible = True
        try:
            with slicer.util.tryWithErrorDisplay("IrisSegment failed.", waitCursor=False):
                try:
                    return work(self.onProgress)
                except Cancelled:
                    self.ui.statusLabel.text = "Cancelled: nothing was added."
        finally:
            self._running = False
            self.ui.progressBar.visible = False
            self.updateButtons()
        return None

    def onProgress(self, fraction: float, message: str) -> None:
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = message

    def onApply(self):
        p = self._parameterNode
        ids = self._run(lambda progress: self.logic.segment(
            p.GetNodeReference("TargetVolume"), p.GetNodeReference("ReferenceVolume"), p.GetNodeReference("ReferenceSegmentation"),
            self._checkedSegmentIds(), p.GetNodeReference("OutputSegmentation"), extraReferences=self._extraReferences(),
            progress=progress, **self.logic.options(p)))
        self._showResult(ids)

    def onSegmentFromTask(self):
        p = self._parameterNode
        task = self.logic.savedTasks()[self.ui.savedTaskComboBox.currentText]
        ids = self._run(lambda progress: self.logic.segment(
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
        saved = self._run(lambda progress: self.logic.saveTask(
            name, p.GetNodeReference("ReferenceVolume"), p.GetNodeReference("ReferenceSegmentation"), self._checkedSegmentIds(),
            device=options["device"], extraReferences=self._extraReferences(), tuningSteps=options["tuningSteps"], progress=progress))
        if saved is not None:
            self.refreshSavedTasks()
            self.ui.savedTaskComboBox.setCurrentIndex(self.ui.savedTaskComboBox.findText(saved))
            self.ui.statusLabel.text = f"Saved task '{saved}' in {self.logic.tasksFolder}"

    def onCancel(self):
        self.logic.requestCancel()
        self.ui.statusLabel.text = "Cancelling after the current window..."

    def onInstallDependencies(self):
        with slicer.util.tryWithErrorDisplay("Installing the dependencies failed.", waitCursor=True):
            self.logic.installDependencies()
        self.refreshDependencies()


#
# IrisSegmentLogic
#
class IrisSegmentLogic(ScriptedLoadableModuleLogic):
    """Behaviour without GUI, also for the Python console:

        logic = slicer.util.getModuleLogic("IrisSegment")
        ids = logic.segment(targetVolume, referenceVolume, referenceSegmentation, ["liver", "spleen"], localise="auto")
        print(logic.statusText(ids))  # how it was localised, and any warning (e.g. a failed registration)
    """

    LOCALISE_CHOICES = LOCALISE_CHOICES
    LOCALISE_TOOLTIP = LOCALISE_TOOLTIP

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.model = None  # None: the bundled model; or a model folder (config.yaml + weights.safetensors)
        self.cancelRequested = False
        self.lastOutputSegmentation = None
        self._engine = None

    def setDefaultParameters(self, parameterNode):
        for name, value in (("Device", "auto"), ("Localise", "auto"), ("Overlap", "0.5"), ("TuningSteps", "0"), ("PostProcess", "true"),
                            ("Show3D", "false")):
            if not parameterNode.GetParameter(name):
                parameterNode.SetParameter(name, value)

    @staticmethod
    def options(parameterNode) -> dict:
        """Run options from the module's parameter node (also used by the Segment Editor effect)."""
        return {
            "device": parameterNode.GetParameter("Device") or "auto",
            "localise": parameterNode.GetParameter("Localise") or "auto",
            "overlap": float(parameterNode.GetParameter("Overlap") or 0.5),
            "tuningSteps": int(parameterNode.GetParameter("TuningSteps") or 0),
            "postprocess": parameterNode.GetParameter("PostProcess") != "false",
            "show3D": parameterNode.GetParameter("Show3D") == "true",
        }

    # -- dependencies: installed only on request -------------------------------------------------
    @staticmethod
    def missingDependencies() -> list[str]:
        return [r for r in ["torch", *_requirements()] if not _installed(r)]

    def installDependencies(self) -> None:
        """torch through the PyTorch extension (the right CUDA build), the rest with Slicer's pip helpers."""
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise RuntimeError("IrisSegment needs the PyTorch extension: install it from the Extensions Manager, restart, then try again.") from None
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled() and torchLogic.installTorch(askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT) is None:
            raise RuntimeError("PyTorch was not installed; IrisSegment cannot run without it.")
        if importlib.util.find_spec("slicer.packaging") is not None:  # Slicer 5.11 and later
            importlib.import_module("slicer.packaging").pip_ensure(_requirements(), requester="IrisSegment")
        else:
            missing = [r for r in _requirements() if not _installed(r)]
            if missing:
                slicer.util.pip_install(" ".join(missing))

    # -- engine ----------------------------------------------------------------------------------
    @property
    def engine(self):
        """The model and last task embedding, kept between runs; torch runs on a worker thread while Slicer stays responsive."""
        from IrisSegmentLib import mrml

        if self._engine is None or self._engine.model != self.model:
            self._engine = mrml.Engine(self.model, wait=slicer.app.processEvents)
        return self._engine

    def deviceChoices(self) -> list[tuple[str, str]]:
        from IrisSegmentLib import mrml

        return mrml.device_choices()

    def requestCancel(self) -> None:
        self.cancelRequested = True

    def _cancel(self) -> bool:
        return self.cancelRequested

    @staticmethod
    def segmentIds(segmentationNode) -> list[str]:
        if segmentationNode is None:
            return []
        segmentation = segmentationNode.GetSegmentation()
        return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]

    @staticmethod
    def sourceVolume(segmentationNode):
        """The volume the segmentation was drawn on, when the Segment Editor recorded it."""
        if segmentationNode is None:
            return None
        return segmentationNode.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())

    # -- segmentation ----------------------------------------------------------------------------
    def compute(self, targetVolume, referenceVolume=None, referenceSegmentation=None, referenceSegments=None, device="auto",
                extraReferences=(), task=None, overlap=None, tuningSteps=0, postprocess=True, progress=None, localise="auto",
                keepLargest=None):
        """Segments the target without writing anything: a Pending result for `write` (the effect's preview).
        `localise`: "auto", "registration" or "none" (see LOCALISE_TOOLTIP); `postprocess`: keep the largest piece of
        each segment whose reference structure is one piece, and fill holes (`keepLargest`: its former name)."""
        from IrisSegmentLib import mrml

        self.cancelRequested = False
        return mrml.compute_segments(targetVolume, referenceVolume, referenceSegmentation, referenceSegments, device, progress,
                                     self._cancel, extra_references=extraReferences, task=task, overlap=overlap,
                                     tuning_steps=tuningSteps, localise=localise,
                                     postprocess=postprocess if keepLargest is None else bool(keepLargest), engine=self.engine)

    def write(self, pending, outputSegmentation=None, add=None, show3D=False) -> list[str]:
        """Adds the computed segments to `outputSegmentation` (None: a new one beside the target);
        `add` replaces how one segment is added (the Segment Editor effect goes through the editor)."""
        from IrisSegmentLib import mrml

        self.lastOutputSegmentation = outputSegmentation or mrml.create_output_segmentation(pending.target_node)
        return mrml.write_segments(pending, self.lastOutputSegmentation, add=add, show_3d=show3D)

    def segment(self, targetVolume, referenceVolume=None, referenceSegmentation=None, referenceSegments=None,
                outputSegmentation=None, device="auto", extraReferences=(), task=None, overlap=None, tuningSteps=0,
                postprocess=True, show3D=False, progress=None, localise="auto", keepLargest=None) -> list[str]:
        """Segments `targetVolume` like the reference segments (IDs or names; None: all) or a saved task file;
        adds the results to `outputSegmentation` (None: a new segmentation) and returns the new segment IDs.
        `extraReferences`: [(volume or None, segmentation)] averaged with the reference (context ensemble).
        `localise`: "auto" registers the reference onto the target and segments only where its structures can be,
        "registration" the same or an error, "none" the whole field of view; `statusText(ids)` tells which was done
        and any warning. `postprocess`, `keepLargest`: see `compute`."""
        pending = self.compute(targetVolume, referenceVolume, referenceSegmentation, referenceSegments, device, extraReferences,
                               task, overlap, tuningSteps, postprocess, progress, localise, keepLargest)
        if self.cancelRequested:
            from IrisSegmentLib.errors import Cancelled

            raise Cancelled("segmentation cancelled")
        return self.write(pending, outputSegmentation, show3D=show3D)

    def statusText(self, ids: list[str]) -> str:
        """What was added, how fast, whether it was localised by registration, the engine's warnings (e.g. a failed
        registration that fell back to the whole field of view) and each segment's estimated Dice (flagged where low)."""
        from IrisSegmentLib import mrml

        return mrml.status_text(self.engine.last, self.lastOutputSegmentation, ids)

    # -- saved tasks -----------------------------------------------------------------------------
    @property
    def tasksFolder(self) -> Path:
        return Path(slicer.app.slicerUserSettingsFilePath).parent / "IrisSegment" / "tasks"

    def savedTasks(self) -> dict:
        if self.missingDependencies():
            return {}
        from IrisSegmentLib import mrml

        return mrml.saved_tasks(self.tasksFolder)

    def saveTask(self, name, referenceVolume, referenceSegmentation, referenceSegments=None, device="auto",
                 extraReferences=(), tuningSteps=0, progress=None) -> str:
        """Encodes the reference, saves the embedding in the user's task folder; returns its name in `savedTasks()`."""
        from IrisSegmentLib import mrml

        task = mrml.encode_task(referenceVolume, referenceSegmentation, referenceSegments, device, progress,
                                extra_references=extraReferences, tuning_steps=tuningSteps, engine=self.engine)
        return mrml.save_task(task, self.tasksFolder, name).name[: -len(mrml.TASK_SUFFIX)]


#
# IrisSegmentTest
#
class IrisSegmentTest(ScriptedLoadableModuleTest):
    """Runs the module's logic on the bundled sample data (two hippocampus MRIs), inside Slicer."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
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
        from IrisSegmentLib.model import IrisModel
        from IrisSegmentLib.resources import DEFAULT_MODEL, resources_dir

        logic = IrisSegmentLogic()
        if not (resources_dir() / "Models" / DEFAULT_MODEL).is_dir():
            cfg = BundleConfig.load(resources_dir() / "Configs" / "tiny.yaml")
            torch.manual_seed(0)
            logic.model = Segmenter(IrisModel(cfg.model), cfg, "cpu")
        return logic

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
