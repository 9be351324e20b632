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
    # threshold 0: every voxel gets one of the reference's label values, never another number (0 only where the
    # post-processing removed a stray piece of a structure: it keeps each one's largest component)
    values = set(np.unique(labels).tolist())
    assert values - {0} and values <= {0, 3, 7}, values
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
    # whole field of view: registration (Greedy) is not bit-reproducible from run to run
    assert main(_seg_args(files, tiny_model_dir, a, "--save-task", str(task_file), "--localise", "none")) == 0
    task = TaskEmbedding.load(task_file)
    assert task.labels == [3, 7] and task.model_id.startswith("tiny-")
    assert task.atlases  # the saved task carries its reference for registration
    assert main(_seg_args(files, tiny_model_dir, b, "--task", str(task_file), "--localise", "none", refs=False)) == 0
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
    summary = json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))
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


# -- bad input, faults and data safety ------------------------------------------------------------
def test_reference_label_not_on_the_image(files, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out.nii.gz"
    lab, aff, _ = read_nifti(files / "ref_label.nii.gz")
    far = aff.copy()
    far[:3, 3] += [500.0, 0.0, 0.0]
    write_nifti(tmp_path / "far_label.nii.gz", lab[:30], far)  # other shape, elsewhere in space
    write_nifti(tmp_path / "cropped_label.nii.gz", lab[:30], aff)  # other shape, overlapping
    write_nifti(tmp_path / "far_same_shape.nii.gz", lab, far)  # same shape, elsewhere
    for name, message in (("far_label", "do not overlap in space"), ("cropped_label", "differ in shape"),
                          ("far_same_shape", "do not overlap in space")):
        args = _seg_args(files, tiny_model_dir, out, refs=False) + [
            "--reference-image", str(files / "ref.nii.gz"), "--reference-label", str(tmp_path / f"{name}.nii.gz")]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and f"{name}.nii.gz" in err and "Traceback" not in err
        assert "give the label map drawn on this image" in err
    assert not out.exists()


def _rgb(shape):
    rgb = np.zeros(shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = 50
    return rgb


@pytest.mark.parametrize("array,message", [
    (np.ones((30, 30), np.int16), "is 2D (30, 30)"),
    (np.ones((20, 20, 10, 3), np.int16), "has 4 dimensions (20, 20, 10, 3)"),
    (np.ones((20, 20, 10, 1, 3), np.float32), "multi-component"),
    (_rgb((20, 20, 10)), "data type"),
])
def test_wrong_kind_of_target_exit_2_without_traceback(files, tiny_model_dir, tmp_path, capsys, array, message):
    import nibabel as nib

    write_nifti(tmp_path / "bad.nii.gz", array, np.eye(4))
    assert nib.load(str(tmp_path / "bad.nii.gz")).shape == array.shape
    out = tmp_path / "out.nii.gz"
    args = _seg_args(files, tiny_model_dir, out)
    args[args.index("--target") + 1] = str(tmp_path / "bad.nii.gz")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: target image ") and message in err and "Traceback" not in err
    assert any(fix in err for fix in ("stack the slices", "extract one", "convert it")), err
    assert not out.exists()


def test_constant_and_nan_targets_warn_and_finish(files, tiny_model_dir, tmp_path, capsys):
    _, t_aff, _ = read_nifti(files / "target.nii.gz")
    write_nifti(tmp_path / "constant.nii.gz", np.full((20, 18, 8), 7, np.int16), t_aff)
    args = _seg_args(files, tiny_model_dir, tmp_path / "c.nii.gz")
    args[args.index("--target") + 1] = str(tmp_path / "constant.nii.gz")
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "warning: target image is constant" in err and "Traceback" not in err
    assert read_nifti(tmp_path / "c.nii.gz")[0].max() == 0
    target = read_nifti(files / "target.nii.gz")[0].astype(np.float32)
    target[:2, :2, :2] = np.nan
    write_nifti(tmp_path / "nan.nii.gz", target, t_aff)
    args = _seg_args(files, tiny_model_dir, tmp_path / "n.nii.gz")
    args[args.index("--target") + 1] = str(tmp_path / "nan.nii.gz")
    assert main(args) == 0
    assert "warning: target image: 8 NaN/Inf voxels replaced" in capsys.readouterr().err


def _stored(array, affine, order):
    """The same physical image stored in another array order: 'ras' as given, 'lps' with i and j reversed,
    'sag' with the axes permuted (k, i, j), affine adjusted so every voxel keeps its world position."""
    if order == "ras":
        return array, affine
    if order == "lps":
        a = affine.copy()
        a[:3, :2] *= -1
        a[:3, 3] = affine[:3, :3] @ [array.shape[0] - 1, array.shape[1] - 1, 0] + affine[:3, 3]
        return np.ascontiguousarray(array[::-1, ::-1]), a
    return np.ascontiguousarray(array.transpose(2, 0, 1)), affine[:, [2, 0, 1, 3]]


def _unstore(array, order):
    if order == "ras":
        return array
    if order == "lps":
        return array[::-1, ::-1]
    return array.transpose(1, 2, 0)


@pytest.fixture(scope="module")
def thick_oblique(tmp_path_factory):
    """5 mm oblique slices with two structures, written RAS, LPS and sagittally ordered, plus a reference likewise."""
    d = tmp_path_factory.mktemp("orders")
    rng = np.random.default_rng(5)
    t_shape, t_aff = (44, 40, 9), make_affine(rot_z(-18) @ rot_x(12) @ np.diag([0.9, 0.95, 5.0]), [-20.0, -19.0, -22.0])
    c = t_aff[:3, :3] @ ((np.array(t_shape) - 1) / 2) + t_aff[:3, 3]
    truth = np.zeros(t_shape, np.uint8)
    truth[ellipsoid_mask(t_shape, t_aff, c + [-5, 2, 0], (9, 8, 12))] = 3
    truth[ellipsoid_mask(t_shape, t_aff, c + [9, -6, 3], (5, 6, 9))] = 7
    image = (100 + 700 * (truth == 3) + 350 * (truth == 7) + rng.normal(0, 8, t_shape)).astype(np.int16)
    r_shape, r_aff = (40, 36, 30), make_affine(np.diag([1.2, 1.3, 1.6]), [-20.0, -25.0, 10.0])
    rc = r_aff[:3, :3] @ ((np.array(r_shape) - 1) / 2) + r_aff[:3, 3]
    r_lab = np.zeros(r_shape, np.uint8)
    r_lab[ellipsoid_mask(r_shape, r_aff, rc + [-6, 0, 0], (9, 8, 7))] = 3
    r_lab[ellipsoid_mask(r_shape, r_aff, rc + [10, 5, 2], (5, 5, 5))] = 7
    r_img = (100 + 700 * (r_lab == 3) + 350 * (r_lab == 7) + rng.normal(0, 8, r_shape)).astype(np.float32)
    for order in ("ras", "lps", "sag"):
        write_nifti(d / f"target_{order}.nii.gz", *_stored(image, t_aff, order))
        write_nifti(d / f"ref_{order}.nii.gz", *_stored(r_img, r_aff, order))
        write_nifti(d / f"ref_label_{order}.nii.gz", *_stored(r_lab, r_aff, order))
    return d, truth, t_aff


def _order_args(d, order, model_dir, out, *extra):
    return ["segment", "--target", str(d / f"target_{order}.nii.gz"), "--output", str(out), "--model", str(model_dir),
            "--device", "cpu", "--reference-image", str(d / f"ref_{order}.nii.gz"),
            "--reference-label", str(d / f"ref_label_{order}.nii.gz"), *extra]


def test_ras_lps_and_permuted_files_give_the_same_world_result(thick_oblique, tiny_model_dir_threshold0, tmp_path):
    """Seeded (untrained) tiny network with threshold 0, two labels: which label wins where depends on every
    voxel the network saw, so equal outputs mean equal geometry end to end. The whole field of view: registration
    (Greedy) is not bit-reproducible from run to run."""
    d, _, t_aff = thick_oblique
    results = {}
    for order in ("ras", "lps", "sag"):
        out = tmp_path / f"{order}.nii.gz"
        assert main(_order_args(d, order, tiny_model_dir_threshold0, out, "--localise", "none")) == 0
        labels, aff, _ = read_nifti(out)
        assert np.array_equal(aff, read_nifti(d / f"target_{order}.nii.gz")[1])
        results[order] = _unstore(labels, order)
    assert {3, 7} <= set(np.unique(results["ras"]).tolist()) <= {0, 3, 7}  # 0: a stray piece post-processing removed
    np.testing.assert_array_equal(results["lps"], results["ras"])
    np.testing.assert_array_equal(results["sag"], results["ras"])


def test_ras_lps_and_permuted_files_segmented_at_the_right_place(thick_oblique, tiny_cfg, tmp_path, monkeypatch):
    """The same through the command line with the oracle in place of the network: the structures are found
    where they are in world space, whichever way the files are stored."""
    from IrisSegmentLib.inference.segmenter import Segmenter

    from conftest import OracleModel, dice

    monkeypatch.setattr(Segmenter, "load", classmethod(lambda cls, name=None, device="auto": cls(OracleModel(), tiny_cfg, device)))
    d, truth, _ = thick_oblique
    for order in ("ras", "lps", "sag"):
        out = tmp_path / f"{order}.nii.gz"
        assert main(_order_args(d, order, "unused", out) + ["--labels", "3"]) == 0
        got = _unstore(read_nifti(out)[0], order)
        assert dice(got == 3, truth == 3) > 0.85, order


def test_interrupted_run_writes_nothing(files, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C in the middle of the windows: exit 130, no output, an existing output (even with --overwrite) and
    the --save-task file untouched or absent, no temporary files."""
    from IrisSegmentLib import commands

    def interrupt(self, fraction, message):
        if message.startswith("window"):
            raise KeyboardInterrupt

    monkeypatch.setattr(commands._Bar, "__call__", interrupt)
    new, old, task = tmp_path / "new.nii.gz", tmp_path / "old.nii.gz", tmp_path / "task.safetensors"
    old.write_bytes(b"precious")
    # the whole field of view: windows run even though the untrained tiny network is trusted with no structure
    assert main(_seg_args(files, tiny_model_dir, new, "--save-task", str(task), "--localise", "none")) == 130
    assert main(_seg_args(files, tiny_model_dir, old, "--overwrite", "--localise", "none")) == 130
    assert "cancelled: no output written" in capsys.readouterr().err
    assert not new.exists() and not task.exists() and old.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.nii.gz"]


def test_interrupted_while_writing_keeps_the_old_file(files, tiny_model_dir, tmp_path, monkeypatch):
    import nibabel as nib

    def half_write(img, path):
        with open(path, "wb") as f:
            f.write(b"\x1f\x8b half")
        raise KeyboardInterrupt

    old = tmp_path / "old.nii.gz"
    old.write_bytes(b"precious")
    monkeypatch.setattr(nib, "save", half_write)
    assert main(_seg_args(files, tiny_model_dir, old, "--overwrite")) == 130
    assert old.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.nii.gz"]


def test_output_paths_checked_before_any_work(files, tmp_path, capsys):
    """Wrong outputs are refused at once, before the model is even looked for (here: a model that does not exist)."""
    (tmp_path / "taken.safetensors").write_bytes(b"keep")
    (tmp_path / "folder.nii.gz").mkdir()
    cases = [
        (["--output", str(tmp_path / "out.nrrd")], "must end in .nii or .nii.gz"),
        (["--output", str(tmp_path / "folder.nii.gz")], "is a folder"),
        (["--save-task", str(tmp_path / "missing" / "task.safetensors")], "output folder does not exist"),
        (["--save-task", str(tmp_path / "task.pt")], "must end in .safetensors"),
        (["--save-task", str(tmp_path / "taken.safetensors")], "exists; pass --overwrite"),
    ]
    for extra, message in cases:
        args = _seg_args(files, "no-such-model", tmp_path / "out.nii.gz")
        if extra[0] == "--output":
            args[args.index("--output") + 1] = extra[1]
        else:
            args += extra
        assert main(args) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
    assert (tmp_path / "taken.safetensors").read_bytes() == b"keep"


def test_save_task_replaced_only_with_overwrite(files, tiny_model_dir, tmp_path):
    task = tmp_path / "task.safetensors"
    task.write_bytes(b"old task")
    assert main(_seg_args(files, tiny_model_dir, tmp_path / "a.nii.gz", "--save-task", str(task))) == 2
    assert task.read_bytes() == b"old task" and not (tmp_path / "a.nii.gz").exists()
    assert main(_seg_args(files, tiny_model_dir, tmp_path / "a.nii.gz", "--save-task", str(task), "--overwrite")) == 0
    assert TaskEmbedding.load(task).labels == [3, 7]
    assert not list(tmp_path.glob(".iris-*"))


def test_strategy_option_reaches_the_engine(files, tiny_model_dir, tmp_path, monkeypatch):
    from IrisSegmentLib.inference.segmenter import Segmenter

    seen = []
    original = Segmenter.segment

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("strategy"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Segmenter, "segment", spy)
    outs = {}
    for strategy in ("full", "coarse-to-fine"):
        outs[strategy] = tmp_path / f"{strategy}.nii.gz"
        assert main(_seg_args(files, tiny_model_dir, outs[strategy], "--strategy", strategy)) == 0
    assert seen == ["full", "coarse-to-fine"]
    with pytest.raises(SystemExit):
        main(_seg_args(files, tiny_model_dir, tmp_path / "x.nii.gz", "--strategy", "fast"))
