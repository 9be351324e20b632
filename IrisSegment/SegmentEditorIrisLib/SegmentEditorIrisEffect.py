"""Segment Editor effect "IRIS": segments the source volume like reference segments drawn on another scan.

Preview shows the result in a separate segmentation (as Grow from seeds does); Apply adds it to the
edited segmentation through the editor, so its masking settings apply, with one undo state per Apply.
Localisation (register the reference onto the source volume first, or not) is an effect parameter; device
and advanced options are those of the IRIS Segment module panel. The status below the buttons says how the
result was localised and shows the engine's warnings.
"""
import os

import qt
import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect


class SegmentEditorIrisEffect(AbstractScriptedSegmentEditorEffect):
    def __init__(self, scriptedEffect):
        scriptedEffect.name = "IRIS"
        scriptedEffect.perSegment = False
        scriptedEffect.requireSegments = False
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.pending = None  # computed, not yet applied
        self.previewNode = None

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
        self.referenceSegmentationSelector = slicer.qMRMLNodeComboBox()
        self.referenceSegmentationSelector.nodeTypes = ["vtkMRMLSegmentationNode"]
        self.referenceSegmentationSelector.addEnabled = False
        self.referenceSegmentationSelector.removeEnabled = False
        self.referenceSegmentationSelector.noneEnabled = True
        self.referenceSegmentationSelector.setMRMLScene(slicer.mrmlScene)
        self.referenceSegmentationSelector.setToolTip("Segmentation holding the reference segments, drawn on another scan.")
        self.scriptedEffect.addLabeledOptionsWidget("Reference segmentation:", self.referenceSegmentationSelector)

        self.referenceVolumeSelector = slicer.qMRMLNodeComboBox()
        self.referenceVolumeSelector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
        self.referenceVolumeSelector.addEnabled = False
        self.referenceVolumeSelector.removeEnabled = False
        self.referenceVolumeSelector.noneEnabled = True
        self.referenceVolumeSelector.setMRMLScene(slicer.mrmlScene)
        self.referenceVolumeSelector.setToolTip("The scan the reference segments were drawn on.")
        self.scriptedEffect.addLabeledOptionsWidget("Reference volume:", self.referenceVolumeSelector)

        self.segmentsList = qt.QListWidget()
        self.segmentsList.setToolTip("Check the segments to find in the source volume.")
        self.scriptedEffect.addLabeledOptionsWidget("Segments:", self.segmentsList)

        self.localiseComboBox = qt.QComboBox()
        for value, label in self.logic.LOCALISE_CHOICES:
            self.localiseComboBox.addItem(label, value)
        self.localiseComboBox.setToolTip(self.logic.LOCALISE_TOOLTIP)
        self.scriptedEffect.addLabeledOptionsWidget("Localisation:", self.localiseComboBox)

        self.previewButton = qt.QPushButton("Preview")
        self.previewButton.objectName = self.__class__.__name__ + "Preview"
        self.cancelButton = qt.QPushButton("Cancel")
        self.cancelButton.objectName = self.__class__.__name__ + "Cancel"
        self.cancelButton.setToolTip("Stop a running segmentation, or discard the preview.")
        self.applyButton = qt.QPushButton("Apply")
        self.applyButton.objectName = self.__class__.__name__ + "Apply"
        self.applyButton.setToolTip("Add the (previewed) result as new segments.")
        buttons = qt.QHBoxLayout()
        for button in (self.previewButton, self.cancelButton, self.applyButton):
            buttons.addWidget(button)
        self.scriptedEffect.addOptionsWidget(buttons)

        self.progressBar = qt.QProgressBar()
        self.progressBar.visible = False
        self.scriptedEffect.addOptionsWidget(self.progressBar)

        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)

        self.referenceSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onReferenceSegmentationChanged)
        self.referenceVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateMRMLFromGUI)
        self.segmentsList.connect("itemChanged(QListWidgetItem*)", self.updateMRMLFromGUI)
        self.localiseComboBox.connect("currentIndexChanged(int)", self.updateMRMLFromGUI)
        self.previewButton.connect("clicked()", self.onPreview)
        self.cancelButton.connect("clicked()", self.onCancel)
        self.applyButton.connect("clicked()", self.onApply)

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault("IrisLocalise", self.logic.LOCALISE_CHOICES[0][0])

    def createCursor(self, widget):
        return slicer.util.mainWindow().cursor

    def deactivate(self):
        self.removePreview()

    @property
    def logic(self):
        return slicer.util.getModuleLogic("IrisSegment")

    # -- options <-> effect parameters -------------------------------------------------------------
    def updateGUIFromMRML(self):
        segmentation = slicer.mrmlScene.GetNodeByID(self.scriptedEffect.parameter("IrisReferenceSegmentation"))
        volume = slicer.mrmlScene.GetNodeByID(self.scriptedEffect.parameter("IrisReferenceVolume"))
        checked = self.scriptedEffect.parameter("IrisReferenceSegments").split(";")
        widgets = (self.referenceSegmentationSelector, self.referenceVolumeSelector, self.segmentsList, self.localiseComboBox)
        for widget in widgets:
            widget.blockSignals(True)
        self.referenceSegmentationSelector.setCurrentNode(segmentation)
        self.referenceVolumeSelector.setCurrentNode(volume)
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
        ready = bool(segmentation and volume and self._checkedIds() and self._sourceVolume())
        running = self.progressBar.visible
        self.previewButton.enabled = ready and not running
        self.applyButton.enabled = (ready or self.pending is not None) and not running
        self.cancelButton.enabled = running or self.previewNode is not None

    def updateMRMLFromGUI(self):
        # One modification: each parameter set alone would refresh the GUI from the others' old values.
        with slicer.util.NodeModify(self.scriptedEffect.parameterSetNode()):
            self.scriptedEffect.setParameter("IrisReferenceSegmentation", self.referenceSegmentationSelector.currentNodeID)
            self.scriptedEffect.setParameter("IrisReferenceVolume", self.referenceVolumeSelector.currentNodeID)
            self.scriptedEffect.setParameter("IrisReferenceSegments", ";".join(self._checkedIds()))
            self.scriptedEffect.setParameter("IrisLocalise", self.localiseComboBox.itemData(self.localiseComboBox.currentIndex) or "auto")

    def onReferenceSegmentationChanged(self, segmentation):
        """A new reference: its source volume and all its segments."""
        volume = self.logic.sourceVolume(segmentation)
        if volume is not None:
            self.referenceVolumeSelector.setCurrentNode(volume)
        with slicer.util.NodeModify(self.scriptedEffect.parameterSetNode()):
            self.scriptedEffect.setParameter("IrisReferenceSegmentation", segmentation.GetID() if segmentation else "")
            self.scriptedEffect.setParameter("IrisReferenceVolume", self.referenceVolumeSelector.currentNodeID)
            self.scriptedEffect.setParameter("IrisReferenceSegments", ";".join(self.logic.segmentIds(segmentation)))

    def _checkedIds(self):
        items = [self.segmentsList.item(i) for i in range(self.segmentsList.count)]
        return [item.data(qt.Qt.UserRole) for item in items if item.checkState() == qt.Qt.Checked]

    def _localise(self):
        """The localisation chosen for this effect ("auto" until one is chosen)."""
        return self.scriptedEffect.parameter("IrisLocalise") or "auto"

    def _sourceVolume(self):
        return self.scriptedEffect.parameterSetNode().GetSourceVolumeNode()

    # -- preview, apply, cancel --------------------------------------------------------------------
    def onPreview(self):
        from IrisSegmentLib.errors import Cancelled

        self.removePreview()
        options = self.logic.options(self.logic.getParameterNode())
        segmentationNode = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
        self.progressBar.visible = True
        self.statusLabel.text = ""
        self.updateGUIFromMRML()
        try:
            with slicer.util.tryWithErrorDisplay("IRIS failed.", waitCursor=False):
                try:
                    self.pending = self.logic.compute(
                        self._sourceVolume(), self.referenceVolumeSelector.currentNode(), self.referenceSegmentationSelector.currentNode(),
                        self._checkedIds(), options["device"], overlap=options["overlap"], tuningSteps=options["tuningSteps"],
                        postprocess=options["postprocess"], progress=self.onProgress, localise=self._localise())
                except Cancelled:
                    self.statusLabel.text = "IRIS cancelled: nothing was added."
                    slicer.util.showStatusMessage(self.statusLabel.text, 3000)
                    return
                self.previewNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", segmentationNode.GetName() + " IRIS preview")
                self.logic.write(self.pending, self.previewNode)
                self.previewNode.GetDisplayNode().SetOpacity(0.6)
                self.statusLabel.text = self.logic.statusText(self.logic.segmentIds(self.previewNode))
                slicer.util.showStatusMessage(self.statusLabel.text.replace("\n", "  "), 5000)
        finally:
            self.progressBar.visible = False
            self.updateGUIFromMRML()

    def onProgress(self, fraction, message):
        self.progressBar.value = int(round(100 * fraction))
        slicer.util.showStatusMessage(f"IRIS: {message}")

    def onApply(self):
        if self.pending is None or self.pending.target_node is not self._sourceVolume():
            self.onPreview()
            if self.pending is None:
                return
        segmentationNode = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
        self.scriptedEffect.saveStateForUndo()
        with slicer.util.tryWithErrorDisplay("IRIS could not add the segments.", waitCursor=True):
            self.logic.write(self.pending, segmentationNode, add=self._addSegment)
        self.removePreview()

    def _addSegment(self, segmentationNode, name, colour, labelmap):
        """One new segment set through the editor, so that its masking and overwrite settings apply."""
        sid = segmentationNode.GetSegmentation().AddEmptySegment("", name, colour)
        self.scriptedEffect.modifySegmentByLabelmap(segmentationNode, sid, labelmap, slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet)
        return sid

    def onCancel(self):
        if self.progressBar.visible:
            self.logic.requestCancel()
        else:
            self.removePreview()

    def removePreview(self):
        if self.previewNode is not None and self.previewNode.GetScene() is not None:
            slicer.mrmlScene.RemoveNode(self.previewNode)
        self.previewNode = None
        self.pending = None
        self.updateGUIFromMRML()
