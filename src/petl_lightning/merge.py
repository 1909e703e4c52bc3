"""Fold linear adapters into the backbone: the shared code of RepAdapter and ARC.

Both methods put a per-token affine map ``A(x) = x @ M.T + c`` between a block's LayerNorm and the
branch's first Linear (``attn.qkv``, ``mlp.fc1``). A Linear after an affine map is a Linear::

    W (x M^T + c) + b = (W M) x + (W c + b)   =>   W' = W M,  b' = W c + b

so after training the adapters disappear and the model is a plain timm ``VisionTransformer``
(same FLOPs, same latency, loads into ``timm.create_model`` with ``strict=True``).

This module holds only the folding maths (:func:`fold_affine_into_linear`), the assembly of a
merged plain timm model (:func:`merge_into_vit`) and its export (:func:`export_safetensors`); the
block both methods train with is :class:`petl_lightning.methods.foldable.FoldableBlock`.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from petl_lightning.errors import PETLError
from petl_lightning.layers.lora import LoRALinear, merge_lora


class MergeError(PETLError, ValueError):
    """An adapter cannot be folded into the layer that follows it."""


@torch.no_grad()
def fold_affine_into_linear(linear: nn.Linear, M: Tensor, c: Tensor) -> None:
    """In place: make ``linear(x)`` compute ``linear(x @ M.T + c)``, i.e. ``W' = W M``, ``b' = W c + b``.

    The algebra runs in fp32 (whatever the Linear's dtype) and the result is cast back.
    ``linear`` must have a bias unless ``c`` is zero (a new bias would change the state-dict keys).
    """
    d = linear.in_features
    if tuple(M.shape) != (d, d) or tuple(c.shape) != (d,):
        raise MergeError(
            f"Cannot fold an affine map with M {tuple(M.shape)} and c {tuple(c.shape)} into "
            f"Linear(in_features={d}); expected M ({d}, {d}) and c ({d},)."
        )
    w = linear.weight.float()
    M, c = M.to(w.device, torch.float32), c.to(w.device, torch.float32)
    shift = w @ c
    if linear.bias is None:
        if bool(shift.abs().max() > 0):
            raise MergeError(
                "The adapter has a non-zero bias but the Linear after it has none (e.g. a model built "
                "with qkv_bias=False); it cannot be folded without adding a bias."
            )
    else:
        linear.bias.copy_(linear.bias.float() + shift)
    linear.weight.copy_(w @ M)


@torch.no_grad()
def merge_into_vit(
    model_name: str,
    backbone: VisionTransformer,
    head: nn.Linear,
    fold_block: Callable[[int, nn.Module], None] | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> VisionTransformer:
    """A fresh fp32 timm ``VisionTransformer`` equal to backbone + adapters + head, adapters folded.

    Built with ``timm.create_model(model_name, pretrained=False, num_classes=head.out_features,
    img_size=<backbone's>, **model_kwargs)``, so its ``state_dict`` loads with ``strict=True`` into
    that same call. LoRA layers inside ``backbone`` are folded into their Linears; then
    ``fold_block(i, block)`` folds the method's adapters of block ``i`` into the fresh block in place.
    Nothing passed in is modified. Returned in eval mode, on the backbone's device.
    """
    kwargs: dict[str, Any] = dict(model_kwargs or {})
    kwargs.update(num_classes=head.out_features, img_size=backbone.patch_embed.img_size)
    kwargs.pop("drop_path_rate", None)
    merged = timm.create_model(model_name, pretrained=False, **kwargs)
    if not isinstance(merged, VisionTransformer):
        raise MergeError(f"{model_name!r} does not build a timm VisionTransformer.")
    source = backbone
    if any(isinstance(m, LoRALinear) for m in backbone.modules()):
        source = merge_lora(copy.deepcopy(backbone))
    state = {
        k: v.float() if v.is_floating_point() else v
        for k, v in source.state_dict().items()
        if not k.startswith(("head.", "head_dist."))
    }
    state["head.weight"], state["head.bias"] = head.weight.float(), head.bias.float()
    if "head_dist.weight" in merged.state_dict():
        # A distilled DeiT averages head(CLS) and head_dist(DIST); our head reads their mean, so both
        # heads get its weights: (W c + b + W d + b) / 2 = W (c + d) / 2 + b.
        state["head_dist.weight"], state["head_dist.bias"] = state["head.weight"], state["head.bias"]
    merged.load_state_dict(state, strict=True)
    device = next(backbone.parameters()).device
    merged = merged.to(device=device, dtype=torch.float32)
    if fold_block is not None:
        for i, block in enumerate(merged.blocks):
            fold_block(i, block)
    return merged.eval()


def export_safetensors(model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Save ``model.state_dict()`` (contiguous CPU tensors) as ``.safetensors`` with ``metadata``
    (values stored as JSON strings: model name, image size, classes, normalisation, ...), written to
    a temporary file and renamed, so an interrupted export never leaves half a file.

    A merged model saved this way loads back with ``timm.create_model(meta["model_name"],
    num_classes=int(meta["num_classes"]), img_size=int(meta["img_size"]), checkpoint_path=path)``.
    """
    from safetensors.torch import save_file

    p = Path(path).expanduser()
    if p.suffix != ".safetensors":
        raise MergeError(f"Export path {str(p)!r} must end in .safetensors.")
    p.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=meta)
    os.replace(tmp, p)
    return p


__all__ = ["MergeError", "export_safetensors", "fold_affine_into_linear", "merge_into_vit"]
