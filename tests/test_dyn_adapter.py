"""Dyn-Adapter: batch-shrinking inference equals a per-image loop, FLOPs equal FlopCounterMode,
the loss schedule, gradient stop, dropout schedule and gradient mask do what they say, calibration
meets its budget on held-out data, and a short real run on dtd10 keeps its accuracy at half the FLOPs."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from timm.models.vision_transformer import Block
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from petl_lightning.layers.adapter import Adapter
from petl_lightning.layers.exits import ExitHead
from petl_lightning.layers.lora import LoRA
from petl_lightning.methods.dyn_adapter import (
    DynAdapter,
    DynAdapterConfigError,
    DynBlock,
    assign_exits,
    evaluate_thresholds,
    search_thresholds,
)

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
    args = dict(base=base, num_classes=K, model_name="vit_tiny_patch16_224", pretrained=False, img_size=32,
                model_kwargs={"depth": 4}, exit_blocks=[1, 2, 3], calibrate_budget=None, arc_rank=16)
    args.update(kw)
    m = DynAdapter(**args)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * (0.1 if "head" in name else 0.05))
    return m.eval()


def per_image_reference(m: DynAdapter, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One image at a time: run the blocks up to each exit, stop at the first confident exit."""
    logits, exits = [], []
    for img in x:
        tokens, start = m.vit.embed(img[None]), 0
        for k, end in enumerate(m.exit_depths):
            tokens = m.run_blocks(tokens, start, end)
            start = end
            lg = m.exit_logits(k, tokens)
            if k == m.num_exits - 1 or float(m.confidence(lg)[0]) >= float(m.thresholds[k]):
                break
        logits.append(lg[0])
        exits.append(k)
    return torch.stack(logits), torch.tensor(exits)


