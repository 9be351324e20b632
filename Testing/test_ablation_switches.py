"""The ModelConfig ablation switches (issue 11): the design's defaults leave the network and its
fingerprint as they were, and every alternative does what its name says."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from IrisSegmentLib.config import ABLATION_CHOICES, BundleConfig, ModelConfig
from IrisSegmentLib.model import build_iris
from IrisSegmentLib.model.foreground_pooling import downsampled_pool, foreground_pool, upsample_then_pool

BUNDLED_FINGERPRINT = "b1a73429dabd"


def _tiny(tiny_cfg, **switches) -> IrisModel:
    torch.manual_seed(0)
    return build_iris(dataclasses.replace(tiny_cfg.model, **switches)).eval()


def _inputs(k: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(1, 1, 32, 32, 32, generator=g)
    masks = torch.zeros(1, k, 32, 32, 32)
    for i in range(k):
        masks[0, i, 4 + 8 * i : 10 + 8 * i, 6:20, 8:22] = 1
    query = torch.randn(1, 1, 32, 32, 32, generator=g)
    return ref, masks, query


def test_bundled_fingerprint_unchanged_and_switches_count_only_off_default(repo_root):
    cfg = BundleConfig.load(repo_root / "Resources" / "Models" / "iris-small" / "config.yaml").model
    assert cfg.fingerprint() == BUNDLED_FINGERPRINT
    seen = {cfg.fingerprint()}
    for name, choices in ABLATION_CHOICES.items():
        assert getattr(ModelConfig(), name) == choices[0]  # the design is the default
        assert dataclasses.replace(cfg, **{name: choices[0]}).fingerprint() == BUNDLED_FINGERPRINT
        for alt in choices[1:]:
            seen.add(dataclasses.replace(cfg, **{name: alt}).fingerprint())
    assert len(seen) == 1 + sum(len(c) - 1 for c in ABLATION_CHOICES.values())  # every alternative its own hash


def test_unknown_switch_value_is_refused(tiny_cfg):
    with pytest.raises(ValueError, match="foreground_pooling"):
        dataclasses.replace(tiny_cfg.model, foreground_pooling="bilinear").validate()


def test_upsample_then_pool_equals_adjoint_and_downsampling_does_not():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 6, 4, 4, 4, generator=g, dtype=torch.float64)
    mask = (torch.rand(2, 3, 32, 32, 32, generator=g) > 0.97).double()
    exact = foreground_pool(feats, mask)
    assert torch.allclose(upsample_then_pool(feats, mask), exact, atol=1e-12)
    assert (downsampled_pool(feats, mask) - exact).abs().max() > 1e-3


def test_pooling_switch_gives_the_same_tokens_as_the_design(tiny_cfg):
    ref, masks, _ = _inputs()
    design, upsampled = _tiny(tiny_cfg), _tiny(tiny_cfg, foreground_pooling="upsample-then-pool")
    assert design.state_dict().keys() == upsampled.state_dict().keys()
    with torch.no_grad():
        assert torch.allclose(design.encode_task(ref, masks), upsampled.encode_task(ref, masks), atol=1e-5)


@pytest.mark.parametrize("name,alt", [(n, a) for n, c in ABLATION_CHOICES.items() for a in c[1:]])
def test_every_alternative_trains_all_classes_in_one_call(tiny_cfg, name, alt):
    model = _tiny(tiny_cfg, **{name: alt}).train()
    ref, masks, query = _inputs()
    valid = torch.tensor([[True, True, False]])
    logits = model(query, ref, masks, valid)
    assert logits.shape == (1, 3, 32, 32, 32)
    logits[:, :2].sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_no_foreground_pooling_ignores_the_mask_in_the_foreground_token(tiny_cfg):
    ref, masks, _ = _inputs()
    other = masks.roll(5, dims=-1)
    with torch.no_grad():
        none = _tiny(tiny_cfg, foreground_pooling="none")
        design = _tiny(tiny_cfg)
        # before the attention: the design's slot 0 is the mask average, the ablation's a learnt vector
        f = design.encoder(ref)[-1]
        assert not torch.allclose(design.task_encoder._foreground(f, masks), design.task_encoder._foreground(f, other))
        assert torch.equal(none.task_encoder._foreground(f, masks), none.task_encoder._foreground(f, other))
        # the mask still reaches the tokens through the context path
        assert not torch.allclose(none.encode_task(ref, masks), none.encode_task(ref, other))


def test_pool_context_has_no_shuffle_path_and_reads_the_mask(tiny_cfg):
    model = _tiny(tiny_cfg, context_tokens="pool")
    assert not hasattr(model.task_encoder, "expand") and hasattr(model.task_encoder, "pool_merge")
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in _tiny(tiny_cfg).parameters())
    ref, masks, _ = _inputs()
    with torch.no_grad():
        assert not torch.allclose(model.encode_task(ref, masks), model.encode_task(ref, masks.roll(3, dims=-2)))


def test_one_way_decoder_does_not_update_the_tokens(tiny_cfg):
    model = _tiny(tiny_cfg, decoder_attention="one-way")
    block = model.decoder.fusion[0]
    assert not hasattr(block, "tok_from_img") and not hasattr(block, "tok_self")
    img, tok = torch.randn(1, 64, 32), torch.randn(1, 10, 32)
    with torch.no_grad():
        new_img, new_tok = block(img, tok, None)
    assert new_tok is tok and not torch.allclose(new_img, img)


def test_independent_classes_do_not_interact_and_joint_ones_do(tiny_cfg):
    ref, masks, query = _inputs()
    changed = masks.clone()
    changed[0, 2] = changed[0, 2].roll(6, dims=-1)  # only class 3's reference changes
    with torch.no_grad():
        for switch, interact in (("joint", True), ("independent", False)):
            model = _tiny(tiny_cfg, class_interaction=switch)
            a = model(query, ref, masks)
            b = model(query, ref, changed)
            assert torch.equal(a[:, :2], b[:, :2]) != interact
            assert not torch.allclose(a[:, 2], b[:, 2])


def test_independent_equals_one_call_per_class(tiny_cfg):
    model = _tiny(tiny_cfg, class_interaction="independent")
    ref, masks, query = _inputs()
    with torch.no_grad():
        tokens = model.encode_task(ref, masks)
        together = model.segment(query, tokens)
        alone = torch.cat([model.segment(query, tokens[:, k : k + 1]) for k in range(3)], 1)
    assert torch.allclose(together, alone, atol=1e-5)


def test_joint_task_attention_reads_the_reference(tiny_cfg):
    model = _tiny(tiny_cfg, task_attention="joint")
    ref, masks, _ = _inputs()
    with torch.no_grad():
        assert not torch.allclose(model.encode_task(ref, masks), model.encode_task(ref.flip(-1), masks))
