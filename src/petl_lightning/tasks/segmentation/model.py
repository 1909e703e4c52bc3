"""``SegmentationModel``: an adapted ViT and a decode head, images to per-pixel logits (a plain module).

The ViT runs its blocks up to the last one the head reads (blocks after it are not run) and hands the
head the patch-token maps after those blocks, each through the ViT's final norm (as timm's
``forward_intermediates(norm=True)`` and DINOv2's ``get_intermediate_layers``). A token-skipping
method (DyT) skips MLP work per token inside the blocks, but every token stays in the sequence, so
every pixel still reaches the head.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import NamedTuple, Protocol, cast

import torch
from torch import Tensor, nn

from petl_lightning.adapted import AdaptedViT
from petl_lightning.errors import ConfigError
from petl_lightning.flops import embed_flops, layernorm_flops
from petl_lightning.stats import InferenceOutput
from petl_lightning.tasks.segmentation.heads import resize


class DecodeHead(Protocol):
    """What a head is: maps (B, D, h, w) to logits, and its convolutions' multiply-adds."""

    def __call__(self, maps: Sequence[Tensor]) -> Tensor: ...

    def flops(self, grid: tuple[int, int]) -> int: ...


class DenseRun(NamedTuple):
    """What :meth:`SegmentationModel.run` returns."""

    logits: Tensor  # (B, K, H, W) at the image's size
    kept: Tensor  # (B, blocks run, sites): patch tokens each image sent through each skippable sub-block


class SegmentationModel(nn.Module):
    """An :class:`AdaptedViT` and a decode head reading the blocks ``levels``.

    Args:
        vit: the adapted ViT (built with ``num_classes=0``).
        head: :class:`~petl_lightning.tasks.segmentation.heads.UperNetHead` (four levels) or
            :class:`~petl_lightning.tasks.segmentation.heads.LinearHead` (reads the last level).
        levels: the blocks (1-based, increasing) whose outputs the head reads, e.g. ``(4, 6, 8, 12)``.
    """

    def __init__(self, vit: AdaptedViT, head: nn.Module, levels: Sequence[int]) -> None:
        super().__init__()
        levels = tuple(int(i) for i in levels)
        if not levels or list(levels) != sorted(set(levels)) or levels[0] < 1 or levels[-1] > vit.depth:
            raise ConfigError(
                f"levels must be increasing block numbers in 1..{vit.depth} (e.g. 4, 6, 8, 12 of 12), "
                f"got {list(levels)}."
            )
        self.vit = vit
        self.head = head
        self.levels = levels

    @property
    def grid(self) -> tuple[int, int]:
        """The patch grid (h, w) of the images this model takes."""
        h, w = self.vit.vit.patch_embed.grid_size
        return int(h), int(w)

    @property
    def img_size(self) -> int:
        return self.vit.img_size

    @property
    def num_classes(self) -> int:
        return int(cast(nn.Module, self.head).num_classes)  # type: ignore[arg-type]

    def to_map(self, tokens: Tensor) -> Tensor:
        """Tokens (B, N, D) to the normed patch-token map (B, D, h, w)."""
        patches = self.vit.vit.norm(tokens)[:, self.vit.num_prefix_tokens :]
        return patches.transpose(1, 2).reshape(tokens.shape[0], -1, *self.grid)

    def run(self, x: Tensor, complete: bool = False) -> DenseRun:
        """Images (B, C, H, W) of the model's size to logits (B, K, H, W) and the tokens each block
        kept. ``complete``: every token through every sub-block (DyT's complete model)."""
        tokens, maps, kept, start = self.vit.embed(x), [], [], 0
        for end in self.levels:
            if complete:
                tokens = self.vit.forward_blocks_complete(tokens, start, end)
            else:
                run = self.vit.forward_blocks(tokens, start, end)
                tokens = run.tokens
                kept.append(run.kept)
            maps.append(self.to_map(tokens))
            start = end
        logits = resize(cast(DecodeHead, self.head)(maps), x.shape[-2:])
        blocks = torch.cat(kept, 1) if kept else x.new_zeros(x.shape[0], self.levels[-1], self.vit.sites)
        return DenseRun(logits, blocks)

    def forward(self, x: Tensor) -> Tensor:
        """Per-pixel logits (B, K, H, W) (in training: a token-skipping method's training path)."""
        return self.run(x).logits

    def complete_logits(self, x: Tensor) -> Tensor:
        """Per-pixel logits with every token through every sub-block (DyT's complete model)."""
        return self.run(x, complete=True).logits

    # -- what executed ----------------------------------------------------------------------------
    def head_flops(self, norm: bool = True) -> int:
        """FLOPs after the blocks: the final norm at each level and the head's convolutions."""
        s = self.vit.shape()
        norms = len(self.levels) * layernorm_flops(s.num_tokens, s.dim) if norm else 0
        return norms + cast(DecodeHead, self.head).flops(self.grid)

    def executed_flops(self, kept: Tensor, norm: bool = True, merged: bool = False) -> Tensor:
        """FLOPs per image (B,) float64 of a forward whose blocks kept ``kept`` (B, blocks run, sites)
        (papers' convention: one multiply-add is one FLOP). ``merged``: adapters that fold are free."""
        blocks = self.vit.block_flops(kept, 0, norm, merged).sum(1)
        return blocks + embed_flops(self.vit.shape(), norm) + self.head_flops(norm)

    def full_flops(self, norm: bool = True, merged: bool = False) -> int:
        """FLOPs per image with every token through every sub-block."""
        kept = torch.full((1, self.levels[-1], self.vit.sites), float(self.vit.num_patches))
        return int(self.executed_flops(kept, norm, merged)[0])

    def infer(self, x: Tensor) -> InferenceOutput:
        """Logits and what the deployed model executes per image: FLOPs (adapters that fold are
        free; head included) and the patch tokens kept and offered in each block (0 after the last
        level: those blocks do not run)."""
        out = self.run(x)
        flops = self.executed_flops(out.kept, merged=True)
        b, run = x.shape[0], out.kept.shape[1]
        kept = out.kept.new_zeros(b, self.vit.depth)
        offered = kept.clone()
        kept[:, :run] = out.kept.sum(-1)
        offered[:, :run] = float(self.vit.num_patches * self.vit.sites)
        return InferenceOutput(out.logits, flops, kept=kept, offered=offered)

    # -- deployment -------------------------------------------------------------------------------
    def deploy_form(self, keep_rate: float | None = None) -> SegmentationModel:
        """A copy (fp32, eval mode) as a deployment runs it: the ViT's adapters folded into a plain
        timm ViT (``MergeError`` where they cannot fold), or DyT's top-``keep_rate`` form."""
        form = self.vit.deploy_form(keep_rate)
        vit = form if isinstance(form, AdaptedViT) else AdaptedViT(form, list(cast(nn.Module, form).blocks))  # type: ignore[arg-type]
        return SegmentationModel(vit, copy.deepcopy(self.head), self.levels).float().eval()

    def merge(self) -> SegmentationModel:
        """:meth:`deploy_form` of a method whose adapters fold: a plain timm ViT and this head."""
        return self.deploy_form()

    def example_input(self, batch: int = 2) -> Tensor:
        return self.vit.example_input(batch)


__all__ = ["DenseRun", "SegmentationModel"]
