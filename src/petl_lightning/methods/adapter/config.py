"""The bottleneck adapter's options (Houlsby et al. 2019, in AdaptFormer's parallel place) and the
adapted ViT they build. It is non-linear (ReLU), so it does not merge: Dyn-Adapter's ``adapter`` base."""

from __future__ import annotations

from dataclasses import dataclass

from timm.models.vision_transformer import VisionTransformer

from petl_lightning.adapted import AdaptedViT, require_timm_blocks
from petl_lightning.layers.adapter import Adapter
from petl_lightning.methods.adapter.block import ParallelAdapterBlock
from petl_lightning.methods.config import MethodConfig, check_count, check_rate


@dataclass
class AdapterConfig(MethodConfig):
    """A bottleneck adapter parallel to every block's MLP.

    Attributes:
        adapter_dim: hidden width (8).
        adapter_scale: fixed multiplier of the branch (AdaptFormer's ``s``).
        adapter_dropout: dropout on the hidden units, in training only.
    """

    adapter_dim: int = 8
    adapter_scale: float = 1.0
    adapter_dropout: float = 0.1

    def __post_init__(self) -> None:
        check_count("adapter_dim", self.adapter_dim)
        check_rate("adapter_dropout", self.adapter_dropout)

    def build(self, vit: VisionTransformer) -> AdaptedViT:
        require_timm_blocks(vit, "The bottleneck adapter")
        dim = int(vit.embed_dim)
        blocks = [
            ParallelAdapterBlock(b, Adapter(dim, self.adapter_dim, self.adapter_scale, self.adapter_dropout))
            for b in vit.blocks
        ]
        return AdaptedViT(vit, blocks)


__all__ = ["AdapterConfig"]
