"""Training: the packed and travel data formats, the episodic sampler and its workers, the loss,
checkpoints, tiny time-budgeted runs with export, resume and --init, the exported memory bank, and
the train command on a machine without nibabel and PyYAML."""
from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import ellipsoid_mask, make_affine, make_tiny_model, write_nifti
from IrisSegmentLib.config import BundleConfig, TrainingConfig
from IrisSegmentLib.errors import IrisInputError
from IrisSegmentLib.inference.task import MemoryBank
from IrisSegmentLib.training import data as data_module
from IrisSegmentLib.training import augment
from IrisSegmentLib.training import travel
from IrisSegmentLib.training.bank import bank_batches, fill_bank
from IrisSegmentLib.training.data import load, pack, pack_case, without
from IrisSegmentLib.training.losses import dice_bce, dice_score
from IrisSegmentLib.training.sampler import MIN_REF_VOXELS, EpisodeSampler, collate, crop
from IrisSegmentLib.training.stream import episode_batches
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
    # crops only: whole-volume episodes shrink the image by area averaging (test_prior_network checks them)
    sampler = EpisodeSampler(load(packed, "train"), _tc(whole_volume_prob=0.0), seed=3, augment_images=False)
    assert sampler.names == ["btcv"]
    seen_values, remapped, merged = set(), 0, 0
    for _ in range(40):
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
            values = torch.tensor([int(v) for v in name.split(":")[1].split("+")])
            seen_values.update(values.tolist())
            merged += len(values) > 1
            # the image holds the label value: each slot's masks are exactly that class (or union), in both images
            assert torch.equal(ep.ref_masks[j], torch.isin(ep.ref_image[0], values.float()).float()), name
            assert torch.equal(ep.query_masks[j], torch.isin(ep.query_image[0], values.float()).float()), name
            remapped += 7 in values.tolist()
    assert seen_values == {3, 7, 9}
    assert remapped > 0  # label 7 has index 2 in caseA and index 1 in caseB
    assert merged > 0  # merge_prob 0.2: some slots are the union of labels


def test_holdout_sets_structures_to_background_everywhere(packed):
    cases = load(packed, "train")
    held = without(cases, {"btcv": [7]})
    assert sum(7 in c.values for c in cases) == 2
    for before, after in zip(cases, held):
        if 7 not in before.values:
            assert after is before
            continue
        seven = int(np.searchsorted(before.values, 7))
        assert not (after.label == seven).any() and np.array_equal(after.values, before.values)
        assert np.array_equal(after.label[before.label != seven], before.label[before.label != seven])
    sampler = EpisodeSampler(held, _tc(), seed=3, augment_images=False)
    names = {v for _ in range(30) for n in sampler.sample().names if n for v in n.split(":")[1].split("+")}
    assert names == {"3", "9"}
    assert without(cases, {}) == cases


def test_random_curve_and_thick_slices():
    g = torch.Generator().manual_seed(0)
    a, b = torch.linspace(-2, 2, 1000).view(10, 10, 10), torch.linspace(-1, 1, 1000).view(10, 10, 10)
    ca, cb = augment.random_curve([a, b], g)
    assert abs(float(ca.mean())) < 1e-4 and float(ca.std()) == pytest.approx(1.0, abs=1e-3)
    # one curve for both images: equal inputs give equal outputs before the per-image z-score
    same = augment.random_curve([a, a.clone()], torch.Generator().manual_seed(1))
    assert torch.allclose(same[0], same[1])
    x = torch.randn(32, 32, 32, generator=g)
    t = augment.thick_slices(x, g)
    assert t.shape == x.shape and float(t.std()) < float(x.std())
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
    save_checkpoint(tmp_path / CHECKPOINT, model, ema, opt, 17, tiny_cfg)

    model2 = make_tiny_model(tiny_cfg, seed=99)
    ema2 = make_tiny_model(tiny_cfg, seed=98)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    assert load_checkpoint(tmp_path / CHECKPOINT, model2, ema2, opt2) == 17
    for a, b in ((model, model2), (ema, ema2)):
        for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(va, vb), k
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for pid in s1:
        for name in s1[pid]:
            assert torch.equal(torch.as_tensor(s1[pid][name]).float(), torch.as_tensor(s2[pid][name]).float()), (pid, name)
    # a further optimiser step from the restored state is the same step
    for mm, oo in ((model, opt), (model2, opt2)):
        oo.zero_grad()
        mm(x, x, m).square().mean().backward()
        oo.step()
    for (k, va), (_, vb) in zip(model.state_dict().items(), model2.state_dict().items()):
        torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-6)


