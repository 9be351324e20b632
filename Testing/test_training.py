"""Training: the packed data format, the episodic sampler, the loss, checkpoints, a tiny
time-budgeted run with export and resume."""
from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import ellipsoid_mask, make_affine, make_tiny_model, write_nifti
from IrisSegmentLib.config import TrainingConfig
from IrisSegmentLib.inference.task import MemoryBank
from IrisSegmentLib.training import data as data_module
from IrisSegmentLib.training.data import load, pack, pack_case
from IrisSegmentLib.training.losses import dice_bce, dice_score
from IrisSegmentLib.training.sampler import MIN_REF_VOXELS, EpisodeSampler, collate, crop
from IrisSegmentLib.training.train import CHECKPOINT, load_checkpoint, lr_at, save_checkpoint, train
from IrisSegmentLib.weights import load_model

SHAPE = (40, 40, 40)


def _case_arrays(values, seed, with_image=True):
    """Label indices into `values` (ellipsoids), and an image whose intensity is the label value."""
    rng = np.random.default_rng(seed)
    label = np.zeros(SHAPE, np.uint8)
    for idx in range(1, len(values)):
        c = rng.uniform(14, 26, 3)
        r = rng.uniform(5, 8, 3)
        label[ellipsoid_mask(SHAPE, np.eye(4), c, r)] = idx
    assert set(np.unique(label)) == set(range(len(values)))
    arrays = {"label": label, "values": np.asarray(values, np.int32)}
    if with_image:
        arrays["image"] = np.asarray(values, np.float16)[label]
    return arrays


def make_packed(root):
    """A packed dataset in the format of training/data.py: index.json + one npz per case."""
    cases = [
        ("train", "btcv", "caseA", "pA", [0, 3, 7, 9], True),
        ("train", "btcv", "caseB", "pB", [0, 7, 9], True),   # label 7 has another index here
        ("train", "btcv", "caseC", "pC", [0, 3, 9], True),
        ("train", "brain", "seg1", "s1", [0, 2, 4], False),  # label-only: rendered synthetically
        ("val", "btcv", "valA", "vA", [0, 3, 7], True),
        ("val", "btcv", "valB", "vB", [0, 3, 7], True),
    ]
    index = []
    for i, (split, dataset, cid, group, values, img) in enumerate(cases):
        f = root / split / dataset / f"{cid}.npz"
        f.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(f, **_case_arrays(values, i, img))
        index.append({"split": split, "dataset": dataset, "id": cid, "group": group, "file": str(f.relative_to(root))})
    (root / "index.json").write_text(json.dumps({"spacing": [1.5, 1.5, 1.5], "cases": index}))
    return root


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return make_packed(tmp_path_factory.mktemp("packed"))


def test_load_packed(packed):
    train_cases, val_cases = load(packed, "train"), load(packed, "val")
    assert [c.case_id for c in train_cases] == ["caseA", "caseB", "caseC", "seg1"]
    assert [c.case_id for c in val_cases] == ["valA", "valB"]
    a = train_cases[0]
    assert a.dataset == "btcv" and a.group == "pA" and a.label.dtype == np.uint8
    assert list(a.values) == [0, 3, 7, 9] and a.image.dtype == np.float16
    assert train_cases[3].image is None


def test_crop_pads_with_fill():
    a = np.arange(27).reshape(3, 3, 3)
    c = crop(a, (0, 0, 0), (3, 3, 3), -1)
    assert c.shape == (3, 3, 3)
    assert c[0, 0, 0] == -1 and c[1, 1, 1] == a[0, 0, 0] and c[2, 2, 2] == a[1, 1, 1]
    assert np.array_equal(crop(a, (1, 1, 1), (3, 3, 3), -1), a)


def _tc(**kw):
    base = dict(crop=(32, 32, 32), max_classes=3, batch_size=2, dataset_weights={"shapes": 0.0, "brain": 0.0})
    base.update(kw)
    return TrainingConfig(**base)


