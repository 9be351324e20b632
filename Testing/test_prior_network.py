"""The prior network (issue 17): the localisation prior as a network input (zero-initialised, so weights of the
network before it behave exactly as before), episodes with simulated registration priors and prior dropout,
--init from a folder without the prior input, and the engine handing each window its crop of the prior."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, make_tiny_model
from IrisSegmentLib import IrisInputError, Segmenter
from IrisSegmentLib.config import BundleConfig
from IrisSegmentLib.model import build_iris
from IrisSegmentLib.training.data import load
from IrisSegmentLib.training.priors import simulate_prior
from IrisSegmentLib.training.sampler import EpisodeSampler
from IrisSegmentLib.training.train import init_weights, train_step
from IrisSegmentLib.weights import load_model, save_model
from test_training import make_packed

BUNDLED = REPO_ROOT / "Resources" / "Models" / "iris-small"


def with_prior(cfg: BundleConfig, channels: int = 4) -> BundleConfig:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, prior_channels=channels))


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()).clamp_min(1))


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return make_packed(tmp_path_factory.mktemp("packed_prior"))


def test_fingerprint_unchanged_without_prior_input_and_changed_with(tiny_cfg):
    assert dataclasses.replace(tiny_cfg.model, prior_channels=0).fingerprint() == tiny_cfg.model.fingerprint()
    assert with_prior(tiny_cfg).model.fingerprint() != tiny_cfg.model.fingerprint()
    assert with_prior(tiny_cfg, 8).model.fingerprint() != with_prior(tiny_cfg, 4).model.fingerprint()
    with pytest.raises(ValueError, match="prior_channels"):
        with_prior(tiny_cfg, -1).model.validate()


def test_weights_without_prior_input_behave_exactly_as_before_in_the_prior_network(tiny_cfg, tiny_model_dir):
    """Adding the prior input to a trained network (--init from a folder without it, as the product model was made
    from the iris-small weights of before): at step 0 the network gives that folder's logits, whatever prior it is
    given."""
    old, old_cfg, _ = load_model(tiny_model_dir)
    new_cfg = with_prior(tiny_cfg)
    assert old_cfg.model.prior_channels == 0 and new_cfg.model.prior_channels > 0
    new = build_iris(new_cfg.model).eval()
    missing, unexpected = new.load_state_dict(init_weights(tiny_model_dir, new_cfg), strict=False)
    assert not unexpected and missing and all(k.startswith("decoder.prior_fusion.") for k in missing)
    assert new.takes_prior and not old.takes_prior
    g = torch.Generator().manual_seed(0)
    query, ref = torch.randn(1, 1, 32, 32, 32, generator=g), torch.randn(1, 1, 32, 32, 32, generator=g)
    masks = (torch.rand(1, 2, 32, 32, 32, generator=g) > 0.7).float()
    with torch.inference_mode():
        tokens = old.encode_task(ref, masks)
        assert torch.equal(new.encode_task(ref, masks), tokens)
        before = old.segment(query, tokens)
        assert torch.equal(new.segment(query, tokens, prior=torch.rand(1, 2, 32, 32, 32, generator=g)), before)
        assert torch.equal(new.segment(query, tokens), before)


def test_bundled_model_takes_the_prior_and_is_the_product_config():
    """The bundled weights are the prior network of the product config (Resources/Configs/iris-small.yaml)."""
    model, cfg, _ = load_model(BUNDLED)
    product = BundleConfig.load(REPO_ROOT / "Resources" / "Configs" / "iris-small.yaml")
    assert model.takes_prior and cfg.model.fingerprint() == product.model.fingerprint()


def test_trained_prior_fusion_uses_the_prior(tiny_cfg):
    cfg = with_prior(tiny_cfg)
    torch.manual_seed(0)
    model = build_iris(cfg.model).eval()
    torch.nn.init.normal_(model.decoder.prior_fusion.refine[-1].weight)  # as if trained
    q, tokens = torch.randn(2, 1, 32, 32, 32), torch.randn(1, 3, cfg.model.num_queries + 1, cfg.model.token_dim)
    with torch.inference_mode():
        a = model.segment(q, tokens, prior=torch.zeros(2, 3, 32, 32, 32))
        b = model.segment(q, tokens, prior=torch.ones(2, 3, 32, 32, 32))
        c = model.segment(q, tokens)
    assert a.shape == (2, 3, 32, 32, 32) and not torch.allclose(a, b) and not torch.allclose(a, c)
    # the same weights for every class: a prior given to class 0 only changes class 0
    p = torch.zeros(2, 3, 32, 32, 32)
    p[:, 0] = 1
    with torch.inference_mode():
        d = model.segment(q, tokens, prior=p)
    assert not torch.allclose(d[:, 0], a[:, 0]) and torch.equal(d[:, 1:], a[:, 1:])


def test_init_from_a_folder_without_prior_input(tmp_path, tiny_cfg, tiny_model_dir):
    weights = init_weights(tiny_model_dir, with_prior(tiny_cfg))
    assert weights.keys() == make_tiny_model(tiny_cfg).state_dict().keys()
    other = dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, num_queries=2, prior_channels=4))
    with pytest.raises(IrisInputError, match="fingerprint"):
        init_weights(tiny_model_dir, other)


def test_old_task_files_are_refused_by_the_prior_network(tmp_path, tiny_cfg, tiny_model_dir):
    old = Segmenter.load(tiny_model_dir, "cpu")
    image = np.random.default_rng(0).normal(size=(30, 30, 30)).astype(np.float32)
    label = np.zeros((30, 30, 30), np.uint8)
    label[10:20, 10:20, 10:20] = 1
    task = old.encode(image, np.eye(4), label, confidence=False)
    new_dir = save_model(build_iris(with_prior(tiny_cfg).model), with_prior(tiny_cfg), tmp_path / "prior_model")
    new = Segmenter.load(new_dir, "cpu")
    assert new.model_id != old.model_id
    with pytest.raises(IrisInputError, match="encode the reference again"):
        new.segment(image, np.eye(4), task, localise="none")


def test_simulated_prior_is_a_blurred_and_moved_truth():
    truth = torch.zeros(2, 40, 40, 40)
    truth[0, 12:28, 12:28, 12:28] = 1
    truth[1, 5:12, 20:35, 8:16] = 1
    assert torch.equal(simulate_prior(truth, torch.Generator().manual_seed(0), 0.0, severity=0.0), truth)  # no error, no blur
    blurred = simulate_prior(truth, torch.Generator().manual_seed(0), 2.0, severity=0.0)
    assert blurred.shape == truth.shape and float(blurred.min()) >= 0 and float(blurred.max()) <= 1
    assert dice(blurred[0] > 0.5, truth[0] > 0) > 0.9 and 0 < float(blurred[0, 11, 20, 20]) < 1  # the engine's blur
    scores = [dice(simulate_prior(truth, torch.Generator().manual_seed(s), 2.0, severity=1.0)[0] > 0.5, truth[0] > 0)
              for s in range(8)]
    assert min(scores) < 0.85 and max(scores) > 0.2  # off, but still about the structure
    empty = simulate_prior(torch.zeros(1, 20, 20, 20), torch.Generator().manual_seed(0), 2.0)
    assert empty.shape == (1, 20, 20, 20) and float(empty.max()) <= 1


def test_episodes_carry_priors_near_the_query_truth_and_batches_drop_them(packed, tiny_cfg):
    tc = dataclasses.replace(tiny_cfg.training, prior_dropout=0.5, whole_volume_prob=0.3, empty_query_prob=0.0)
    sampler = EpisodeSampler(load(packed, "train"), tc, seed=5, augment_images=False)
    overlaps = []
    for _ in range(30):
        ep = sampler.sample()
        assert ep.query_prior.shape == ep.query_masks.shape
        assert float(ep.query_prior.min()) >= 0 and float(ep.query_prior.max()) <= 1
        for j, name in enumerate(ep.names):
            if not name:
                assert float(ep.query_prior[j].max()) == 0  # padded slot: no prior
            elif ep.query_masks[j].sum() > 50:
                overlaps.append(float((ep.query_prior[j] * ep.query_masks[j]).sum() / ep.query_masks[j].sum()))
    assert np.mean(overlaps) > 0.3  # the prior lies mostly on the truth
    dropped = [sampler.batch(2)["query_prior"] is None for _ in range(30)]
    assert 0 < sum(dropped) < 30


def test_whole_volume_episode_shows_the_whole_case(packed, tiny_cfg):
    tc = dataclasses.replace(tiny_cfg.training, whole_volume_prob=1.0, crop=(32, 32, 32))
    sampler = EpisodeSampler(load(packed, "train"), tc, seed=1, augment_images=False)
    case = sampler.by_dataset["btcv"][0]
    lab, img = sampler._whole(case, (32, 32, 32), None)
    assert lab.shape == img.shape == (32, 32, 32)
    assert set(np.unique(lab.numpy())) == set(np.unique(case.label))  # every structure of the 40^3 case, shrunk
    assert float(img[0, 0, 0]) == float(case.image.min())  # the margin is the case's background


def test_train_step_with_and_without_prior_in_bf16(packed, tiny_cfg):
    cfg = with_prior(tiny_cfg)
    torch.manual_seed(0)
    model = build_iris(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sampler = EpisodeSampler(load(packed, "train"), dataclasses.replace(cfg.training, prior_dropout=0.0), seed=0)
    batch = sampler.batch(2)
    before = model.decoder.prior_fusion.refine[-1].weight.detach().clone()
    loss = train_step(model, opt, batch, 1e-3, 1.0, "cpu", cpu_bf16=True)
    assert torch.isfinite(loss)
    assert not torch.equal(model.decoder.prior_fusion.refine[-1].weight, before)  # the zero layer learns
    train_step(model, opt, {**batch, "query_prior": None}, 1e-3, 1.0, "cpu")


def test_engine_gives_each_window_its_crop_of_the_prior(tiny_cfg):
    """With a prior, the windows run with it: a network whose fusion is trained answers differently than with
    no prior; the prior crops lie where the windows are (the fusion sees the prior under the structure)."""
    cfg = with_prior(tiny_cfg)
    torch.manual_seed(0)
    model = build_iris(cfg.model).eval()
    torch.nn.init.normal_(model.decoder.prior_fusion.refine[-1].weight, std=0.5)
    seen = []
    fusion_forward = model.decoder.prior_fusion.forward

    def spy(emb, logits, prior):
        seen.append(prior.clone())
        return fusion_forward(emb, logits, prior)

    model.decoder.prior_fusion.forward = spy
    seg = Segmenter(model, cfg, "cpu")
    image = np.random.default_rng(0).normal(size=(48, 48, 48)).astype(np.float32)
    tokens = torch.randn(1, cfg.model.num_queries + 1, cfg.model.token_dim)
    work = seg.prepare(image, np.eye(4) * [1.5, 1.5, 1.5, 1]).work
    prior = torch.zeros(1, *work.shape[1:])
    prior[0, 10:30, 10:30, 10:30] = 1
    region = torch.ones(work.shape[1:], dtype=torch.bool)
    report = lambda f, m: None  # noqa: E731
    with_p, _, n = seg.probabilities(work, tokens, 0.5, report, region=region, prior=prior)
    assert n > 0 and len(seen) > 0
    assert sum(float(p.sum()) for p in seen) > 0
    without, _, _ = seg.probabilities(work, tokens, 0.5, report, region=region)
    assert not torch.allclose(with_p, without)


def test_packed_registrations_become_real_priors_of_episodes(tmp_path, tiny_cfg):
    """`pack --registrations`: the engine's registration of one training case onto another, packed once; episodes
    whose query is that case take it as the prior (with probability real_prior_prob), simulated priors otherwise."""
    from IrisSegmentLib.training.registrations import coverage, load_registrations, pack_registrations

    packed = make_packed(tmp_path / "packed")
    done = pack_registrations(packed, 2, seed=0)
    assert done == {"btcv": 2}
    regs = load_registrations(packed)
    assert sum(len(v) for v in regs.values()) == 2 and coverage(regs).startswith("btcv 2 on")
    cases = {f"{c.dataset}/{c.case_id}": c for c in load(packed, "train")}
    key, (reg, *_) = next(iter(regs.items()))
    case = cases[key]
    for v in reg.values:  # the synthetic image is the label value: the registration carries each structure over well
        truth = torch.from_numpy(case.label == int(np.searchsorted(case.values, v)))
        assert dice(reg.on_case([v], case.label.shape) > 0.5, truth) > 0.6
    again = pack_registrations(packed, 2, seed=0)  # kept, not redone
    assert again == done and load_registrations(packed).keys() == regs.keys()

    from IrisSegmentLib.training.sampler import crop

    tc = dataclasses.replace(tiny_cfg.training, real_prior_prob=1.0)
    sampler = EpisodeSampler(load(packed, "train"), tc, seed=2, augment_images=False, registrations=regs)
    centre, size = (20, 18, 22), (24, 24, 24)
    got = sampler._registered(case, [[reg.values[0]], [12345]], centre, size)
    assert list(got) == [0]  # a class the registration does not hold keeps its simulated prior
    assert torch.equal(got[0], torch.from_numpy(crop(reg.on_case([reg.values[0]], case.label.shape).numpy(), centre, size, 0.0)))
    never = EpisodeSampler(load(packed, "train"), dataclasses.replace(tc, real_prior_prob=0.0), seed=2, registrations=regs)
    assert never._registered(case, [[reg.values[0]]], centre, size) is None
    unregistered = next(c for k, c in cases.items() if k not in regs)
    assert sampler._registered(unregistered, [[reg.values[0]]], centre, size) is None
