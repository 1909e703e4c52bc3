"""Fold linear adapters into the backbone: the shared code of RepAdapter and ARC.

Both methods put a per-token affine map ``A(x) = x @ M.T + c`` between a block's LayerNorm and the
branch's first Linear (``attn.qkv``, ``mlp.fc1``). A Linear after an affine map is a Linear::

    W (x M^T + c) + b = (W M) x + (W c + b)   =>   W' = W M,  b' = W c + b

so after training the adapters disappear and the model is a plain timm ``VisionTransformer``
(same FLOPs, same latency, loads into ``timm.create_model`` with ``strict=True``).

This module holds :class:`AffineAdapterBlock` (the block wrapper both methods train with),
:func:`fold_affine_into_linear` and :func:`merge_into_vit`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from petl_lightning.errors import PETLError


class MergeError(PETLError, ValueError):
    """An adapter cannot be folded into the layer that follows it."""


class AffineAdapter(Protocol):
    """What a mergeable adapter offers: ``forward(x) == x @ M.T + c`` in eval mode."""

    def affine(self) -> tuple[Tensor, Tensor]: ...


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


class AffineAdapterBlock(nn.Module):
    """A frozen timm ``Block`` with an affine adapter on each branch's input (after the norm).

    Reuses the block's own sub-modules, so LayerScale, drop-path and fused attention work as in
    timm. ``None`` means no adapter on that branch (e.g. RepAdapter's ``repattn`` placement).
    """

    def __init__(self, block: nn.Module, attn_adapter: nn.Module | None, mlp_adapter: nn.Module | None) -> None:
        super().__init__()
        for name in ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"):
            if not hasattr(block, name):
                raise MergeError(
                    f"{type(block).__name__} has no {name!r}; adapters expect a timm "
                    f"vision_transformer.Block (pre-norm, attn + mlp branches)."
                )
        self.norm1, self.attn, self.ls1, self.drop_path1 = block.norm1, block.attn, block.ls1, block.drop_path1
        self.norm2, self.mlp, self.ls2, self.drop_path2 = block.norm2, block.mlp, block.ls2, block.drop_path2
        self.attn_adapter = attn_adapter if attn_adapter is not None else nn.Identity()
        self.mlp_adapter = mlp_adapter if mlp_adapter is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.attn_adapter(self.norm1(x)))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.mlp_adapter(self.norm2(x)))))
        return x

    def adapter_flops(self, n_tokens: int) -> int:
        """Multiply-adds the adapters add on ``n_tokens`` tokens (0 once merged)."""
        return sum(a.flops(n_tokens) for a in (self.attn_adapter, self.mlp_adapter) if hasattr(a, "flops"))

    @torch.no_grad()
    def fold_into(self, block: nn.Module) -> None:
        """Fold this block's adapters into ``block.attn.qkv`` / ``block.mlp.fc1`` (another block, in place)."""
        for adapter, owner, lin in ((self.attn_adapter, block.attn, "qkv"), (self.mlp_adapter, block.mlp, "fc1")):
            if isinstance(adapter, nn.Identity):
                continue
            target = getattr(owner, lin, None)
            if not isinstance(target, nn.Linear):
                raise MergeError(
                    f"Cannot merge: the branch's first layer {type(owner).__name__}.{lin} is "
                    f"{type(target).__name__}, not an nn.Linear."
                )
            fold_affine_into_linear(target, *adapter.affine())


@torch.no_grad()
def merge_into_vit(
    model_name: str,
    backbone: VisionTransformer,
    blocks: Sequence[AffineAdapterBlock],
    head: nn.Linear,
    model_kwargs: dict[str, Any] | None = None,
) -> VisionTransformer:
    """A fresh fp32 timm ``VisionTransformer`` equal to backbone + adapters + head, adapters folded.

    Built with ``timm.create_model(model_name, pretrained=False, num_classes=head.out_features,
    img_size=<backbone's>, **model_kwargs)``, so its ``state_dict`` loads with ``strict=True`` into
    that same call. Nothing passed in is modified. Returned in eval mode, on the backbone's device.
    """
    if len(blocks) != len(backbone.blocks):
        raise MergeError(f"Got {len(blocks)} adapter blocks for a backbone with {len(backbone.blocks)} blocks.")
    kwargs: dict[str, Any] = dict(model_kwargs or {})
    kwargs.update(num_classes=head.out_features, img_size=backbone.patch_embed.img_size)
    kwargs.pop("drop_path_rate", None)
    merged = timm.create_model(model_name, pretrained=False, **kwargs)
    if not isinstance(merged, VisionTransformer):
        raise MergeError(f"{model_name!r} does not build a timm VisionTransformer.")
    state = {k: v.float() if v.is_floating_point() else v
             for k, v in backbone.state_dict().items() if not k.startswith("head.")}
    state["head.weight"], state["head.bias"] = head.weight.float(), head.bias.float()
    merged.load_state_dict(state, strict=True)
    device = next(backbone.parameters()).device
    merged = merged.to(device=device, dtype=torch.float32)
    for wrapper, block in zip(blocks, merged.blocks):
        wrapper.fold_into(block)
    return merged.eval()


def export_safetensors(model: nn.Module, path: str | Path) -> Path:
    """Save ``model.state_dict()`` (contiguous CPU tensors) as ``.safetensors``; returns the path.

    A merged model saved this way loads back with
    ``timm.create_model(model_name, num_classes=C, img_size=S, checkpoint_path=path)``.
    """
    from safetensors.torch import save_file

    p = Path(path).expanduser()
    if p.suffix != ".safetensors":
        raise MergeError(f"Export path {str(p)!r} must end in .safetensors.")
    p.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(p))
    return p


__all__ = [
    "AffineAdapter", "AffineAdapterBlock", "MergeError", "export_safetensors", "fold_affine_into_linear",
    "merge_into_vit",
]
