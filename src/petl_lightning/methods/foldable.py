"""`FoldableAdapterModule`: what RepAdapter and ARC share.

Both train affine adapters in :class:`~petl_lightning.merge.AffineAdapterBlock`s (``self.blocks``)
and fold them into the backbone for inference, so they share the forward, the training-form FLOPs,
:meth:`merge` and :meth:`export`. Their inference FLOPs are the backbone's (the merged form).
"""

from __future__ import annotations

from pathlib import Path

from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from petl_lightning.merge import export_safetensors, merge_into_vit
from petl_lightning.methods.base import PETLModule


class FoldableAdapterModule(PETLModule):
    """A :class:`PETLModule` whose ``self.blocks`` (a ``ModuleList`` of ``AffineAdapterBlock``)
    fold into a plain timm ``VisionTransformer``."""

    def forward_tokens(self, tokens: Tensor) -> Tensor:
        x = tokens
        for blk in self.blocks:
            x = blk(x)
        return x

    def unmerged_flops(self) -> int:
        """FLOPs per image of the training form (backbone + head + the adapters' multiply-adds)."""
        n = self.vit.num_tokens
        return self.backbone_flops() + sum(blk.adapter_flops(n) for blk in self.blocks)

    def merge(self) -> VisionTransformer:
        """A plain fp32 timm ``VisionTransformer`` (with this head) computing the same logits in eval mode.

        Its ``state_dict`` loads with ``strict=True`` into ``timm.create_model(model_name,
        num_classes=..., img_size=..., **model_kwargs)``. This module is not modified.
        """
        hp = self.hparams
        return merge_into_vit(hp.model_name, self.vit.vit, list(self.blocks), self.head, hp.model_kwargs)

    def export(self, path: str | Path) -> Path:
        """Merge and save as ``.safetensors``; load with ``timm.create_model(..., checkpoint_path=path)``."""
        return export_safetensors(self.merge(), path)


__all__ = ["FoldableAdapterModule"]
