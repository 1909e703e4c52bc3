"""The analytic FLOPs counter against the papers' constants and FlopCounterMode on real forwards."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from petl_lightning.backbone import FrozenViT
from petl_lightning.flops import ViTShape, block_flops, non_block_flops, vit_flops

VIT_B = ViTShape(dim=768, depth=12, num_heads=12, mlp_hidden=3072, num_patches=196, num_prefix_tokens=1, patch_size=16)


def test_vit_b16_matches_the_papers_convention() -> None:
    assert vit_flops(VIT_B, 100) / 1e9 == pytest.approx(17.58, abs=0.005)
    assert non_block_flops(VIT_B, 100) / 1e9 == pytest.approx(0.116439, abs=5e-7)  # DyT's constant
    assert block_flops(197, 197, VIT_B) / 1e9 == pytest.approx(1.4555, abs=1e-4)  # fvcore per block


def test_built_vit_b_has_the_same_shape() -> None:
    with torch.device("meta"):
        vit = FrozenViT("vit_base_patch16_224", pretrained=False)
    assert vit.shape() == VIT_B


def test_fewer_tokens_and_depth_cost_less() -> None:
    full = vit_flops(VIT_B, 100)
    half_mlp = vit_flops(VIT_B, 100, mlp_tokens=[99] * 12)
    early = vit_flops(VIT_B, 100, depth=6)
    assert full > half_mlp > early > non_block_flops(VIT_B, 100)
    assert full - early == 6 * block_flops(197, 197, VIT_B)


@pytest.mark.parametrize("model_name", ["vit_tiny_patch16_224", "vit_small_patch16_224"])
@pytest.mark.parametrize("img_size", [32, 64, 112])
def test_equals_flop_counter_mode_on_real_forwards(model_name: str, img_size: int) -> None:
    vit = FrozenViT(model_name, pretrained=False, img_size=img_size).eval()
    vit.set_fused_attn(False)  # FlopCounterMode does not see the CPU SDPA kernel
    head = torch.nn.Linear(vit.dim, 10)
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        head(vit(x))
    measured = counter.get_total_flops() / 2 / x.shape[0]  # 2 FLOPs per multiply-add, per image
    analytic = vit_flops(vit.shape(), 10, norm=False)
    assert analytic == pytest.approx(measured, rel=0.005)


def test_token_counts_must_cover_the_depth() -> None:
    with pytest.raises(ValueError, match="token counts"):
        vit_flops(VIT_B, 100, attn_tokens=[197] * 3)
