"""FrozenViT: loading every weight format offline, freezing, and clear errors."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from petl_lightning.backbone import FrozenViT
from petl_lightning.errors import CheckpointError, ModelNameError

TINY = "vit_tiny_patch16_224"


def google_npz(vit: torch.nn.Module, path: Path) -> None:
    """Write a timm ViT in Google's ``ViT-B_16.npz`` key layout (the inverse of timm's npz loader)."""
    sd = {k: v.detach().numpy() for k, v in vit.state_dict().items()}
    dim = vit.embed_dim
    heads = vit.blocks[0].attn.num_heads
    hd = dim // heads
    out = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
    }
    for i in range(len(vit.blocks)):
        p, b = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        out[p + "LayerNorm_0/scale"], out[p + "LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
        out[p + "LayerNorm_2/scale"], out[p + "LayerNorm_2/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        for j, name in enumerate(("query", "key", "value")):
            w = qkv_w[j * dim : (j + 1) * dim]
            out[p + f"MultiHeadDotProductAttention_1/{name}/kernel"] = w.T.reshape(dim, heads, hd)
            out[p + f"MultiHeadDotProductAttention_1/{name}/bias"] = qkv_b[j * dim : (j + 1) * dim].reshape(heads, hd)
        out[p + "MultiHeadDotProductAttention_1/out/kernel"] = (
            sd[b + "attn.proj.weight"].reshape(dim, heads, hd).transpose(1, 2, 0)
        )
        out[p + "MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"]
        for j, fc in enumerate(("fc1", "fc2")):
            out[p + f"MlpBlock_3/Dense_{j}/kernel"] = sd[b + f"mlp.{fc}.weight"].T
            out[p + f"MlpBlock_3/Dense_{j}/bias"] = sd[b + f"mlp.{fc}.bias"]
    np.savez(path, **out)


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(TINY, pretrained=False, num_classes=0, img_size=64).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fmt", ["npz", "pth", "safetensors"])
def test_local_weights_load_exactly(tmp_path: Path, reference, images, fmt: str) -> None:
    path = tmp_path / f"weights.{fmt}"
    if fmt == "npz":
        google_npz(reference, path)
    elif fmt == "pth":
        torch.save({"model": reference.state_dict()}, path)  # wrapped, as many checkpoints are
    else:
        save_file(reference.state_dict(), str(path))
    vit = FrozenViT(TINY, checkpoint_path=str(path), img_size=64).eval()
    with torch.no_grad():
        torch.testing.assert_close(vit(images), reference(images), atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in vit.parameters())


def test_pieces_compose_to_timm_forward(reference, images) -> None:
    vit = FrozenViT(TINY, pretrained=False, img_size=64).eval()
    vit.vit.load_state_dict(reference.state_dict())
    tokens = vit.embed(images)
    assert tokens.shape == (2, vit.num_tokens, vit.dim) and vit.num_prefix_tokens == 1
    for blk in vit.blocks:
        tokens = blk(tokens)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_head(vit.vit.norm(tokens), pre_logits=True), reference(images))
        torch.testing.assert_close(vit.forward_features(images), reference.forward_features(images))  # timm's meaning
        torch.testing.assert_close(vit(images), reference(images))
    assert vit.depth == 12 and vit.shape().num_patches == 16


def test_real_vits_weights_resample_to_patch16(vits_weights: Path) -> None:
    """The shared DINOv2-layout ViT-S loads into patch-14 and, resampled, patch-16 models."""
    a = FrozenViT("vit_small_patch14_dinov2", checkpoint_path=str(vits_weights), img_size=56).eval()
    b = FrozenViT(
        "vit_small_patch16_224", checkpoint_path=str(vits_weights), img_size=64, model_kwargs={"init_values": 1.0}
    ).eval()
    assert a.shape().patch_size == 14 and b.shape().patch_size == 16
    assert float(a.vit.blocks[0].ls1.gamma.abs().mean()) > 0  # LayerScale weights came from the file
    torch.testing.assert_close(a.vit.blocks[3].mlp.fc1.weight, b.vit.blocks[3].mlp.fc1.weight)


def test_drop_path_override_is_active_only_in_training() -> None:
    vit = FrozenViT(TINY, pretrained=False, img_size=32, drop_path_rate=0.1)
    assert vit.vit.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    x = torch.randn(2, 3, 32, 32)
    vit.eval()
    torch.testing.assert_close(vit(x), vit(x))


def test_unknown_model_name_suggests_close_names() -> None:
    with pytest.raises(ModelNameError, match="vit_base_patch16_224"):
        FrozenViT("vit_bsae_patch16_224", pretrained=False)


def test_non_vit_model_is_refused() -> None:
    with pytest.raises(ModelNameError, match="not a timm VisionTransformer"):
        FrozenViT("resnet18", pretrained=False)


def test_missing_and_unknown_weight_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        FrozenViT(TINY, checkpoint_path=str(tmp_path / "ViT-B_16.npz"))
    bad = tmp_path / "weights.txt"
    bad.write_text("hello")
    with pytest.raises(CheckpointError, match="Unknown weights format"):
        FrozenViT(TINY, checkpoint_path=str(bad))
    garbage = tmp_path / "weights.pth"
    garbage.write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="Could not read"):
        FrozenViT(TINY, checkpoint_path=str(garbage))


def test_weights_of_another_size_are_refused(tmp_path: Path) -> None:
    small = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=32)
    path = tmp_path / "small.safetensors"
    save_file(small.state_dict(), str(path))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        FrozenViT(TINY, checkpoint_path=str(path), img_size=32)
    npz = tmp_path / "small.npz"
    google_npz(small, npz)
    with pytest.raises(CheckpointError, match="model_name"):
        FrozenViT(TINY, checkpoint_path=str(npz), img_size=32)


def test_offline_without_cache_fails_fast_with_a_fix(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="checkpoint_path"):
        FrozenViT("vit_base_patch16_224.orig_in21k")
    assert time.perf_counter() - start < 10