def mixed_thresholds(m: DynAdapter, x: torch.Tensor, q: float = 0.4) -> torch.Tensor:
    """Per-exit thresholds near the ``q`` quantile of that exit's confidences, halfway between two
    neighbouring confidences at least 1e-4 apart (so float noise cannot move an image across)."""
    with torch.no_grad():
        conf = torch.stack([m.confidence(lg) for lg in m.forward_exits(x)], dim=1)
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
    from petl_lightning.methods.dyn_adapter import confidence

    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [30.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    p = logits.softmax(-1)
    torch.testing.assert_close(confidence(logits, "max_softmax"), p.max(-1).values)
    ent = 1 + (p * p.log()).sum(-1) / math.log(4)
    torch.testing.assert_close(confidence(logits, "entropy"), ent)
    assert confidence(logits, "entropy")[0].abs() < 1e-6 and confidence(logits, "entropy")[1] > 0.999


@pytest.mark.parametrize("base,conf", [(b, "max_softmax") for b in BASES] + [("repadapter", "entropy")])
def test_batched_dynamic_path_equals_per_image_loop(base: str, conf: str) -> None:
    m = tiny(base, confidence=conf)
    torch.manual_seed(1)
    x = torch.randn(64, 3, 32, 32)
    mixed = mixed_thresholds(m, x)
    settings = {"mixed": mixed, "all_early": torch.zeros(3), "none_early": torch.full((3,), math.inf)}
    costs = torch.tensor(m.exit_flops(), dtype=torch.float64)
    with torch.no_grad():
        for name, thr in settings.items():
            m.thresholds.copy_(thr)
            ref_logits, ref_exits = per_image_reference(m, x)
            assert torch.equal(m.forward_masked_reference(x).exit_index, ref_exits)
            if name == "all_early":
                assert bool((ref_exits == 0).all())
            elif name == "none_early":
                assert bool((ref_exits == 3).all())
            else:  # every exit used
                assert set(ref_exits.tolist()) == {0, 1, 2, 3}, ref_exits.bincount()
            for bs in (1, 5, 64):
                outs = [m.dynamic_forward(xb) for xb in x.split(bs)]
                logits = torch.cat([o.logits for o in outs])
                exits = torch.cat([o.exit_index for o in outs])
                assert torch.equal(exits, ref_exits), (name, bs)
                assert torch.equal(logits.argmax(1), ref_logits.argmax(1)), (name, bs)
                torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
                assert torch.equal(torch.cat([o.flops for o in outs]), costs[ref_exits])
    # The eval forward returns the same logits and records what executed.
    m.thresholds.copy_(mixed)
    m.reset_inference_stats()
    with torch.no_grad():
        out = m(x)
        ref_logits, ref_exits = per_image_reference(m, x)
    torch.testing.assert_close(out, ref_logits, atol=1e-5, rtol=1e-5)
    stats = m.inference_stats()
    share = torch.bincount(ref_exits, minlength=4).double() / 64
    torch.testing.assert_close(stats["exit_share"], share)
    assert float(stats["gflops"]) == pytest.approx(float((share * costs).sum()) / 1e9, rel=1e-12)


@pytest.mark.parametrize("base", BASES)
def test_executed_flops_equal_flop_counter(base: str) -> None:
    """2 × analytic FLOPs (no LayerNorm) == FlopCounterMode on the batch-shrinking forward, so the
    reported saving is what ran; and the full model's FLOPs == backbone + PETL modules."""
    m = tiny(base)
    m.vit.set_fused_attn(False)
    x = torch.randn(16, 3, 32, 32)
    m.thresholds.copy_(mixed_thresholds(m, x))
    costs = torch.tensor(m.exit_flops(norm=False), dtype=torch.float64)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        res = m.dynamic_forward(x)
    assert len(set(res.exit_index.tolist())) >= 3
    assert fc.get_total_flops() == 2 * int(costs[res.exit_index].sum())
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m.head(m.forward_features(x))
    assert fc.get_total_flops() == 2 * 16 * m.full_flops(norm=False)
    n = m.vit.num_tokens
    assert m.full_flops() == m.backbone_flops() + sum(b.adapter_flops(n) for b in m.blocks)


@pytest.mark.parametrize("base", ["lora", "repadapter", "arc"])
def test_merged_inference_equals_unmerged_and_costs_only_the_backbone(base: str) -> None:
    m = tiny(base)
    x = torch.randn(32, 3, 32, 32)
    m.thresholds.copy_(mixed_thresholds(m, x))
    with torch.no_grad():
        ref = m.dynamic_forward(x)
        full_unmerged = m.full_flops()
        m.merge()
        assert m.is_merged and all(isinstance(b, Block) for b in m.merged_blocks)
        out = m.dynamic_forward(x)
    assert torch.equal(out.exit_index, ref.exit_index)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=1e-4)
    assert m.full_flops() == m.backbone_flops() < full_unmerged
    m.vit.set_fused_attn(False)
    for b in m.merged_blocks:
        b.attn.fused_attn = False
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        res = m.dynamic_forward(x)
    assert fc.get_total_flops() == 2 * int(torch.tensor(m.exit_flops(norm=False))[res.exit_index].sum())
    assert not any(k.startswith("merged_blocks") for k in m.trainable_state_keys())
    m.train()
    assert not m.is_merged  # training drops the (soon stale) copies


def test_bottleneck_adapter_base_cannot_merge() -> None:
    with pytest.raises(DynAdapterConfigError, match="non-linear"):
        tiny("adapter").merge()


def test_lora_block_equals_timm_block_with_merged_qkv() -> None:
    """The explicit LoRA attention is timm's attention with W_qkv + (alpha/r) B A (fused and not)."""
    torch.manual_seed(0)
    blk = Block(64, 4, qkv_bias=True).eval()
    lora = LoRA.for_linear(blk.attn.qkv, r=4, alpha=8.0, dropout=0.0)
    torch.nn.init.normal_(lora.lora_b, std=0.1)
    dyn = DynBlock(blk, qkv_lora=lora).eval()
    merged = Block(64, 4, qkv_bias=True).eval()
    merged.load_state_dict(blk.state_dict())
    with torch.no_grad():
        merged.attn.qkv.weight += lora.delta_weight()
    x = torch.randn(3, 10, 64)
    for fused in (True, False):
        blk.attn.fused_attn = merged.attn.fused_attn = fused
        torch.testing.assert_close(dyn(x), merged(x), atol=1e-5, rtol=1e-5)
    assert (dyn(x) - blk(x)).abs().max() > 1e-3  # the update does something


