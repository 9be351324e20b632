"""The command line end to end on real NIfTI files with the seeded tiny model folder (untrained:
these tests check files, geometry, label values and error handling, not segmentation quality)."""
from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest

from conftest import REPO_ROOT, ellipsoid_mask, make_affine, read_nifti, rot_x, rot_z, write_nifti
from IrisSegmentLib.cli import main
from IrisSegmentLib.inference.task import TaskEmbedding


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    # reference: plain RAS, labels 3 and 7
    r_shape, r_aff = (40, 36, 30), make_affine(np.diag([1.2, 1.3, 1.6]), [-20.0, -25.0, 10.0])
    c = r_aff[:3, :3] @ ((np.array(r_shape) - 1) / 2) + r_aff[:3, 3]
    lab = np.zeros(r_shape, np.uint8)
    lab[ellipsoid_mask(r_shape, r_aff, c + [-6, 0, 0], (9, 8, 7))] = 3
    lab[ellipsoid_mask(r_shape, r_aff, c + [10, 5, 2], (5, 5, 5))] = 7
    img = (100 + 600 * (lab == 3) + 350 * (lab == 7) + rng.normal(0, 10, r_shape)).astype(np.float32)
    write_nifti(d / "ref.nii.gz", img, r_aff)
    write_nifti(d / "ref_label.nii.gz", lab, r_aff)
    # target: oblique, LPS-like flips, anisotropic, stored as int16
    t_shape = (44, 38, 16)
    t_aff = make_affine(np.diag([-1.0, -1.0, 1.0]) @ rot_z(20) @ rot_x(15) @ np.diag([1.1, 1.3, 2.8]), [60.0, 45.0, -12.0])
    tc = t_aff[:3, :3] @ ((np.array(t_shape) - 1) / 2) + t_aff[:3, 3]
    tl = np.zeros(t_shape, np.uint8)
    tl[ellipsoid_mask(t_shape, t_aff, tc + [4, -3, 0], (10, 8, 7))] = 3
    tl[ellipsoid_mask(t_shape, t_aff, tc + [-9, 6, 3], (5, 6, 5))] = 7
    timg = (120 + 550 * (tl == 3) + 300 * (tl == 7) + rng.normal(0, 10, t_shape)).astype(np.int16)
    write_nifti(d / "target.nii.gz", timg, t_aff)
    return d


def _seg_args(files, model_dir, output, *extra, refs=True):
    args = ["segment", "--target", str(files / "target.nii.gz"), "--output", str(output),
            "--model", str(model_dir), "--device", "cpu"]
    if refs:
        args += ["--reference-image", str(files / "ref.nii.gz"), "--reference-label", str(files / "ref_label.nii.gz")]
    return args + list(extra)


def test_segment_writes_label_map_with_target_geometry(files, tiny_model_dir_threshold0, tmp_path, capsys):
    out = tmp_path / "out.nii.gz"
    assert main(_seg_args(files, tiny_model_dir_threshold0, out)) == 0
    target, t_aff, t_hdr = read_nifti(files / "target.nii.gz")
    labels, aff, hdr = read_nifti(out)
    assert labels.shape == target.shape
    assert np.array_equal(aff, t_aff)
    assert np.array_equal(hdr.get_sform(), t_hdr.get_sform())
    assert np.issubdtype(labels.dtype, np.integer)
    # threshold 0: every voxel gets one of the reference's label values, never another number
    values = set(np.unique(labels).tolist())
    assert values and values <= {3, 7}, values
    stdout = capsys.readouterr().out
    assert f"wrote {out}" in stdout and "label 3" in stdout and "label 7" in stdout


def test_segment_default_threshold_values(files, tiny_model_dir, tmp_path):
    out = tmp_path / "out.nii"
    assert main(_seg_args(files, tiny_model_dir, out, "--overlap", "0.25")) == 0
    labels, aff, _ = read_nifti(out)
    assert set(np.unique(labels).tolist()) <= {0, 3, 7}
    assert np.array_equal(aff, read_nifti(files / "target.nii.gz")[1])


