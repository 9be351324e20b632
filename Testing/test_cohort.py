"""iris-segment batch (issue 10): target finding, formats, the results table and its completeness check, cluster
sizing, and a cohort of 12 small synthetic studies (one unreadable, one 4D) through real local Dask clusters with 2
worker processes: results.csv, resume after damage and after Ctrl-C, --overwrite, and outputs identical to `segment`.

The network is the seeded, untrained tiny one with threshold 0: every voxel of a target gets label 1 or 2 (but for
stray pieces the post-processing removes), so the voxel counts of a row add up to the target's labelled voxels and
its volumes are checked exactly; quality is not tested. Every run segments the whole field of view (--localise none):
registration is not bit-reproducible from run to run, and label maps are compared across runs.
"""
from __future__ import annotations

import csv
import hashlib
import shutil
import sys
import time
from contextlib import redirect_stdout
from io import StringIO

import numpy as np
import psutil
import pytest

from conftest import ellipsoid_mask, make_affine, read_nifti, rot_x, rot_z, write_nifti
from IrisSegmentLib import io
from IrisSegmentLib.cli import main
from IrisSegmentLib.cohort import cluster as C
from IrisSegmentLib.cohort import formats as F
from IrisSegmentLib.cohort import results as R
from IrisSegmentLib.cohort import run as RUN
from IrisSegmentLib.cohort import targets as T
from IrisSegmentLib.errors import IrisInputError

GOOD = ["case00", "case01", "case02", "case03", "case04", "case05", "case06", "site2/case07", "site2/case08",
        "site2/deeper/case09"]
BAD = {"bad_unreadable": "cannot be read as NIfTI", "bad_4d": "has 4 dimensions (12, 10, 8, 3)"}
STRUCTURES = [(1, "label 1_ml", "label 1_voxels", "label 1_estimated_dice"), (2, "label 2_ml", "label 2_voxels", "label 2_estimated_dice")]


# -- the cohort ------------------------------------------------------------------------------------------------
def _study(rng, i: int):
    shape = (16 + 2 * (i % 4), 14 + (i % 3), 10 + (i % 5))
    linear = np.diag([1.3 + 0.1 * (i % 3), 1.5, 2.0 + 0.2 * (i % 2)])
    if i % 3 == 0:
        linear = rot_z(15 * i) @ rot_x(10) @ linear  # oblique
    if i % 4 == 1:
        linear = np.diag([-1.0, -1.0, 1.0]) @ linear  # LPS-like
    aff = make_affine(linear, [5.0 * i, -3.0, 2.0 * i])
    c = aff[:3, :3] @ ((np.array(shape) - 1) / 2) + aff[:3, 3]
    lab = ellipsoid_mask(shape, aff, c, (7, 6, 5))
    dtype = (np.int16, np.float32, np.uint8)[i % 3]
    return (40 + 150 * lab + rng.normal(0, 8, shape)).clip(0, 250).astype(dtype), aff


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """ref.nii.gz + ref_label.nii.gz (labels 1 and 2), and targets/ with 10 good studies (three in subfolders, one
    stored as .nii), one unreadable file, one 4D image, and files that are not studies (hidden, text)."""
    d = tmp_path_factory.mktemp("cohort")
    rng = np.random.default_rng(10)
    r_shape, r_aff = (28, 26, 20), make_affine(np.diag([1.5, 1.5, 2.0]), [-20.0, -18.0, -15.0])
    rc = r_aff[:3, :3] @ ((np.array(r_shape) - 1) / 2) + r_aff[:3, 3]
    lab = np.zeros(r_shape, np.uint8)
    lab[ellipsoid_mask(r_shape, r_aff, rc, (9, 8, 7))] = 1
    lab[ellipsoid_mask(r_shape, r_aff, rc + [7, 5, 0], (4, 4, 4))] = 2
    write_nifti(d / "ref.nii.gz", (40 + 150 * (lab == 1) + 90 * (lab == 2) + rng.normal(0, 8, r_shape)).astype(np.float32), r_aff)
    write_nifti(d / "ref_label.nii.gz", lab, r_aff)
    t = d / "targets"
    (t / "site2" / "deeper").mkdir(parents=True)
    for i, sid in enumerate(GOOD):
        write_nifti(t / (sid + (".nii" if i == 4 else ".nii.gz")), *_study(rng, i))
    (t / "bad_unreadable.nii.gz").write_bytes(b"\x1f\x8b\x08\x00 this is not a NIfTI file")
    write_nifti(t / "bad_4d.nii.gz", np.ones((12, 10, 8, 3), np.int16), np.eye(4))
    (t / "notes.txt").write_text("not an image")
    write_nifti(t / ".hidden.nii.gz", np.ones((4, 4, 4), np.int16), np.eye(4))
    return d


def _batch_args(cohort, model_dir, out, *extra, targets=None):
    """Whole field of view (--localise none; it is part of the task key, so every run here gives it): registration
    (Greedy) is not bit-reproducible from run to run, and these tests compare label maps across runs."""
    return ["batch", "--reference-image", str(cohort / "ref.nii.gz"), "--reference-label", str(cohort / "ref_label.nii.gz"),
            "--targets", str(targets or cohort / "targets"), "--output-dir", str(out), "--model", str(model_dir),
            "--device", "cpu", "--localise", "none", *extra]