def test_fresh_petl_is_identity_and_heads_are_balanced() -> None:
    """Untrained adapter/LoRA/RepAdapter bases leave the backbone unchanged; head widths fall with depth."""
    for base in ("adapter", "lora", "repadapter"):
        torch.manual_seed(0)
        m = DynAdapter(base=base, num_classes=K, model_name="vit_tiny_patch16_224", pretrained=False, img_size=32,
                       model_kwargs={"depth": 4}, exit_blocks=[1, 2, 3]).eval()
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(m.forward_exits(x)[-1], m.head(m.vit(x)))
    m = DynAdapter(num_classes=K, model_name="vit_tiny_patch16_224", pretrained=False, img_size=32)
    assert m.exit_depths == [3, 6, 9, 12]
    assert [h.hidden for h in m.exit_heads] == [256, 128, 0]
    assert all(isinstance(h, ExitHead) for h in m.exit_heads)
    assert m.is_head_parameter("exit_heads.0.fc1.weight")
    assert not m.is_head_parameter("blocks.0.attn_adapter.down.weight")


# ------------------------------------------------------------------------------------------------
# Training: schedule, gradient stop, forward and backward sparsity
# ------------------------------------------------------------------------------------------------
def test_loss_weight_schedules() -> None:
    m = tiny(loss_weight_start=0.1, loss_weight_end=1.0, loss_ramp=(0.0, 0.5))
    w = [m.loss_weights(t) for t in (0.0, 0.25, 0.5, 1.0)]
    assert w[0].tolist() == pytest.approx([0.1, 0.1, 0.1, 1.0])
    assert w[1].tolist() == pytest.approx([0.55, 0.55, 0.55, 1.0])
    assert w[2].tolist() == pytest.approx([1.0] * 4) and w[3].tolist() == pytest.approx([1.0] * 4)
    m.hparams.loss_schedule = "cosine"
    assert m.loss_weights(0.125)[0].item() == pytest.approx(0.1 + 0.9 * 0.5 * (1 - math.cos(math.pi / 4)))
    m.hparams.loss_schedule = "step"
    assert m.loss_weights(0.49)[0].item() == pytest.approx(0.1) and m.loss_weights(0.5)[0].item() == pytest.approx(1.0)
    m.hparams.loss_schedule = "constant"
    assert m.loss_weights(0.0)[0].item() == pytest.approx(1.0)
    # The loss is the weighted sum of the exits' cross-entropies.
    m.train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, K, (4,))
    m.hparams.loss_schedule = "linear"
    torch.manual_seed(3)
    loss, logits, terms = m.training_loss(x, y)
    weights = m.loss_weights(1.0)
    ces = [terms[f"ce_exit{d}"] for d in m.exit_depths]
    assert loss.item() == pytest.approx(sum(w * c for w, c in zip(weights.tolist(), ces)).item(), rel=1e-5)
    assert logits.shape == (4, K)


def test_exit_grad_scale_scales_or_stops_the_early_exit_gradient() -> None:
    """An early exit's loss reaches the blocks below it scaled by exit_grad_scale (0 = stopped);
    its own head always trains, and nothing above it is touched."""
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, K, (4,))
    grads = {}
    for scale in (1.0, 0.5, 0.0):
        m = tiny(exit_grad_scale=scale, petl_dropout=(0.0, 0.0), exit_dropout=0.0).train()
        torch.nn.functional.cross_entropy(m.forward_exits(x)[1], y).backward()  # exit after block 2 only
        grads[scale] = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                        for n, p in m.named_parameters() if p.requires_grad}
    below = [n for n in grads[1.0] if n.startswith(("blocks.0.", "blocks.1."))]
    above = [n for n in grads[1.0]
             if n.startswith(("blocks.2.", "blocks.3.", "head.", "exit_heads.0.", "exit_heads.2."))]
    assert sum(grads[1.0][n].abs().sum() for n in below) > 0
    for n in below:
        torch.testing.assert_close(grads[0.5][n], 0.5 * grads[1.0][n])
        assert not grads[0.0][n].any()
    for scale in (1.0, 0.5, 0.0):
        assert not any(grads[scale][n].any() for n in above)
        torch.testing.assert_close(grads[scale]["exit_heads.1.fc2.weight"], grads[1.0]["exit_heads.1.fc2.weight"])


