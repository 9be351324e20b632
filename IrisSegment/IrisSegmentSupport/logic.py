"""IrisSegmentLogic: the module's behaviour without GUI, for the panel, the Segment Editor effect and the Python
console. Light to create: it imports neither Qt nor torch; torch and IrisSegmentLib load on the first segmentation.

    logic = slicer.util.getModuleLogic("IrisSegment")   # or IrisSegmentLogic() without building the panel
    ids = logic.segment(targetVolume, referenceVolume, referenceSegmentation, ["liver", "spleen"], localise="auto")
    print(logic.statusText(ids))
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import slicer
import vtk
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from . import dependencies

MODULE_DIR = Path(__file__).resolve().parent.parent
REQUIREMENTS_FILE = MODULE_DIR / "Resources" / "requirements.txt"
# Localisation (IrisSegmentLib.inference.localise): (value passed to the engine, label shown), default first.
LOCALISE_CHOICES = [("auto", "auto"), ("registration", "registration"), ("none", "none (whole field of view)")]
LOCALISE_TOOLTIP = (
    "auto: register the reference onto the target and segment only where its structures can be (falls back to the "
    "whole field of view, with a warning, when registration fails or cannot run). registration: the same, but an "
    "error when it cannot run. none: segment the whole field of view, no registration.")
DEFAULTS = (("Device", "auto"), ("Localise", "auto"), ("Overlap", "0.5"), ("TuningSteps", "0"), ("PostProcess", "true"),
            ("Show3D", "false"))
_ENGINES: dict = {}  # model -> engine, shared by every logic (the panel's and the effect's): the model loads once


class DependencyError(RuntimeError):
    """A dependency could not be installed; the message says what to do."""


def failure_kind(error: BaseException) -> str:
    """"cancelled", "input" (bad input or an install problem: the message says what to do, shown without
    traceback) or "bug"."""
    errors = sys.modules.get("IrisSegmentLib.errors")  # not imported: the engine never ran, so none of its errors
    if errors is not None and isinstance(error, errors.Cancelled):
        return "cancelled"
    if isinstance(error, DependencyError) or errors is not None and isinstance(error, errors.IrisInputError):
        return "input"
    return "bug"


class IrisSegmentLogic(ScriptedLoadableModuleLogic):
    """Segmentation, saved tasks and dependency checks; every long call takes `progress` and stops on `requestCancel()`."""

    LOCALISE_CHOICES = LOCALISE_CHOICES
    LOCALISE_TOOLTIP = LOCALISE_TOOLTIP

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.model = None  # None: the bundled model; or a model folder (config.yaml + weights.safetensors), or a Segmenter
        self.lastOutputSegmentation = None
        self._cancel = None  # IrisSegmentLib.worker.CancelToken, made on the first run

    # -- parameters ------------------------------------------------------------------------------
    def setDefaultParameters(self, parameterNode) -> None:
        for name, value in DEFAULTS:
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

    # -- dependencies: checked from metadata, installed only on request ----------------------------
    @staticmethod
    def requirements() -> list[dependencies.Requirement]:
        return dependencies.load(REQUIREMENTS_FILE)

    def dependencyProblems(self, probe: bool = False) -> list[dependencies.Problem]:
        """Unmet requirements; `probe` also imports each package to see that it loads (torch takes seconds: not on the
        effect's first click)."""
        requirements = self.requirements()
        return dependencies.check(requirements, tuple(r.name for r in requirements) if probe else ())

    def installDependencies(self, problems: list[dependencies.Problem]) -> str:
        """Installs what `problems` lists: torch through the PyTorch extension (it asks, and picks the build for the
        GPU), the rest with pip, the packages Slicer ships pinned. Returns what to tell the user; raises
        DependencyError when something could not be installed."""
        restart = False
        torch = dependencies.torch_problem(problems)
        if torch is not None:
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                raise DependencyError("IrisSegment needs the PyTorch extension: install it in the Extensions Manager (search "
                                      "'PyTorch'), restart Slicer, then click Install dependencies again.") from None
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            restart = torch.kind != "missing" and "torch" in sys.modules  # an old torch is loaded: the new one needs a restart
            if torch.kind == "broken":
                torchLogic.uninstallTorch()
            if torchLogic.installTorch(askConfirmation=True, torchVersionRequirement=f">={torch.requirement.minimum}") is None:
                raise DependencyError("PyTorch was not installed; IrisSegment cannot run without it. Click Install "
                                      "dependencies again when you are ready.")
        others = [str(p.requirement) for p in problems if p.requirement.name != dependencies.TORCH]
        if others:
            if not slicer.util.confirmOkCancelDisplay(
                    f"IrisSegment will install {', '.join(others)} into Slicer's Python with pip. The packages Slicer "
                    "ships (numpy, scipy, SimpleITK) are kept as they are.", windowTitle="Install dependencies"):
                raise DependencyError(f"{', '.join(others)} not installed; IrisSegment cannot run without them.")
            with tempfile.TemporaryDirectory() as folder:
                constraints = Path(folder) / "constraints.txt"
                constraints.write_text(dependencies.constraints())
                slicer.util.pip_install(dependencies.pip_arguments(problems, constraints))
        if restart:
            return "PyTorch was updated: restart Slicer to use it (the old version is still loaded)."
        remaining = self.dependencyProblems(probe=True)
        if remaining:
            raise DependencyError(dependencies.message(remaining))
        return "Dependencies installed: IrisSegment is ready."

    # -- engine ----------------------------------------------------------------------------------
    @property
    def engine(self):
        """The model and last task embedding, kept between runs and shared by every logic; torch runs on a worker
        thread while Slicer processes its events."""
        from IrisSegmentLib import mrml

        if self.model not in _ENGINES:
            _ENGINES[self.model] = mrml.Engine(self.model, wait=slicer.app.processEvents)
        return _ENGINES[self.model]

    @staticmethod
    def deviceChoices() -> list[tuple[str, str]]:
        from IrisSegmentLib import mrml

        return mrml.device_choices()

    def requestCancel(self) -> None:
        """Stops the running computation at its next check (see IrisSegmentLib.progress); nothing is added."""
        if self._cancel is not None:
            self._cancel.set()

    @property
    def cancelRequested(self) -> bool:
        return self._cancel is not None and self._cancel()

    def _startRun(self):
        from IrisSegmentLib.worker import CancelToken

        self._cancel = self._cancel or CancelToken()
        self._cancel.clear()
        return self._cancel

    # -- scene helpers (no torch) ----------------------------------------------------------------
    @staticmethod
    def segmentIds(segmentationNode) -> list[str]:
        if segmentationNode is None:
            return []
        segmentation = segmentationNode.GetSegmentation()
        return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]

    @staticmethod
    def sourceVolume(segmentationNode):
        """The volume the segmentation was drawn on: as the Segment Editor recorded it, else the one volume in the
        scene with exactly its reference geometry (e.g. a .seg.nrrd loaded beside its volume), else None."""
        if segmentationNode is None:
            return None
        node = segmentationNode.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
        if node is not None:
            return node
        converter = slicer.vtkSegmentationConverter
        geometry = segmentationNode.GetSegmentation().GetConversionParameter(converter.GetReferenceImageGeometryParameterName())
        matches = []
        for volume in _volumes(segmentationNode.GetScene()):
            matrix = vtk.vtkMatrix4x4()
            volume.GetIJKToRASMatrix(matrix)
            if geometry and volume.GetImageData() is not None and converter.SerializeImageGeometry(matrix, volume.GetImageData()) == geometry:
                matches.append(volume)
        return matches[0] if len(matches) == 1 else None

    @classmethod
    def defaultTarget(cls, scene, reference=None):
        """A volume to segment other than the reference: the latest loaded one that is no segmentation's source
        volume, else any other (None when the reference is the only volume)."""
        volumes = [v for v in _volumes(scene) if v is not reference]
        sources = {cls.sourceVolume(s) for s in scene.GetNodesByClass("vtkMRMLSegmentationNode")}
        free = [v for v in volumes if v not in sources]
        return (free or volumes or [None])[-1]

    # -- segmentation ----------------------------------------------------------------------------
    def compute(self, targetVolume, referenceVolume=None, referenceSegmentation=None, referenceSegments=None, device="auto",
                extraReferences=(), task=None, overlap=None, tuningSteps=0, postprocess=True, progress=None, localise="auto"):
        """Segments the target without writing anything: a Pending result for `write` (the effect's preview).
        `localise`: "auto", "registration" or "none" (see LOCALISE_TOOLTIP); `postprocess`: keep the largest piece of
        each segment whose reference structure is one piece, and fill holes."""
        from IrisSegmentLib import mrml

        cancel = self._startRun()
        return mrml.compute_segments(targetVolume, referenceVolume, referenceSegmentation, referenceSegments, device, progress,
                                     cancel, extra_references=extraReferences, task=task, overlap=overlap,
                                     tuning_steps=tuningSteps, localise=localise, postprocess=postprocess, engine=self.engine)

    def beforeWriting(self, progress=None, what: str = "adding the segments") -> None:
        """Reports `what`, then raises Cancelled if Cancel was requested meanwhile: call it before changing the scene."""
        from IrisSegmentLib import mrml

        mrml.before_writing(progress, self._cancel, what)

    def write(self, pending, outputSegmentation=None, add=None, show3D=False, progress=None) -> list[str]:
        """Adds the computed segments to `outputSegmentation` (None: a new one beside the target), unless Cancel was
        requested meanwhile; `add` replaces how one segment is added (the Segment Editor effect goes through the editor)."""
        from IrisSegmentLib import mrml

        self.beforeWriting(progress)
        self.lastOutputSegmentation = outputSegmentation or mrml.create_output_segmentation(pending.target_node)
        ids = mrml.write_segments(pending, self.lastOutputSegmentation, add=add, show_3d=show3D)
        if progress is not None:
            progress(1.0, "done")
        return ids

    def segment(self, targetVolume, referenceVolume=None, referenceSegmentation=None, referenceSegments=None,
                outputSegmentation=None, device="auto", extraReferences=(), task=None, overlap=None, tuningSteps=0,
                postprocess=True, show3D=False, progress=None, localise="auto") -> list[str]:
        """Segments `targetVolume` like the reference segments (IDs or names; None: all) or a saved task file;
        adds the results to `outputSegmentation` (None: a new segmentation) and returns the new segment IDs.
        `extraReferences`: [(volume or None, segmentation)] averaged with the reference (context ensemble).
        `localise`: "auto" registers the reference onto the target and segments only where its structures can be,
        "registration" the same or an error, "none" the whole field of view; `statusText(ids)` tells which was done
        and any warning. Cancelled (requestCancel) raises IrisSegmentLib.Cancelled and adds nothing."""
        pending = self.compute(targetVolume, referenceVolume, referenceSegmentation, referenceSegments, device, extraReferences,
                               task, overlap, tuningSteps, postprocess, progress, localise)
        return self.write(pending, outputSegmentation, show3D=show3D, progress=progress)

    def statusText(self, ids: list[str]) -> str:
        """What was added, how fast, whether it was localised by registration, the engine's warnings and each
        segment's estimated Dice (flagged where low)."""
        from IrisSegmentLib import mrml

        return mrml.status_text(self.engine.last, self.lastOutputSegmentation, ids)

    # -- saved tasks -----------------------------------------------------------------------------
    @property
    def tasksFolder(self) -> Path:
        return Path(slicer.app.slicerUserSettingsFilePath).parent / "IrisSegment" / "tasks"

    def savedTasks(self) -> dict:
        from IrisSegmentLib import mrml

        return mrml.saved_tasks(self.tasksFolder)

    def saveTask(self, name, referenceVolume, referenceSegmentation, referenceSegments=None, device="auto",
                 extraReferences=(), tuningSteps=0, progress=None) -> str:
        """Encodes the reference, saves the embedding in the user's task folder; returns its name in `savedTasks()`.
        A bad name is refused before any work; cancelled, no file is written."""
        from IrisSegmentLib import mrml

        path = mrml.task_path(self.tasksFolder, name)
        cancel = self._startRun()
        task = mrml.encode_task(referenceVolume, referenceSegmentation, referenceSegments, device, progress, cancel,
                                extra_references=extraReferences, tuning_steps=tuningSteps, engine=self.engine)
        self.beforeWriting(progress, "saving the task")
        mrml.save_task(task, self.tasksFolder, name)
        return path.name[: -len(mrml.TASK_SUFFIX)]


def _volumes(scene) -> list:
    """The scene's scalar volumes (not label maps), in the order they were added."""
    return [v for v in scene.GetNodesByClass("vtkMRMLScalarVolumeNode") if not v.IsA("vtkMRMLLabelMapVolumeNode")]
