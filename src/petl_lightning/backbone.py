"""The shared frozen Vision Transformer every method stands on.

`FrozenViT` builds any timm ``VisionTransformer`` by name, loads its weights from a local file
(Google's ``.npz`` layout such as ``ViT-B_16.npz``, a ``.pth``/``.pt``/``.bin`` state dict, or
``.safetensors``) or from the Hugging Face hub cache and freezes every parameter. It is the
:class:`~petl_lightning.adapted.AdaptedViT` with no adaptation.
"""

from __future__ import annotations

import difflib
import os
import socket
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn

from petl_lightning.adapted import AdaptedViT
from petl_lightning.errors import CheckpointError, ConfigError, ModelNameError

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


class FrozenViT(AdaptedViT):
    """A timm ViT with every parameter frozen and no classifier: the adapted ViT with no adaptation
    (what :class:`~petl_lightning.methods.baselines.LinearProbe` trains a head on, and what
    :func:`petl_lightning.adapt` adapts).

    Args:
        model_name: timm name, e.g. ``vit_base_patch16_224.orig_in21k`` (Google's ``ViT-B_16.npz``).
        checkpoint_path: local ``.npz``/``.pth``/``.pt``/``.bin``/``.safetensors`` weights. When
            ``None`` and ``pretrained`` is true, the hub cache is used (and downloaded when online).
        pretrained: ``False`` gives random weights (tests, speed benchmarks), drawn from
            ``init_seed``; it cannot be combined with ``checkpoint_path``.
        img_size: input resolution override (position embeddings are resampled on load).
        drop_path_rate: stochastic depth of the frozen blocks, active in training mode only.
        model_kwargs: further ``timm.create_model`` arguments (e.g. ``{"init_values": 1.0}``).
        init_seed: the seed of the random weights (``pretrained=False``), drawn apart from the global
            random state so that the same arguments always rebuild the same backbone (a checkpoint
            keeps the adapters only and rebuilds its backbone on load).
    """

    def __init__(
        self,
        model_name: str = DEFAULT_MODEL,
        checkpoint_path: str | None = None,
        pretrained: bool = True,
        img_size: int | None = None,
        drop_path_rate: float = 0.0,
        model_kwargs: dict[str, Any] | None = None,
        init_seed: int = 0,
    ) -> None:
        check_model_name(model_name)
        if not pretrained and checkpoint_path is not None:
            raise ConfigError(
                f"pretrained=false (random weights) contradicts checkpoint_path={str(checkpoint_path)!r}: "
                f"drop --model.init_args.checkpoint_path, or set pretrained=true to load it."
            )
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
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
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
        super().__init__(vit, vit.blocks)
        self.model_name = model_name


def frozen_timm_vit(model: nn.Module) -> VisionTransformer:
    """The frozen timm ``VisionTransformer`` behind ``model`` (a timm ViT, whose parameters this
    freezes, or a :class:`FrozenViT`); anything else is a one-line error."""
    if isinstance(model, FrozenViT):
        return model.vit
    if isinstance(model, AdaptedViT):
        raise ConfigError(
            f"adapt() takes a timm ViT or a FrozenViT, not an already adapted {type(model).__name__}; adapt the "
            f"model it was made from."
        )
    vit = check_family(model, type(model).__name__)
    return vit.requires_grad_(False)


__all__ = [
    "DEFAULT_MODEL",
    "FrozenViT",
    "check_family",
    "check_model_name",
    "frozen_timm_vit",
    "load_weights",
]
