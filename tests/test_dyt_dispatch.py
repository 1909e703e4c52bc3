"""DyT's dispatcher options beyond the paper: the class-attention prior (gathered = masked, its
attention equals timm's, it ranks by attention from the start, its FLOPs equal FlopCounterMode's)
and top-k training masks (exactly the target count per image, straight-through gradient)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from petl_lightning.errors import PETLError
from petl_lightning.layers.dispatcher import gumbel_sigmoid_st, topk_st
from test_dyt import TINY, dyt, executed_flops, gathered, make, masked


def prior_model(fused: bool = False, weight: float = 1.0) -> torch.nn.Module:
    return make("mlp", fused=fused, class_attention_prior=weight)


def class_attention(blk: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The class token's attention to the patch tokens, averaged over heads, from timm's own module
    (its attention map read through a forward hook on ``attn_drop``, fused attention off)."""
    seen = []
    handle = blk.attn.attn_drop.register_forward_hook(lambda mod, inp, out: seen.append(out))
    fused, blk.attn.fused_attn = blk.attn.fused_attn, False
    try:
        blk.attn(blk.norm1(x))
    finally:
        handle.remove()
        blk.attn.fused_attn = fused
    return seen[0][:, :, 0, blk.num_prefix_tokens :].mean(1)


@pytest.mark.parametrize("fused", [False, True])
def test_prior_gathered_equals_masked_and_reads_timms_class_attention(fused: bool) -> None:
    m = prior_model(fused)
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        ref, ref_kept = masked(m, x)
        fast, kept = gathered(m, x)
        assert (fast - ref).abs().max().item() <= 1e-5
        assert torch.equal(kept, ref_kept)
        assert 0.2 < kept.double().mean().item() / m.vit.num_patches < 0.8
        blk, tokens = m.vit.blocks[0], m.vit.embed(x)
        update, prior = blk.attn_branch_and_class_attention(tokens)
        torch.testing.assert_close(update, blk.attn_branch(tokens), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(prior, class_attention(blk, tokens), atol=1e-6, rtol=1e-5)
        assert prior.shape == (5, m.vit.num_patches)
        assert bool(((prior.sum(1) > 0) & (prior.sum(1) < 1)).all())  # the class token attends to itself too


def test_prior_alone_keeps_the_tokens_the_class_token_attends_to_above_the_mean() -> None:
    """Zero linear dispatchers and threshold 0.5: the logit is ``log(P * a)``, so a token is kept
    exactly when its attention share is above the mean patch token's; the prior weight is learned."""
    m = prior_model()
    with torch.no_grad():
        for blk in m.vit.blocks:
            blk.dispatchers["mlp"].proj.weight.zero_()
    x = torch.randn(4, 3, 64, 64)
    blk, tokens = m.vit.blocks[0], m.vit.embed(x)
    with torch.no_grad():
        after_attn, prior = blk.attn_update(tokens)
        _, mask = blk.masked_site("mlp", after_attn, sample=False, prior=prior)
    assert torch.equal(mask.bool(), prior * m.vit.num_patches > 1.0)
    weights = [n for n, p in m.named_parameters() if n.endswith("prior_weight") and p.requires_grad]
    assert len(weights) == 3 and set(weights) <= set(m.trainable_state_keys())
    m.train()
    loss, _, _ = m.training_loss(x, torch.arange(4) % 5)
    loss.backward()
    assert all(blk.dispatchers["mlp"].prior_weight.grad.abs() > 0 for blk in m.vit.blocks)


def test_prior_flops_equal_the_flop_counter() -> None:
    m = prior_model()
    x = torch.randn(7, 3, 64, 64)
    for mode, run in (("gather", gathered), ("mask", masked)):
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            kept = run(m, x)[1]
        assert fc.get_total_flops() == 2 * int(executed_flops(m, kept, mode, norm=False).sum()), mode
    plain = make("mlp")
    s = m.vit.shape()
    ones = torch.full((1, m.vit.depth, 1), float(s.num_patches))
    extra = m.vit.executed_flops(ones) - plain.vit.executed_flops(ones)
    assert int(extra) == m.vit.depth * s.num_tokens * s.dim  # the class token's scores, per block


def test_topk_straight_through_keeps_exactly_the_count() -> None:
    logits = torch.randn(6, 40, requires_grad=True)
    torch.manual_seed(2)
    mask = topk_st(logits, 12, tau=5.0)
    assert torch.equal(mask.detach().sum(1), torch.full((6,), 12.0))
    torch.manual_seed(2)  # the same noise by hand: the kept tokens are the top 12 noisy logits
    u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
    noisy = logits.detach() + torch.log(u) - torch.log1p(-u)
    top = torch.zeros_like(noisy).scatter_(1, noisy.topk(12, dim=1).indices, 1.0)
    assert torch.equal(mask.detach(), top)
    (grad,) = torch.autograd.grad(mask.sum(), logits)
    ordered = noisy.sort(dim=1, descending=True).values
    cut = 0.5 * (ordered[:, 11:12] + ordered[:, 12:13])  # between the 12th and the 13th
    soft = torch.sigmoid((noisy - cut) / 5.0)
    torch.testing.assert_close(grad, soft * (1 - soft) / 5.0)  # the soft gradient around the cut
    assert torch.equal(topk_st(logits, 40), torch.ones(6, 40)) and torch.equal(topk_st(logits, 0), torch.zeros(6, 40))


def test_noise_zero_samples_the_inference_rule_with_the_same_gradient() -> None:
    logits = torch.randn(5, 30, requires_grad=True)
    top = torch.zeros(5, 30).scatter_(1, logits.detach().topk(9, dim=1).indices, 1.0)
    assert torch.equal(topk_st(logits, 9, noise=0.0).detach(), top)
    assert torch.equal(gumbel_sigmoid_st(logits, noise=0.0).detach(), (logits.detach() > 0).float())
    (grad,) = torch.autograd.grad(gumbel_sigmoid_st(logits, tau=2.0, noise=0.0).sum(), logits)
    soft = torch.sigmoid(logits.detach() / 2.0)
    torch.testing.assert_close(grad, soft * (1 - soft) / 2.0)
    x = torch.randn(3, 3, 64, 64)
    for noise, same in ((0.0, True), (1.0, False)):  # noise 0: the training masks are deterministic
        m = make("mlp", training_masks="topk", training_noise=noise, fixed_keep_rate=0.5).train()
        blk, tokens = m.vit.blocks[0], m.vit.embed(x)
        with torch.no_grad():
            masks = [blk.forward_masked(tokens, sample=True)[1] for _ in range(2)]
        assert torch.equal(*masks) is same
    with pytest.raises(PETLError, match="skipping.training_noise must be non-negative"):
        dyt(num_classes=5, training_noise=-1.0, **TINY)


def test_topk_training_masks_keep_the_target_count_in_every_block() -> None:
    with pytest.warns(UserWarning, match=r"set skipping.fixed_keep_rate: 0.3 \(the target_rate\)"):
        m = dyt(num_classes=5, target_rate=0.3, training_masks="topk", **TINY).train()
    x = torch.randn(4, 3, 64, 64)
    run = m.vit.run(x)
    count = round(0.3 * m.vit.num_patches)
    assert torch.equal(run.kept.detach(), torch.full_like(run.kept, float(count)))
    loss, _, terms = m.training_loss(x, torch.arange(4))
    assert terms["keep_rate"].item() == pytest.approx(count / m.vit.num_patches)
    loss.backward()
    assert all(blk.dispatchers["mlp"].proj.weight.grad.abs().sum() > 0 for blk in m.vit.blocks)


def test_prior_survives_a_checkpoint_and_bad_prior_settings_fail_in_one_line(tmp_path) -> None:
    L.seed_everything(0)
    m = dyt(num_classes=5, class_attention_prior=0.5, **TINY)
    with torch.no_grad():
        m.vit.blocks[1].dispatchers["mlp"].prior_weight.fill_(2.5)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_epochs=0)
    trainer.strategy.connect(m)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    again = type(m).load_from_checkpoint(tmp_path / "m.ckpt")
    assert again.vit.blocks[1].dispatchers["mlp"].prior_weight.item() == 2.5
    assert again.hparams.skipping["class_attention_prior"] == 0.5
    with pytest.raises(PETLError, match="class_attention_prior needs the block's attention before the dispatch"):
        dyt("attn_mlp", num_classes=5, class_attention_prior=1.0, **TINY)
    no_cls = {**TINY, "model_kwargs": {"depth": 2, "class_token": False, "global_pool": "avg"}}
    with pytest.raises(PETLError, match="needs timm's plain Attention and a class token"):
        dyt(num_classes=5, class_attention_prior=1.0, **no_cls)
    with pytest.raises(PETLError, match="Unknown skipping.training_masks 'hard'"):
        dyt(num_classes=5, training_masks="hard", **TINY)


def test_a_fixed_keep_rate_fit_skips_the_agreement_calibration() -> None:
    """Under ``fixed_keep_rate`` the top-k rule decides, so the epoch-end threshold search is not run."""
    from torch.utils.data import DataLoader, TensorDataset

    L.seed_everything(0)
    m = dyt(num_classes=4, training_masks="topk", target_rate=0.5, fixed_keep_rate=0.5, **TINY)
    x, y = torch.randn(16, 3, 64, 64), torch.arange(16) % 4
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(m, DataLoader(TensorDataset(x, y), batch_size=8))
    assert "calibration/threshold" not in trainer.callback_metrics and len(m.agreement_images) == 0
    assert m.vit.threshold == pytest.approx(0.5)  # untouched
