"""Dyn-Adapter over a DyT base: early exits and token skipping at once. Batch-shrinking inference with
gathered blocks equals a masked per-image reference (predictions, exits, per-layer keep counts) for
every batch size, threshold regime and keep regime; executed FLOPs equal FlopCounterMode; calibration
meets its budget on held-out data; the statistics carry exit shares and per-layer keep rates."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from petl_lightning.errors import ConfigError, MergeError
from petl_lightning.methods.dyn_adapter import DynAdapter
from petl_lightning.methods.dyt.block import DyTBlock

K = 5


def tiny(**kw: Any) -> DynAdapter:
    """A 4-block ViT-Ti at 64 px (16 patches), exits after blocks 1, 2, 3, every trainable tensor
    randomised and the dispatchers decisive enough to keep about half the tokens."""
    torch.manual_seed(0)
    args: dict[str, Any] = dict(
        base="dyt",
        num_classes=K,
        model_name="vit_tiny_patch16_224",
        pretrained=False,
        img_size=64,
        model_kwargs={"depth": 4},
        exits={"blocks": [1, 2, 3]},
        calibration={"budget": None},
    )
    args.update(kw)
    m = DynAdapter(**args)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * (0.1 if "head" in name else 0.05))
        for blk in m.vit.blocks:
            for d in blk.dispatchers.values():
                d.proj.weight.normal_(0.0, 0.5)
    m.vit.set_fused_attn(False)  # FlopCounterMode does not see the CPU SDPA kernel
    return m.eval()


def set_dispatch_bias(m: DynAdapter, value: float) -> None:
    with torch.no_grad():
        for blk in m.vit.blocks:
            for d in blk.dispatchers.values():
                d.proj.bias.fill_(value)


def per_image_masked_reference(m: DynAdapter, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image at a time, every block on the masked path (everything runs, skipped outputs are
    zeroed), stopping at the first confident exit: logits, exits, kept patch tokens per block."""
    logits, exits, kept = [], [], torch.zeros(x.shape[0], m.vit.depth)
    for i, img in enumerate(x):
        tokens, start = m.vit.embed(img[None]), 0
        for k, end in enumerate(m.exit_depths):
            for j in range(start, end):
                tokens, mask = m.vit.blocks[j].forward_masked(tokens, sample=False)
                kept[i, j] = int(mask.sum())
            start = end
            lg = m.model.exit_logits(k, tokens)
            if k == m.num_exits - 1 or float(m.model.confidence(lg)[0]) >= float(m.thresholds[k]):
                break
        logits.append(lg[0])
        exits.append(k)
    return torch.stack(logits), torch.tensor(exits), kept


