"""Cohort segmentation: one task, many target studies, on a local or remote Dask cluster (`iris-segment batch`).

    targets.py   find the studies: a folder (recursive, by pattern) or a CSV of paths (optional id column)
    formats.py   read a target: NIfTI (nibabel), NRRD / MetaImage / DICOM series (SimpleITK, optional extra)
    settings.py  what makes two results comparable: the task key (model weights, task inputs, options)
    results.py   OUT/results.csv (atomic rewrites), the completeness check, the output-folder lock
    worker.py    runs on the Dask workers: the model loaded once per worker (a WorkerPlugin), one study per task
    cluster.py   a LocalCluster sized to the machine, or a Client to a running scheduler
    run.py       the orchestration: plan, submit, record, progress, Ctrl-C

Dask is imported only by worker.py, cluster.py and run.py (pip install "IrisSegmentLib[cohort]"); SimpleITK only
when a non-NIfTI target is read (pip install "IrisSegmentLib[formats]"). Nothing here imports slicer, vtk or Qt.
"""
from .targets import Study, find_targets

__all__ = ["Study", "find_targets"]