def test_labels_selects(files, tiny_model_dir_threshold0, tmp_path):
    out = tmp_path / "only7.nii.gz"
    assert main(_seg_args(files, tiny_model_dir_threshold0, out, "--labels", "7")) == 0
    labels = read_nifti(out)[0]
    assert np.all(labels == 7)


def test_save_task_then_task_gives_identical_output(files, tiny_model_dir, tiny_model_dir_threshold0, tmp_path):
    task_file = tmp_path / "task.safetensors"
    a, b, c = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz", tmp_path / "c.nii.gz"
    assert main(_seg_args(files, tiny_model_dir, a, "--save-task", str(task_file))) == 0
    task = TaskEmbedding.load(task_file)
    assert task.labels == [3, 7] and task.model_id.startswith("tiny-")
    assert main(_seg_args(files, tiny_model_dir, b, "--task", str(task_file), refs=False)) == 0
    la, lb = read_nifti(a)[0], read_nifti(b)[0]
    assert np.array_equal(la, lb)
    assert np.array_equal(read_nifti(a)[1], read_nifti(b)[1])
    # the saved task with --labels selects; with threshold 0 the answer is known exactly
    assert main(_seg_args(files, tiny_model_dir_threshold0, c, "--task", str(task_file), "--labels", "3", refs=False)) == 0
    assert np.all(read_nifti(c)[0] == 3)
    # --save-task does not overwrite an existing task file without --overwrite
    assert main(_seg_args(files, tiny_model_dir, tmp_path / "d.nii.gz", "--save-task", str(task_file))) == 2
    assert not (tmp_path / "d.nii.gz").exists()