def test_sampler_masks_match_classes_and_valid_flags(packed):
    sampler = EpisodeSampler(load(packed, "train"), _tc(), seed=3, augment_images=False)
    assert sampler.names == ["btcv"]
    seen_values, remapped = set(), 0
    for _ in range(25):
        ep = sampler.sample()
        k = ep.ref_masks.shape[0]
        assert k == 3 and ep.ref_masks.shape == ep.query_masks.shape == (3, 32, 32, 32)
        assert ep.ref_image.shape == ep.query_image.shape == (1, 32, 32, 32)
        assert ep.valid.dtype == torch.bool and ep.valid.any()
        assert ep.valid.tolist() == (ep.ref_masks.flatten(1).sum(1) >= MIN_REF_VOXELS).tolist()
        assert int((ep.ref_masks.sum(0) > 1).sum()) == 0 and int((ep.query_masks.sum(0) > 1).sum()) == 0
        for j in range(k):
            name = ep.names[j]
            if not name:  # padded slot: empty, invalid
                assert not ep.valid[j] and ep.ref_masks[j].sum() == 0 and ep.query_masks[j].sum() == 0
                continue
            value = int(name.split(":")[1])
            seen_values.add(value)
            # the image holds the label value: each slot's masks are exactly that class, in both images
            assert torch.equal(ep.ref_masks[j], (ep.ref_image[0] == value).float()), name
            assert torch.equal(ep.query_masks[j], (ep.query_image[0] == value).float()), name
            remapped += value == 7
    assert seen_values == {3, 7, 9}
    assert remapped > 0  # label 7 has index 2 in caseA and index 1 in caseB


def test_sampler_label_only_and_shapes(packed):
    cases = load(packed, "train")
    tc = _tc(dataset_weights={"btcv": 0.0})
    sampler = EpisodeSampler(cases, tc, seed=0, augment_images=True)
    assert sorted(sampler.names) == ["brain", "shapes"]
    kinds = set()
    for _ in range(12):
        ep = sampler.sample()
        kinds.add(next(n for n in ep.names if n).split(":")[0].rstrip("0123456789"))
        for m in (ep.ref_masks, ep.query_masks):
            assert set(torch.unique(m).tolist()) <= {0.0, 1.0}
        assert torch.isfinite(ep.ref_image).all() and torch.isfinite(ep.query_image).all()
        for j, n in enumerate(ep.names):
            if not n:
                assert not ep.valid[j] and ep.ref_masks[j].sum() == 0
            else:
                assert bool(ep.valid[j]) == bool(ep.ref_masks[j].sum() >= MIN_REF_VOXELS)
    assert kinds == {"brain", "shape"}
    b = collate([sampler.sample() for _ in range(2)])
    assert b["ref_image"].shape == (2, 1, 32, 32, 32) and b["ref_masks"].shape == (2, 3, 32, 32, 32)
    assert b["valid"].shape == (2, 3) and len(b["names"]) == 2


def test_sampler_is_deterministic(packed):
    cases = load(packed, "train")
    a = EpisodeSampler(cases, _tc(dataset_weights={}), seed=5).sample()
    b = EpisodeSampler(cases, _tc(dataset_weights={}), seed=5).sample()
    assert a.names == b.names and torch.equal(a.ref_image, b.ref_image) and torch.equal(a.query_masks, b.query_masks)


def test_dice_bce_ignores_invalid_slots():
    torch.manual_seed(0)
    target = (torch.rand(2, 3, 8, 8, 8) > 0.6).float()
    good = torch.where(target > 0, 20.0, -20.0)
    valid = torch.tensor([[True, True, False], [True, False, False]])
    assert float(dice_bce(good, target, valid)) < 1e-3
    garbage = good.clone()
    garbage[~valid] = torch.randn(int((~valid).sum()), 8, 8, 8) * 50
    target_g = target.clone()
    target_g[~valid] = 1 - target[~valid]
    assert float(dice_bce(garbage, target_g, valid)) == pytest.approx(float(dice_bce(good, target, valid)), abs=1e-7)
    # the mean over the valid slots, each slot's loss computed alone
    logits = torch.randn(2, 3, 8, 8, 8)
    per = [float(dice_bce(logits[i : i + 1, j : j + 1], target[i : i + 1, j : j + 1], torch.ones(1, 1, dtype=torch.bool)))
           for i in range(2) for j in range(3) if valid[i, j]]
    assert float(dice_bce(logits, target, valid)) == pytest.approx(np.mean(per), rel=1e-5)
    assert float(dice_bce(logits, target, valid)) != pytest.approx(float(dice_bce(logits, target, torch.ones_like(valid))), rel=1e-3)
    assert float(dice_bce(logits, target, torch.zeros_like(valid))) == 0.0


