"""The support matrix: every method on every ViT family users bring, at random init and small sizes.

Where a method applies it is exact (merges load strictly into the plain timm model of the same name
and give the same logits; DyT's gather equals its masked path and never drops a prefix token;
Dyn-Adapter's batch shrinking equals a per-image loop; analytic FLOPs equal FlopCounterMode).
Where it does not, construction fails with one line that says why and what to use instead.
"""

from __future__ import annotations

from typing import Any

import pytest
import timm
import torch
from timm.layers import LayerScale
from torch.utils.flop_counter import FlopCounterMode

from petl_lightning import ARC, DynAdapter, DyT, LinearProbe, RepAdapter
from petl_lightning.errors import ConfigError, ModelNameError
from petl_lightning.flops import vit_flops
from petl_lightning.tasks.classification import PETLModule

SMALL = {"depth": 3, "embed_dim": 64, "num_heads": 2}
#: family -> (timm name, image size, extra model_kwargs). Image sizes give 16 patches.
FAMILIES: dict[str, tuple[str, int, dict[str, Any]]] = {
    "vit": ("vit_small_patch16_224", 64, {}),
    "vit_layerscale": ("vit_small_patch16_224", 64, {"init_values": 0.1}),
    "deit_distilled": ("deit_small_distilled_patch16_224", 64, {}),
    "dinov2": ("vit_small_patch14_dinov2", 56, {}),
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", 56, {}),
    "clip_quickgelu": ("vit_base_patch16_clip_quickgelu_224", 64, {}),
    "dinov2_swiglu": ("vit_giant_patch14_dinov2", 56, {"mlp_ratio": 4.0}),  # SwiGLUPacked MLP
}
#: Models outside the matrix that a single test checks (SigLIP: attention-pool head, no class token).
SPECS = {**FAMILIES, "siglip_map": ("vit_base_patch16_siglip_224", 64, {})}
PREFIX_TOKENS = {"deit_distilled": 2, "dinov2_reg4": 5}
DYN_BASES = ("repadapter", "arc", "lora", "adapter")


def build(cls: type[PETLModule], family: str, seed: int = 0, **kw: Any) -> Any:
    """``cls`` on ``family`` with every trainable tensor randomised (fresh adapters are the identity)."""
    name, size, extra = SPECS[family]
    torch.manual_seed(seed)
    m = cls(num_classes=5, model_name=name, pretrained=False, img_size=size, model_kwargs={**SMALL, **extra}, **kw)
    with torch.no_grad():
        for pname, p in m.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * (0.3 if "head" in pname else 0.1))
        for mod in m.vit.modules():  # DINOv2's LayerScale starts at 1e-5, which would hide every branch
            if isinstance(mod, LayerScale):
                mod.gamma.normal_(0.5, 0.1)
    m.vit.set_fused_attn(False)  # FlopCounterMode does not see the CPU SDPA kernel
    return m.eval()


def images(family: str, n: int = 6, seed: int = 1) -> torch.Tensor:
    size = SPECS[family][1]
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def plain_timm(family: str) -> torch.nn.Module:
    """The plain timm model a merge must load into strictly."""
    name, size, extra = SPECS[family]
    return timm.create_model(name, pretrained=False, num_classes=5, img_size=size, **SMALL, **extra).eval()


def assert_loads_strictly_and_equals(merged: torch.nn.Module, family: str, x: torch.Tensor, ref: torch.Tensor) -> None:
    fresh = plain_timm(family)
    fresh.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        err = (fresh(x) - ref).abs().max().item()
    assert err <= 1e-4, f"{family}: merged logits differ by {err:.2e}"


def counted_flops(fn: Any) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


