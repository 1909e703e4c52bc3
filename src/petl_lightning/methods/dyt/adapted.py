"""DyT's adapted ViT: every frozen block wrapped by a :class:`~petl_lightning.methods.dyt.block.DyTBlock`.

In training mode the blocks run the masked path with sampled masks (hard forward, straight-through
gradient); in eval mode they run the inference rule (``skipping.inference``): the gathered path,
where skipped tokens really skip the sub-block, or the masked reference. The keep rule is
``sigmoid(logit) > threshold`` per token (the paper), or with ``skipping.fixed_keep_rate`` the top-k
tokens per image (ours; static shapes, what export runs).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from typing import cast

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from petl_lightning.adapted import AdaptedViT, BlockRun, Features, require_timm_blocks
from petl_lightning.errors import ConfigError, MergeError
from petl_lightning.layers.dispatcher import TokenDispatcher
from petl_lightning.methods.dyt.block import DyTBlock, TopKBlock
from petl_lightning.methods.dyt.loss import dyt_loss_terms
from petl_lightning.methods.dyt.skipping import SITES, TokenSkipping


class DyTViT(AdaptedViT):
    """A frozen timm ViT whose blocks are DyT's.

    Args:
        vit: the frozen timm model (shared, not modified).
        skipping: the token skipping options (:class:`~petl_lightning.methods.dyt.skipping.TokenSkipping`).
        adapter_dim / adapter_scale / adapter_dropout / num_experts: the parallel adapters.
    """

    def __init__(
        self,
        vit: VisionTransformer,
        skipping: TokenSkipping,
        adapter_dim: int = 8,
        adapter_scale: float = 1.0,
        adapter_dropout: float = 0.1,
        num_experts: int = 1,
    ) -> None:
        require_timm_blocks(vit, "DyT")
        p = int(vit.num_prefix_tokens)
        blocks = [
            DyTBlock(
                b,
                skipping,
                num_prefix_tokens=p,
                adapter_dim=adapter_dim,
                adapter_scale=adapter_scale,
                adapter_dropout=adapter_dropout,
                num_experts=num_experts,
            )
            for b in vit.blocks
        ]
        super().__init__(vit, blocks)
        self.skipping = skipping
        self.sites = len(SITES[skipping.sites])

    def dyt_blocks(self) -> list[DyTBlock]:
        """The blocks, typed (``nn.ModuleList`` iterates as plain modules)."""
        return [cast(DyTBlock, b) for b in self.blocks]

    def keep_count(self) -> int | None:
        """Patch tokens every image keeps per site under ``skipping.fixed_keep_rate`` (None: thresholded)."""
        return self.skipping.keep_count(self.num_patches)

    # -- the paths -------------------------------------------------------------------------------
    def forward_blocks(self, tokens: Tensor, start: int = 0, end: int | None = None) -> BlockRun:
        """Training: sampled masks (``kept`` carries their straight-through gradient); eval: the
        inference rule, gathered (``skipping.inference="gather"``) or masked."""
        if self.training:
            return self.forward_blocks_masked(tokens, start, end, sample=True)
        if self.skipping.inference == "mask":
            return self.forward_blocks_masked(tokens, start, end, sample=False)
        return self.forward_blocks_gathered(tokens, start, end, self.keep_count())

    def forward_blocks_gathered(
        self, tokens: Tensor, start: int = 0, end: int | None = None, keep_count: int | None = None
    ) -> BlockRun:
        """Blocks ``start:end`` on their gathered path (``keep_count``: top-k instead of the threshold)."""
        kept = []
        for blk in self.dyt_blocks()[start:end]:
            tokens, n = blk(tokens, keep_count)
            kept.append(n)
        return BlockRun(tokens, self._stack(kept, tokens))

    def forward_blocks_masked(
        self, tokens: Tensor, start: int = 0, end: int | None = None, sample: bool = False
    ) -> BlockRun:
        """Blocks ``start:end`` on their masked path; ``kept`` sums the masks (float32)."""
        kept = []
        for blk in self.dyt_blocks()[start:end]:
            tokens, masks = blk.forward_masked(tokens, sample)
            kept.append(masks.float().sum(-1))
        return BlockRun(tokens, self._stack(kept, tokens))

    def _stack(self, kept: list[Tensor], tokens: Tensor) -> Tensor:
        return torch.stack(kept, dim=1) if kept else tokens.new_zeros(tokens.shape[0], 0, self.sites)

    def forward_gathered(self, x: Tensor, keep_count: int | None = None) -> Features:
        """Images to pooled features and kept counts through the gathered path of every block."""
        return self._features(self.forward_blocks_gathered(self.embed(x), keep_count=keep_count))

    def forward_masked(self, x: Tensor, sample: bool = False) -> Features:
        """Images to pooled features and kept counts through the masked path of every block."""
        return self._features(self.forward_blocks_masked(self.embed(x), sample=sample))

    def forward_complete(self, x: Tensor) -> Tensor:
        """Pooled features of the complete model (every token through every sub-block, in the
        current mode: adapters' dropout in training)."""
        tokens = self.forward_blocks_complete(self.embed(x))
        return self.forward_head(self.vit.norm(tokens), pre_logits=True)

    def forward_blocks_complete(self, tokens: Tensor, start: int = 0, end: int | None = None) -> Tensor:
        """Blocks ``start:end`` with every token through every sub-block (in the current mode)."""
        for blk in self.dyt_blocks()[start:end]:
            tokens = blk.forward_complete(tokens)
        return tokens

    def training_terms(
        self,
        kept: Tensor,
        logits: Tensor,
        labels: Tensor,
        complete: Callable[[], Tensor],
        criterion: Callable[[Tensor, Tensor], Tensor],
    ) -> dict[str, tuple[float, Tensor]]:
        """The rate loss and the complete-model terms (:func:`~petl_lightning.methods.dyt.loss.dyt_loss_terms`)."""
        return dyt_loss_terms(self.keep_rate(kept), self.skipping, logits, labels, complete, criterion)

    def _features(self, run: BlockRun) -> Features:
        return Features(self.forward_head(self.vit.norm(run.tokens), pre_logits=True), run.kept)

    # -- the threshold ---------------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        """The dispatchers' shared inference threshold on ``sigmoid(logit)`` (the first one's)."""
        first = self.dyt_blocks()[0]
        return cast(TokenDispatcher, first.dispatchers[first.sites[0]]).threshold

    def set_threshold(self, threshold: float) -> None:
        """Set every dispatcher's inference threshold on ``sigmoid(logit)``."""
        self.set_logit_threshold(float(torch.logit(torch.tensor(threshold, dtype=torch.float64))))

    def set_logit_threshold(self, value: float) -> None:
        """Set every dispatcher's inference threshold, in logit space (0.0 = the paper's 0.5)."""
        for blk in self.dyt_blocks():
            for d in blk.dispatchers.values():
                cast(Tensor, d.logit_threshold).fill_(value)

    @torch.no_grad()
    def calibrate_keep_rate(
        self, images: list[Tensor], keep_rate: float | None = None, iters: int = 12
    ) -> dict[str, float]:
        """Set one inference threshold so the gathered path keeps a share ``keep_rate`` (default
        ``skipping.target_rate``) of the patch tokens of ``images``: a bisection on the shared logit
        threshold (ours). Returns the threshold on ``sigmoid(logit)`` and the keep rate it gives."""
        rate = self.skipping.target_rate if keep_rate is None else keep_rate
        if not 0.0 <= rate <= 1.0:
            raise ConfigError(f"The keep rate to calibrate for must lie in [0, 1], got {rate}.")
        offered = sum(x.shape[0] for x in images) * self.depth * self.sites * self.num_patches

        def keep_rate_at(logit: float) -> float:
            self.set_logit_threshold(logit)
            return sum(float(self.forward_gathered(x, self.keep_count()).kept.sum()) for x in images) / offered

        was_training = self.training
        self.eval()
        lo, hi = -20.0, 20.0  # the keep rate falls as the logit threshold rises
        try:
            for _ in range(iters):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if keep_rate_at(mid) > rate else (lo, mid)
            kept = keep_rate_at(0.5 * (lo + hi))
        finally:
            self.train(was_training)
        return {"threshold": float(torch.sigmoid(torch.tensor(0.5 * (lo + hi)))), "keep_rate": kept}

    # -- cost ------------------------------------------------------------------------------------
    def block_flops(self, kept: Tensor, start: int = 0, norm: bool = True, merged: bool = False) -> Tensor:
        """FLOPs (B, n) each image executed in blocks ``start:start+n`` (``merged`` changes nothing:
        DyT's adapters and dispatchers do not fold)."""
        s, gathered = self.shape(), self.skipping.inference == "gather"
        blocks = self.dyt_blocks()[start : start + kept.shape[1]]
        cols = [blk.executed_flops(kept[:, j], s, gathered, norm) for j, blk in enumerate(blocks)]
        return torch.stack(cols, dim=1) if cols else kept.new_zeros(kept.shape[0], 0, dtype=torch.float64)

    # -- deployment ------------------------------------------------------------------------------
    def merge(self) -> VisionTransformer:
        raise MergeError(
            "DyT decides per token at inference, so it does not fold into a static timm ViT; use its own "
            "inference path, or its export with a fixed keep rate (docs/deploy.md)."
        )

    def with_fixed_keep_rate(self, keep_rate: float | None = None) -> DyTViT:
        """A copy (fp32, eval mode) that keeps the top ``keep_rate`` (default ``skipping.fixed_keep_rate``)
        of the patch tokens per image at every site, on the gathered path: static shapes."""
        rate = self.skipping.fixed_keep_rate if keep_rate is None else keep_rate
        if rate is None:
            raise ConfigError(
                "DyT exports with a fixed keep rate (the top-k tokens per image and block); pass keep_rate "
                f"(petl-lightning export --keep_rate), e.g. its target_rate {self.skipping.target_rate}."
            )
        if not 0.0 <= rate <= 1.0:
            raise ConfigError(f"keep_rate must lie in [0, 1], got {rate}.")
        form = copy.deepcopy(self).float().eval()
        form.skipping = replace(self.skipping, fixed_keep_rate=rate, inference="gather")
        return form

    def deploy_form(self, keep_rate: float | None = None) -> nn.Module:
        return self.with_fixed_keep_rate(keep_rate)

    def deploy_blocks(self, keep_rate: float | None = None) -> list[nn.Module]:
        form = self.with_fixed_keep_rate(keep_rate)
        k = form.keep_count()
        assert k is not None  # with_fixed_keep_rate sets it
        return [TopKBlock(b, k) for b in form.dyt_blocks()]


__all__ = ["DyTViT"]
