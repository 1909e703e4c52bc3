"""The bottleneck adapter parallel to a frozen MLP (AdaptFormer's place, Chen et al. 2022)."""

from __future__ import annotations

from torch import Tensor, nn

from petl_lightning.layers.adapter import Adapter
from petl_lightning.layers.block_parts import BlockParts


class ParallelAdapterBlock(BlockParts):
    """A frozen timm ``Block`` with an :class:`~petl_lightning.layers.adapter.Adapter` parallel to its
    MLP, reading the MLP's normalised input, added outside LayerScale (a small LayerScale must not
    shrink the adapter's update)::

        x = x + drop_path1(ls1(attn(norm1(x))))
        h = norm2(x)
        x = x + drop_path2(ls2(mlp(h))) + adapter(h)

    The frozen sub-modules are the block's own (shared), so LayerScale, drop-path and fused
    attention behave as in timm.
    """

    def __init__(self, block: nn.Module, adapter: Adapter) -> None:
        super().__init__(block)
        self.adapter = adapter

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        h = self.norm2(x)
        return x + self.drop_path2(self.ls2(self.mlp(h))) + self.adapter(h)


__all__ = ["ParallelAdapterBlock"]
