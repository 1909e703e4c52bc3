"""The sub-modules of a frozen timm ``Block``, for a method's own block that runs them (shared, not
copied), so LayerScale, drop-path and fused attention behave as in timm."""

from __future__ import annotations

from typing import cast

from timm.models.vision_transformer import Block
from torch import nn


class BlockParts(nn.Module):
    """A module holding ``block``'s ``norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2``; a
    subclass writes its ``forward`` with them, as timm's ``Block.forward`` does."""

    norm1: nn.Module
    attn: nn.Module
    ls1: nn.Module
    drop_path1: nn.Module
    norm2: nn.Module
    mlp: nn.Module
    ls2: nn.Module
    drop_path2: nn.Module

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        blk = cast(Block, block)  # any module with a timm Block's sub-modules
        self.norm1, self.attn, self.ls1, self.drop_path1 = blk.norm1, blk.attn, blk.ls1, blk.drop_path1
        self.norm2, self.mlp, self.ls2, self.drop_path2 = blk.norm2, blk.mlp, blk.ls2, blk.drop_path2


__all__ = ["BlockParts"]