def _rows(out) -> dict[str, dict[str, str]]:
    with open(out / "results.csv", newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def _outputs(out) -> dict[str, tuple[int, int]]:
    """(mtime_ns, inode) of every label map: a rewritten one (atomic rename) changes both."""
    return {p.relative_to(out).as_posix()[: -len(".nii.gz")]: (p.stat().st_mtime_ns, p.stat().st_ino)
            for p in out.rglob("*.nii.gz") if not p.name.startswith(".")}


def _worker_processes() -> set[int]:
    """This process's children started by multiprocessing spawn (Dask worker processes)."""
    found = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if "spawn_main" in " ".join(p.cmdline()):
                found.add(p.pid)
        except psutil.Error:  # gone meanwhile
            pass
    return found


@pytest.fixture(scope="module")
def first_run(cohort, tiny_model_dir_threshold0, tmp_path_factory):
    """The cohort through the command's own LocalCluster (--workers 2); returns (out, exit code, stdout, rows,
    outputs, label maps), and checks the cluster's worker processes are gone afterwards."""
    out = tmp_path_factory.mktemp("first") / "out"
    before = _worker_processes()
    stdout = StringIO()
    with redirect_stdout(stdout):
        code = main(_batch_args(cohort, tiny_model_dir_threshold0, out, "--workers", "2"))
    assert _worker_processes() <= before, "the local cluster's worker processes outlived the run"
    maps = {sid: read_nifti(out / f"{sid}.nii.gz")[0] for sid in GOOD}
    return out.resolve(), code, stdout.getvalue(), _rows(out), _outputs(out), maps


@pytest.fixture(scope="module")
def scheduler():
    """A running Dask cluster (scheduler + 2 worker processes) for --scheduler runs, and a client to inspect it."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster)
    yield cluster.scheduler_address, client
    client.close()
    cluster.close()


# -- the cohort end to end ---------------------------------------------------------------------------------------
def test_results_csv_complete_and_correct(first_run, cohort):
    out, code, stdout, rows, _, maps = first_run
    assert code == 1  # two studies failed
    assert "10 segmented, 2 failed, 0 kept, 0 already done" in stdout
    assert sorted(rows) == sorted(GOOD + list(BAD))
    header = open(out / "results.csv").readline().strip().split(",")
    assert header == [*R.FIXED, *(c for _, *cols in STRUCTURES for c in cols)]
    assert len({r["task"] for r in rows.values()}) == 1 and len(rows["case00"]["task"]) == 12
    for sid, message in BAD.items():
        r = rows[sid]
        assert r["status"] == "failed" and message in r["reason"], r
        assert not (out / f"{sid}.nii.gz").exists() and r["label 1_ml"] == ""
    for sid in GOOD:
        r = rows[sid]
        assert r["status"] == "ok" and r["reason"] == "" and r["device"] == "cpu" and r["worker"] in ("0", "1"), r
        assert float(r["seconds"]) > 0 and r["finished"]
        target = next((cohort / "targets").glob(sid + ".nii*"))
        image, t_aff, _ = read_nifti(target)
        labels, aff, _ = read_nifti(out / f"{sid}.nii.gz")
        assert labels.shape == image.shape and np.allclose(aff, t_aff)
        assert r["path"] == str(target.resolve()) and r["output"] == str(out / f"{sid}.nii.gz")
        assert r["output_sha256"] == hashlib.sha256((out / f"{sid}.nii.gz").read_bytes()).hexdigest()
        voxel_ml = abs(np.linalg.det(t_aff[:3, :3])) / 1000
        for v, ml, vx, est in STRUCTURES:
            assert r[est] == ""  # the tiny model folder has no confidence calibration
            assert int(r[vx]) == np.count_nonzero(labels == v)
            assert float(r[ml]) == pytest.approx(int(r[vx]) * voxel_ml, abs=5e-5)
        # threshold 0: every voxel labelled, but for the stray pieces the post-processing removed (it keeps each
        # structure's largest component)
        assert int(r["label 1_voxels"]) + int(r["label 2_voxels"]) == np.count_nonzero(labels) >= 0.95 * labels.size
        assert np.array_equal(labels, maps[sid])
    assert {r["worker"] for r in rows.values()} <= {"0", "1"}
    assert not [p for p in out.rglob(".iris-*") if p.name != R.LOCK]  # no temporary file left
    assert not (out / "notes.nii.gz").exists() and ".hidden" not in rows


@pytest.mark.parametrize("sid", ["case04", "site2/case07", "case03"])  # .nii, a subfolder, an oblique int16
def test_outputs_identical_to_segment(first_run, cohort, tiny_model_dir_threshold0, tmp_path, sid):
    out, *_ = first_run
    target = next((cohort / "targets").glob(sid + ".nii*"))
    single = tmp_path / "single.nii.gz"
    assert main(["segment", "--reference-image", str(cohort / "ref.nii.gz"), "--reference-label", str(cohort / "ref_label.nii.gz"),
                 "--target", str(target), "--output", str(single), "--model", str(tiny_model_dir_threshold0),
                 "--device", "cpu", "--localise", "none"]) == 0
    a, a_aff, a_hdr = read_nifti(single)
    b, b_aff, b_hdr = read_nifti(out / f"{sid}.nii.gz")
    assert np.array_equal(a, b) and a.dtype == b.dtype
    assert np.array_equal(a_aff, b_aff) and np.array_equal(a_hdr.get_sform(), b_hdr.get_sform())


def _set_row(out, sid, **values):
    table = R.ResultsTable.load(out / "results.csv", STRUCTURES)
    table.rows[sid].update(values)
    table.save()


def test_rerun_redoes_only_what_is_missing(first_run, cohort, tiny_model_dir_threshold0, scheduler, tmp_path, capsys):
    """After damage and a simulated crash, a rerun (on a running cluster, --scheduler) segments exactly the studies
    without a complete output, keeps what the user changed, and keeps a column it does not know."""
    src, _, _, rows0, outputs0, maps = first_run
    out = tmp_path / "out"
    shutil.copytree(src, out)  # copy2 keeps the mtimes
    assert {k: v[0] for k, v in _outputs(out).items()} == {k: v[0] for k, v in outputs0.items()}
    # a later version's column (e.g. the confidence issue's) in the existing table
    table = R.ResultsTable.load(out / "results.csv", STRUCTURES)
    for r in list(table.rows.values()):
        table.set({**r, "label 1_confidence": "0.5"})
    table.save()
    (out / "case00.nii.gz").unlink()  # deleted output
    data = (out / "case01.nii.gz").read_bytes()
    (out / "case01.nii.gz").write_bytes(data[: len(data) // 2])  # truncated output
    # a crash after case02's label map was written but before its row, and before case03's
    _set_row(out, "case02", status="skipped", reason=R.NOT_FINISHED)
    _set_row(out, "case03", status="skipped", reason=R.NOT_FINISHED)
    (out / "case03.nii.gz").unlink()
    (out / ".iris-half.nii.gz").write_bytes(b"half")  # stray temporaries of the crash
    (out / "site2" / ".iris-q1w2.nii.gz").write_bytes(b"half")
    # a correction drawn by hand over case05, and a file the batch never wrote in case06's place
    edited = maps["case05"].copy()
    edited[0] = 2
    write_nifti(out / "case05.nii.gz", edited, read_nifti(src / "case05.nii.gz")[1])
    table = R.ResultsTable.load(out / "results.csv", STRUCTURES)
    del table.rows["case06"]
    table.save()
    before = _outputs(out)
    capsys.readouterr()

    code = main(_batch_args(cohort, tiny_model_dir_threshold0, out, "--scheduler", scheduler[0]))
    stdout = capsys.readouterr().out
    assert code == 1, stdout
    assert "12 studies: 4 already done (checked), 2 kept" in stdout and "6 to segment" in stdout
    assert "removed 2 temporary file(s)" in stdout
    assert "case00 (output missing)" in stdout and "case01 (output unreadable" in stdout
    after, rows = _outputs(out), _rows(out)
    redone = {"case00", "case01", "case02", "case03"}
    assert {sid for sid in GOOD if after.get(sid) != before.get(sid)} == redone
    for sid in redone:
        assert rows[sid]["status"] == "ok" and rows[sid]["finished"] > rows0[sid]["finished"]
        assert np.array_equal(read_nifti(out / f"{sid}.nii.gz")[0], maps[sid])
    for sid in set(GOOD) - redone - {"case05", "case06"}:
        assert rows[sid] == {**rows0[sid], "label 1_confidence": "0.5"}  # untouched, unknown column kept
    for sid, message in (("case05", "changed since this batch wrote it"), ("case06", "existed before this batch")):
        assert rows[sid]["status"] == "skipped" and rows[sid]["reason"].startswith("kept:") and message in rows[sid]["reason"]
        assert after[sid] == before[sid]
    for sid in BAD:  # failed studies are retried
        assert rows[sid]["status"] == "failed" and rows[sid]["finished"] > rows0[sid]["finished"]
    assert not [p for p in out.rglob(".iris-*") if p.name != R.LOCK]
    assert open(out / "results.csv").readline().strip().endswith("label 1_confidence")
    # the shared cluster is left as it was: no IrisSegment plugin on its workers
    assert all(not [n for n in names if n.startswith("iris-segment")]
               for names in scheduler[1].run(lambda dask_worker: list(dask_worker.plugins)).values())


def test_overwrite_redoes_all_and_other_tasks_are_refused(first_run, cohort, tiny_model_dir_threshold0, scheduler,
                                                          tmp_path, capsys):
    src, _, _, rows0, _, maps = first_run
    out = tmp_path / "out"
    shutil.copytree(src, out)
    write_nifti(out / "case05.nii.gz", np.zeros_like(maps["case05"]), read_nifti(src / "case05.nii.gz")[1])
    before = _outputs(out)
    # another task (other labels) over these results: refused, nothing touched
    assert main(_batch_args(cohort, tiny_model_dir_threshold0, out, "--labels", "1", "--scheduler", scheduler[0])) == 2
    assert "segmented with another task" in capsys.readouterr().err
    assert _outputs(out) == before
    code = main(_batch_args(cohort, tiny_model_dir_threshold0, out, "--overwrite", "--scheduler", scheduler[0]))
    assert code == 1
    assert "0 already done (checked), 0 kept (outputs not written by this batch), 12 to segment" in capsys.readouterr().out
    after, rows = _outputs(out), _rows(out)
    assert all(after[sid] != before[sid] for sid in GOOD)
    for sid in GOOD:
        assert rows[sid]["status"] == "ok" and rows[sid]["finished"] > rows0[sid]["finished"]
        assert np.array_equal(read_nifti(out / f"{sid}.nii.gz")[0], maps[sid])


def test_interrupt_cancels_then_rerun_resumes(cohort, tiny_model_dir_threshold0, scheduler, tmp_path, monkeypatch, capsys):
    """Ctrl-C after the third study: exit 130, finished rows kept, the rest marked interrupted, the cluster's tasks
    cancelled; the next run segments only what is missing."""
    out = tmp_path / "out"
    calls = {"n": 0}
    save = R.ResultsTable.save

    def interrupting_save(self):
        calls["n"] += 1
        if calls["n"] == 4:  # the first save writes the placeholders; then one per finished study
            raise KeyboardInterrupt
        save(self)

    monkeypatch.setattr(R.ResultsTable, "save", interrupting_save)
    monkeypatch.setattr(RUN, "SAVE_EVERY", 0.0)  # a save after every study
    assert main(_batch_args(cohort, tiny_model_dir_threshold0, out, "--scheduler", scheduler[0])) == 130
    assert "interrupted: finished studies are kept" in capsys.readouterr().err
    monkeypatch.setattr(R.ResultsTable, "save", save)
    rows = _rows(out)
    done = {sid for sid, r in rows.items() if r["status"] in ("ok", "failed")}
    assert len(rows) == 12 and len(done) == 3
    assert all(r["status"] == "skipped" and r["reason"] == R.INTERRUPTED for sid, r in rows.items() if sid not in done)
    client = scheduler[1]
    deadline = time.monotonic() + 20
    while client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)) == 0
    first = {sid: (rows[sid]["finished"], _outputs(out).get(sid)) for sid in done}

    assert main(_batch_args(cohort, tiny_model_dir_threshold0, out, "--scheduler", scheduler[0])) == 1
    rows = _rows(out)
    assert sorted(sid for sid, r in rows.items() if r["status"] == "ok") == sorted(GOOD)
    for sid in done - set(BAD):
        assert (rows[sid]["finished"], _outputs(out)[sid]) == first[sid]  # not redone


def test_ctrl_c_in_a_terminal(cohort, tiny_model_dir_threshold0, tmp_path):
    """SIGINT to the whole process group, as Ctrl-C in a terminal sends it (the command's own LocalCluster): exit 130
    with one message and no traceback, finished rows kept, the others marked interrupted, no process left behind."""
    import os
    import signal
    import subprocess

    from conftest import REPO_ROOT

    targets = tmp_path / "targets"
    targets.mkdir()
    n = 300  # tiny studies run at ~25/s: enough of them that the run is still going when the signal comes
    for i in range(n):
        shutil.copy(cohort / "targets" / "case01.nii.gz", targets / f"s{i:03d}.nii.gz")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "IrisSegmentLib.cli", *_batch_args(cohort, tiny_model_dir_threshold0, out,
                          "--workers", "2", targets=targets)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env, start_new_session=True,
                         # a terminal starts a command with SIGINT at its default; an in-process cluster earlier in
                         # this pytest process may have left it ignored, which a child would inherit
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and p.poll() is None:
        if (out / "results.csv").exists() and sum(r["status"] == "ok" for r in _rows(out).values()) >= 2:
            break
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be interrupted"
    os.killpg(p.pid, signal.SIGINT)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert "interrupted: finished studies are kept" in stderr
    rows = _rows(out)
    assert len(rows) == n and {r["status"] for r in rows.values()} == {"ok", "skipped"}
    assert 2 <= sum(r["status"] == "ok" for r in rows.values()) < n
    assert all(r["reason"] == R.INTERRUPTED for r in rows.values() if r["status"] == "skipped")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _group_members(p.pid):
        time.sleep(0.1)
    assert not _group_members(p.pid), "processes of the run are left"


def _group_members(pgid: int) -> list[str]:
    """Command lines of the live processes in process group `pgid`."""
    import os

    found = []
    for q in psutil.process_iter():
        try:
            if os.getpgid(q.pid) == pgid and q.status() != psutil.STATUS_ZOMBIE:
                found.append(" ".join(q.cmdline()))
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return found


def test_nrrd_and_dicom_targets_from_a_csv(cohort, tiny_model_dir_threshold0, scheduler, tmp_path):
    """The same image as NIfTI, NRRD and a DICOM series, listed in a CSV with ids: three equal label maps."""
    sitk = pytest.importorskip("SimpleITK")
    image, aff, _ = read_nifti(cohort / "targets" / "case03.nii.gz")
    img = sitk.ReadImage(str(cohort / "targets" / "case03.nii.gz"))
    sitk.WriteImage(img, str(tmp_path / "scan.nrrd"))
    _write_dicom_series(sitk, img, tmp_path / "series")
    (tmp_path / "list.csv").write_text("subject,id,path\nA,nifti," + str(cohort / "targets" / "case03.nii.gz")
                                       + "\nB,nrrd,scan.nrrd\nC,dicom,series\n")
    out = tmp_path / "out"
    assert main(_batch_args(cohort, tiny_model_dir_threshold0, out, "--scheduler", scheduler[0], targets=tmp_path / "list.csv")) == 0
    rows = _rows(out)
    assert {sid: r["status"] for sid, r in rows.items()} == {"nifti": "ok", "nrrd": "ok", "dicom": "ok"}
    maps = {sid: read_nifti(out / f"{sid}.nii.gz") for sid in rows}
    for sid in ("nrrd", "dicom"):
        assert np.allclose(maps[sid][1], aff, atol=1e-4)
        assert np.array_equal(maps[sid][0], maps["nifti"][0]), sid


# -- command-line errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change,message", [
    (lambda a, c: [x for x in a if x not in (str(c / "ref.nii.gz"), str(c / "ref_label.nii.gz"), "--reference-image", "--reference-label")],
     "give a reference"),
    (lambda a, c: a + ["--task", "t.safetensors"], "either --task or --reference"),
    (lambda a, c: a + ["--labels", "3"], "label(s) [3] not in the reference label map"),
    (lambda a, c: a + ["--overlap", "1.5"], "overlap must be in [0, 1)"),
    (lambda a, c: a + ["--workers", "0"], "--workers must be at least 1"),
    (lambda a, c: a + ["--pattern", "*.mha"], "no targets matching *.mha"),
])
def test_bad_arguments_exit_2_with_one_line(cohort, tiny_model_dir_threshold0, tmp_path, capsys, change, message):
    args = change(_batch_args(cohort, tiny_model_dir_threshold0, tmp_path / "out"), cohort)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err and err.count("\n") == 1, err


def test_output_folder_errors(cohort, tiny_model_dir_threshold0, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(_batch_args(cohort, tiny_model_dir_threshold0, tmp_path / "file")) == 2
    assert "--output-dir is a file" in capsys.readouterr().err
    t = tmp_path / "t"
    t.mkdir()
    write_nifti(t / "a.nii.gz", np.ones((8, 8, 8), np.int16), np.eye(4))
    assert main(_batch_args(cohort, tiny_model_dir_threshold0, t, targets=t)) == 2
    assert "would replace the image itself" in capsys.readouterr().err
    assert read_nifti(t / "a.nii.gz")[0].dtype == np.int16


def test_missing_csv_target_and_unreachable_scheduler(cohort, tiny_model_dir_threshold0, tmp_path, capsys, monkeypatch):
    (tmp_path / "list.csv").write_text(f"path\n{cohort / 'targets' / 'case00.nii.gz'}\nmissing.nii.gz\n")
    assert main(_batch_args(cohort, tiny_model_dir_threshold0, tmp_path / "out", targets=tmp_path / "list.csv")) == 2
    err = capsys.readouterr().err
    assert "1 target(s) not found (row 3: " in err and "missing.nii.gz" in err
    monkeypatch.setattr(C, "CONNECT_TIMEOUT", 1)
    args = _batch_args(cohort, tiny_model_dir_threshold0, tmp_path / "out", "--scheduler", "tcp://127.0.0.1:1")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:1" in err and "dask scheduler" in err and "Traceback" not in err
    # results.csv holds the unfinished studies; nothing else was written
    assert {r["status"] for r in _rows(tmp_path / "out").values()} == {"skipped"}


def test_a_worker_that_cannot_load_the_model_stops_the_run(cohort, tiny_model_dir_threshold0, scheduler, tmp_path, capsys):
    """--device cuda on CPU-only workers (the client encodes on its CPU): one line naming the worker, exit 2, and the
    cluster is left without the plugin."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the workers can use it")
    args = _batch_args(cohort, tiny_model_dir_threshold0, tmp_path / "out", "--scheduler", scheduler[0])
    args[args.index("--device") + 1] = "cuda"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: worker tcp://") and "no CUDA GPU is available" in err and err.count("\n") == 1, err
    assert all(not [n for n in names if n.startswith("iris-segment")]
               for names in scheduler[1].run(lambda dask_worker: list(dask_worker.plugins)).values())


def test_without_dask_the_message_names_the_extra(cohort, tiny_model_dir_threshold0, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    assert main(_batch_args(cohort, tiny_model_dir_threshold0, tmp_path / "out")) == 2
    assert 'pip install "IrisSegmentLib[cohort]"' in capsys.readouterr().err


# -- finding targets ---------------------------------------------------------------------------------------------------
def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_folder_targets_recursive_by_pattern(tmp_path):
    for name in ("a.nii.gz", "b.nii", "sub/c.nii.gz", "sub/deeper/d.nii.gz", "notes.txt", ".hidden.nii.gz",
                 ".cache/e.nii.gz", "out/f.nii.gz", "x_image.nii.gz", "x_label.nii.gz", "scan.nrrd"):
        _touch(tmp_path / name)
    studies = T.find_targets(tmp_path, exclude=tmp_path / "out")
    assert [s.id for s in studies] == ["a", "b", "sub/c", "sub/deeper/d", "x_image", "x_label"]
    assert all(s.path.is_absolute() and s.path.is_file() for s in studies)
    assert studies[2].output(tmp_path / "o") == tmp_path / "o" / "sub" / "c.nii.gz"
    assert [s.id for s in T.find_targets(tmp_path, ["*_image.nii.gz"])] == ["x_image"]
    assert [s.id for s in T.find_targets(tmp_path, ["*.nrrd", "b.nii"])] == ["b", "scan"]
    # the output folder is skipped only when it lies inside the targets folder
    assert "out/f" in [s.id for s in T.find_targets(tmp_path, exclude=tmp_path.parent / "elsewhere")]


def test_folder_targets_dicom_folders_and_errors(tmp_path):
    for name in ("p1/series/1.dcm", "p1/series/2.dcm", "p2/series/1.dcm", "p2/series/2.dcm"):
        _touch(tmp_path / name)
    studies = T.find_targets(tmp_path, ["series", "*.dcm"])
    assert [(s.id, s.path.is_dir()) for s in studies] == [("p1/series", True), ("p2/series", True)]
    _touch(tmp_path / "x.nii")
    _touch(tmp_path / "x.nii.gz")
    with pytest.raises(IrisInputError, match=r"1 study id\(s\) given to more than one target: 'x'"):
        T.find_targets(tmp_path)
    with pytest.raises(IrisInputError, match=r"no targets matching \*\.mha in this folder or below; use --pattern"):
        T.find_targets(tmp_path, ["*.mha"])
    with pytest.raises(IrisInputError, match="--targets not found"):
        T.find_targets(tmp_path / "nope")
    with pytest.raises(IrisInputError, match="must be a folder or a .csv file"):
        T.find_targets(tmp_path / "x.nii")


def test_csv_targets_with_and_without_id(tmp_path):
    a, b = _touch(tmp_path / "img" / "a.nii.gz"), _touch(tmp_path / "img" / "b.nrrd")
    (tmp_path / "ids.csv").write_text(f"subject,Path,ID\n1,img/a.nii.gz,sub-01\n\n2,{b},site2/sub-02\n")
    assert [(s.id, s.path) for s in T.find_targets(tmp_path / "ids.csv")] == [("site2/sub-02", b), ("sub-01", a)]
    (tmp_path / "plain.csv").write_text("img/a.nii.gz\nimg/b.nrrd\n")
    assert [(s.id, s.path) for s in T.find_targets(tmp_path / "plain.csv")] == [("a", a), ("b", b)]
    (tmp_path / "header.csv").write_text("path\nimg/a.nii.gz\n")
    assert [s.id for s in T.find_targets(tmp_path / "header.csv")] == ["a"]


@pytest.mark.parametrize("text,message", [
    ("path\nimg/a.nii.gz\nimg/nope.nii.gz\n/abs/gone.nii\n", r"2 target\(s\) not found \(row 3: .*nope.nii.gz, row 4: /abs/gone.nii\)"),
    ("img/a.nii.gz,sub-01\n", "no header; add a header row naming the `path` column"),
    ("path\nimg/a.nii.gz\nother/a.nii.gz\n", r"study id\(s\) given to more than one target: 'a' .*add an id column"),
    ("id,path\n../up,img/a.nii.gz\n", r"row 2: id '../up' cannot be used as a file name"),
    ("id,path\nx,\n", "row 2: empty path"),
    ("", "no rows"),
])
def test_csv_target_errors(tmp_path, text, message):
    _touch(tmp_path / "img" / "a.nii.gz")
    _touch(tmp_path / "other" / "a.nii.gz")
    (tmp_path / "list.csv").write_text(text)
    with pytest.raises(IrisInputError, match=message):
        T.find_targets(tmp_path / "list.csv")
    with pytest.raises(IrisInputError, match="--pattern applies to a targets folder"):
        T.find_targets(tmp_path / "list.csv", ["*.nii"])


# -- formats -----------------------------------------------------------------------------------------------------------
def _write_dicom_series(sitk, img, folder):
    """One DICOM file per slice with the position and orientation tags SimpleITK reads the geometry from."""
    folder.mkdir()
    img = sitk.Cast(img, sitk.sitkInt16)
    d, uid = img.GetDirection(), "1.2.826.0.1.3680043.2.1125.1"
    w = sitk.ImageFileWriter()
    w.KeepOriginalImageUIDOn()
    for k in range(img.GetDepth()):
        s = img[:, :, k]
        for tag, value in (("0008|0060", "MR"), ("0020|000d", uid + ".1"), ("0020|000e", uid + ".2"),
                           ("0020|0037", "\\".join(f"{x:.10f}" for x in (d[0], d[3], d[6], d[1], d[4], d[7]))),
                           ("0020|0032", "\\".join(f"{x:.10f}" for x in img.TransformIndexToPhysicalPoint((0, 0, k)))),
                           ("0020|0013", str(k + 1))):
            s.SetMetaData(tag, value)
        w.SetFileName(str(folder / f"{k:03d}.dcm"))
        w.Execute(s)


def test_nrrd_and_dicom_read_as_the_nifti(tmp_path):
    """An oblique, LPS-flipped int16 NIfTI converted by SimpleITK's own NIfTI reader to NRRD and to a DICOM series:
    formats.read_image gives the same voxels and the same voxel-to-RAS matrix as nibabel gives for the NIfTI."""
    sitk = pytest.importorskip("SimpleITK")
    rng = np.random.default_rng(3)
    aff = make_affine(np.diag([-1.0, -1.0, 1.0]) @ rot_z(25) @ rot_x(-12) @ np.diag([0.9, 1.1, 2.5]), [30.0, -12.0, 7.0])
    data = rng.integers(-100, 900, (9, 7, 5)).astype(np.int16)
    write_nifti(tmp_path / "a.nii.gz", data, aff)
    ref_data, ref_aff, _ = io.read_image(tmp_path / "a.nii.gz")
    img = sitk.ReadImage(str(tmp_path / "a.nii.gz"))
    sitk.WriteImage(img, str(tmp_path / "a.nrrd"))
    _write_dicom_series(sitk, img, tmp_path / "dicom")
    for p in (tmp_path / "a.nrrd", tmp_path / "dicom"):
        arr, affine, header = F.read_image(p)
        assert header is None and arr.shape == data.shape and np.array_equal(arr, ref_data), p
        np.testing.assert_allclose(affine, ref_aff, atol=1e-4)
        shape, g_aff = F.read_geometry(p)
        assert shape == data.shape and np.allclose(g_aff, affine)
    assert F.read_geometry(tmp_path / "a.nii.gz")[0] == data.shape
    # errors: an empty folder, a broken NRRD, an unknown suffix
    for path, message in ((tmp_path / "empty", "no DICOM series in it"), (tmp_path / "broken.nrrd", "cannot be read as .nrrd"),
                          (tmp_path / "a.txt", "not an image IrisSegment reads")):
        if path.suffix:
            path.write_text("nonsense")
        else:
            path.mkdir()
        with pytest.raises(IrisInputError, match=message):
            F.read_image(path)


def test_dicom_folder_with_two_series_is_refused(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    img = sitk.GetImageFromArray(np.zeros((3, 4, 5), np.int16))
    _write_dicom_series(sitk, img, tmp_path / "a")
    (tmp_path / "both").mkdir()
    for f in (tmp_path / "a").iterdir():
        shutil.copy(f, tmp_path / "both" / f.name)
    other = sitk.GetImageFromArray(np.zeros((3, 4, 5), np.int16))
    _write_dicom_series(sitk, other, tmp_path / "b")
    for f in (tmp_path / "b").iterdir():  # same files, another series UID
        data = f.read_bytes().replace(b"1.2.826.0.1.3680043.2.1125.1.2", b"1.2.826.0.1.3680043.2.1125.9.2")
        (tmp_path / "both" / ("b" + f.name)).write_bytes(data)
    with pytest.raises(IrisInputError, match="holds 2 DICOM series"):
        F.read_image(tmp_path / "both")


def test_without_simpleitk_the_message_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "SimpleITK", None)
    _touch(tmp_path / "a.nrrd")
    with pytest.raises(IrisInputError, match=r'\.nrrd files needs SimpleITK: pip install "IrisSegmentLib\[formats\]"'):
        F.read_image(tmp_path / "a.nrrd")
    (tmp_path / "series").mkdir()
    with pytest.raises(IrisInputError, match=r"DICOM series folders needs SimpleITK"):
        F.read_image(tmp_path / "series")


# -- the completeness check and the table ----------------------------------------------------------------------------
@pytest.fixture()
def finished(tmp_path):
    """A target, its label map written as the batch writes it, and the ok row the batch would record."""
    aff = make_affine(rot_z(20) @ np.diag([1.2, 1.4, 3.0]), [4.0, -2.0, 1.0])
    write_nifti(tmp_path / "t.nii.gz", np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4), aff)
    study = T.Study("t", tmp_path / "t.nii.gz")
    out = study.output(tmp_path / "out")
    out.parent.mkdir()
    labels = np.zeros((6, 5, 4), np.uint8)
    labels[2:4] = 1
    io.write_label_map(out, labels, aff, read_nifti(tmp_path / "t.nii.gz")[2])
    row = {"id": "t", "status": "ok", "task": "k1", "output_sha256": R.file_sha256(out)}
    return study, out, row, aff


def test_complete_output_is_done(finished):
    study, out, row, _ = finished
    assert R.check_study(study, out, row, "k1") == R.Verdict(R.DONE)


def test_incomplete_or_foreign_outputs(finished):
    study, out, row, aff = finished
    assert R.check_study(study, out, row, "k2").state == R.RUN  # another task (refused earlier unless --overwrite)
    assert R.check_study(study, out, {**row, "status": "skipped", "reason": R.NOT_FINISHED}, "k1").state == R.RUN
    assert R.check_study(study, out, {**row, "status": "failed"}, "k1").state == R.RUN
    v = R.check_study(study, out, None, "k1")
    assert v.state == R.KEPT and "existed before this batch" in v.reason
    assert R.check_study(study, out, {**row, "status": "skipped", "reason": v.reason}, "k1") == v
    data = out.read_bytes()
    out.write_bytes(data[:-20])  # truncated: the sha differs and the data no longer decompresses
    v = R.check_study(study, out, row, "k1")
    assert v.state == R.RUN and "output unreadable" in v.reason
    write_nifti(out, np.ones((6, 5, 4), np.uint8), aff)  # edited but readable
    v = R.check_study(study, out, row, "k1")
    assert v.state == R.KEPT and "changed since this batch wrote it" in v.reason
    out.write_bytes(data)
    moved = aff.copy()
    moved[:3, 3] += 1
    write_nifti(study.path, np.zeros((6, 5, 4), np.int16), moved)  # the target was replaced
    v = R.check_study(study, out, row, "k1")
    assert v.state == R.RUN and "voxel-to-world matrix changed" in v.reason
    write_nifti(study.path, np.zeros((6, 5, 5), np.int16), aff)
    assert "shape is now (6, 5, 5)" in R.check_study(study, out, row, "k1").reason
    out.unlink()
    assert R.check_study(study, out, row, "k1") == R.Verdict(R.RUN, "output missing")


def test_results_table_round_trip_keeps_unknown_columns(tmp_path):
    p = tmp_path / "results.csv"
    p.write_text("id,status,liver_confidence,label 1_ml\na,ok,0.9,1.5\n")
    t = R.ResultsTable.load(p, STRUCTURES)
    assert t.columns == [*R.FIXED, "label 1_ml", "label 1_voxels", "label 1_estimated_dice", "label 2_ml", "label 2_voxels",
                         "label 2_estimated_dice", "liver_confidence"]
    t.set(R.format_row({"id": "b", "status": "ok", "seconds": 1.234, "voxels": {1: 10, 2: 0}, "voxel_mm3": 2.5,
                        "estimated_dice": {1: 0.8123}}, STRUCTURES))
    t.save()
    rows = _rows(tmp_path)
    assert rows["a"]["liver_confidence"] == "0.9" and rows["a"]["label 1_ml"] == "1.5"
    assert rows["b"]["label 1_ml"] == "0.0250" and rows["b"]["label 1_voxels"] == "10" and rows["b"]["seconds"] == "1.23"
    assert rows["b"]["label 2_ml"] == "0.0000" and rows["b"]["liver_confidence"] == ""
    assert rows["b"]["label 1_estimated_dice"] == "0.812" and rows["b"]["label 2_estimated_dice"] == ""
    assert not list(tmp_path.glob(".iris-*"))
    p.write_text("name,value\nx,1\n")
    with pytest.raises(IrisInputError, match="not a results table of iris-segment batch"):
        R.ResultsTable.load(p, STRUCTURES)
    assert [c[1] for c in R.structure_columns([1, 2, 3], ["liver", "liver", "spleen"])] == ["liver (1)_ml", "liver (2)_ml", "spleen_ml"]


def test_output_folder_lock(tmp_path):
    with R.OutputLock(tmp_path):
        with pytest.raises(IrisInputError, match="another iris-segment batch is writing into this folder"):
            with R.OutputLock(tmp_path):
                pass
    with R.OutputLock(tmp_path):  # released
        pass


def test_plan_with_overwrite_runs_everything(finished):
    study, out, row, _ = finished
    table = R.ResultsTable(out.parent / "results.csv", STRUCTURES)
    assert RUN.plan_studies([study], out.parent, table, "k1", overwrite=True)["t"].state == R.RUN
    assert RUN.plan_studies([study], out.parent, table, "k1", overwrite=False)["t"].state == R.KEPT


# -- cluster sizing ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,expected", [
    (dict(cores=2, gpus=0, memory_gib=20), (1, 2, 0)),
    (dict(cores=16, gpus=0, memory_gib=100), (4, 4, 0)),
    (dict(cores=16, gpus=0, memory_gib=7), (2, 8, 0)),  # memory-bound
    (dict(cores=16, gpus=2), (2, 8, 2)),  # one worker per GPU
    (dict(cores=2, gpus=0, workers=2), (2, 1, 0)),
    (dict(cores=2, gpus=0, workers=3), (3, 1, 0)),  # more workers than cores: one thread each
    (dict(cores=12, gpus=0, workers=5), (5, 2, 0)),
])
def test_local_plan(kw, expected):
    p = C.local_plan("cpu", **kw)
    assert (p.workers, p.threads, p.gpus) == expected
    assert p.workers * p.threads <= max(kw["cores"], p.workers)


def test_worker_helpers(monkeypatch):
    from IrisSegmentLib.cohort import worker as W

    lab = np.array([[[0, 1, 1], [2, 2, 2]]], np.uint8)
    assert W.count_labels(lab, [1, 2, 7]) == {1: 2, 2: 3, 7: 0}
    big = np.array([0, 70000, 70000, 3], np.int32)
    assert W.count_labels(big, [70000, 3, 5]) == {70000: 2, 3: 1, 5: 0}
    assert W.worker_device("cpu", 0) == "cpu"
    monkeypatch.setattr(C, "available_cores", lambda: 16)
    assert W.worker_threads("tcp://10.0.0.5:4000", {"10.0.0.5": 4, "10.0.0.6": 1}) == 4
    assert W.worker_threads("tcp://10.0.0.7:4000", {"10.0.0.5": 4}) == 16  # joined after the run started
