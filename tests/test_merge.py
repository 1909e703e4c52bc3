"""Merging RepAdapter and ARC into a plain timm ViT: exact folding, strict loading, export, FLOPs."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from petl_lightning.errors import ConfigError, MergeError
from petl_lightning.flops import vit_flops
from petl_lightning.layers.wrapper import adapter_layers, fold_affine_into_linear, wrap_linears
from petl_lightning.methods.arc import ARC
from petl_lightning.methods.arc.layer import ARCBasis, ARCLinear
from petl_lightning.methods.repadapter import RepAdapter
from petl_lightning.methods.repadapter.layer import RepAdapterLinear

TOL = 1e-4
TINY = dict(model_name="vit_tiny_patch16_224", pretrained=False, img_size=32, model_kwargs={"depth": 2})
SMALL_LS = dict(
    model_name="vit_small_patch16_224", pretrained=False, img_size=32, model_kwargs={"depth": 2, "init_values": 0.1}
)
METHODS = {
    "repblock": (RepAdapter, dict(placement="attn_mlp", adapter_scale=0.7)),
    "repattn": (RepAdapter, dict(placement="attn", adapter_scale=5.0)),
    "arc": (ARC, dict(placement="attn_mlp")),
    "arc_att": (ARC, dict(placement="attn")),
}


def randomize(module: nn.Module, std: float = 0.05, seed: int = 0) -> None:
    """Give every trainable tensor (adapters, head) and every LayerScale random values, so nothing
    cancels by accident (at initialisation both methods are close to the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.requires_grad or name.endswith(("ls1.gamma", "ls2.gamma")):
                p.copy_(torch.randn(p.shape, generator=g) * std + (0.1 if "gamma" in name else 0.0))


def build(method: str, base: dict, num_classes: int = 7) -> nn.Module:
    cls, kw = METHODS[method]
    torch.manual_seed(0)
    m = cls(num_classes=num_classes, **base, **kw)
    randomize(m)
    return m.eval()


def fresh_timm(base: dict, num_classes: int) -> nn.Module:
    return timm.create_model(
        base["model_name"], pretrained=False, num_classes=num_classes, img_size=base["img_size"], **base["model_kwargs"]
    ).eval()


# -- the folding primitive -------------------------------------------------------------------------
def test_fold_affine_into_linear_is_exact() -> None:
    torch.manual_seed(0)
    lin, d = nn.Linear(24, 40), 24
    M, c = torch.eye(d) + 0.3 * torch.randn(d, d), torch.randn(d)
    x = torch.randn(5, d)
    expected = lin(x @ M.T + c)
    fold_affine_into_linear(lin, M, c)
    assert (lin(x) - expected).abs().max().item() < 1e-5


def test_fold_runs_in_fp32_for_half_precision_linears() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(16, 8).to(torch.bfloat16)
    M, c = torch.eye(16) + 0.1 * torch.randn(16, 16), torch.randn(16)
    want_w = lin.weight.float() @ M
    want_b = lin.weight.float() @ c + lin.bias.float()
    fold_affine_into_linear(lin, M, c)
    assert lin.weight.dtype == torch.bfloat16
    # One bf16 rounding of the fp32 result, not a product of rounded partial sums.
    assert torch.equal(lin.weight, want_w.to(torch.bfloat16))
    assert torch.equal(lin.bias, want_b.to(torch.bfloat16))


def test_fold_errors() -> None:
    lin = nn.Linear(8, 4, bias=False)
    fold_affine_into_linear(lin, torch.eye(8) * 2, torch.zeros(8))  # no bias needed when c == 0
    assert torch.allclose(lin(torch.ones(1, 8)), 2 * (torch.ones(1, 8) @ (lin.weight / 2).T))
    with pytest.raises(MergeError, match="no bias|has none"):
        fold_affine_into_linear(lin, torch.eye(8), torch.ones(8))
    with pytest.raises(MergeError, match=r"expected M \(8, 8\)"):
        fold_affine_into_linear(nn.Linear(8, 4), torch.eye(7), torch.zeros(7))


@pytest.mark.parametrize("kind", ["repadapter", "arc"])
def test_layer_affine_form_equals_forward(kind: str) -> None:
    torch.manual_seed(0)
    layer = (
        RepAdapterLinear(nn.Linear(48, 20), adapter_dim=8, groups=4, scale=0.3)
        if kind == "repadapter"
        else ARCLinear(nn.Linear(48, 20), ARCBasis(48, 12), xavier_coeff=True)
    )
    randomize(layer, std=0.2)
    layer.eval()
    x = torch.randn(3, 10, 48)
    M, c = layer.affine()
    assert M.dtype == c.dtype == torch.float32
    assert (layer.adapt_input(x) - (x @ M.T + c)).abs().max().item() < 1e-5
    merged = layer.merged()  # the wrapped Linear with the adapter folded in: one plain Linear
    assert type(merged) is nn.Linear and not merged.weight.requires_grad
    assert (merged(x) - layer(x)).abs().max().item() < 1e-5


def test_wrapping_names_a_missing_linear_and_leaves_the_block_alone() -> None:
    block = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ConfigError, match=r"Sequential has no 'attn' module holding 'attn\.qkv' to wrap"):
        wrap_linears(block, {"attn.qkv": RepAdapterLinear})
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, depth=1)
    original = vit.blocks[0]
    qkv = original.attn.qkv
    wrapped = wrap_linears(original, {"attn.qkv": RepAdapterLinear})
    assert original.attn.qkv is qkv and type(original.attn.qkv) is nn.Linear  # no surgery on the frozen block
    assert wrapped.attn.qkv.base_layer is qkv and wrapped.mlp is original.mlp  # tensors shared