@pytest.mark.parametrize("family", FAMILIES)
def test_family_shape_and_backbone_flops(family: str) -> None:
    """The frozen backbone + probe: prefix tokens as the family has them, analytic FLOPs exact,
    and the probe merges into the plain timm model (DeiT's two heads both get the probe's)."""
    m = build(LinearProbe, family, cache_features=False)
    assert m.vit.num_prefix_tokens == PREFIX_TOKENS.get(family, 1)
    x = images(family)
    measured = counted_flops(lambda: m(x))
    assert measured == 2 * x.shape[0] * vit_flops(m.vit.shape(), 5, norm=False)
    with torch.no_grad():
        ref = m(x)
    assert_loads_strictly_and_equals(m.merge(), family, x, ref)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cls", [RepAdapter, ARC], ids=["RepAdapter", "ARC"])
def test_foldable_methods_merge_exactly(family: str, cls: type[PETLModule]) -> None:
    m = build(cls, family, **({"adapter_dim": 8} if cls is ARC else {}))
    x = images(family)
    with torch.no_grad():
        ref = m(x)
    merged = m.merge()
    assert_loads_strictly_and_equals(merged, family, x, ref)
    for blk in merged.blocks:
        blk.attn.fused_attn = False  # FlopCounterMode does not see the CPU SDPA kernel
    second_head = m.vit.dim * 5 if family == "deit_distilled" else 0  # timm's DeiT runs head and head_dist
    expected = vit_flops(m.vit.shape(), 5, norm=False) + second_head
    assert counted_flops(lambda: merged(x)) == 2 * x.shape[0] * expected


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("placement", ["mlp", "attn", "layer"])
def test_dyt_gather_equals_masked_and_keeps_every_prefix_token(family: str, placement: str) -> None:
    m = build(DyT, family, skipping={"sites": placement})
    x = images(family)
    with torch.no_grad():
        ref, ref_kept = m.vit.forward_masked(x)
        fast, kept = m.vit.forward_gathered(x)
        gather_flops = counted_flops(lambda: m.head(m.vit.forward_gathered(x).features))
    assert (fast - ref).abs().max().item() <= 1e-5
    assert torch.equal(kept, ref_kept)
    rate = kept.double().mean().item() / m.vit.num_patches
    assert 0.05 < rate < 0.95, f"decisions are not mixed (keep rate {rate:.2f})"
    assert gather_flops == 2 * int((m.vit.executed_flops(kept, norm=False) + m.model.head_flops()).sum())
    # Prefix tokens are never dispatched: with no patch token kept, the first block's prefix rows
    # are exactly the complete block's (they still ran every sub-block).
    p = m.vit.num_prefix_tokens
    blk = m.vit.blocks[0]
    with torch.no_grad():
        for d in blk.dispatchers.values():
            d.proj.bias.fill_(-1e4)
        tokens = m.vit.embed(x)
        out, none_kept = blk(tokens)
        complete = blk.forward_complete(tokens)
    assert bool((none_kept == 0).all())
    torch.testing.assert_close(out[:, :p], complete[:, :p], atol=1e-5, rtol=1e-5)
    assert (out[:, p:] - complete[:, p:]).abs().max().item() > 1e-3


