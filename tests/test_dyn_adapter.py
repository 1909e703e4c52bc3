"""Dyn-Adapter: batch-shrinking inference equals a per-image loop, FLOPs equal FlopCounterMode,
the loss schedule, gradient stop, dropout schedule and gradient mask do what they say, calibration
meets its budget on held-out data, and a short real run on dtd10 keeps its accuracy at half the FLOPs."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from lightning.pytorch.loggers import Logger
from timm.models.vision_transformer import Block
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from petl_lightning.adapted import AdaptedViT
from petl_lightning.callbacks import ExitCurveLogger
from petl_lightning.errors import ConfigError, MergeError
from petl_lightning.layers.adapter import Adapter
from petl_lightning.layers.exits import ExitHead
from petl_lightning.layers.wrapper import adapter_layers, merge_adapter_layers
from petl_lightning.methods.dyn_adapter import DynAdapter
from petl_lightning.methods.dyn_adapter.thresholds import (
    ExitCosts,
    ExitOutputs,
    assign_exits,
    confidence,
    evaluate_thresholds,
    search_thresholds,
    single_exit_points,
    single_exit_thresholds,
)
from petl_lightning.methods.lora.layer import LoRALinear

BASES = ["adapter", "lora", "repadapter", "arc"]
K = 5


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core CPU a second OpenMP thread mostly waits for a time
    slice (measured under load: the tiny models 40x and the dtd10 run 10x slower with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(base: str = "repadapter", **kw) -> DynAdapter:
    """A 4-block random ViT-Tiny at 32 px with exits after blocks 1, 2, 3, whose PETL modules and
    heads are randomised (a fresh model's adapters are the identity and its heads near-uniform)."""
    torch.manual_seed(0)
    args = dict(
        base=base,
        num_classes=K,
        model_name="vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        model_kwargs={"depth": 4},
        exits={"blocks": [1, 2, 3]},
        calibration={"budget": None},
        adapter_dim=16 if base == "arc" else None,
    )
    args.update(kw)
    m = DynAdapter(**args)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * (0.1 if "head" in name else 0.05))
    return m.eval()


def exit_flops(m: DynAdapter, vit: AdaptedViT | None = None, norm: bool = True) -> torch.Tensor:
    """FLOPs (E,) of leaving at each exit at ``m``'s thresholds, for a base whose blocks cost the same for
    every image: the heads and embedding (``exit_costs``) plus the blocks up to the exit (closed form)."""
    vit = m.vit if vit is None else vit
    per_block = vit.block_flops(torch.zeros(1, vit.depth, 0), norm=norm)[0]
    blocks = per_block.cumsum(0)[[d - 1 for d in m.exit_depths]]
    return m.exit_costs(vit, norm).of(m.thresholds)[0] + blocks


