"""Renders the module panel's .ui file to PNG for the README (no Slicer needed): docs/slicer_panel_ui.png (ready to
run) and docs/slicer_panel_install_ui.png (first use without PyTorch: the install offer).

    pip install PySide6-Essentials && QT_QPA_PLATFORM=offscreen python scripts/render_slicer_ui.py

This is a rendering of IrisSegment/Resources/UI/IrisSegment.ui with plain Qt widgets standing in for Slicer's
(qMRMLNodeComboBox -> a combo box showing a node name, ctkCollapsibleButton -> a group box), filled with what the
panel shows for the bundled sample pair; it is not a screenshot of Slicer.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import Property, QFile, Qt  # noqa: E402
from PySide6.QtUiTools import QUiLoader  # noqa: E402
from PySide6.QtWidgets import QApplication, QComboBox, QGroupBox, QListWidgetItem, QWidget  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
UI = ROOT / "IrisSegment" / "Resources" / "UI" / "IrisSegment.ui"
sys.path.insert(0, str(ROOT / "IrisSegment"))
from IrisSegmentSupport import dependencies  # noqa: E402


class qMRMLWidget(QWidget):  # noqa: N801 (named as Slicer's class, which the .ui refers to)
    pass


class qMRMLNodeComboBox(QComboBox):  # noqa: N801
    pass


class qMRMLCheckableNodeComboBox(qMRMLNodeComboBox):  # noqa: N801
    pass


class ctkCollapsibleButton(QGroupBox):  # noqa: N801
    def _text(self) -> str:
        return self.title()

    def _set_text(self, text: str) -> None:
        self.setTitle(text)

    text = Property(str, _text, _set_text)


def load():
    loader = QUiLoader()
    for cls in (qMRMLWidget, qMRMLNodeComboBox, qMRMLCheckableNodeComboBox, ctkCollapsibleButton):
        loader.registerCustomWidget(cls)
    file = QFile(str(UI))
    file.open(QFile.ReadOnly)
    panel = loader.load(file)
    file.close()
    return panel


def fill(panel, ready: bool) -> None:
    """What the panel shows with the sample pair loaded (ready), or on first use without PyTorch."""
    find = lambda name, cls=QWidget: panel.findChild(cls, name)  # noqa: E731
    find("referenceVolumeSelector", QComboBox).addItem("hippocampus_001_image")
    find("referenceSegmentationSelector", QComboBox).addItem("hippocampus_001 reference labels")
    find("extraReferencesSelector", QComboBox).addItem("None")
    find("targetVolumeSelector", QComboBox).addItem("hippocampus_003_image")
    find("outputSegmentationSelector", QComboBox).addItem("Create new segmentation")
    for name in ("anterior hippocampus", "posterior hippocampus"):
        item = QListWidgetItem(name)
        item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
        item.setCheckState(Qt.Checked)
        find("referenceSegmentsList").addItem(item)
    find("referenceSegmentsList").setFixedHeight(44)
    devices = ["auto (CPU: no CUDA GPU detected)", "CPU"] if ready else ["auto"]  # as on a machine without a GPU
    find("deviceComboBox", QComboBox).addItems(devices)
    find("localiseComboBox", QComboBox).addItems(["auto", "registration", "none (whole field of view)"])
    install = not ready
    problems = [dependencies.Problem(dependencies.Requirement("torch", "2.2"))]
    find("dependenciesLabel").setText(dependencies.message(problems) if install else "")
    find("dependenciesLabel").setVisible(install)
    find("installButton").setVisible(install)
    find("applyButton").setEnabled(ready)


def main() -> None:
    app = QApplication.instance() or QApplication([])
    for ready, name in ((True, "slicer_panel_ui.png"), (False, "slicer_panel_install_ui.png")):
        panel = load()
        fill(panel, ready)
        panel.resize(460, 700)
        panel.show()
        app.processEvents()
        panel.grab().save(str(ROOT / "docs" / name))
        panel.close()


if __name__ == "__main__":
    main()