def per_image_exits(m: DynAdapter, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One image at a time through the blocks, stopping at the first exit over its threshold."""
    logits, exits = [], []
    for img in x:
        tokens, start = m.vit.embed(img[None]), 0
        for k, end in enumerate(m.exit_depths):
            tokens, start = m.vit.forward_blocks(tokens, start, end).tokens, end
            lg = m.model.exit_logits(k, tokens)
            if k == m.num_exits - 1 or float(m.model.confidence(lg)[0]) >= float(m.thresholds[k]):
                break
        logits.append(lg[0])
        exits.append(k)
    return torch.stack(logits), torch.tensor(exits)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("base", DYN_BASES)
def test_dyn_adapter_batch_shrinking_equals_per_image_loop(family: str, base: str) -> None:
    m = build(DynAdapter, family, base=base, exits={"blocks": [1, 2]}, calibration={"budget": None})
    x = images(family, n=12)
    with torch.no_grad():
        conf = m.model.confidence(m.forward_exits(x))  # (exits, B)
        m.thresholds.copy_(conf[:-1].median(dim=1).values + 1e-6)  # about half the images leave at each exit
        ref_logits, ref_exits = per_image_exits(m, x)
        assert len(set(ref_exits.tolist())) >= 2, ref_exits
        for bs in (1, 5, 12):
            outs = [m.infer(xb) for xb in x.split(bs)]
            assert torch.equal(torch.cat([o.exit_index for o in outs]), ref_exits), bs
            # float32 sums in another order for another batch size: 1.1e-5 seen on CLIP's arc base
            torch.testing.assert_close(torch.cat([o.logits for o in outs]), ref_logits, atol=3e-5, rtol=1e-5)
        blocks = m.vit.block_flops(torch.zeros(1, m.vit.depth, 0), norm=False)[0].cumsum(0)
        costs = m.exit_costs(norm=False).of(m.thresholds)[0] + blocks[[d - 1 for d in m.exit_depths]]
        res = m.infer(x)
    assert counted_flops(lambda: m.infer(x)) == 2 * int(costs[res.exit_index].sum())
    if base != "adapter":  # the non-linear bottleneck base does not fold
        merged = m.merge()
        with torch.no_grad():
            final = m.model.exit_logits(m.num_exits - 1, m.vit.forward_blocks(m.vit.embed(x)).tokens)
        assert_loads_strictly_and_equals(merged, family, x, final)


def test_attention_pool_head_is_counted_and_merges() -> None:
    """SigLIP's MAP head (a latent query over all tokens) is part of the analytic FLOPs; RepAdapter
    merges into the plain model with it."""
    probe = build(LinearProbe, "siglip_map", cache_features=False)
    x = images("siglip_map")
    assert probe.vit.shape().attn_pool_hidden > 0
    probe.vit.vit.attn_pool.fused_attn = False
    assert counted_flops(lambda: probe(x)) == 2 * x.shape[0] * vit_flops(probe.vit.shape(), 5, norm=False)
    m = build(RepAdapter, "siglip_map")
    with torch.no_grad():
        ref = m(x)
    assert_loads_strictly_and_equals(m.merge(), "siglip_map", x, ref)


# -- refusals -------------------------------------------------------------------------------------
ALL_METHODS = [LinearProbe, RepAdapter, ARC, DyT, DynAdapter]


@pytest.mark.parametrize("cls", ALL_METHODS, ids=lambda c: c.__name__)
def test_eva02_is_refused_in_one_line_with_the_reason(cls: type[PETLModule]) -> None:
    with pytest.raises(ModelNameError, match=r"Eva.*rotary position embeddings.*supports vit_\*") as err:
        cls(num_classes=5, model_name="eva02_tiny_patch14_224", pretrained=False, model_kwargs={"depth": 2})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("cls", [RepAdapter, ARC, DyT, DynAdapter], ids=lambda c: c.__name__)
def test_post_norm_blocks_are_refused_by_block_wrapping_methods(cls: type[PETLModule]) -> None:
    """timm's ResPostBlock (post-norm) would silently compute another function if wrapped as a
    pre-norm block; the probe, which runs the blocks as they are, still works."""
    kw = dict(num_classes=5, model_name="vit_base_patch16_rpn_224", pretrained=False, img_size=32, model_kwargs=SMALL)
    with pytest.raises(ModelNameError, match=r"ResPostBlock blocks.*use LinearProbe") as err:
        cls(**kw)
    assert "\n" not in str(err.value)
    probe = LinearProbe(**kw).eval()
    assert probe(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_dyn_adapter_refuses_models_without_a_class_token() -> None:
    with pytest.raises(ConfigError, match="class token"):
        DynAdapter(
            num_classes=5, model_name="vit_base_patch16_siglip_224", pretrained=False, img_size=32, model_kwargs=SMALL
        )