def test_existing_output_refused_then_replaced(files, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out.nii.gz"
    out.write_bytes(b"precious")
    assert main(_seg_args(files, tiny_model_dir, out)) == 2
    assert out.read_bytes() == b"precious"
    assert "--overwrite" in capsys.readouterr().err
    assert main(_seg_args(files, tiny_model_dir, out, "--overwrite")) == 0
    labels, aff, _ = read_nifti(out)
    assert labels.shape == read_nifti(files / "target.nii.gz")[0].shape
    assert not list(tmp_path.glob(".iris-*"))  # no temporary files left behind


def test_missing_output_folder(files, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "no" / "such" / "folder" / "out.nii.gz"
    assert main(_seg_args(files, tiny_model_dir, out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "output folder does not exist" in err and "Traceback" not in err
    assert not out.parent.exists()


def test_reference_pairs_must_match(files, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out.nii.gz"
    args = _seg_args(files, tiny_model_dir, out) + ["--reference-image", str(files / "ref.nii.gz")]
    assert main(args) == 2
    assert "2 --reference-image but 1 --reference-label" in capsys.readouterr().err
    # a label drawn on another grid (same shape, different geometry)
    lab, aff, _ = read_nifti(files / "ref_label.nii.gz")
    shifted = aff.copy()
    shifted[:3, 3] += 5
    write_nifti(tmp_path / "moved_label.nii.gz", lab, shifted)
    args = _seg_args(files, tiny_model_dir, out, refs=False) + [
        "--reference-image", str(files / "ref.nii.gz"), "--reference-label", str(tmp_path / "moved_label.nii.gz")]
    assert main(args) == 2
    assert "different geometry" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("extra,message", [
    (["--labels", "5"], "label(s) [5] not in the reference label map"),
    (["--labels", "3,x"], "--labels must be comma-separated integers"),
    (["--task", "whatever.safetensors"], "either --task or --reference"),
    (["--overlap", "1.0"], "overlap must be in [0, 1)"),
])
def test_input_errors_exit_2(files, tiny_model_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "out.nii.gz"
    assert main(_seg_args(files, tiny_model_dir, out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_no_reference_and_bad_target(files, tiny_model_dir, tmp_path, capsys):
    assert main(_seg_args(files, tiny_model_dir, tmp_path / "o.nii.gz", refs=False)) == 2
    assert "give a reference" in capsys.readouterr().err
    (tmp_path / "target.mha").write_bytes(b"x")
    args = ["segment", "--target", str(tmp_path / "target.mha"), "--output", str(tmp_path / "o.nii.gz"),
            "--model", str(tiny_model_dir), "--device", "cpu",
            "--reference-image", str(files / "ref.nii.gz"), "--reference-label", str(files / "ref_label.nii.gz")]
    assert main(args) == 2
    assert "not a NIfTI file" in capsys.readouterr().err
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    args[2] = str(tmp_path / "broken.nii.gz")
    assert main(args) == 2
    assert "cannot be read as NIfTI" in capsys.readouterr().err


def test_info(tiny_model_dir, tiny_cfg, tiny_model, capsys):
    assert main(["info", "--model", str(tiny_model_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "IrisSegmentLib" in out and "device: cpu" in out
    n = sum(p.numel() for p in tiny_model.parameters())
    assert f"model: tiny ({n / 1e6:.2f}M parameters, fingerprint {tiny_cfg.model.fingerprint()})" in out
    assert "seeded, untrained test network" in out
    assert main(["info", "--model", "no-such-model", "--device", "cpu"]) == 2


def _check_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, tag = struct.unpack(">I4s", data[8:16])
    assert tag == b"IHDR" and length == 13
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    assert zlib.crc32(data[12:29]) & 0xFFFFFFFF == struct.unpack(">I", data[29:33])[0]
    assert data[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82"
    # the image data decompresses to height rows of 1 + 3*width bytes
    idat = data.index(b"IDAT")
    n = struct.unpack(">I", data[idat - 4 : idat])[0]
    raw = zlib.decompress(data[idat + 4 : idat + 4 + n])
    assert len(raw) == height * (1 + 3 * width)
    return width, height, depth, colour


def _check_demo(out_dir, summary_expected_model=None):
    from IrisSegmentLib.demo import TARGET

    target = read_nifti(REPO_ROOT / "Resources" / "SampleData" / f"{TARGET}_image.nii.gz")
    labels, aff, _ = read_nifti(out_dir / f"{TARGET}_iris.nii.gz")
    assert labels.shape == target[0].shape and np.array_equal(aff, target[1])
    assert set(np.unique(labels).tolist()) <= {0, 1, 2}
    w, h, depth, colour = _check_png(out_dir / "overlay.png")
    x, y = target[0].shape[:2]
    assert (w, h, depth, colour) == (2 * 4 * x, 4 * y, 8, 2)  # two zoomed (rotated) slices side by side
    summary = json.loads((out_dir / "summary.json").read_text())
    assert set(summary["dice"]) == {"anterior hippocampus", "posterior hippocampus", "whole hippocampus"}
    assert all(0.0 <= v <= 1.0 for v in summary["dice"].values())
    if summary_expected_model:
        assert summary["model"].startswith(summary_expected_model)
    return summary


def test_demo_with_tiny_model(tiny_model_dir, tmp_path, capsys):
    """The demo's files with the seeded tiny network (plumbing only: its Dice means nothing)."""
    assert main(["demo", "--output-dir", str(tmp_path / "demo"), "--device", "cpu", "--model", str(tiny_model_dir)]) == 0
    summary = _check_demo(tmp_path / "demo", "tiny-")
    assert json.loads(capsys.readouterr().out) == summary


@pytest.mark.skipif(not (REPO_ROOT / "Resources" / "Models" / "iris-small" / "weights.safetensors").is_file(),
                    reason="bundled model Resources/Models/iris-small/weights.safetensors not present")
def test_demo_with_bundled_model(tmp_path):
    assert main(["demo", "--output-dir", str(tmp_path), "--device", "cpu"]) == 0
    _check_demo(tmp_path, "iris-small-")
