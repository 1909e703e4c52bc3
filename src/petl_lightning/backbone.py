"""The shared frozen Vision Transformer every method stands on.

`FrozenViT` builds any timm ``VisionTransformer`` by name, loads its weights from a local file
(Google's ``.npz`` layout such as ``ViT-B_16.npz``, a ``.pth``/``.pt``/``.bin`` state dict, or
``.safetensors``) or from the Hugging Face hub cache, freezes every parameter, and exposes the
pieces methods need: :meth:`embed`, :attr:`blocks`, :meth:`pool`.
"""

from __future__ import annotations

import difflib
import os
import socket
from pathlib import Path
from typing import Any, cast

import timm
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn

from petl_lightning.errors import CheckpointError, ConfigError, ModelNameError
from petl_lightning.flops import ViTShape

DEFAULT_MODEL = "vit_base_patch16_224.orig_in21k"
WEIGHT_SUFFIXES = (".npz", ".pth", ".pt", ".bin", ".safetensors")
_IGNORED_KEY_PREFIXES = ("head.", "pre_logits.", "fc_norm.", "head_drop.")


def check_model_name(model_name: str) -> None:
    """Raise :class:`ModelNameError` with close suggestions when timm does not know ``model_name``."""
    arch = model_name.split(".", 1)[0]
    if timm.is_model(arch):
        return
    known = timm.list_models("vit_*")
    close = difflib.get_close_matches(arch, known, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else " See timm.list_models('vit_*')."
    raise ModelNameError(f"Unknown timm model name {model_name!r}.{hint}")


def _hub_file_cached(model_name: str) -> bool:
    """True when the pretrained weights of ``model_name`` are already in the local hub cache."""
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(model_name)
    hub_id: str | None = getattr(cfg, "hf_hub_id", None)
    if cfg is None or not hub_id:
        return False
    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        if isinstance(try_to_load_from_cache(hub_id, filename), str):
            return True
    return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, so an offline machine fails in seconds rather than after retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_weights(vit: VisionTransformer, checkpoint_path: str | os.PathLike) -> None:
    """Load a local weights file into ``vit`` (classifier keys ignored), with clear errors.

    ``.npz`` files use timm's loader for Google's layout; other files are state dicts, passed
    through timm's ``checkpoint_filter_fn`` (which also resamples patch and position embeddings
    when patch size or image size differ).
    """
    path = Path(checkpoint_path).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"Weights file not found: {str(path)!r}. Pass the path of a local file "
            f"(e.g. ViT-B_16.npz, a .pth or a .safetensors) as checkpoint_path."
        )
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise CheckpointError(
            f"Unknown weights format {suffix!r} for {str(path)!r}; expected one of {', '.join(WEIGHT_SUFFIXES)}."
        )
    if suffix == ".npz":
        try:
            vit.load_pretrained(str(path))
        except (KeyError, ValueError, RuntimeError, OSError) as err:
            raise CheckpointError(
                f"Could not load {str(path)!r} as a Google ViT .npz into this model: {err}. "
                f"Check that model_name matches the checkpoint (e.g. vit_base_patch16_224 for ViT-B_16.npz)."
            ) from None
        return
    try:
        state = timm.models.load_state_dict(str(path), weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure means the file is not weights
        raise CheckpointError(f"Could not read weights from {str(path)!r}: {err}") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{str(path)!r} does not hold a flat state dict of tensors.")
    try:
        state = checkpoint_filter_fn(state, vit)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{str(path)!r} does not fit {type(vit).__name__}: {err}") from None
    state = {k: v for k, v in state.items() if not k.startswith(_IGNORED_KEY_PREFIXES)}
    own = vit.state_dict()
    bad = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = sorted(set(own) - set(state) - {k for k in own if k.startswith(_IGNORED_KEY_PREFIXES)})
    unexpected = sorted(set(state) - set(own))
    if bad or missing or unexpected:
        parts = []
        if bad:
            parts.append("shape mismatch " + "; ".join(bad[:4]))
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        raise CheckpointError(
            f"Weights in {str(path)!r} do not fit this model: {'; '.join(parts)}. "
            f"Check model_name and model_kwargs (e.g. init_values for LayerScale)."
        )
    vit.load_state_dict(state, strict=False)


def check_family(vit: nn.Module, model_name: str) -> VisionTransformer:
    """Refuse, in one line saying why and what to use, a model that is not a timm ``VisionTransformer``
    (EVA-02's ``Eva`` passes rotary position embeddings into every block and attention)."""
    if isinstance(vit, VisionTransformer):
        return vit
    kind = type(vit).__name__
    why = (
        " (its blocks take rotary position embeddings at every call and its attention differs from timm's Attention)"
        if kind == "Eva"
        else ""
    )
    raise ModelNameError(
        f"{model_name!r} builds a timm {kind}, not a timm VisionTransformer{why}; petl_lightning supports "
        f"vit_* (incl. LayerScale, *_dinov2, *_reg4_dinov2, *_clip_*), deit_* and deit_*_distilled_* models."
    )


class FrozenViT(nn.Module):
    """A timm ViT with every parameter frozen and no classifier.

    Args:
        model_name: timm name, e.g. ``vit_base_patch16_224.orig_in21k`` (Google's ``ViT-B_16.npz``).
        checkpoint_path: local ``.npz``/``.pth``/``.pt``/``.bin``/``.safetensors`` weights. When
            ``None`` and ``pretrained`` is true, the hub cache is used (and downloaded when online).
        pretrained: ``False`` gives random weights (tests, speed benchmarks).
        img_size: input resolution override (position embeddings are resampled on load).
        drop_path_rate: stochastic depth of the frozen blocks, active in training mode only.
        model_kwargs: further ``timm.create_model`` arguments (e.g. ``{"init_values": 1.0}``).
    """

    def __init__(
        self,
        model_name: str = DEFAULT_MODEL,
        checkpoint_path: str | None = None,
        pretrained: bool = True,
        img_size: int | None = None,
        drop_path_rate: float = 0.0,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_model_name(model_name)
        kwargs: dict[str, Any] = dict(model_kwargs or {})
        kwargs.update(num_classes=0, drop_path_rate=drop_path_rate)
        if img_size is not None:
            if img_size < 1:
                raise ConfigError(f"img_size must be a positive number of pixels, got {img_size}.")
            kwargs["img_size"] = img_size
        use_hub = pretrained and checkpoint_path is None
        if use_hub and not _hub_file_cached(model_name) and not _hub_reachable():
            raise CheckpointError(
                f"Pretrained weights for {model_name!r} are not in the local Hugging Face cache and the "
                f"hub cannot be reached (offline). Pass a local file instead, e.g. "
                f"--model.checkpoint_path /path/ViT-B_16.npz (or FrozenViT(checkpoint_path=...)), "
                f"or pretrained=False for random weights."
            )
        vit = check_family(timm.create_model(model_name, pretrained=use_hub, **kwargs), model_name)
        size, patch = vit.patch_embed.img_size, vit.patch_embed.patch_size
        if size[0] % patch[0] or size[1] % patch[1]:
            lo, hi = size[0] // patch[0] * patch[0], -(-size[0] // patch[0]) * patch[0]
            raise ConfigError(
                f"img_size {size[0]} is not a multiple of {model_name!r}'s patch size {patch[0]} (the edge pixels "
                f"would be dropped); use {lo or hi} or {hi} (set --data.init_args.img_size)."
            )
        if pretrained and checkpoint_path is not None:
            load_weights(vit, checkpoint_path)
        vit.requires_grad_(False)
        self.vit = vit
        self.model_name = model_name

    @property
    def blocks(self) -> nn.Sequential:
        return self.vit.blocks

    @property
    def dim(self) -> int:
        return self.vit.embed_dim

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    @property
    def num_prefix_tokens(self) -> int:
        return self.vit.num_prefix_tokens

    @property
    def num_patches(self) -> int:
        return self.vit.patch_embed.num_patches

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens

    def shape(self) -> ViTShape:
        """Sizes for :mod:`petl_lightning.flops`."""
        v = self.vit
        blk: Any = v.blocks[0]  # a timm Block (attn.num_heads, mlp.fc1, mlp.fc2)
        hidden = blk.mlp.fc2.in_features
        pool: Any = getattr(v, "attn_pool", None)
        return ViTShape(
            dim=self.dim,
            depth=self.depth,
            num_heads=blk.attn.num_heads,
            mlp_hidden=hidden,
            num_patches=self.num_patches,
            num_prefix_tokens=self.num_prefix_tokens,
            patch_size=v.patch_embed.patch_size[0],
            in_chans=v.patch_embed.proj.in_channels,
            gated_mlp=blk.mlp.fc1.out_features == 2 * hidden,
            norm_pre=isinstance(v.norm_pre, nn.LayerNorm),
            fc_norm=isinstance(v.fc_norm, nn.LayerNorm),
            attn_pool_hidden=pool.mlp.fc1.out_features if pool is not None else 0,
        )

    def check_blocks(self, method: str) -> None:
        """Refuse in one line when ``method``, which wraps every block, cannot wrap this model's:
        it needs timm's pre-norm ``Block`` (norm1 -> Attention -> ls1, norm2 -> MLP(fc1, fc2) -> ls2)."""
        for blk in self.vit.blocks:
            mlp = getattr(blk, "mlp", None)
            problem = None
            if not isinstance(blk, Block) or type(blk).forward is not Block.forward:
                problem = f"{type(blk).__name__} blocks (not timm's pre-norm vision_transformer.Block)"
            elif not isinstance(blk.attn, Attention):
                problem = f"a {type(blk.attn).__name__} attention (not timm's Attention)"
            elif not all(isinstance(getattr(mlp, fc, None), nn.Linear) for fc in ("fc1", "fc2")):
                problem = f"a {type(mlp).__name__} MLP without fc1/fc2 Linears"
            if problem:
                raise ModelNameError(
                    f"{method} wraps each transformer block, but {self.model_name!r} has {problem}; "
                    f"use LinearProbe on it, or a vit_*/deit_* model with standard blocks."
                )

    def embed(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) to tokens (B, N, D): patch embed, prefix tokens, position, norm_pre."""
        v = self.vit
        x = v.patch_embed(x)
        x = v._pos_embed(x)
        x = v.patch_drop(x)
        return v.norm_pre(x)

    def pool(self, tokens: Tensor) -> Tensor:
        """Tokens (B, N, D) to features (B, D): final norm, then CLS (or the model's global pool)."""
        return self.vit.forward_head(self.vit.norm(tokens), pre_logits=True)

    def forward(self, x: Tensor) -> Tensor:
        """Pooled features of the frozen model."""
        x = self.embed(x)
        x = self.vit.blocks(x)
        return self.pool(x)

    def set_fused_attn(self, enabled: bool) -> None:
        """Switch timm's fused SDPA attention (off = explicit matmuls, which FLOP counters see)."""
        for blk in self.vit.blocks:
            cast(Attention, blk.attn).fused_attn = enabled  # type: ignore[misc]  # timm's Final is for TorchScript


def frozen_state_ids(module: nn.Module) -> set[int]:
    """Identities of the frozen tensors in ``module``'s state dict: every tensor except trainable
    parameters (a LoRA layer injected into the backbone trains, so it is kept in checkpoints)."""
    return {
        id(t)
        for t in module.state_dict(keep_vars=True).values()
        if not (isinstance(t, nn.Parameter) and t.requires_grad)
    }


__all__ = ["DEFAULT_MODEL", "FrozenViT", "check_family", "check_model_name", "load_weights", "frozen_state_ids"]