def _records(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_train_export_and_resume(tmp_path, packed, tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, training=dataclasses.replace(tiny_cfg.training, warmup_steps=5))
    out = tmp_path / "run"
    lines = []
    train(cfg, packed, out, minutes=0.06, val_episodes=2, log_every=1, log=lines.append, bank_crops=1)

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
    assert bank.embeddings and all(n.split(":")[0] in ("btcv", "brain") for n in bank.embeddings)
    assert all(t.shape == (cfg.model.num_queries + 1, cfg.model.token_dim) for t in bank.embeddings.values())
    assert bank.model_id == f"tiny-{cfg.model.fingerprint()}"

    # resume: continues the step count from the checkpoint
    out2 = tmp_path / "run2"
    lines2 = []
    train(cfg, packed, out2, minutes=0.05, resume=out / CHECKPOINT, val_episodes=2, log_every=1, log=lines2.append, bank_crops=1)
    assert lines2[0] == f"resumed from {out / CHECKPOINT} at step {steps}"
    recs2 = _records(out2 / "log.jsonl")
    losses2 = [r for r in recs2 if "loss" in r]
    assert losses2[0]["step"] == steps + 1
    with safe_open(str(out2 / CHECKPOINT), framework="pt") as f:
        steps2 = int(f.metadata()["step"])
    assert steps2 == losses2[-1]["step"] > steps
    assert load_model(out2 / "model")[2]["steps"] == steps2


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
    meta = json.loads((out / "index.json").read_text(encoding="utf-8"))
    assert meta["spacing"] == [1.5, 1.5, 1.5]
    assert [c.case_id for c in load(out, "train")] == ["hippocampus_041"]
    assert [c.case_id for c in load(out, "val")] == ["hippocampus_001"]
    assert data_module.HIPPO_VAL_SUBJECTS == 10


# -- travel cache ---------------------------------------------------------------------------------
def test_travel_encode_decode_error_bound():
    rng = np.random.default_rng(0)
    label = (rng.random((20, 18, 16)) > 0.7).astype(np.uint8)
    image = rng.normal(0, 1, label.shape).astype(np.float16)
    label2, values, decoded = travel.decode(travel.encode(label, np.array([0, 5], np.int32), image))
    assert np.array_equal(label2, label) and list(values) == [0, 5] and decoded.dtype == np.float16
    x = image.astype(np.float32)
    step = (x.max() - x.min()) / 255
    err = np.abs(decoded.astype(np.float32) - x)
    assert err.max() <= step / 2 + float(np.spacing(np.float16(np.abs(x).max())))
    assert err.max() > step / 4  # quantised, not stored exactly
    assert decoded.min() == image.min()  # the padding value of crops is kept
    assert travel.decode(travel.encode(label, np.array([0, 5], np.int32), None))[2] is None


def test_travel_spread_and_tighten():
    entries = [{"group": f"p{g}", "id": f"p{g}_f{f}"} for g in range(4) for f in range(2)]
    ids = lambda es: [e["id"] for e in es]  # noqa: E731
    assert ids(travel.spread(entries, 2)) == ["p0_f0", "p3_f1"]  # distinct subjects, frames alternate
    assert ids(travel.spread(entries, 4)) == ["p0_f0", "p1_f1", "p2_f0", "p3_f1"]
    assert len(travel.spread(entries, 5)) == 5 and ids(travel.spread(entries, None)) == ids(entries)
    label = np.zeros((30, 30, 30), np.uint8)
    label[10:12, 3:5, 20:28] = 1
    assert travel.tighten(label, 4) == (slice(6, 16), slice(0, 9), slice(16, 30))


def test_travel_pack_round_trip(tmp_path, packed, capsys):
    from IrisSegmentLib.cli import main

    assert main(["pack", "--travel", str(packed), "--out", str(tmp_path / "travel"), "--margin", "4"]) == 0
    out = capsys.readouterr().out
    assert "train/btcv" in out and "travel cache" in out and "MiB" in out
    summary = travel.make_travel(packed, tmp_path / "t2", limits={"train": {"btcv": 2}}, margin=4)
    assert summary["cases_kept_of"]["train/btcv"] == [2, 3] and summary["cases_kept_of"]["val/btcv"] == [2, 2]
    before = {c.case_id: c for c in load(packed, "train") + load(packed, "val")}
    after = load(tmp_path / "t2", "train")
    assert [c.case_id for c in after] == ["caseA", "caseC", "seg1"]
    worst = 0.0
    for c in after + load(tmp_path / "t2", "val"):
        p = before[c.case_id]
        sl = travel.tighten(p.label, 4)
        assert (c.dataset, c.group) == (p.dataset, p.group) and np.array_equal(c.values, p.values)
        assert np.array_equal(c.label, p.label[sl])
        if p.image is None:
            assert c.image is None
            continue
        x = p.image[sl].astype(np.float32)
        err = float(np.abs(c.image.astype(np.float32) - x).max())
        assert err <= (x.max() - x.min()) / 255 / 2 + float(np.spacing(np.float16(np.abs(x).max())))
        worst = max(worst, err)
    assert summary["image_max_abs_error"] == pytest.approx(worst)
    with pytest.raises(ValueError, match="already a travel cache"):
        travel.make_travel(tmp_path / "t2", tmp_path / "t3")


# -- workers, --init, memory bank -----------------------------------------------------------------
def _same(a, b):
    return a["names"] == b["names"] and all(torch.equal(a[k], b[k]) for k in ("ref_image", "ref_masks", "query_image", "query_masks", "valid"))


def test_worker_batches_are_deterministic(packed):
    cases, tc = load(packed, "train"), _tc(dataset_weights={})

    def first(seed, workers, n):
        it = episode_batches(cases, tc, seed, workers)
        out = [next(it) for _ in range(n)]
        it.close()
        return out

    two = first(7, 2, 3)
    assert all(_same(a, b) for a, b in zip(two, first(7, 2, 3)))
    inline7, inline8 = first(7, 0, 2), first(8, 0, 1)
    # batches come from the workers in turn; worker w samples with seed + w
    assert _same(two[0], inline7[0]) and _same(two[1], inline8[0]) and _same(two[2], inline7[1])
    assert not _same(two[0], two[1]) and two[0]["ref_image"].shape == (2, 1, 32, 32, 32)


def test_init_starts_from_the_model_folder(tmp_path, packed, tiny_cfg, tiny_model_dir, repo_root):
    out = tmp_path / "run"
    lines = []
    train(tiny_cfg, packed, out, minutes=0, init=tiny_model_dir, val_episodes=2, bank_crops=1, log=lines.append)
    assert lines[0] == f"initialised from {tiny_model_dir}"
    src = load_model(tiny_model_dir)[0].state_dict()
    with safe_open(str(out / CHECKPOINT), framework="pt") as f:
        assert f.metadata()["step"] == "0"
        t = {k: f.get_tensor(k) for k in f.keys()}
    assert not any(k.startswith("opt.") for k in t)  # a fresh optimiser
    for k, v in src.items():
        assert torch.equal(t[f"model.{k}"], v) and torch.equal(t[f"ema.{k}"], v), k
    exported = load_model(out / "model")[0].state_dict()
    assert all(torch.equal(exported[k], v) for k, v in src.items())
    with pytest.raises(IrisInputError, match="fingerprint"):
        train(tiny_cfg, packed, tmp_path / "x", minutes=0, init=repo_root / "Resources" / "Models" / "iris-small")
    with pytest.raises(IrisInputError, match="not both"):
        train(tiny_cfg, packed, tmp_path / "y", minutes=0, init=tiny_model_dir, resume=out / CHECKPOINT)


def test_exported_bank_is_what_the_exported_model_gives(tmp_path, packed, tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, training=dataclasses.replace(tiny_cfg.training, warmup_steps=1, lr=1e-2))
    out = tmp_path / "run"
    train(cfg, packed, out, minutes=0.05, val_episodes=2, bank_crops=3, log=lambda s: None)
    model, _, _ = load_model(out / "model")
    bank = MemoryBank.load(out / "model" / "memory_bank.safetensors")
    batches = bank_batches(load(packed, "train"), cfg.training, 3)
    # every class of every collection trained on, 3 crops each (not a random draw of episodes)
    assert bank.counts == {n: 3 for n in ("brain:2", "brain:4", "btcv:3", "btcv:7", "btcv:9")}
    assert all(torch.equal(a["ref_image"], b["ref_image"]) for a, b in zip(batches, bank_batches(load(packed, "train"), cfg.training, 3)))
    expected = fill_bank(model, batches, 0.99, "")
    assert bank.counts == expected.counts and bank.momentum == cfg.training.bank_momentum
    for n, v in expected.embeddings.items():
        torch.testing.assert_close(bank.embeddings[n], v, rtol=0, atol=1e-6)
    # made by the exported (EMA) weights, not by the live network
    with safe_open(str(out / CHECKPOINT), framework="pt") as f:
        assert int(f.metadata()["step"]) >= 1
        live = make_tiny_model(cfg)
        live.load_state_dict({k[6:]: f.get_tensor(k) for k in f.keys() if k.startswith("model.")})
    live_bank = fill_bank(live, batches, 0.99, "")
    assert not all(torch.allclose(live_bank.embeddings[k], v, atol=1e-4) for k, v in bank.embeddings.items())


def test_bank_references_are_centred_on_their_class(packed):
    cases = load(packed, "train")
    batches = bank_batches(cases, _tc(dataset_weights={"brain": 0.0}), 2)  # a collection not trained on is left out
    names = [n[0] for b in batches for n in b["names"]]
    assert names == ["btcv:3", "btcv:3", "btcv:7", "btcv:7", "btcv:9", "btcv:9"]
    for b in batches:
        assert b["ref_image"].shape[1:] == (1, 32, 32, 32) and b["ref_masks"].shape[1:] == (1, 32, 32, 32)
        for i, (n,) in enumerate(b["names"]):
            value = int(n.split(":")[1])  # the fixture's image holds the label value
            assert torch.equal(b["ref_masks"][i, 0], b["ref_image"][i, 0] == value) and b["valid"][i, 0]
            assert b["ref_masks"][i, 0, 12:21, 12:21, 12:21].any()  # centred on the class (jitter <= 4)


def test_fill_bank_averages_every_sighting(tiny_cfg):
    model = make_tiny_model(tiny_cfg)
    x = torch.randn(2, 1, 32, 32, 32)
    m = (torch.rand(2, 3, 32, 32, 32) > 0.6).float()
    b = {"ref_image": x, "ref_masks": m, "valid": torch.tensor([[True, True, False], [True, False, True]]),
         "names": [["a", "b", "c"], ["a", "", "c"]]}
    bank = fill_bank(model, [b], 0.9, "id")
    with torch.no_grad():
        t = model.encode_task(x, m)
    assert bank.counts == {"a": 2, "b": 1, "c": 1} and bank.model_id == "id" and bank.momentum == 0.9
    torch.testing.assert_close(bank.embeddings["a"], (t[0, 0] + t[1, 0]) / 2)
    torch.testing.assert_close(bank.embeddings["c"], t[1, 2])  # the invalid sighting in sample 0 is left out


def test_every_config_round_trips_through_load_and_save_with_pyyaml(repo_root, tmp_path):
    """PyYAML is the one parser: every YAML config under Resources/ loads, saves and loads back equal, and every
    value the file gives is in the saved file unchanged (a float stays a float, a list a list)."""
    import yaml

    files = sorted((repo_root / "Resources").rglob("*.yaml"))
    assert len(files) >= 4
    for f in files:
        cfg = BundleConfig.load(f)
        cfg.save(tmp_path / "saved.yaml")
        assert BundleConfig.load(tmp_path / "saved.yaml") == cfg, f
        saved = yaml.safe_load((tmp_path / "saved.yaml").read_text(encoding="utf-8"))
        assert saved == cfg.to_dict(), f
        for section, values in yaml.safe_load(f.read_text(encoding="utf-8")).items():
            for key, value in values.items():
                assert saved[section][key] == value and type(saved[section][key]) is type(value), (f, section, key)


BLOCKER = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'nibabel':
            raise ModuleNotFoundError(f'blocked: {name}', name=name)
sys.meta_path.insert(0, Blocker())
from IrisSegmentLib.cli import main
rc = main(sys.argv[1:])
print('imported:', sorted(m for m in sys.modules if m.split('.')[0] == 'nibabel'))
sys.exit(rc)
"""


def test_train_command_without_nibabel(tmp_path, packed, tiny_cfg, tiny_model_dir, repo_root):
    """The GPU machine has no nibabel (PyYAML comes with the run: scripts/gpu_train.sh): the train command reads the
    travel cache and the model folder's config.yaml and writes the exported folder without it."""
    import os
    import subprocess
    import sys

    travel.make_travel(packed, tmp_path / "travel", margin=4)
    assert not load(tmp_path / "travel", "val")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(repo_root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", BLOCKER, "train", "--init", str(tiny_model_dir), "--data", str(tmp_path / "travel"),
           "--minutes", "0.05", "--out", str(out), "--resume-dir", str(tmp_path / "resume"), "--workers", "1",
           "--batch-size", "1", "--bank-crops", "1", "--checkpoint-minutes", "0.01"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "initialised from" in r.stdout and "imported: []" in r.stdout
    model, cfg, info = load_model(out / "model")
    assert cfg == dataclasses.replace(tiny_cfg, training=dataclasses.replace(tiny_cfg.training, batch_size=1))
    assert info["steps"] >= 1 and info["val_dice"] == {}  # the fixture's only validation collection stays home
    assert (out / "model" / "memory_bank.safetensors").is_file() and (out / "log.jsonl").is_file()
    assert (tmp_path / "resume" / CHECKPOINT).is_file() and not (out / CHECKPOINT).exists()


def test_held_out_structures_are_not_in_the_exported_bank_or_config(tmp_path, packed, tiny_cfg, tiny_model_dir):
    """minutes=0: no training step, only the export; the bank and the saved recipe show the holdout."""
    cfg = dataclasses.replace(tiny_cfg, training=dataclasses.replace(
        tiny_cfg.training, dataset_weights={"shapes": 0.0, "brain": 0.0}, holdout={"btcv": [7]}))
    train(cfg, packed, tmp_path / "run", minutes=0, init=tiny_model_dir, val_episodes=2, bank_crops=1, log=lambda s: None)
    bank = MemoryBank.load(tmp_path / "run" / "model" / "memory_bank.safetensors")
    assert sorted(bank.embeddings) == ["btcv:3", "btcv:9"]
    assert load_model(tmp_path / "run" / "model")[1].training.holdout == {"btcv": [7]}