def test_dice_score():
    p = torch.zeros(1, 3, 4, 4, 4, dtype=torch.bool)
    t = torch.zeros_like(p)
    p[0, 0, :2] = True
    t[0, 0, 1:3] = True
    t[0, 1, 0] = True
    d = dice_score(p, t)
    assert d[0, 0] == pytest.approx(0.5) and d[0, 1] == 0 and d[0, 2] == 1  # both empty: 1


def test_lr_schedule():
    tc = TrainingConfig(lr=1e-3, warmup_steps=10, decay_per_1k=0.5)
    assert lr_at(0, tc) == pytest.approx(1e-4)
    assert lr_at(9, tc) == pytest.approx(1e-3)
    assert lr_at(1010, tc) == pytest.approx(0.5e-3)
    assert lr_at(2010, tc) == pytest.approx(0.25e-3)


def test_checkpoint_round_trip(tmp_path, tiny_cfg):
    model = make_tiny_model(tiny_cfg)
    ema = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(1, 1, 16, 16, 16)
    m = (torch.rand(1, 2, 16, 16, 16) > 0.7).float()
    for _ in range(2):
        opt.zero_grad()
        model(x, x, m).square().mean().backward()
        opt.step()
    bank = MemoryBank(0.9)
    bank.update("btcv:3", torch.randn(5, 32))
    bank.update("btcv:3", torch.randn(5, 32))
    save_checkpoint(tmp_path / CHECKPOINT, model, ema, opt, bank, 17, tiny_cfg)

    model2 = make_tiny_model(tiny_cfg, seed=99)
    ema2 = make_tiny_model(tiny_cfg, seed=98)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    bank2 = MemoryBank(0.9)
    assert load_checkpoint(tmp_path / CHECKPOINT, model2, ema2, opt2, bank2) == 17
    for a, b in ((model, model2), (ema, ema2)):
        for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(va, vb), k
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for pid in s1:
        for name in s1[pid]:
            assert torch.equal(torch.as_tensor(s1[pid][name]).float(), torch.as_tensor(s2[pid][name]).float()), (pid, name)
    assert bank2.counts == {"btcv:3": 2} and torch.equal(bank2.embeddings["btcv:3"], bank.embeddings["btcv:3"])
    # a further optimiser step from the restored state is the same step
    for mm, oo in ((model, opt), (model2, opt2)):
        oo.zero_grad()
        mm(x, x, m).square().mean().backward()
        oo.step()
    for (k, va), (_, vb) in zip(model.state_dict().items(), model2.state_dict().items()):
        torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-6)


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_train_export_and_resume(tmp_path, packed, tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, training=dataclasses.replace(tiny_cfg.training, warmup_steps=5))
    out = tmp_path / "run"
    lines = []
    train(cfg, packed, out, minutes=0.05, val_episodes=2, log_every=1, log=lines.append)

    # checkpoint
    with safe_open(str(out / CHECKPOINT), framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
        ema = {k[4:]: f.get_tensor(k) for k in keys if k.startswith("ema.")}
    steps = int(meta["step"])
    assert steps >= 1
    assert any(k.startswith("model.") for k in keys) and any(k.startswith("opt.") for k in keys)
    assert json.loads(meta["config"]) == cfg.to_dict()

    # log: one loss record per step, then the validation record
    recs = _records(out / "log.jsonl")
    losses = [r for r in recs if "loss" in r]
    assert [r["step"] for r in losses] == list(range(1, steps + 1))
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in losses)
    assert all(r["lr"] == pytest.approx(lr_at(r["step"], cfg.training)) for r in losses)
    final = recs[-1]
    assert final["step"] == steps and final["val_dice"]
    assert all(k == "btcv" or k.startswith("shape") for k in final["val_dice"])  # val split + synthetic shapes
    assert all(0.0 <= v <= 1.0 for v in final["val_dice"].values())
    assert lines and json.loads(lines[-1]) == final

    # exported model folder: loadable, EMA weights (fp16), training info, memory bank
    model, loaded_cfg, info = load_model(out / "model")
    assert loaded_cfg == cfg and info["steps"] == steps and info["val_dice"] == final["val_dice"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, ema[k].half().float()), k
    bank = MemoryBank.load(out / "model" / "memory_bank.safetensors")
    assert bank.embeddings and all(n.split(":")[0] in ("btcv", "brain") or n.startswith("shape") for n in bank.embeddings)
    assert all(t.shape == (cfg.model.num_queries + 1, cfg.model.token_dim) for t in bank.embeddings.values())
    assert bank.model_id == f"tiny-{cfg.model.fingerprint()}"

    # resume: continues the step count from the checkpoint
    out2 = tmp_path / "run2"
    lines2 = []
    train(cfg, packed, out2, minutes=0.03, resume=out / CHECKPOINT, val_episodes=2, log_every=1, log=lines2.append)
    assert lines2[0] == f"resumed from {out / CHECKPOINT} at step {steps}"
    recs2 = _records(out2 / "log.jsonl")
    losses2 = [r for r in recs2 if "loss" in r]
    assert losses2[0]["step"] == steps + 1
    with safe_open(str(out2 / CHECKPOINT), framework="pt") as f:
        steps2 = int(f.metadata()["step"])
        counts2 = json.loads(f.metadata()["bank_counts"])
    assert steps2 == losses2[-1]["step"] > steps
    assert load_model(out2 / "model")[2]["steps"] == steps2
    # the memory bank carried over and kept counting
    assert sum(counts2.values()) > sum(bank.counts.values())