def test_petl_dropout_falls_with_depth_and_only_acts_in_training() -> None:
    m = tiny("lora", petl_dropout=(0.4, 0.1))
    rates = [b.qkv_lora.dropout.p for b in m.blocks]
    assert rates == pytest.approx([0.4, 0.3, 0.2, 0.1])
    m2 = tiny("repadapter", petl_dropout=[0.5, 0.2, 0.2, 0.0])
    assert [b.attn_adapter.dropout.p for b in m2.blocks] == pytest.approx([0.5, 0.2, 0.2, 0.0])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        m.eval()
        torch.testing.assert_close(m.forward_exits(x), m.forward_exits(x))
        m.train()
        assert (m.forward_exits(x) - m.forward_exits(x)).abs().max() > 1e-4


def _loader(n: int = 32, bs: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, K, (n,), generator=g)),
                      batch_size=bs)


def test_gradient_mask_gradient_mode() -> None:
    m = tiny(grad_keep=0.25, grad_mask_mode="gradient")
    petl = m.petl_parameters()
    assert petl and all(not m.is_head_parameter(n) for n, p in m.named_parameters() if any(p is q for q in petl))
    for p in m.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    torch.manual_seed(0)
    m.on_before_optimizer_step(None)
    g = torch.cat([p.grad.flatten() for p in petl])
    assert set(g.unique().tolist()) == {0.0, 4.0}
    assert (g > 0).double().mean().item() == pytest.approx(0.25, abs=0.02)
    assert all(bool((p.grad == 1).all()) for p in m.exit_heads.parameters())


def test_gradient_mask_update_mode_in_a_real_step() -> None:
    """With keep=0.3 about 30% of the PETL entries move in a step; heads all move; keep=1 moves all."""
    for keep in (0.3, 1.0):
        m = tiny(grad_keep=keep, grad_mask_mode="update", petl_dropout=(0.0, 0.0), lr=1e-2, warmup_epochs=0).train()
        before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
        L.seed_everything(0)
        trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        trainer.fit(m, _loader())
        petl_ids = {id(p) for p in m.petl_parameters()}
        moved = {n: (p.detach() != before[n]) for n, p in m.named_parameters() if p.requires_grad}
        petl_moved = torch.cat([v.flatten() for n, v in moved.items() if id(dict(m.named_parameters())[n]) in petl_ids])
        head_moved = torch.cat([v.flatten() for n, v in moved.items() if m.is_head_parameter(n)])
        assert head_moved.double().mean().item() > 0.99
        assert petl_moved.double().mean().item() == pytest.approx(keep, abs=0.03)


# ------------------------------------------------------------------------------------------------
# Calibration, sweep, statistics
# ------------------------------------------------------------------------------------------------
def test_search_thresholds_matches_brute_force() -> None:
    torch.manual_seed(0)
    n, e = 12, 3
    conf = torch.rand(n, e)
    correct = torch.rand(n, e) < torch.tensor([0.4, 0.6, 0.9])
    costs = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    vals = sorted(set(conf[:, :-1].flatten().tolist())) + [math.inf]
    cands = torch.tensor([[a, b] for a in vals for b in vals])
    acc, cost, _ = evaluate_thresholds(conf, correct, costs, cands)
    for budget in (1.3, 1.8, 2.4):
        best = acc[cost <= budget + 1e-12].max().item()
        thr, got, got_cost, share = search_thresholds(conf, correct, costs, budget, "grid", resolution=n + 1)
        assert got == pytest.approx(best) and got_cost <= budget + 1e-12
        ex = assign_exits(conf, thr)
        assert correct[torch.arange(n), ex].double().mean().item() == pytest.approx(got)
        assert costs[ex].mean().item() == pytest.approx(got_cost)
        for policy in ("geometric", "shared"):
            _, a, c, _ = search_thresholds(conf, correct, costs, budget, policy)
            assert c <= budget + 1e-12 and a <= best + 1e-12
    with pytest.raises(DynAdapterConfigError, match="cheapest"):
        search_thresholds(conf, correct, costs, 0.9)


@pytest.mark.parametrize("policy", ["geometric", "shared", "grid"])
def test_calibration_meets_budget_on_held_out_data(policy: str) -> None:
    m = tiny()
    held_out = _loader(48, 16, seed=5)
    res = m.calibrate(held_out, budget=0.5, policy=policy)
    assert bool(m.calibrated) and m.thresholds.tolist() == pytest.approx(res["thresholds"])
    # Run the real dynamic path over the held-out data and read the executed FLOPs.
    m.reset_inference_stats()
    with torch.no_grad():
        for x, _ in held_out:
            m(x)
    stats = m.inference_stats()
    assert float(stats["flops_ratio"]) <= 0.5 + 1e-12
    assert float(stats["flops_ratio"]) == pytest.approx(res["flops_ratio"])
    assert stats["exit_share"].tolist() == pytest.approx(res["exit_share"])
    assert "thresholds" in m.trainable_state_keys()