def mixed_thresholds(m: DynAdapter, x: torch.Tensor) -> torch.Tensor:
    """Each early exit's threshold halfway between two neighbouring confidences near its median."""
    with torch.no_grad():
        conf = m.model.confidence(m.forward_exits(x))
    thr = []
    for c in conf[:-1]:
        c = c.sort().values
        j = next(j for j in range(len(c) // 2, len(c) - 1) if c[j + 1] - c[j] > 1e-4)
        thr.append(0.5 * float(c[j] + c[j + 1]))
    return torch.tensor(thr)


@pytest.mark.parametrize("placement", ["mlp", pytest.param("layer", marks=pytest.mark.slow)])
def test_shrinking_and_gathering_equal_the_masked_per_image_reference(placement: str) -> None:
    m = tiny(skipping={"sites": placement})
    x = torch.randn(64, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    p = m.vit.num_patches
    for keep, bias in (("mixed", 0.0), ("keep all", 1e4), ("keep none", -1e4)):
        set_dispatch_bias(m, bias)
        mixed = mixed_thresholds(m, x)
        for regime, thr in (("mixed", mixed), ("all out", torch.zeros(3)), ("none out", torch.full((3,), math.inf))):
            m.thresholds.copy_(thr)
            with torch.no_grad():
                ref_logits, ref_exits, ref_kept = per_image_masked_reference(m, x)
                if regime == "mixed":
                    assert set(ref_exits.tolist()) == {0, 1, 2, 3}, (keep, ref_exits.bincount())
                ran = m.model.offered(ref_exits) > 0
                if keep == "keep all":
                    assert torch.equal(ref_kept[ran], torch.full_like(ref_kept[ran], p))
                elif keep == "keep none":
                    assert int(ref_kept.sum()) == 0
                else:
                    assert 0.2 < ref_kept[ran].double().mean().item() / p < 0.8
                for bs in (1, 5, 64):
                    outs = [m.infer(xb) for xb in x.split(bs)]
                    label = (placement, keep, regime, bs)
                    assert torch.equal(torch.cat([o.exit_index for o in outs]), ref_exits), label
                    assert torch.equal(torch.cat([o.kept for o in outs]), ref_kept), label
                    assert torch.equal(torch.cat([o.offered for o in outs]) > 0, ran), label
                    logits = torch.cat([o.logits for o in outs])
                    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)


def test_executed_flops_equal_flop_counter_mode() -> None:
    """2 x (analytic FLOPs without LayerNorm) == FlopCounterMode on the shrinking + gathering forward:
    each image pays the blocks it ran at the tokens it kept, and the heads that were evaluated."""
    m = tiny()
    x = torch.randn(32, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    s = m.vit.shape()
    for thr in (mixed_thresholds(m, x), torch.tensor([math.inf, 0.6, 0.0])):
        m.thresholds.copy_(thr)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            res = m.infer(x)
        static = m.exit_costs(norm=False).of(m.thresholds)[0][res.exit_index]
        blocks = torch.zeros(x.shape[0], dtype=torch.float64)
        for j, blk in enumerate(m.vit.blocks):
            ran = res.offered[:, j] > 0
            counts = res.kept[ran, j][:, None]  # mlp placement: one site, no attention padding
            blocks[ran] += blk.executed_flops(counts, s, norm=False)
        assert fc.get_total_flops() == 2 * int((static + blocks).sum())
        assert len(set(res.exit_index.tolist())) >= 2
    # the model with no exit taken and every token kept costs the complete model, at the budget's reference
    set_dispatch_bias(m, 1e4)
    m.thresholds.fill_(math.inf)
    with torch.no_grad():
        full = m.infer(x[:4]).flops
    assert torch.equal(full, torch.full_like(full, float(m.full_flops())))
    assert m.full_flops() > m.backbone_flops()


def test_calibration_meets_the_budget_on_held_out_data() -> None:
    m = tiny()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(96, 3, 64, 64, generator=g), torch.randint(0, K, (96,), generator=g)
    for budget in (0.35, 0.6):
        res = m.calibrate((x, y), budget)
        with torch.no_grad():
            out = m.infer(x)
        measured = float(out.flops.mean())
        assert measured <= budget * m.full_flops() * (1 + 1e-9)
        assert measured == pytest.approx(res["gflops"] * 1e9, rel=1e-9)  # the table's costs are what ran
        acc = float((out.logits.argmax(1) == y).double().mean())
        assert acc == pytest.approx(res["acc"], abs=1e-12)


def test_validation_statistics_equal_the_dynamic_path() -> None:
    """The held-out table (what validation records) gives the same GFLOPs, exit shares and per-layer
    keep rates as running the dynamic path on those images."""
    m = tiny()
    x = torch.randn(40, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    y = torch.randint(0, K, (40,))
    m.thresholds.copy_(mixed_thresholds(m, x))
    m.record_exits(m.collect_exits((x, y)))
    table = m.inference_stats()
    m.reset_inference_stats()
    with torch.no_grad():
        m.inference_meter.update(m.infer(x), y)
    direct = m.inference_stats()
    for key in ("gflops", "exit_share", "keep_rate_per_layer", "keep_rate"):
        torch.testing.assert_close(table[key], direct[key], msg=key)
    rates = direct["keep_rate_per_layer"]
    assert rates.shape == (4,) and bool(((rates > 0.05) & (rates < 0.95)).all())


def test_training_adds_the_rate_loss_and_reaches_the_dispatchers() -> None:
    m = tiny(skipping={"w_complete_cls": 1.0, "w_distill": 1.0}).train()
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, K, (8,))
    loss, logits, terms = m.training_loss(x, y)
    assert {"loss_rate", "loss_complete_cls", "loss_distill", "keep_rate", "ce_exit1", "ce_exit4"} <= set(terms)
    exits = sum(float(terms[f"ce_exit{d}"]) * float(terms[f"w_exit{d}"]) for d in m.exit_depths)
    extra = 2.0 * float(terms["loss_rate"]) + float(terms["loss_complete_cls"]) + float(terms["loss_distill"])
    assert float(loss) == pytest.approx(exits + extra, rel=1e-5)
    loss.backward()
    assert all(cast_grad(blk).abs().sum() > 0 for blk in m.vit.blocks), (
        "the straight-through masks must pass a gradient to every dispatcher"
    )


def cast_grad(blk: Any) -> torch.Tensor:
    assert isinstance(blk, DyTBlock)
    grad = blk.dispatchers["mlp"].proj.weight.grad
    assert grad is not None
    return grad


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"skipping": {"target_rate": 1.5}}, "skipping.target_rate"),
        ({"skipping": {"fixed_keep_rate": -0.1}}, "skipping.fixed_keep_rate"),
        ({"skipping": {"sites": "heads"}}, "skipping.sites"),
        ({"skipping": {"placement": "mlp"}}, r"Unknown key\(s\) \['placement'\] for skipping"),
        ({"base": "repadapter", "skipping": {"target_rate": 0.3}}, "base='dyt' only"),
    ],
)
def test_bad_skipping_options_are_refused_in_one_line(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        tiny(**kw)
    assert "\n" not in str(err.value)


def test_the_dyt_base_does_not_merge() -> None:
    with pytest.raises(MergeError, match="decides per token"):
        tiny().merge()


def test_fixed_keep_rate_keeps_the_same_count_everywhere() -> None:
    m = tiny(skipping={"fixed_keep_rate": 0.25})
    m.thresholds.fill_(math.inf)
    with torch.no_grad():
        out = m.infer(torch.randn(6, 3, 64, 64))
    assert torch.equal(out.kept, torch.full_like(out.kept, 4))  # round(0.25 * 16) in every block
