"""Model folders: safetensors round trip, and refusal of pickles, truncated files, other
architectures and unknown configuration keys."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import make_tiny_model
from IrisSegmentLib.errors import IrisInputError
from IrisSegmentLib.inference.segmenter import Segmenter
from IrisSegmentLib.weights import CONFIG, FORMAT, WEIGHTS, load_model, read_weights, save_model


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, 32, 32, 32, generator=g)
    ref = torch.randn(1, 1, 32, 32, 32, generator=g)
    masks = (torch.rand(1, 2, 32, 32, 32, generator=g) > 0.8).float()
    return q, ref, masks


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_round_trip_fp16(tmp_path, tiny_cfg, tiny_model_dir):
    original = make_tiny_model(tiny_cfg)
    model, cfg, info = load_model(tiny_model_dir)
    assert cfg == tiny_cfg
    assert info == {"note": "seeded, untrained test network"}
    assert not model.training
    q, ref, masks = _inputs()
    # the fp16 file holds exactly the fp16-rounded weights ...
    rounded = make_tiny_model(tiny_cfg)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.half().float())
    for (k, a), (_, b) in zip(model.state_dict().items(), rounded.state_dict().items()):
        assert a.dtype == torch.float32 and torch.equal(a, b), k
    with torch.no_grad():
        out = model(q, ref, masks)
        assert torch.equal(out, rounded(q, ref, masks))
        # ... and gives the original network's output up to that rounding
        exp = original(q, ref, masks)
    scale = float(exp.abs().max())
    assert float((out - exp).abs().max()) < 2e-2 * scale
    with safe_open(str(tiny_model_dir / WEIGHTS), framework="pt") as f:
        meta = f.metadata()
        assert meta["format"] == FORMAT and meta["fingerprint"] == tiny_cfg.model.fingerprint()
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())


def test_round_trip_fp32_is_exact(tmp_path, tiny_cfg):
    original = make_tiny_model(tiny_cfg, seed=7)
    save_model(original, tiny_cfg, tmp_path / "m", dtype=torch.float32)
    model, _, info = load_model(tmp_path / "m")
    assert info == {}
    q, ref, masks = _inputs(1)
    with torch.no_grad():
        assert torch.equal(model(q, ref, masks), original(q, ref, masks))


def test_segmenter_load_from_folder(tiny_model_dir, tiny_cfg):
    seg = Segmenter.load(str(tiny_model_dir), "cpu")
    assert seg.model_id == f"tiny-{tiny_cfg.model.fingerprint()}"
    assert seg.device.type == "cpu"


@pytest.mark.parametrize("zipfile", [True, False])
def test_pickle_refused(tmp_path, tiny_model_dir, zipfile):
    d = _copy(tiny_model_dir, tmp_path / "m")
    state = make_tiny_model(load_model(tiny_model_dir)[1]).state_dict()
    torch.save(state, d / WEIGHTS, _use_new_zipfile_serialization=zipfile)
    with pytest.raises(IrisInputError, match="safetensors") as e:
        load_model(d)
    assert "this is a pickle/PyTorch checkpoint" in str(e.value)  # (the test's folder name has "pickle" in it too)


def test_truncated_safetensors_refused(tmp_path, tiny_model_dir):
    d = _copy(tiny_model_dir, tmp_path / "m")
    data = (d / WEIGHTS).read_bytes()
    for cut in (len(data) // 2, 100, 5):
        (d / WEIGHTS).write_bytes(data[:cut])
        with pytest.raises(IrisInputError, match="truncated or corrupt"):
            load_model(d)
    (d / WEIGHTS).write_bytes(b"")
    with pytest.raises(IrisInputError):
        load_model(d)


def test_missing_files_refused(tmp_path, tiny_model_dir):
    d = _copy(tiny_model_dir, tmp_path / "m")
    (d / WEIGHTS).unlink()
    with pytest.raises(IrisInputError, match="weights file not found"):
        load_model(d)
    (d / CONFIG).unlink()
    with pytest.raises(IrisInputError, match="no config.yaml"):
        load_model(d)
    with pytest.raises(IrisInputError, match="not found"):
        load_model("no-such-model-name")


def test_other_architecture_refused_by_fingerprint(tmp_path, tiny_cfg, tiny_model_dir):
    d = _copy(tiny_model_dir, tmp_path / "m")
    other = dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, head_channels=16))
    other.save(d / CONFIG)
    with pytest.raises(IrisInputError, match="another architecture") as e:
        load_model(d)
    assert tiny_cfg.model.fingerprint() in str(e.value) and other.model.fingerprint() in str(e.value)


def test_other_architecture_refused_by_shapes(tmp_path, tiny_cfg, tiny_model_dir):
    """Weights without a fingerprint (written by hand) are still checked tensor by tensor."""
    d = _copy(tiny_model_dir, tmp_path / "m")
    other = dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, widths=(8, 16, 16, 64)))
    tensors, _ = read_weights(d / WEIGHTS)
    save_file(tensors, str(d / WEIGHTS))  # no metadata
    other.save(d / CONFIG)
    with pytest.raises(IrisInputError, match="do not match the architecture") as e:
        load_model(d)
    assert "wrong shape" in str(e.value)
    # missing and unexpected tensors are named
    tensors.pop("decoder.kernel.0.weight")
    tensors["extra.weight"] = torch.zeros(1)
    save_file(tensors, str(d / WEIGHTS))
    tiny_cfg.save(d / CONFIG)
    with pytest.raises(IrisInputError, match="missing") as e:
        load_model(d)
    assert "decoder.kernel.0.weight" in str(e.value) and "extra.weight" in str(e.value)


def test_unknown_config_key_refused(tmp_path, tiny_model_dir):
    d = _copy(tiny_model_dir, tmp_path / "m")
    data = yaml.safe_load((d / CONFIG).read_text(encoding="utf-8"))
    data["model"]["dropout"] = 0.1
    (d / CONFIG).write_text(yaml.safe_dump(data))
    with pytest.raises(IrisInputError, match="dropout"):
        load_model(d)
    data["model"].pop("dropout")
    data["extras"] = {"a": 1}  # unknown top-level section
    (d / CONFIG).write_text(yaml.safe_dump(data))
    with pytest.raises(IrisInputError, match="extras"):
        load_model(d)
    data.pop("extras")
    data["inference"] = [1, 2]  # a section that is not a mapping
    (d / CONFIG).write_text(yaml.safe_dump(data))
    with pytest.raises(IrisInputError, match="mapping"):
        load_model(d)
    (d / CONFIG).write_text("model: [unclosed\n")
    with pytest.raises(IrisInputError, match="YAML"):
        load_model(d)


def test_info_metadata_survives(tmp_path, tiny_cfg):
    save_model(make_tiny_model(tiny_cfg), tiny_cfg, tmp_path / "m", info={"steps": 12, "val_dice": {"btcv": 0.5}})
    _, _, info = load_model(tmp_path / "m")
    assert info == {"steps": 12, "val_dice": {"btcv": 0.5}}
    with safe_open(str(tmp_path / "m" / WEIGHTS), framework="pt") as f:
        assert json.loads(f.metadata()["info"])["steps"] == 12


def test_unreadable_and_garbage_weights_refused(tmp_path, tiny_model_dir, monkeypatch):
    from IrisSegmentLib import weights

    d = _copy(tiny_model_dir, tmp_path / "m")
    (d / WEIGHTS).write_bytes(b"this is not a weights file at all, just text" * 10)
    with pytest.raises(IrisInputError, match="not a readable safetensors file"):
        load_model(d)

    def no_permission(path, mode="r", *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(weights, "open", no_permission, raising=False)  # the module's own `open` (root can read anything)
    with pytest.raises(IrisInputError, match="cannot be read .*Permission denied.*permissions"):
        load_model(d)