def per_image_reference(m: DynAdapter, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One image at a time: run the blocks up to each exit, stop at the first confident exit."""
    logits, exits = [], []
    for img in x:
        tokens, start = m.vit.embed(img[None]), 0
        for k, end in enumerate(m.exit_depths):
            tokens = m.vit.forward_blocks(tokens, start, end).tokens
            start = end
            lg = m.model.exit_logits(k, tokens)
            if k == m.num_exits - 1 or float(m.model.confidence(lg)[0]) >= float(m.thresholds[k]):
                break
        logits.append(lg[0])
        exits.append(k)
    return torch.stack(logits), torch.tensor(exits)


def mixed_thresholds(m: DynAdapter, x: torch.Tensor, q: float = 0.4) -> torch.Tensor:
    """Per-exit thresholds near the ``q`` quantile of that exit's confidences, halfway between two
    neighbouring confidences at least 1e-4 apart (so float noise cannot move an image across)."""
    with torch.no_grad():
        conf = m.model.confidence(m.forward_exits(x)).T
    thr = []
    for k in range(conf.shape[1] - 1):
        c = conf[:, k].sort().values
        j = next(j for j in range(int(q * len(c)), len(c) - 1) if c[j + 1] - c[j] > 1e-4)
        thr.append(0.5 * float(c[j] + c[j + 1]))
    return torch.tensor(thr)


# ------------------------------------------------------------------------------------------------
# Dynamic inference
# ------------------------------------------------------------------------------------------------
def test_confidence_measures() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [30.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    p = logits.softmax(-1)
    torch.testing.assert_close(confidence(logits, "max_softmax"), p.max(-1).values)
    ent = 1 + (p * p.log()).sum(-1) / math.log(4)
    torch.testing.assert_close(confidence(logits, "entropy"), ent)
    assert confidence(logits, "entropy")[0].abs() < 1e-6 and confidence(logits, "entropy")[1] > 0.999


@pytest.mark.parametrize("base,conf", [(b, "max_softmax") for b in BASES] + [("repadapter", "entropy")])
def test_batched_dynamic_path_equals_per_image_loop(base: str, conf: str) -> None:
    m = tiny(base, calibration={"budget": None, "confidence": conf})
    torch.manual_seed(1)
    x = torch.randn(64, 3, 32, 32)
    mixed = mixed_thresholds(m, x)
    skip_middle = mixed.clone()
    skip_middle[1] = math.inf  # exit 2 takes no image, so its head is not even evaluated
    settings = {
        "mixed": mixed,
        "skip a head": skip_middle,
        "all_early": torch.zeros(3),
        "none_early": torch.full((3,), math.inf),
    }
    with torch.no_grad():
        for name, thr in settings.items():
            m.thresholds.copy_(thr)
            costs = exit_flops(m)
            ref_logits, ref_exits = per_image_reference(m, x)
            assert torch.equal(m.model.infer_reference(x).exit_index, ref_exits)
            if name == "all_early":
                assert bool((ref_exits == 0).all())
            elif name == "none_early":
                assert bool((ref_exits == 3).all())
            elif name == "mixed":  # every exit used
                assert set(ref_exits.tolist()) == {0, 1, 2, 3}, ref_exits.bincount()
            else:
                assert 1 not in set(ref_exits.tolist()) and len(set(ref_exits.tolist())) == 3
            for bs in (1, 5, 64):
                outs = [m.infer(xb) for xb in x.split(bs)]
                logits = torch.cat([o.logits for o in outs])
                exits = torch.cat([o.exit_index for o in outs])
                assert torch.equal(exits, ref_exits), (name, bs)
                assert torch.equal(logits.argmax(1), ref_logits.argmax(1)), (name, bs)
                torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
                assert torch.equal(torch.cat([o.flops for o in outs]), costs[ref_exits])
    # forward returns the same logits and records nothing; the statistics get what infer executed
    m.thresholds.copy_(mixed)
    with torch.no_grad():
        out = m(x)
        ref_logits, ref_exits = per_image_reference(m, x)
        assert m.inference_meter.update_count == 0
        m.inference_meter.update(m.infer(x))
    torch.testing.assert_close(out, ref_logits, atol=1e-5, rtol=1e-5)
    stats = m.inference_stats()
    share = torch.bincount(ref_exits, minlength=4).double() / 64
    torch.testing.assert_close(stats["exit_share"], share)
    costs = exit_flops(m)
    assert float(stats["gflops"]) == pytest.approx(float((share * costs).sum()) / 1e9, rel=1e-12)


def spread_thresholds(m: DynAdapter, x: torch.Tensor) -> torch.Tensor:
    """Per-exit thresholds under which every exit takes some of ``x``: at early exit k, about 1 / (E - k)
    of the images still running leave, the threshold halfway between two confidences at least 1e-4 apart."""
    with torch.no_grad():
        conf = m.model.confidence(m.forward_exits(x)).T  # (N, E)
    running, thr = torch.ones(conf.shape[0], dtype=torch.bool), []
    for k in range(conf.shape[1] - 1):
        c = conf[running, k].sort(descending=True).values
        j = next(j for j in range(max(len(c) // (conf.shape[1] - k), 1) - 1, len(c) - 1) if c[j] - c[j + 1] > 1e-4)
        thr.append(0.5 * float(c[j] + c[j + 1]))
        running &= conf[:, k] < thr[-1]
    return torch.tensor(thr)


@pytest.mark.parametrize("base", BASES)
def test_executed_flops_equal_flop_counter(base: str) -> None:
    """2 x analytic FLOPs (no LayerNorm) == FlopCounterMode on the batch-shrinking forward (also
    when a head is skipped), so the reported saving is what ran; the full model = backbone + PETL."""
    m = tiny(base)
    m.vit.set_fused_attn(False)
    x = torch.randn(16, 3, 32, 32)
    mixed = spread_thresholds(m, x)
    for thr in (mixed, torch.cat([mixed[:1], torch.tensor([math.inf]), mixed[2:]])):
        m.thresholds.copy_(thr)
        costs = exit_flops(m, norm=False)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            res = m.infer(x)
        assert len(set(res.exit_index.tolist())) >= 3
        assert fc.get_total_flops() == 2 * int(costs[res.exit_index].sum())
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m.head(m.vit.run(x).features)
    assert fc.get_total_flops() == 2 * 16 * m.full_flops(norm=False)
    n = m.vit.num_tokens
    assert m.full_flops() == m.backbone_flops() + sum(a.flops(n) for a in adapter_layers(m.vit))


@pytest.mark.parametrize("base", ["lora", "repadapter", "arc"])
def test_merged_inference_equals_unmerged_and_costs_only_the_backbone(base: str) -> None:
    m = tiny(base)
    x = torch.randn(32, 3, 32, 32)
    m.thresholds.copy_(mixed_thresholds(m, x))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        ref = m.infer(x)
        merged = m.merge()  # a plain timm ViT with the final head; this module is not modified
        assert type(merged) is timm.models.vision_transformer.VisionTransformer
        torch.testing.assert_close(merged(x), m.forward_exits(x)[-1], atol=1e-4, rtol=1e-4)
        merged_vit = AdaptedViT(merged, merged.blocks)
        out = m.infer(x, vit=merged_vit)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert torch.equal(out.exit_index, ref.exit_index)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=1e-4)
    assert m.full_flops(merged=True) == m.backbone_flops() < m.full_flops()
    fresh = timm.create_model("vit_tiny_patch16_224", num_classes=K, img_size=32, depth=4)
    fresh.load_state_dict(merged.state_dict(), strict=True)
    m.vit.set_fused_attn(False)
    for b in merged.blocks:
        b.attn.fused_attn = False
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        res = m.infer(x, vit=merged_vit)
    costs = exit_flops(m, merged_vit, norm=False)
    assert fc.get_total_flops() == 2 * int(costs[res.exit_index].sum())


def test_bottleneck_adapter_base_cannot_merge() -> None:
    with pytest.raises(MergeError, match="non-linear"):
        tiny("adapter").merge()


def test_lora_wraps_the_frozen_qkv_and_merges_exactly() -> None:
    """A LoRALinear around timm's fused qkv: timm's own attention runs unchanged and equals the block
    with W_qkv + scale B A (fused and not); merge_lora gives back plain Linears."""
    torch.manual_seed(0)
    blk = Block(64, 4, qkv_bias=True).eval()
    plain = Block(64, 4, qkv_bias=True).eval()
    plain.load_state_dict(blk.state_dict())
    blk.attn.qkv = LoRALinear(blk.attn.qkv, adapter_dim=4, scale=2.0, dropout=0.0)
    torch.nn.init.normal_(blk.attn.qkv.lora_b, std=0.1)
    merged = Block(64, 4, qkv_bias=True).eval()
    merged.load_state_dict(plain.state_dict())
    with torch.no_grad():
        merged.attn.qkv.weight += blk.attn.qkv.delta_weight()
    x = torch.randn(3, 10, 64)
    for fused in (True, False):
        blk.attn.fused_attn = merged.attn.fused_attn = fused
        torch.testing.assert_close(blk(x), merged(x), atol=1e-5, rtol=1e-5)
    assert (blk(x) - plain(x)).abs().max() > 1e-3  # the update does something
    folded = merge_adapter_layers(copy.deepcopy(blk))
    assert type(folded.attn.qkv) is torch.nn.Linear
    torch.testing.assert_close(folded(x), blk(x), atol=1e-5, rtol=1e-5)


def test_fresh_petl_is_identity_and_heads_are_balanced() -> None:
    """Untrained adapter/LoRA/RepAdapter bases leave the backbone unchanged; head widths fall with depth."""
    from petl_lightning.backbone import FrozenViT

    kw = dict(
        num_classes=K,
        model_name="vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        model_kwargs={"depth": 4},
        exits={"blocks": [1, 2, 3]},
    )
    x = torch.randn(2, 3, 32, 32)
    for base in ("adapter", "lora", "repadapter"):
        torch.manual_seed(0)
        plain = FrozenViT("vit_tiny_patch16_224", pretrained=False, img_size=32, model_kwargs={"depth": 4}).eval()
        torch.manual_seed(0)
        m = DynAdapter(base=base, **kw).eval()  # the same backbone weights (built first, same seed)
        with torch.no_grad():
            torch.testing.assert_close(m.forward_exits(x)[-1], m.head(plain(x)))
    m = DynAdapter(num_classes=K, model_name="vit_tiny_patch16_224", pretrained=False, img_size=32)
    assert m.exit_depths == [3, 6, 9, 12]
    assert [h.hidden for h in m.model.exit_heads] == [256, 128, 0]
    assert all(isinstance(h, ExitHead) for h in m.model.exit_heads)
    assert m.is_head_parameter("model.exit_heads.0.fc1.weight")
    assert not m.is_head_parameter("model.vit.blocks.0.attn.qkv.down.weight")


# ------------------------------------------------------------------------------------------------
# Training: schedule, gradient stop, forward and backward sparsity
# ------------------------------------------------------------------------------------------------
def test_loss_weight_schedules() -> None:
    m = tiny(loss={"start": 0.1, "end": 1.0, "ramp": (0.0, 0.5)})
    w = [m.loss_weights(t) for t in (0.0, 0.25, 0.5, 1.0)]
    assert w[0] == pytest.approx([0.1, 0.1, 0.1, 1.0])
    assert w[1] == pytest.approx([0.55, 0.55, 0.55, 1.0])
    assert w[2] == pytest.approx([1.0] * 4) and w[3] == pytest.approx([1.0] * 4)
    m.loss_schedule.kind = "cosine"
    assert m.loss_weights(0.125)[0] == pytest.approx(0.1 + 0.9 * 0.5 * (1 - math.cos(math.pi / 4)))
    m.loss_schedule.kind = "step"
    assert m.loss_weights(0.49)[0] == pytest.approx(0.1) and m.loss_weights(0.5)[0] == pytest.approx(1.0)
    m.loss_schedule.kind = "constant"
    assert m.loss_weights(0.0)[0] == pytest.approx(1.0)
    # The loss is the weighted sum of the exits' cross-entropies.
    m.train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, K, (4,))
    m.loss_schedule.kind = "linear"
    torch.manual_seed(3)
    loss, logits, terms = m.training_loss(x, y)
    weights = m.loss_weights(1.0)
    ces = [terms[f"ce_exit{d}"] for d in m.exit_depths]
    assert loss.item() == pytest.approx(sum(w * c for w, c in zip(weights, ces)).item(), rel=1e-5)
    assert logits.shape == (4, K)


def test_exit_grad_scale_scales_or_stops_the_early_exit_gradient() -> None:
    """An early exit's loss reaches the blocks below it scaled by exit_grad_scale (0 = stopped);
    its own head always trains, and nothing above it is touched."""
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, K, (4,))
    grads = {}
    for scale in (1.0, 0.5, 0.0):
        m = tiny(
            exits={"blocks": [1, 2, 3], "grad_scale": scale, "dropout": 0.0}, sparsity={"adapter_dropout": [0.0, 0.0]}
        ).train()
        torch.nn.functional.cross_entropy(m.forward_exits(x)[1], y).backward()  # exit after block 2 only
        grads[scale] = {
            n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for n, p in m.named_parameters()
            if p.requires_grad
        }
    below = [n for n in grads[1.0] if n.startswith(("model.vit.blocks.0.", "model.vit.blocks.1."))]
    above = [
        n
        for n in grads[1.0]
        if n.startswith(
            ("model.vit.blocks.2.", "model.vit.blocks.3.", "model.head.", "model.exit_heads.0.", "model.exit_heads.2.")
        )
    ]
    assert sum(grads[1.0][n].abs().sum() for n in below) > 0
    for n in below:
        torch.testing.assert_close(grads[0.5][n], 0.5 * grads[1.0][n])
        assert not grads[0.0][n].any()
    for scale in (1.0, 0.5, 0.0):
        assert not any(grads[scale][n].any() for n in above)
        head = "model.exit_heads.1.fc2.weight"
        torch.testing.assert_close(grads[scale][head], grads[1.0][head])


def test_adapter_dropout_falls_with_depth_and_only_acts_in_training() -> None:
    m = tiny("lora", sparsity={"adapter_dropout": [0.4, 0.1]})
    rates = [b.attn.qkv.dropout.p for b in m.vit.blocks]
    assert rates == pytest.approx([0.4, 0.3, 0.2, 0.1])
    m2 = tiny("repadapter", sparsity={"adapter_dropout": [0.5, 0.2, 0.2, 0.0]})
    assert [b.mlp.fc1.dropout.p for b in m2.vit.blocks] == pytest.approx([0.5, 0.2, 0.2, 0.0])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        m.eval()
        torch.testing.assert_close(m.forward_exits(x), m.forward_exits(x))
        m.train()
        assert (m.forward_exits(x) - m.forward_exits(x)).abs().max() > 1e-4


def _loader(n: int = 32, bs: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, K, (n,), generator=g)), batch_size=bs
    )


def test_gradient_mask_gradient_mode() -> None:
    m = tiny(sparsity={"grad_keep": 0.25, "grad_mask_mode": "gradient"})
    petl = m.adapter_parameters()
    assert petl and all(not m.is_head_parameter(n) for n, p in m.named_parameters() if any(p is q for q in petl))
    for p in m.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    torch.manual_seed(0)
    m.on_before_optimizer_step(None)
    g = torch.cat([p.grad.flatten() for p in petl])
    assert set(g.unique().tolist()) == {0.0, 4.0}
    assert (g > 0).double().mean().item() == pytest.approx(0.25, abs=0.02)
    assert all(bool((p.grad == 1).all()) for p in m.model.exit_heads.parameters())


def test_gradient_mask_update_mode_in_a_real_step() -> None:
    """With keep=0.3 about 30% of the PETL entries move in a step; heads all move; keep=1 moves all."""
    for keep in (0.3, 1.0):
        m = tiny(
            sparsity={"grad_keep": keep, "grad_mask_mode": "update", "adapter_dropout": [0.0, 0.0]},
            lr=1e-2,
            warmup_epochs=0,
        ).train()
        before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
        L.seed_everything(0)
        trainer = L.Trainer(
            max_steps=1,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )
        trainer.fit(m, _loader())
        petl_ids = {id(p) for p in m.adapter_parameters()}
        moved = {n: (p.detach() != before[n]) for n, p in m.named_parameters() if p.requires_grad}
        petl_moved = torch.cat([v.flatten() for n, v in moved.items() if id(dict(m.named_parameters())[n]) in petl_ids])
        head_moved = torch.cat([v.flatten() for n, v in moved.items() if m.is_head_parameter(n)])
        assert head_moved.double().mean().item() > 0.99
        assert petl_moved.double().mean().item() == pytest.approx(keep, abs=0.03)


# ------------------------------------------------------------------------------------------------
# Calibration, sweep, statistics
# ------------------------------------------------------------------------------------------------
def _table(conf: torch.Tensor, correct: torch.Tensor) -> ExitOutputs:
    """An exit table whose predictions are right exactly where ``correct`` says (label 0); no block costs
    (the exit costs below hold them)."""
    n, e = conf.shape
    zeros = torch.zeros(n, dtype=torch.long)
    return ExitOutputs(conf, torch.where(correct, 0, 1), zeros, torch.zeros(n, e, dtype=torch.float64), zeros[:, None])


def test_search_thresholds_matches_brute_force() -> None:
    torch.manual_seed(0)
    n, e = 12, 3
    conf = torch.rand(n, e)
    correct = torch.rand(n, e) < torch.tensor([0.4, 0.6, 0.9])
    out = _table(conf, correct)
    costs = ExitCosts(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    vals = sorted(set(conf[:, :-1].flatten().tolist())) + [math.inf]
    cands = torch.tensor([[a, b] for a in vals for b in vals])
    acc, cost, _ = evaluate_thresholds(out, costs, cands)
    for budget in (1.3, 1.8, 2.4):
        best = acc[cost <= budget + 1e-12].max().item()
        thr, got, got_cost, share = search_thresholds(out, costs, budget, "grid", resolution=n + 1)
        assert got == pytest.approx(best) and got_cost <= budget + 1e-12
        ex = assign_exits(conf, thr)
        assert correct[torch.arange(n), ex].double().mean().item() == pytest.approx(got)
        assert costs.fixed[ex].mean().item() == pytest.approx(got_cost)
        for policy in ("pareto", "geometric", "shared"):
            _, a, c, _ = search_thresholds(out, costs, budget, policy)
            assert c <= budget + 1e-12 and a <= best + 1e-12
    with pytest.raises(ConfigError, match="cheapest"):
        search_thresholds(out, costs, 0.9)


def test_heads_are_paid_only_where_they_can_take_images() -> None:
    """Cost of leaving at exit k: its depth, its own head, and the earlier heads with a finite
    threshold; "everything at exit k" therefore costs exactly the model truncated after exit k."""
    costs = ExitCosts(
        torch.tensor([10.0, 20.0, 30.0, 40.0], dtype=torch.float64), torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    )
    inf = math.inf
    got = costs.of(torch.tensor([[0.5, inf, 0.5], [inf, inf, inf], [inf, -inf, inf]]))
    assert got.tolist() == [[11, 23, 35, 45], [11, 22, 34, 40], [11, 22, 36, 42]]
    assert costs.of(single_exit_thresholds(4)).diagonal().tolist() == [11, 22, 34, 40]


@pytest.mark.parametrize("policy", ["pareto", "geometric", "shared", "grid"])
def test_calibration_meets_budget_on_held_out_data(policy: str) -> None:
    m = tiny()
    held_out = _loader(48, 16, seed=5)
    res = m.calibrate(held_out, budget=0.5, policy=policy)
    assert m.calibrated and m.thresholds.tolist() == pytest.approx(res["thresholds"])
    # Run the real dynamic path over the held-out data and read the executed FLOPs.
    with torch.no_grad():
        for x, _ in held_out:
            m.inference_meter.update(m.infer(x))
    stats = m.inference_stats()
    assert float(stats["flops_ratio"]) <= 0.5 + 1e-12
    assert float(stats["flops_ratio"]) == pytest.approx(res["flops_ratio"])
    assert stats["exit_share"].tolist() == pytest.approx(res["exit_share"])
    assert "model.thresholds" in m.trainable_state_keys()


def test_calibration_never_does_worse_than_the_best_single_exit_it_can_afford() -> None:
    m = tiny()
    out = m.collect_exits(_loader(48, 16, seed=5))
    costs, full = m.exit_costs(), m.full_flops()
    single = single_exit_points(out, costs)
    for point in m.curve(out, budgets=(0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)):
        affordable = [p["acc"] for p in single if p["gflops"] * 1e9 <= point["budget"] * full * (1 + 1e-9)]
        assert point["acc"] >= max(affordable) - 1e-12, point


def test_calibrate_refuses_a_datamodule_without_held_out_split(dtd10_root: Path) -> None:
    from petl_lightning.data.vtab import VTAB1kDataModule

    m = tiny()
    dm = VTAB1kDataModule(str(dtd10_root), "dtd10", protocol="trainval_test", img_size=32, num_workers=0)
    with pytest.raises(ConfigError, match="train_val"):
        m.calibrate(dm, 0.5)
    with pytest.raises(ConfigError, match="budget"):
        m.calibrate(_loader(), 1.5)


class _ImageLogger(Logger):
    """Records what a W&B-like logger would be sent."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[tuple[str, list]] = []
        self.metrics: list[dict] = []

    name, version = "mem", 0

    @property
    def experiment(self) -> None:
        return None

    def log_image(self, key: str, images: list) -> None:
        self.images.append((key, images))

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.metrics.append(metrics)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


class _RandomData(L.LightningDataModule):
    def __init__(self, val_split: str | None = "val200") -> None:
        super().__init__()
        self.val_split = val_split

    def train_dataloader(self) -> DataLoader:
        return _loader(32, 16, seed=4)

    def val_dataloader(self) -> DataLoader:
        return _loader(48, 16, seed=5)

    def test_dataloader(self) -> DataLoader:
        return _loader(32, 16, seed=6)


def test_every_validation_epoch_calibrates_and_fit_draws_the_curve(tmp_path: Path) -> None:
    """The module calibrates by itself at each validation epoch's last batch, so the statistics the
    callbacks read at its end (wherever they sit in the list) are those of thresholds calibrated on
    that epoch's held-out exits (no +inf, no flat charts during fit); ExitCurveLogger saves and logs the
    curve at fit's end; the checkpoint carries the calibration."""
    m = tiny(calibration={"budget": 0.6}, lr=1e-2, warmup_epochs=0)
    logger = _ImageLogger()
    from petl_lightning.callbacks import ExitRateLogger, FlopsLogger, PETLCheckpoint

    curve, flops = ExitCurveLogger(), FlopsLogger()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        callbacks=[ExitRateLogger(charts=False), flops, curve, PETLCheckpoint()],
    )
    trainer.fit(m, datamodule=_RandomData())
    res = m.calibration_result
    assert res is not None and res["budget"] == 0.6 and res["step"] == trainer.global_step
    stats = flops.last_stats["val"]
    assert float(stats["gflops"]) / float(stats["gflops_full"]) == pytest.approx(res["flops_ratio"])
    assert float(stats["gflops"]) / float(stats["gflops_full"]) <= 0.6 + 1e-9
    assert torch.isfinite(m.thresholds).any()
    metrics = trainer.callback_metrics
    assert float(metrics["val/acc"]) == pytest.approx(res["acc"], abs=1e-6) == float(metrics["calibration/acc"])
    assert {"val/acc_exit1", "val/acc_exit4", "val/gflops_per_image"} <= set(metrics)
    assert curve.curve_path is not None and curve.curve_path.stat().st_size > 5000
    assert [k for k, _ in logger.images] == ["dyn_adapter/acc_vs_gflops"]
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["petl"]["calibration"]["thresholds"] == pytest.approx(m.thresholds.tolist())


