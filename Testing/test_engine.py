"""The front ends' engine without Slicer (IrisSegmentLib/engine.py): it imports no slicer, vtk or qt; torch work
runs on its worker thread while progress and the result arrive on the calling thread; the last task is reused;
Cancel and errors reach the caller."""
from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest

from conftest import REPO_ROOT, OracleModel, dice, ellipsoid_mask, make_affine
from IrisSegmentLib.engine import WRITE_AT, Engine, Reference, SegmentInfo
from IrisSegmentLib.errors import Cancelled, IrisInputError
from IrisSegmentLib.inference.segmenter import Segmenter


def test_engine_imports_no_slicer_vtk_or_qt():
    code = ("import sys, IrisSegmentLib.engine; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'slicer', 'vtk', 'vtkmodules', 'qt', 'PythonQt'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    affine = make_affine(np.diag([1.5, 1.5, 1.5]), [0.0, 0.0, 0.0])
    mask = ellipsoid_mask((40, 40, 40), affine, (30.0, 30.0, 30.0), (10, 8, 7))
    image = (100 + 800 * mask + np.random.default_rng(0).normal(0, 5, mask.shape)).astype(np.float32)
    return image, affine, mask


def test_engine_segments_arrays_on_its_worker_thread(tiny_cfg):
    image, affine, mask = _scene()
    waits, reports = [], []
    engine = Engine(Segmenter(OracleModel(), tiny_cfg, "cpu", model_id="oracle"), wait=lambda: waits.append(1), slice_s=0.001)
    reference, infos = Reference(image, affine, [mask], [1]), [SegmentInfo("blob", (1.0, 0.0, 0.0))]
    main = threading.get_ident()

    result, run = engine.segment(image, affine, [reference], infos, device="cpu", localise="none",
                                 progress=lambda f, m: reports.append((threading.get_ident(), f, m)))
    assert result.label_map.shape == mask.shape and dice(result.label_map == 1, mask) > 0.85
    assert waits and reports and all(t == main for t, _, _ in reports) and reports[-1][1:] == (WRITE_AT, "done")
    assert engine.last is run and run.device == "cpu" and run.windows > 0 and not run.reused_task
    assert engine.segment(image, affine, [reference], infos, device="cpu", localise="none")[1].reused_task
    task = engine.encode([reference], infos, "cpu")
    assert task.labels == [1] and task.names == ["blob"] and task.model_id == "oracle"

    with pytest.raises(Cancelled):
        engine.segment(image, affine, [reference], infos, device="cpu", cancel=lambda: True)
    with pytest.raises(IrisInputError, match="overlap must be in"):  # the worker's error reaches the caller
        engine.segment(image, affine, [reference], infos, device="cpu", overlap=1.5)
