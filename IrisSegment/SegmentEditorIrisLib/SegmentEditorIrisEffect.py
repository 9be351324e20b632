"""Segment Editor effect "IRIS": segments the source volume like reference segments drawn on another scan.

Preview shows the result in a separate segmentation (as Grow from seeds does), kept as a node reference of the
editor's parameter node and removed on Cancel, on deactivation and when the scene closes; Apply adds it to the
edited segmentation through the editor, so its masking settings apply, with one undo state per Apply.
The effect owns a light logic (no panel, no torch until Preview), checks the dependencies with the same install
offer as the panel, and runs behind a modal progress dialog whose Cancel adds nothing. Localisation is an effect
parameter; device and advanced options are those of the IRIS Segment module panel.
"""
import os

import qt
import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

from IrisSegmentSupport import dependencies
from IrisSegmentSupport.logic import LOCALISE_CHOICES, LOCALISE_TOOLTIP, DependencyError, IrisSegmentLogic
from IrisSegmentSupport.progressdialog import ProgressRun

# Effect parameters (stored as "IRIS.<name>" on the segment editor node): node references and values.
REFERENCE_SEGMENTATION, REFERENCE_VOLUME, PREVIEW = "ReferenceSegmentation", "ReferenceVolume", "PreviewSegmentation"
SEGMENTS, LOCALISE = "ReferenceSegments", "Localise"
SEPARATOR = ";"


