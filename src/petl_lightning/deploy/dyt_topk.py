"""DyT's deployable inference form: a fixed number of kept tokens per image and block (top-k).

DyT's own eval forward keeps a token when ``sigmoid(logit) > threshold``, so how many tokens each
block gathers depends on the data: a host sync per block and shapes no exporter can fix.
:class:`DyTTopK` keeps, in every block and dispatch site, each image's ``keep_count`` patch tokens
with the largest dispatcher logits (:meth:`DyTBlock.forward_gathered` with a keep count): static
shapes, no host sync, and the sub-block still runs on the gathered kept rows only, so the exported
graph really skips the work. It computes what ``DyT(fixed_keep_rate=r)`` computes in eval mode.
"""

from __future__ import annotations

import copy
from typing import Any, cast

from torch import Tensor, nn

from petl_lightning.backbone import FrozenViT
from petl_lightning.errors import ConfigError
from petl_lightning.layers.dyt_block import DyTBlock


class DyTTopK(nn.Module):
    """Images to logits through DyT's gathered path keeping ``keep_count`` patch tokens per image
    at every dispatch site (prefix tokens such as CLS are always kept).

    Args:
        vit: the frozen backbone (embedding, final norm and pooling; its blocks are DyT's).
        blocks: DyT's blocks.
        head: the classifier.
        keep_count: patch tokens each image keeps per site, ``0 <= keep_count <= patches``.
    """

    blocks: nn.ModuleList

    def __init__(self, vit: FrozenViT, blocks: nn.ModuleList, head: nn.Module, keep_count: int) -> None:
        super().__init__()
        if not 0 <= keep_count <= vit.num_patches:
            raise ConfigError(f"keep_count must lie in [0, {vit.num_patches}] (the patch tokens), got {keep_count}.")
        self.vit, self.blocks, self.head = vit, blocks, head
        self.keep_count = keep_count

    @classmethod
    def of(cls, model: Any, keep_rate: float | None = None) -> DyTTopK:
        """The top-k form of a :class:`~petl_lightning.methods.dyt.DyT` at ``keep_rate`` (default: its
        ``fixed_keep_rate``), on copies of its modules in eval mode (``model`` is not modified)."""
        rate = model.hparams.fixed_keep_rate if keep_rate is None else keep_rate
        if rate is None:
            raise ConfigError(
                "DyT exports with a fixed keep rate (the top-k tokens per image and block); pass keep_rate "
                f"(petl-lightning export --keep_rate), e.g. its target_rate {model.hparams.target_rate}."
            )
        if not 0.0 <= rate <= 1.0:
            raise ConfigError(f"keep_rate must lie in [0, 1], got {rate}.")
        vit, blocks, head = copy.deepcopy((model.vit, model.blocks, model.head))  # one memo: shared modules stay shared
        return cls(vit, blocks, head, int(round(rate * model.vit.num_patches))).eval()

    def forward(self, images: Tensor) -> Tensor:
        tokens = self.vit.embed(images)
        for blk in self.blocks:
            tokens = cast(DyTBlock, blk).forward_gathered(tokens, self.keep_count)[0]
        return self.head(self.vit.pool(tokens))

    def extra_repr(self) -> str:
        return f"keep_count={self.keep_count}"


__all__ = ["DyTTopK"]
