"""Task embeddings: file round trip, selection, context ensemble, memory bank, in-context tuning."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import ellipsoid_mask, make_affine, rot_z
from IrisSegmentLib.errors import IrisInputError
from IrisSegmentLib.inference import encoding
from IrisSegmentLib.inference.segmenter import Segmenter
from IrisSegmentLib.inference.task import MemoryBank, TaskEmbedding, default_colour
from IrisSegmentLib.training.losses import dice_bce


def _task(labels, model_id="tiny-abc", seed=0, names=None, colours=None):
    g = torch.Generator().manual_seed(seed)
    return TaskEmbedding(torch.randn(len(labels), 5, 32, generator=g), list(labels), names or [], colours or [], model_id)


def test_defaults_names_and_colours():
    t = _task([3, 7, 9])
    assert t.names == ["label 3", "label 7", "label 9"]
    assert t.colours == [default_colour(i) for i in range(3)]
    assert len(set(t.colours)) == 3 and all(0 <= c <= 1 for col in t.colours for c in col)
    with pytest.raises(ValueError, match="2 token sets but 3 labels"):
        TaskEmbedding(torch.zeros(2, 5, 32), [1, 2, 3])


def test_save_load_round_trip(tmp_path):
    t = _task([3, 7], names=["liver", "spleen"], colours=[(0.1, 0.2, 0.3), (1.0, 0.5, 0.25)], model_id="tiny-0123456789ab")
    t.save(tmp_path / "task.safetensors")
    back = TaskEmbedding.load(tmp_path / "task.safetensors")
    assert torch.equal(back.tokens, t.tokens)
    assert back.labels == [3, 7] and back.names == ["liver", "spleen"]
    assert back.colours == [(0.1, 0.2, 0.3), (1.0, 0.5, 0.25)]
    assert back.model_id == "tiny-0123456789ab"


def test_load_refuses_missing_and_foreign_files(tmp_path):
    with pytest.raises(IrisInputError, match="not found"):
        TaskEmbedding.load(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(IrisInputError, match="not an IrisSegment task file"):
        TaskEmbedding.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"tokens": torch.zeros(1, 2, 3)}, str(tmp_path / "nometa.safetensors"))
    with pytest.raises(IrisInputError, match="not an IrisSegment task file"):
        TaskEmbedding.load(tmp_path / "nometa.safetensors")


def test_select_reorders_everything():
    t = _task([3, 7, 9], names=["a", "b", "c"])
    s = t.select([9, 3])
    assert s.labels == [9, 3] and s.names == ["c", "a"]
    assert s.colours == [t.colours[2], t.colours[0]]
    assert torch.equal(s.tokens[0], t.tokens[2]) and torch.equal(s.tokens[1], t.tokens[0])
    assert s.model_id == t.model_id
    with pytest.raises(ValueError):
        t.select([4])


def test_ensemble_averages_matching_labels():
    a = _task([1, 2], seed=1, names=["one", "two"])
    b = _task([2, 3], seed=2, names=["TWO", "three"])
    c = _task([2], seed=3)
    e = TaskEmbedding.ensemble([a, b, c])
    assert e.labels == [1, 2, 3]
    assert e.names == ["one", "two", "three"]  # first task that has the label names it
    torch.testing.assert_close(e.tokens[0], a.tokens[0])
    torch.testing.assert_close(e.tokens[1], (a.tokens[1] + b.tokens[0] + c.tokens[0]) / 3)
    torch.testing.assert_close(e.tokens[2], b.tokens[1])
    assert e.model_id == a.model_id
    with pytest.raises(IrisInputError, match="different models"):
        TaskEmbedding.ensemble([a, _task([1], model_id="other-model")])
    with pytest.raises(ValueError):
        TaskEmbedding.ensemble([])


def test_memory_bank_ema_formula():
    bank = MemoryBank(momentum=0.9)
    t0, t1, t2 = (torch.randn(5, 32) for _ in range(3))
    bank.update("liver", t0)
    assert torch.equal(bank.embeddings["liver"], t0)
    t0_before = t0.clone()
    bank.update("liver", t1)
    torch.testing.assert_close(bank.embeddings["liver"], 0.9 * t0_before + 0.1 * t1)
    bank.update("liver", t2)
    torch.testing.assert_close(bank.embeddings["liver"], 0.9 * (0.9 * t0_before + 0.1 * t1) + 0.1 * t2)
    assert torch.equal(t0, t0_before)  # the caller's tensor is not modified in place
    assert bank.counts == {"liver": 3}


def test_memory_bank_retrieval_and_task():
    g = torch.Generator().manual_seed(0)
    bank = MemoryBank(0.99, model_id="m")
    entries = {n: torch.randn(5, 32, generator=g) for n in ["liver", "spleen", "kidney", "aorta"]}
    for n, t in entries.items():
        bank.update(n, t)
    query = torch.stack([entries["kidney"] * 2.0 + 0.05 * torch.randn(5, 32, generator=g), entries["liver"]])
    hits = bank.retrieve(query, top_k=2)
    assert [h[0][0] for h in hits] == ["kidney", "liver"]
    assert hits[1][0][1] == pytest.approx(1.0, abs=1e-6)  # cosine similarity, scale-invariant
    assert hits[0][0][1] > 0.99 and hits[0][1][1] < 0.5
    assert len(hits[0]) == 2
    t = bank.task(["spleen", "aorta"], labels=[4, 8])
    assert t.labels == [4, 8] and t.names == ["spleen", "aorta"] and t.model_id == "m"
    assert torch.equal(t.tokens[1], entries["aorta"])
    assert bank.task(["liver"]).labels == [1]
    with pytest.raises(IrisInputError, match="not in the memory bank"):
        bank.task(["heart"])
    with pytest.raises(IrisInputError, match="empty"):
        MemoryBank().retrieve(query)


def test_memory_bank_save_load(tmp_path):
    bank = MemoryBank(0.95, model_id="tiny-0123")
    bank.update("a", torch.randn(3, 8))
    bank.update("b", torch.randn(3, 8))
    bank.update("a", torch.randn(3, 8))
    bank.save(tmp_path / "bank.safetensors")
    back = MemoryBank.load(tmp_path / "bank.safetensors")
    assert back.momentum == 0.95 and back.model_id == "tiny-0123"
    assert back.counts == {"a": 2, "b": 1}
    assert set(back.embeddings) == {"a", "b"}
    for k in bank.embeddings:
        assert torch.equal(back.embeddings[k], bank.embeddings[k])


def _reference():
    shape = (40, 36, 30)
    aff = make_affine(rot_z(12) @ np.diag([1.2, 1.3, 1.5]), [-20.0, 10.0, 5.0])
    c = aff[:3, :3] @ ((np.array(shape) - 1) / 2) + aff[:3, 3]
    big = ellipsoid_mask(shape, aff, c + [-6.0, 0, 0], (9.0, 8.0, 7.0))
    small = ellipsoid_mask(shape, aff, c + [9.0, 4.0, 2.0], (5.0, 4.0, 4.0)) & ~big
    rng = np.random.default_rng(0)
    img = 100 + 700 * big + 400 * small + 10 * rng.standard_normal(shape)
    lab = (3 * big + 7 * small).astype(np.uint8)
    return img.astype(np.float32), aff, lab


def test_segmenter_tune_lowers_loss_network_frozen(tiny_cfg, tiny_model, monkeypatch):
    seg = Segmenter(tiny_model, tiny_cfg, "cpu")
    img, aff, lab = _reference()
    task = seg.encode(img, aff, lab)
    assert task.labels == [3, 7]
    before = {k: v.clone() for k, v in seg.model.state_dict().items()}

    seen = {}
    real_tune = encoding.tune

    def spy(segment, tokens, images, masks, steps, lr, **progress_and_cancel):
        seen.update(segment=segment, tokens=tokens.clone(), images=images.clone(), masks=masks.clone())
        return real_tune(segment, tokens, images, masks, steps, lr, **progress_and_cancel)

    monkeypatch.setattr(encoding, "tune", spy)
    tuned = seg.tune(task, [(img, aff, lab)], steps=30, lr=5e-2)

    # the tuning data: one crop per label present, masks for both classes, binary
    assert seen["images"].shape == (2, 1, *tiny_cfg.model.window)
    assert seen["masks"].shape == (2, 2, *tiny_cfg.model.window)
    assert set(torch.unique(seen["masks"]).tolist()) == {0.0, 1.0}
    valid = torch.ones(seen["masks"].shape[:2], dtype=torch.bool)
    with torch.no_grad():
        loss0 = float(dice_bce(seg.model.segment(seen["images"], task.tokens[None]), seen["masks"], valid))
        loss1 = float(dice_bce(seg.model.segment(seen["images"], tuned.tokens[None]), seen["masks"], valid))
    assert loss1 < 0.85 * loss0, (loss0, loss1)

    # only the tokens changed: the network is bit-for-bit the same and still frozen
    after = seg.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in seg.model.parameters())
    assert not torch.equal(tuned.tokens, task.tokens)
    assert tuned.labels == task.labels and tuned.names == task.names and tuned.model_id == task.model_id
    assert torch.equal(seen["tokens"][0], task.tokens)  # the input task itself was not modified


def test_segmenter_tune_needs_labels_present(tiny_cfg, tiny_model):
    seg = Segmenter(tiny_model, tiny_cfg, "cpu")
    img, aff, lab = _reference()
    task = seg.encode(img, aff, lab, labels=[3])
    with pytest.raises(IrisInputError, match="at least one image"):
        seg.tune(task, [(img, aff, np.zeros_like(lab))], steps=1)


def test_segment_refuses_task_from_another_model(tiny_cfg, tiny_model):
    seg = Segmenter(tiny_model, tiny_cfg, "cpu")
    img, aff, lab = _reference()
    with pytest.raises(IrisInputError, match="encode the reference again"):
        seg.segment(img, aff, _task([3], model_id="iris-small-000000000000"))


def test_save_is_atomic(tmp_path, monkeypatch):
    """Interrupted while writing: the previous task file is kept whole and no temporary file is left."""
    from IrisSegmentLib.inference import task as task_module

    path = tmp_path / "liver.task.safetensors"
    old = TaskEmbedding(torch.ones(1, 2, 4), [1], ["liver"], model_id="m")
    old.save(path)
    before = path.read_bytes()

    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x08\x00\x00\x00")
        raise KeyboardInterrupt

    monkeypatch.setattr(task_module, "save_file", half_write)
    with pytest.raises(KeyboardInterrupt):
        TaskEmbedding(torch.zeros(1, 2, 4), [1], ["liver"], model_id="m").save(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]
    assert torch.equal(TaskEmbedding.load(path).tokens, old.tokens)


def test_retrieval_replaces_each_class_by_its_nearest_bank_entry(tiny_cfg, oracle):
    """Object-level retrieval with the oracle (1-channel tokens = mean intensity under the mask). Without
    localisation (`retrieve` segments with the config's mode; a bare bank task has no reference to register)."""
    cfg = dataclasses.replace(tiny_cfg, localise=dataclasses.replace(tiny_cfg.localise, mode="none"))
    seg = Segmenter(oracle, cfg, "cpu")
    img, aff, lab = _reference()
    task = seg.encode(img, aff, lab, labels=[3])
    assert float(task.tokens[0, 0, 0]) > 0  # the structure is brighter than the mean
    seg.bank.update("bright", torch.full((1, 1), 2.0))
    seg.bank.update("dark", torch.full((1, 1), -2.0))
    result, names = seg.retrieve(img, aff, task)
    assert names == [["bright"]]
    direct = seg.segment(img, aff, TaskEmbedding(torch.full((1, 1, 1), 2.0), [3], model_id=seg.model_id))
    np.testing.assert_array_equal(result.label_map, direct.label_map)
    assert not np.array_equal(result.label_map, seg.segment(img, aff, task).label_map)