class SegmentEditorIrisEffect(AbstractScriptedSegmentEditorEffect):
    def __init__(self, scriptedEffect):
        scriptedEffect.name = "IRIS"  # not translated: modules find effects by name
        scriptedEffect.title = "IRIS"
        scriptedEffect.perSegment = False
        scriptedEffect.requireSegments = False
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.logic = IrisSegmentLogic()  # light: no widget, no torch
        self.pending = None  # computed, shown in the preview, not yet applied
        self._problems: list = []  # unmet dependencies
        self._running = False
        self._active = False
        self._connections: list = []
        self._sceneObserver = None

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(os.path.dirname(__file__), "SegmentEditorIrisEffect.png")
        return qt.QIcon(iconPath) if os.path.exists(iconPath) else qt.QIcon()

    def helpText(self):
        return ("<html>Segment the source volume like segments drawn on another scan (IRIS in-context segmentation).<p>"
                "Pick the reference segmentation (its volume is taken from it, or pick one) and check the segments. "
                "<b>Preview</b> shows the result, <b>Apply</b> adds it as new segments (masking settings apply; undo "
                "restores). <b>Localisation</b> auto registers the reference onto the source volume and segments only "
                "where its structures can be; none segments the whole field of view. Device and advanced options: "
                "IRIS Segment module.</html>")

    def setupOptionsFrame(self):
        self.referenceSegmentationSelector = self._nodeSelector("vtkMRMLSegmentationNode",
                                                                "Segmentation holding the reference segments, drawn on another scan.")
        self.scriptedEffect.addLabeledOptionsWidget("Reference segmentation:", self.referenceSegmentationSelector)
        self.referenceVolumeSelector = self._nodeSelector("vtkMRMLScalarVolumeNode", "The scan the reference segments were drawn on.")
        self.scriptedEffect.addLabeledOptionsWidget("Reference volume:", self.referenceVolumeSelector)

        self.segmentsList = qt.QListWidget()
        self.segmentsList.setToolTip("Check the segments to find in the source volume.")
        self.scriptedEffect.addLabeledOptionsWidget("Segments:", self.segmentsList)

        self.localiseComboBox = qt.QComboBox()
        for value, label in LOCALISE_CHOICES:
            self.localiseComboBox.addItem(label, value)
        self.localiseComboBox.setToolTip(LOCALISE_TOOLTIP)
        self.scriptedEffect.addLabeledOptionsWidget("Localisation:", self.localiseComboBox)

        self.dependenciesLabel = qt.QLabel()
        self.dependenciesLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.dependenciesLabel)
        self.installButton = qt.QPushButton("Install dependencies")
        self.installButton.objectName = self.__class__.__name__ + "Install"
        self.installButton.setToolTip("Install PyTorch (through the PyTorch extension) and the other Python packages IrisSegment needs.")
        self.scriptedEffect.addOptionsWidget(self.installButton)

        self.previewButton = qt.QPushButton("Preview")
        self.previewButton.objectName = self.__class__.__name__ + "Preview"
        self.previewButton.setToolTip("Segment the source volume and show the result in a separate preview segmentation.")
        self.cancelButton = qt.QPushButton("Cancel")
        self.cancelButton.objectName = self.__class__.__name__ + "Cancel"
        self.cancelButton.setToolTip("Discard the preview.")
        self.applyButton = qt.QPushButton("Apply")
        self.applyButton.objectName = self.__class__.__name__ + "Apply"
        self.applyButton.setToolTip("Add the (previewed) result as new segments.")
        buttons = qt.QHBoxLayout()
        for button in (self.previewButton, self.cancelButton, self.applyButton):
            buttons.addWidget(button)
        self.scriptedEffect.addOptionsWidget(buttons)

        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)

        self._connect(self.referenceSegmentationSelector, "currentNodeChanged(vtkMRMLNode*)", self.onReferenceSegmentationChanged)
        self._connect(self.referenceVolumeSelector, "currentNodeChanged(vtkMRMLNode*)", self.updateMRMLFromGUI)
        self._connect(self.segmentsList, "itemChanged(QListWidgetItem*)", self.updateMRMLFromGUI)
        self._connect(self.localiseComboBox, "currentIndexChanged(int)", self.updateMRMLFromGUI)
        self._connect(self.installButton, "clicked()", self.onInstall)
        self._connect(self.previewButton, "clicked()", self.onPreview)
        self._connect(self.cancelButton, "clicked()", self.onCancel)
        self._connect(self.applyButton, "clicked()", self.onApply)
        self._sceneObserver = slicer.mrmlScene.AddObserver(slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self._problems = self.logic.dependencyProblems()  # from metadata: no torch import on the first click

    def _nodeSelector(self, nodeType: str, toolTip: str):
        selector = slicer.qMRMLNodeComboBox()
        selector.nodeTypes = [nodeType]
        selector.addEnabled = False
        selector.removeEnabled = False
        selector.noneEnabled = True
        selector.setMRMLScene(slicer.mrmlScene)
        selector.setToolTip(toolTip)
        return selector

    def _connect(self, widget, signal: str, slot) -> None:
        widget.connect(signal, slot)
        self._connections.append((widget, signal, slot))

    def cleanup(self):
        """Disconnects every signal and observer, so that the effect can be deleted (Slicer issue 7392)."""
        for widget, signal, slot in self._connections:
            widget.disconnect(signal, slot)
        self._connections = []
        if self._sceneObserver is not None:
            slicer.mrmlScene.RemoveObserver(self._sceneObserver)
            self._sceneObserver = None

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault(LOCALISE, LOCALISE_CHOICES[0][0])

    def createCursor(self, widget):
        return slicer.util.mainWindow().cursor

    def activate(self):
        self._active = True

    def deactivate(self):
        """Stops a running Preview and removes the preview segmentation."""
        self._active = False
        self.logic.requestCancel()
        self.removePreview()

    def onSceneStartClose(self, caller=None, event=None):
        self.removePreview()

    # -- options <-> effect parameters -------------------------------------------------------------
    def _parameter(self, name: str) -> str:
        """An effect parameter, "" when it was never set (reading an unset one logs an error in Slicer)."""
        return self.scriptedEffect.parameter(name) if self.scriptedEffect.parameterDefined(name) else ""

    def updateGUIFromMRML(self):
        segmentation = self.scriptedEffect.nodeReference(REFERENCE_SEGMENTATION)
        checked = self._parameter(SEGMENTS).split(SEPARATOR)
        widgets = (self.referenceSegmentationSelector, self.referenceVolumeSelector, self.segmentsList, self.localiseComboBox)
        for widget in widgets:
            widget.blockSignals(True)
        self.referenceSegmentationSelector.setCurrentNode(segmentation)
        self.referenceVolumeSelector.setCurrentNode(self.scriptedEffect.nodeReference(REFERENCE_VOLUME))
        self.localiseComboBox.setCurrentIndex(max(self.localiseComboBox.findData(self._localise()), 0))
        self.segmentsList.clear()
        for sid in self.logic.segmentIds(segmentation):
            item = qt.QListWidgetItem(segmentation.GetSegmentation().GetSegment(sid).GetName())
            item.setData(qt.Qt.UserRole, sid)
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            item.setCheckState(qt.Qt.Checked if sid in checked else qt.Qt.Unchecked)
            self.segmentsList.addItem(item)
        for widget in widgets:
            widget.blockSignals(False)
        self.dependenciesLabel.text = dependencies.message(self._problems)
        self.dependenciesLabel.visible = self.installButton.visible = bool(self._problems)
        ready = bool(segmentation and self.referenceVolumeSelector.currentNode() and self._checkedIds()
                     and self._sourceVolume()) and not self._problems
        preview = self.scriptedEffect.nodeReference(PREVIEW)
        self.previewButton.enabled = ready and not self._running
        self.applyButton.enabled = (ready or self.pending is not None) and not self._running
        self.cancelButton.enabled = preview is not None and not self._running

    def updateMRMLFromGUI(self):
        # One modification: each parameter set alone would refresh the GUI from the others' old values.
        with slicer.util.NodeModify(self.scriptedEffect.parameterSetNode()):
            self.scriptedEffect.setNodeReference(REFERENCE_SEGMENTATION, self.referenceSegmentationSelector.currentNode())
            self.scriptedEffect.setNodeReference(REFERENCE_VOLUME, self.referenceVolumeSelector.currentNode())
            self.scriptedEffect.setParameter(SEGMENTS, SEPARATOR.join(self._checkedIds()))
            self.scriptedEffect.setParameter(LOCALISE, self.localiseComboBox.itemData(self.localiseComboBox.currentIndex) or "auto")

    def onReferenceSegmentationChanged(self, segmentation):
        """A new reference: its source volume and all its segments."""
        volume = self.logic.sourceVolume(segmentation)
        with slicer.util.NodeModify(self.scriptedEffect.parameterSetNode()):
            self.scriptedEffect.setNodeReference(REFERENCE_SEGMENTATION, segmentation)
            self.scriptedEffect.setNodeReference(REFERENCE_VOLUME, volume or self.referenceVolumeSelector.currentNode())
            self.scriptedEffect.setParameter(SEGMENTS, SEPARATOR.join(self.logic.segmentIds(segmentation)))

    def _checkedIds(self):
        items = [self.segmentsList.item(i) for i in range(self.segmentsList.count)]
        return [item.data(qt.Qt.UserRole) for item in items if item.checkState() == qt.Qt.Checked]

    def _localise(self):
        """The localisation chosen for this effect ("auto" until one is chosen)."""
        return self._parameter(LOCALISE) or "auto"

    def _sourceVolume(self):
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        return parameterSetNode.GetSourceVolumeNode() if parameterSetNode is not None else None

    # -- dependencies ------------------------------------------------------------------------------
    def onInstall(self):
        """The same install offer as the panel's: torch through the PyTorch extension, the rest with pip."""
        try:
            with slicer.util.WaitCursor():
                self.statusLabel.text = self.logic.installDependencies(self._problems)
        except DependencyError as e:
            self.statusLabel.text = str(e)
            slicer.util.errorDisplay(str(e), windowTitle="IRIS")
        self._problems = self.logic.dependencyProblems()
        self.updateGUIFromMRML()

    # -- preview, apply, cancel --------------------------------------------------------------------
    def onPreview(self):
        self.removePreview()
        self._running = True
        self.statusLabel.text = ""
        self.updateGUIFromMRML()
        try:
            preview = ProgressRun(self.logic, "IRIS", self._setStatus).run(self._preview)
        finally:
            self._running = False
        if preview is not None:
            self.statusLabel.text = self.logic.statusText(self.logic.segmentIds(preview))
            slicer.util.showStatusMessage(self.statusLabel.text.replace("\n", "  "), 5000)
        self.updateGUIFromMRML()

    def _preview(self, progress):
        """Computes (torch on the worker thread), then makes the preview segmentation here; nothing when cancelled."""
        progress(0.0, "loading PyTorch and the model (first run only)")
        self._problems = self.logic.dependencyProblems(probe=True)
        if self._problems:
            raise DependencyError(dependencies.message(self._problems))
        options = self.logic.options(self.logic.getParameterNode())
        pending = self.logic.compute(
            self._sourceVolume(), self.referenceVolumeSelector.currentNode(), self.referenceSegmentationSelector.currentNode(),
            self._checkedIds(), options["device"], overlap=options["overlap"], tuningSteps=options["tuningSteps"],
            postprocess=options["postprocess"], progress=progress, localise=self._localise())
        self.logic.beforeWriting(progress)
        if not self._active:  # deactivated meanwhile (also requests cancel): leave nothing behind
            return None
        name = self.scriptedEffect.parameterSetNode().GetSegmentationNode().GetName() + " IRIS preview"
        preview = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        try:
            self.logic.write(pending, preview)
        except Exception:
            slicer.mrmlScene.RemoveNode(preview)
            raise
        preview.GetDisplayNode().SetOpacity(0.6)
        self.scriptedEffect.setNodeReference(PREVIEW, preview)
        self.pending = pending
        return preview

    def _setStatus(self, text: str) -> None:
        self.statusLabel.text = text

    def onApply(self):
        if self.pending is None or self.pending.target_node is not self._sourceVolume():
            self.onPreview()
            if self.pending is None:
                return
        segmentationNode = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
        self.scriptedEffect.saveStateForUndo()
        ProgressRun(self.logic, "IRIS", self._setStatus).run(
            lambda progress: self.logic.write(self.pending, segmentationNode, add=self._addSegment))
        self.removePreview()

    def _addSegment(self, segmentationNode, name, colour, labelmap):
        """One new segment set through the editor, so that its masking and overwrite settings apply."""
        sid = segmentationNode.GetSegmentation().AddEmptySegment("", name, colour)
        self.scriptedEffect.modifySegmentByLabelmap(segmentationNode, sid, labelmap, slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet)
        return sid

    def onCancel(self):
        """Discards the preview (a running Preview is stopped by its progress dialog's Cancel)."""
        self.removePreview()

    def removePreview(self):
        preview = self.scriptedEffect.nodeReference(PREVIEW)
        if preview is not None:
            self.scriptedEffect.setNodeReference(PREVIEW, None)
            if preview.GetScene() is not None:
                preview.GetScene().RemoveNode(preview)
        self.pending = None
        self.updateGUIFromMRML()