def test_calibrate_refuses_a_datamodule_without_held_out_split(dtd10_root: Path) -> None:
    from petl_lightning.data.vtab import VTAB1kDataModule

    m = tiny()
    dm = VTAB1kDataModule(str(dtd10_root), "dtd10", protocol="trainval_test", img_size=32, num_workers=0)
    with pytest.raises(DynAdapterConfigError, match="train_val"):
        m.calibrate(dm, 0.5)
    with pytest.raises(DynAdapterConfigError, match="budget"):
        m.calibrate(_loader(), 1.5)


class _ImageLogger(Logger):
    """Records what a W&B-like logger would be sent."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[tuple[str, list[str]]] = []
        self.metrics: list[dict] = []

    name, version = "mem", 0

    @property
    def experiment(self) -> None:
        return None

    def log_image(self, key: str, images: list[str]) -> None:
        self.images.append((key, images))

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.metrics.append(metrics)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def test_sweep_curve_png_logged_and_validation_stats(tmp_path: Path) -> None:
    m = tiny()
    logger = _ImageLogger()
    trainer = L.Trainer(accelerator="cpu", logger=logger, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)
    m.calibrate(_loader(48, 16, seed=5), 0.6)
    thr = m.thresholds.clone()
    trainer.validate(m, _loader(48, 16, seed=5))
    stats = m.inference_stats()
    assert stats["exit_share"].sum().item() == pytest.approx(1.0)
    assert float(stats["flops_ratio"]) <= 0.6 + 1e-12
    assert stats["exit_acc_all"].shape == (4,) and stats["exit_acc"].shape == (4,)
    assert set(trainer.callback_metrics) >= {"val/acc", "val/gflops", "val/acc_exit1", "val/acc_exit4"}
    png = tmp_path / "curve.png"
    points = m.sweep(_loader(48, 16, seed=5), budgets=(0.4, 0.6, 0.8, 1.0), plot_path=png)
    assert png.stat().st_size > 5000 and logger.images == [("dyn_adapter/acc_vs_gflops", [str(png)])]
    assert [p["budget"] for p in points] == [0.4, 0.6, 0.8, 1.0]
    assert all(p["flops_ratio"] <= p["budget"] + 1e-12 for p in points)
    assert [p["gflops"] for p in points] == sorted(p["gflops"] for p in points)
    assert torch.equal(m.thresholds, thr)  # the sweep leaves the thresholds alone


class _RandomData(L.LightningDataModule):
    def __init__(self, protocol: str) -> None:
        super().__init__()
        self.protocol = protocol

    def val_dataloader(self) -> DataLoader:
        return _loader(48, 16, seed=5)

    def test_dataloader(self) -> DataLoader:
        return _loader(32, 16, seed=6)


def test_test_calibrates_on_the_held_out_split_first() -> None:
    """``trainer.test`` of an uncalibrated model calibrates on the DataModule's validation split
    (train_val protocol) before testing; with no held-out split it warns and keeps +inf."""
    m = tiny(calibrate_budget=0.5)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.test(m, datamodule=_RandomData("train_val"), verbose=False)
    assert bool(m.calibrated) and m.last_calibration["flops_ratio"] <= 0.5
    assert torch.isfinite(m.thresholds).any() and m.inference_stats()["images"].item() == 32
    m2 = tiny(calibrate_budget=0.5)
    with pytest.warns(UserWarning, match="no held-out split"):
        trainer.test(m2, datamodule=_RandomData("trainval_test"), verbose=False)
    assert not bool(m2.calibrated) and bool(torch.isinf(m2.thresholds).all())
    assert m2.inference_stats()["exit_share"].tolist() == [0.0, 0.0, 0.0, 1.0]


def test_thresholds_survive_a_checkpoint(tmp_path: Path) -> None:
    m = tiny()
    m.calibrate(_loader(), 0.5)
    trainer = L.Trainer(max_steps=0, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.strategy.connect(m)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    state = torch.load(tmp_path / "m.ckpt", weights_only=False)["state_dict"]
    assert "thresholds" in state and not any(k.startswith("vit.") for k in state)
    loaded = DynAdapter.load_from_checkpoint(tmp_path / "m.ckpt")
    assert torch.equal(loaded.thresholds, m.thresholds) and bool(loaded.calibrated)


def test_bad_arguments_raise_clear_errors() -> None:
    common = dict(num_classes=K, model_name="vit_tiny_patch16_224", pretrained=False, img_size=32,
                  model_kwargs={"depth": 4})
    for bad, match in [
        (dict(exit_blocks=[2, 1]), "exit_blocks"),
        (dict(exit_blocks=[4]), "exit_blocks"),
        (dict(base="prompt"), "base"),
        (dict(exit_blocks=[1, 2], exit_hidden=[8]), "exit_hidden"),
        (dict(exit_blocks=[1, 2], exit_thresholds=[0.5, 0.5, 0.5]), "exit_thresholds"),
        (dict(grad_keep=0.0), "grad_keep"),
        (dict(petl_dropout=[0.1, 0.2, 0.3]), "petl_dropout"),
        (dict(loss_ramp=(0.6, 0.2)), "loss_ramp"),
    ]:
        with pytest.raises(DynAdapterConfigError, match=match):
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
    assert (args["base"], args["exit_blocks"], args["calibrate_budget"]) == ("repadapter", [3, 6, 9], 0.5)
    assert (args["lr"], args["weight_decay"], args["warmup_epochs"], args["min_lr"]) == (1e-3, 1e-4, 10, 1e-5)
    assert cfg["trainer"]["max_epochs"] == 100 and cfg["data"]["init_args"]["protocol"] == "train_val"
    args.update(pretrained=False, num_classes=10)
    m = DynAdapter(**args)
    assert m.exit_depths == [3, 6, 9, 12] and [h.hidden for h in m.exit_heads] == [256, 128, 0]
    assert [b.attn_adapter.dropout.p for b in m.blocks][::11] == pytest.approx([0.3, 0.0])


# ------------------------------------------------------------------------------------------------
# Real data
# ------------------------------------------------------------------------------------------------
def test_real_dtd10_every_exit_reported_and_half_budget_keeps_accuracy(vits_weights: Path, dtd10_root: Path,
                                                                       tmp_path: Path) -> None:
    """ViT-S (real weights) on dtd10 at 84 px, 3 epochs on train800; at the end of fit the thresholds
    are calibrated on val200 for half the full model's FLOPs. On test: every exit's accuracy is
    logged, early exit stays within 3 points of the final head alone and executes <= 0.55 of its FLOPs."""
    from petl_lightning.data.vtab import VTAB1kDataModule

    L.seed_everything(0, verbose=False)
    dm = VTAB1kDataModule(str(dtd10_root), "dtd10", protocol="train_val", img_size=84, batch_size=32,
                          num_workers=0, cache=True)
    m = DynAdapter(num_classes=dm.num_classes, model_name="vit_small_patch14_dinov2",
                   checkpoint_path=str(vits_weights), img_size=84, lr=3e-3, warmup_epochs=1, calibrate_budget=0.5)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        check_val_every_n_epoch=100, default_root_dir=tmp_path)
    trainer.fit(m, dm)
    calib = m.last_calibration
    assert calib is not None and bool(m.calibrated) and calib["flops_ratio"] <= 0.5
    assert (tmp_path / "dyn_adapter_curve.png").stat().st_size > 5000
    metrics = trainer.test(m, dm, verbose=False)[0]
    stats = m.inference_stats()
    exit_acc = {d: metrics[f"test/acc_exit{d}"] for d in m.exit_depths}
    print(f"\ndtd10 test: exit acc {exit_acc}; dynamic acc {metrics['test/acc']:.4f} at "
          f"{float(stats['flops_ratio']):.3f} of the full FLOPs ({float(stats['gflops']):.4f} of "
          f"{float(stats['gflops_full']):.4f} GFLOPs); exit shares {stats['exit_share'].tolist()}; "
          f"val200 calibration {calib}")
    assert stats["images"].item() == 200 and all(a > 0.3 for a in exit_acc.values())  # chance is 0.1
    assert stats["exit_acc_all"].tolist() == pytest.approx(list(exit_acc.values()), abs=1e-6)
    assert metrics["test/acc"] >= exit_acc[m.exit_depths[-1]] - 0.03
    assert float(stats["flops_ratio"]) <= 0.55