# -- whole models ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("base", [TINY, SMALL_LS], ids=["vit_tiny", "vit_small_layerscale"])
def test_merge_equals_unmerged_and_loads_strictly(method: str, base: dict) -> None:
    m = build(method, base)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        logits = m(x)
        backbone_only = m.head(m.vit.vit(x))  # the frozen timm model alone
        merged = m.merge()
        merged_logits = merged(x)
    assert type(merged) is timm.models.vision_transformer.VisionTransformer
    assert not merged.training
    # The adapters matter here (so the equality below is not vacuous) ...
    assert (logits - backbone_only).abs().max().item() > 1e-2
    # ... and the merged plain ViT reproduces them.
    assert (merged_logits - logits).abs().max().item() < TOL
    fresh = fresh_timm(base, 7)
    fresh.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        assert (fresh(x) - logits).abs().max().item() < TOL
    # merge() left the training module untouched.
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("method", ["repblock", "arc"])
def test_merge_real_vit_s_weights_with_layerscale(method: str, vits_weights) -> None:
    base = dict(model_name="vit_small_patch14_dinov2", checkpoint_path=str(vits_weights), img_size=56, model_kwargs={})
    cls, kw = METHODS[method]
    torch.manual_seed(0)
    m = cls(num_classes=10, **base, **kw)
    randomize(m, std=0.02)
    m.eval()
    assert isinstance(m.vit.vit.blocks[0].ls1, timm.layers.LayerScale)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        logits, merged_logits = m(x), m.merge()(x)
    err = (merged_logits - logits).abs().max().item()
    assert err < TOL, err


@pytest.mark.parametrize("method", ["repblock", "arc"])
def test_merge_from_bf16_training_is_done_in_fp32(method: str) -> None:
    m = build(method, SMALL_LS)
    m_bf16 = m.to(torch.bfloat16)
    reference = copy.deepcopy(m_bf16).float()  # the same (bf16-rounded) weights, computed in fp32
    merged = m_bf16.merge()
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    assert all(p.dtype == torch.bfloat16 for p in adapter_layers(m_bf16.vit)[0].parameters())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (merged(x) - reference(x)).abs().max().item() < TOL


@pytest.mark.parametrize("method", ["repblock", "arc"])
def test_export_safetensors_loads_in_timm(method: str, tmp_path) -> None:
    m = build(method, TINY, num_classes=5)
    path = m.export(tmp_path / "merged.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert (meta["model_name"], meta["img_size"], meta["num_classes"]) == ("vit_tiny_patch16_224", "32", "5")
    assert json.loads(meta["model_kwargs"]) == {"depth": 2} and len(json.loads(meta["mean"])) == 3
    loaded = timm.create_model(
        meta["model_name"],
        num_classes=int(meta["num_classes"]),
        img_size=int(meta["img_size"]),
        checkpoint_path=str(path),
        **json.loads(meta["model_kwargs"]),
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (loaded(x) - m(x)).abs().max().item() < TOL
    with pytest.raises(ConfigError, match=".safetensors"):  # the export format comes from the suffix
        m.export(tmp_path / "merged.pth")


@pytest.mark.parametrize("method", list(METHODS))
def test_flops_unmerged_adds_adapters_merged_is_backbone(method: str) -> None:
    """Analytic FLOPs equal FlopCounterMode (2 per multiply-add, no norms) on real forwards."""
    m = build(method, TINY, num_classes=5)
    m.vit.set_fused_attn(False)
    x = torch.randn(1, 3, 32, 32)
    shape, n = m.vit.shape(), m.vit.num_tokens
    extra = sum(a.flops(n) for a in adapter_layers(m.vit))
    per_token = {
        "repblock": 2 * (192 * 8 + 192 * 4),
        "repattn": 192 * 8 + 192 * 4,
        "arc": 2 * 2 * 192 * 50,
        "arc_att": 2 * 192 * 50,
    }[method]
    assert extra == 2 * n * per_token  # depth 2
    assert m.model.full_flops() == vit_flops(shape, 5, extra=extra)  # the unmerged form runs the adapters
    assert m.inference_flops() == m.backbone_flops() == vit_flops(shape, 5)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        m(x)
    assert counter.get_total_flops() == 2 * vit_flops(shape, 5, extra=extra, norm=False)
    merged = m.merge()
    for blk in merged.blocks:
        blk.attn.fused_attn = False
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        merged(x)
    assert counter.get_total_flops() == 2 * vit_flops(shape, 5, norm=False)
