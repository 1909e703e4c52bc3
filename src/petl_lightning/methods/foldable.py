"""The block and module RepAdapter and ARC share: affine adapters that fold into the backbone.

:class:`FoldableBlock` is a frozen timm ``Block`` with an affine adapter on each branch's input
(after its LayerNorm); :class:`FoldableAdapterModule` runs a list of them, counts their training
FLOPs, and folds them block by block when :meth:`PETLModule.merge` builds the plain timm
``VisionTransformer`` whose inference FLOPs are the backbone's.
"""

from __future__ import annotations

from typing import Protocol, cast

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from petl_lightning.merge import MergeError, fold_affine_into_linear
from petl_lightning.methods.base import PETLModule


class AffineLayer(Protocol):
    """An adapter that folds: ``affine() -> (M, c)`` with ``forward(x) == x @ M.T + c`` in eval mode."""

    def affine(self) -> tuple[Tensor, Tensor]: ...

    def flops(self, n_tokens: int) -> int: ...


BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


class FoldableBlock(nn.Module):
    """A frozen timm ``Block`` with affine adapters on the branch inputs (``None``: none there)::

        x = x + drop_path1(ls1(attn(attn_adapter(norm1(x)))))
        x = x + drop_path2(ls2(mlp(mlp_adapter(norm2(x)))))

    Reuses the block's own sub-modules, so LayerScale, drop-path and fused attention work as in
    timm. Any adapter with ``affine() -> (M, c)`` (RepAdapter's, ARC's) can be folded by
    :meth:`fold_into` into ``attn.qkv`` / ``mlp.fc1``.
    """

    norm1: nn.Module
    attn: nn.Module
    ls1: nn.Module
    drop_path1: nn.Module
    norm2: nn.Module
    mlp: nn.Module
    ls2: nn.Module
    drop_path2: nn.Module
    attn_adapter: nn.Module
    mlp_adapter: nn.Module

    def __init__(self, block: nn.Module, attn_adapter: nn.Module | None, mlp_adapter: nn.Module | None) -> None:
        super().__init__()
        missing = [name for name in BLOCK_PARTS if not hasattr(block, name)]
        if missing:
            raise MergeError(
                f"{type(block).__name__} has no {missing[0]!r}; adapters expect a timm "
                f"vision_transformer.Block (pre-norm, attn + mlp branches)."
            )
        blk = cast(Block, block)  # any module with a timm Block's sub-modules
        self.norm1, self.attn, self.ls1, self.drop_path1 = blk.norm1, blk.attn, blk.ls1, blk.drop_path1
        self.norm2, self.mlp, self.ls2, self.drop_path2 = blk.norm2, blk.mlp, blk.ls2, blk.drop_path2
        self.attn_adapter = attn_adapter if attn_adapter is not None else nn.Identity()
        self.mlp_adapter = mlp_adapter if mlp_adapter is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.attn_adapter(self.norm1(x)))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.mlp_adapter(self.norm2(x)))))
        return x

    def adapters(self) -> list[AffineLayer]:
        """The block's adapters (attention first)."""
        found = (self.attn_adapter, self.mlp_adapter)
        return [cast(AffineLayer, a) for a in found if not isinstance(a, nn.Identity)]

    def adapter_flops(self, n_tokens: int) -> int:
        """Multiply-adds the adapters add on ``n_tokens`` tokens (0 once merged)."""
        return sum(a.flops(n_tokens) for a in self.adapters())

    @torch.no_grad()
    def fold_into(self, block: nn.Module) -> None:
        """Fold this block's adapters into ``block.attn.qkv`` / ``block.mlp.fc1`` (another block, in place)."""
        for adapter, owner, name in ((self.attn_adapter, block.attn, "qkv"), (self.mlp_adapter, block.mlp, "fc1")):
            if isinstance(adapter, nn.Identity):
                continue
            target = getattr(owner, name, None)
            if not isinstance(target, nn.Linear):
                raise MergeError(
                    f"Cannot merge: the branch's first layer {type(owner).__name__}.{name} is "
                    f"{type(target).__name__}, not an nn.Linear."
                )
            fold_affine_into_linear(target, *cast(AffineLayer, adapter).affine())


class FoldableAdapterModule(PETLModule):
    """A :class:`PETLModule` whose ``self.blocks`` (a ``ModuleList`` of :class:`FoldableBlock`) fold
    into a plain timm ``VisionTransformer``."""

    blocks: nn.ModuleList

    def forward_tokens(self, tokens: Tensor) -> Tensor:
        for blk in self.blocks:
            tokens = blk(tokens)
        return tokens

    def unmerged_flops(self) -> int:
        """FLOPs per image of the training form (backbone + head + the adapters' multiply-adds)."""
        n = self.vit.num_tokens
        return self.backbone_flops() + sum(cast(FoldableBlock, blk).adapter_flops(n) for blk in self.blocks)

    def fold_block(self, index: int, block: nn.Module) -> None:
        cast(FoldableBlock, self.blocks[index]).fold_into(block)


__all__ = ["FoldableAdapterModule", "FoldableBlock"]