def test_pack_case_and_pack(tmp_path):
    """pack() on a minimal source folder: a real image/label pair per split, read back by load()."""
    src = tmp_path / "src" / "msd_hippocampus"
    src.mkdir(parents=True)
    aff = make_affine(np.diag([-1.0, 1.0, 1.0]), [10.0, -5.0, 3.0])
    shape = (30, 28, 26)
    for n in (1, 41):  # subject 1 is validation, subject 21 training
        lab = np.zeros(shape, np.int16)
        lab[ellipsoid_mask(shape, aff, aff[:3, :3] @ [15, 14, 13] + aff[:3, 3], (6, 5, 4))] = 1
        lab[ellipsoid_mask(shape, aff, aff[:3, :3] @ [8, 14, 13] + aff[:3, 3], (3, 3, 3))] = 2
        img = (100 + 200 * lab + np.random.default_rng(n).normal(0, 5, shape)).astype(np.float32)
        write_nifti(src / f"hippocampus_{n:03d}_image.nii.gz", img, aff)
        write_nifti(src / f"hippocampus_{n:03d}_label.nii.gz", lab, aff)
    image, label, values = pack_case(src / "hippocampus_001_image.nii.gz", src / "hippocampus_001_label.nii.gz", (1.5, 1.5, 1.5))
    assert list(values) == [0, 1, 2] and label.dtype == np.uint8 and image.dtype == np.float16
    assert image.shape == label.shape and set(np.unique(label)) == {0, 1, 2}
    assert float(image[label == 1].mean()) > float(image[label == 0].mean()) + 1  # normalised image, aligned
    out = pack(tmp_path / "src", tmp_path / "packed", (1.5, 1.5, 1.5))
    meta = json.loads((out / "index.json").read_text())
    assert meta["spacing"] == [1.5, 1.5, 1.5]
    assert [c.case_id for c in load(out, "train")] == ["hippocampus_041"]
    assert [c.case_id for c in load(out, "val")] == ["hippocampus_001"]
    assert data_module.HIPPO_VAL_SUBJECTS == 10