def test_a_plain_trainer_calibrates_and_tests_on_the_held_out_split_first() -> None:
    """Without any callback: ``trainer.test`` of an uncalibrated model calibrates on the DataModule's
    validation split before testing; with no held-out split it warns and keeps +inf."""
    m = tiny(calibration={"budget": 0.5})
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.test(m, datamodule=_RandomData(), verbose=False)
    assert m.calibrated and m.calibration_result["flops_ratio"] <= 0.5
    assert not bool(torch.isposinf(m.thresholds).all())  # calibrated: no longer every image to the end
    assert m.inference_stats()["images"].item() == 32
    m2 = tiny(calibration={"budget": 0.5})
    with pytest.warns(UserWarning, match="no held-out split"):
        trainer.test(m2, datamodule=_RandomData(val_split=None), verbose=False)
    assert not m2.calibrated and bool(torch.isinf(m2.thresholds).all())
    assert m2.inference_stats()["exit_share"].tolist() == [0.0, 0.0, 0.0, 1.0]


def test_thresholds_survive_a_checkpoint(tmp_path: Path) -> None:
    m = tiny()
    m.calibrate(_loader(), 0.5)
    trainer = L.Trainer(
        max_steps=0, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.strategy.connect(m)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    state = torch.load(tmp_path / "m.ckpt", weights_only=True)["state_dict"]
    assert "model.thresholds" in state and not any(k.startswith("model.vit.vit.") for k in state)
    loaded = DynAdapter.load_from_checkpoint(tmp_path / "m.ckpt")
    assert torch.equal(loaded.thresholds, m.thresholds) and loaded.calibrated
    assert loaded.calibration_result == m.calibration_result
    fixed = DynAdapter.load_from_checkpoint(tmp_path / "m.ckpt", calibration={"budget": None, "thresholds": [0.0]})
    assert fixed.thresholds.tolist() == [0.0, 0.0, 0.0]  # thresholds given now win over the stored ones


def test_bad_arguments_raise_clear_errors() -> None:
    common = dict(
        num_classes=K, model_name="vit_tiny_patch16_224", pretrained=False, img_size=32, model_kwargs={"depth": 4}
    )
    for bad, match in [
        (dict(exits={"blocks": [2, 1]}), "exits.blocks"),
        (dict(exits={"blocks": [4]}), "exits.blocks"),
        (dict(base="prompt"), "base"),
        (dict(exits={"blocks": [1, 2], "hidden": [8]}), "exits.hidden"),
        (dict(exits={"blocks": [1, 2]}, calibration={"thresholds": [0.5, 0.5, 0.5]}), "thresholds"),
        (dict(sparsity={"grad_keep": 0.0}), "grad_keep"),
        (dict(sparsity={"adapter_dropout": [0.1, 0.2, 0.3]}), "adapter_dropout"),
        (dict(loss={"ramp": (0.6, 0.2)}), "loss.ramp"),
        (dict(exits={"blockz": [1]}), "Unknown key"),
    ]:
        with pytest.raises(ConfigError, match=match):
            DynAdapter(**common, **bad)
    assert Adapter(8, 2).flops(3) == 3 * 2 * 8 * 2


def test_recipe_parses_and_builds() -> None:
    """The CLI accepts every key of recipes/dyn_adapter.yaml; its model builds (random weights)
    with the documented defaults: RepAdapter base, exits after 3/6/9, 100 epochs, warm-up + cosine."""
    from conftest import recipe_config

    recipe = Path(__file__).resolve().parent.parent / "recipes" / "dyn_adapter.yaml"
    cfg = recipe_config(recipe)
    assert cfg["model"]["class_path"] == "petl_lightning.methods.dyn_adapter.DynAdapter"
    args = cfg["model"]["init_args"]
    assert (args["base"], args["exits"]["blocks"], args["calibration"]["budget"]) == ("repadapter", [3, 6, 9], 0.5)
    assert (args["lr"], args["weight_decay"], args["warmup_epochs"], args["min_lr"]) == (1e-3, 1e-4, 10, 1e-5)
    assert cfg["trainer"]["max_epochs"] == 100 and cfg["data"]["init_args"]["protocol"] == "train_val"
    assert cfg["trainer"]["callbacks"][0]["class_path"] == "petl_lightning.callbacks.ExitCurveLogger"
    args.update(pretrained=False, num_classes=10)
    m = DynAdapter(**args)
    assert m.exit_depths == [3, 6, 9, 12] and [h.hidden for h in m.model.exit_heads] == [256, 128, 0]
    assert [b.attn.qkv.dropout.p for b in m.vit.blocks][::11] == pytest.approx([0.3, 0.0])


# ------------------------------------------------------------------------------------------------
# Real data
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_dtd10_every_exit_reported_and_half_budget_keeps_accuracy(
    vits_weights: Path, dtd10_root: Path, tmp_path: Path
) -> None:
    """ViT-S (real weights) on dtd10 at 84 px, 3 epochs on train800; at the end of fit the thresholds
    are calibrated on val200 for half the full model's FLOPs. On test: every exit's accuracy is
    logged, early exit stays within 3 points of the final head alone and executes <= 0.55 of its
    FLOPs. On val200 the calibrated curve is at every budget at least as accurate as the best single
    exit that fits the budget."""
    from petl_lightning.data.vtab import VTAB1kDataModule

    L.seed_everything(0, verbose=False)
    dm = VTAB1kDataModule(
        str(dtd10_root), "dtd10", protocol="train_val", img_size=84, batch_size=32, num_workers=0, cache=True
    )
    m = DynAdapter(
        num_classes=dm.num_classes,
        model_name="vit_small_patch14_dinov2",
        checkpoint_path=str(vits_weights),
        img_size=84,
        lr=3e-3,
        warmup_epochs=1,
        calibration={"budget": 0.5},
    )
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=100,
        default_root_dir=tmp_path,
        callbacks=[ExitCurveLogger()],
    )
    trainer.fit(m, dm)
    calib = m.calibration_result
    assert calib is not None and m.calibrated and calib["flops_ratio"] <= 0.5
    assert (tmp_path / "dyn_adapter_curve.png").stat().st_size > 5000
    metrics = trainer.test(m, dm, verbose=False)[0]
    stats = m.inference_stats()
    exit_acc = {d: metrics[f"test/acc_exit{d}"] for d in m.exit_depths}
    print(
        f"\ndtd10 test: exit acc {exit_acc}; dynamic acc {metrics['test/acc']:.4f} at "
        f"{float(stats['flops_ratio']):.3f} of the full FLOPs ({float(stats['gflops']):.4f} of "
        f"{float(stats['gflops_full']):.4f} GFLOPs); exit shares {stats['exit_share'].tolist()}; "
        f"val200 calibration {calib}"
    )
    assert stats["images"].item() == 200 and all(a > 0.3 for a in exit_acc.values())  # chance is 0.1
    assert metrics["test/acc"] >= exit_acc[m.exit_depths[-1]] - 0.03
    assert float(stats["flops_ratio"]) <= 0.55
    held_out = m.collect_exits(dm)
    single = single_exit_points(held_out, m.exit_costs())
    full = m.full_flops()
    for point in m.curve(held_out):
        affordable = [p["acc"] for p in single if p["gflops"] * 1e9 <= point["budget"] * full * (1 + 1e-9)]
        assert point["acc"] >= max(affordable) - 1e-12, (point, single)
