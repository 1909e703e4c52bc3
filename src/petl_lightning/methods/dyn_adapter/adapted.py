"""Dyn-Adapter's adapted model (Zhang et al., ECCV 2024, arXiv 2407.14302): early-exit heads over any
adapted ViT (its PETL base), run with per-image early exit.

Exit ``k`` reads pooled tokens after block ``exit_depths[k]`` through an
:class:`~petl_lightning.layers.exits.ExitHead`; the last exit is the base's final norm, pooling and
``head``. An image leaves at the first exit whose confidence clears that exit's threshold. The
model stacks its exits on the base's block contract only (``forward_blocks`` and ``block_flops``),
so every base works the same way, token-skipping bases included: finished images leave the batch,
and inside every block an image still runs it pays for the tokens it kept.
"""

from __future__ import annotations

import math
from typing import NamedTuple, cast

import torch
from torch import Tensor, nn

from petl_lightning.adapted import AdaptedViT, ViTClassifier
from petl_lightning.errors import ConfigError
from petl_lightning.flops import embed_flops, head_flops
from petl_lightning.layers.exits import ExitHead, pool_exit_tokens
from petl_lightning.methods.dyn_adapter import thresholds as th
from petl_lightning.methods.dyn_adapter.groups import ExitConfig
from petl_lightning.stats import InferenceOutput


class ExitRun(NamedTuple):
    """Every exit on every image (what calibration and training read)."""

    logits: Tensor  # (E, B, K)
    block_cost: Tensor  # (B, E) float64: each image's block FLOPs up to each exit
    kept: Tensor  # (B, depth, sites): patch tokens each image kept per block and site


class EarlyExitViT(ViTClassifier):
    """An adapted ViT with early exits: ``forward(x)`` is the early-exit prediction (B, K) in every mode.

    Args:
        vit: the PETL base (any adapted ViT).
        num_classes: classes of every exit.
        exits: where the early exits sit and what they are (:class:`ExitConfig`).
        confidence: ``"max_softmax"`` or ``"entropy"``: how sure an exit is (:meth:`confidence`,
            the one exit rule; override it in a subclass for another).
        thresholds: the early exits' thresholds (one value or one per exit); None: ``+inf`` (no
            image leaves early until calibrated).
        head_init: init of the final head.
    """

    thresholds: Tensor

    def __init__(
        self,
        vit: AdaptedViT,
        num_classes: int,
        exits: ExitConfig,
        confidence: str = "max_softmax",
        thresholds: float | list[float] | None = None,
        head_init: str = "default",
    ) -> None:
        super().__init__(vit, num_classes, head_init)
        exits.check(vit.depth)
        blocks = exits.resolved_blocks(vit.depth)
        self.exit_depths = [*blocks, vit.depth]
        self.pool, self.confidence_rule = exits.pool, confidence
        n_pool = 2 if exits.pool == "cls_avg" else 1
        self.exit_heads = nn.ModuleList(
            ExitHead(vit.dim, num_classes, h, exits.dropout, n_pool, exits.grad_scale)
            for h in exits.resolved_hidden(len(blocks))
        )
        values: float | list[float] = math.inf if thresholds is None else thresholds
        self.register_buffer("thresholds", threshold_vector(values, len(blocks)))

    @property
    def num_exits(self) -> int:
        return len(self.exit_depths)

    def confidence(self, logits: Tensor) -> Tensor:
        """Per-image confidence (B,) of one exit's logits (B, K): the one exit rule."""
        return th.confidence(logits, self.confidence_rule)  # type: ignore[arg-type]

    def exit_logits(self, k: int, tokens: Tensor) -> Tensor:
        """Exit ``k``'s logits from the tokens after block ``exit_depths[k]``."""
        if k == self.num_exits - 1:
            return self.head(self.vit.forward_head(self.vit.vit.norm(tokens), pre_logits=True))
        head = cast(ExitHead, self.exit_heads[k])
        return head(pool_exit_tokens(tokens, self.pool, self.vit.num_prefix_tokens))

    # -- every exit on every image ---------------------------------------------------------------
    def run_exits(self, x: Tensor) -> ExitRun:
        """Every exit on every image, with each image's block FLOPs and kept tokens (in training mode
        the base's training path: ``kept`` carries a token-skipping base's mask gradient)."""
        tokens, logits, kept, start = self.vit.embed(x), [], [], 0
        for k, end in enumerate(self.exit_depths):
            run = self.vit.forward_blocks(tokens, start, end)
            tokens, start = run.tokens, end
            kept.append(run.kept)
            logits.append(self.exit_logits(k, tokens))
        counts = torch.cat(kept, dim=1)
        block_cost = self.vit.block_flops(counts).cumsum(dim=1)[:, [d - 1 for d in self.exit_depths]]
        return ExitRun(torch.stack(logits), block_cost, counts)

    def forward_exits(self, x: Tensor) -> Tensor:
        """Every exit's logits on every image (E, B, K)."""
        return self.run_exits(x).logits

    def exit_table(self, run: ExitRun, y: Tensor) -> th.ExitOutputs:
        """The exit table (on the CPU) of a labelled batch's :meth:`run_exits`: what calibration searches."""
        conf = torch.stack([self.confidence(lg) for lg in run.logits], dim=1)
        return th.ExitOutputs(
            conf.cpu(), run.logits.argmax(-1).T.cpu(), y.cpu(), run.block_cost.double().cpu(), run.kept.sum(-1).cpu()
        )

    # -- early exit ------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """The early-exit prediction (B, K)."""
        return self.infer(x).logits

    def infer(self, x: Tensor, vit: AdaptedViT | None = None) -> InferenceOutput:
        """Early exit with batch shrinking: after each exit the images whose confidence clears its
        threshold are written out and leave the batch; exits that take no image (``+inf``) are not
        evaluated. ``vit``: another base to run (e.g. the merged one, whose adapters cost nothing).
        Host syncs on a GPU: one read of the thresholds, and one per evaluated early exit (plus a
        token-skipping base's own under its threshold rule)."""
        vit = self.vit if vit is None else vit
        b, last = x.shape[0], self.num_exits - 1
        thresholds = self.thresholds.tolist()
        tokens, remaining = vit.embed(x), torch.arange(b, device=x.device)
        exit_index = torch.full((b,), last, dtype=torch.long, device=x.device)
        block_flops = torch.zeros(b, dtype=torch.float64, device=x.device)
        kept = torch.zeros(b, vit.depth, device=x.device)
        out: Tensor | None = None
        start = 0
        for k, end in enumerate(self.exit_depths):
            run = vit.forward_blocks(tokens, start, end)
            block_flops.index_add_(0, remaining, vit.block_flops(run.kept, start).sum(1))
            kept[remaining, start:end] = run.kept.sum(-1)
            tokens, start = run.tokens, end
            if k < last and not thresholds[k] < math.inf:
                continue
            logits = self.exit_logits(k, tokens)
            out = logits.new_empty(b, logits.shape[1]) if out is None else out
            if k == last:
                out.index_copy_(0, remaining, logits)
                break
            done = self.confidence(logits) >= thresholds[k]
            n_stay = done.numel() - int(done.sum())
            if n_stay == done.numel():
                continue
            order = torch.sort(done.to(torch.uint8), stable=True).indices  # staying first, each part in order
            stay, leave = order[:n_stay], order[n_stay:]
            out.index_copy_(0, remaining[leave], logits[leave])
            exit_index.index_fill_(0, remaining[leave], k)
            if n_stay == 0:
                break
            tokens, remaining = tokens.index_select(0, stay), remaining.index_select(0, stay)
        assert out is not None
        costs = self.exit_costs(vit).of(torch.tensor(thresholds, dtype=torch.float64))[0]
        flops = costs.to(x.device, non_blocking=True)[exit_index] + block_flops
        return InferenceOutput(out, flops, exit_index, kept, self.offered(exit_index, vit))

    def infer_reference(self, x: Tensor) -> InferenceOutput:
        """The same decisions without batch shrinking (every exit on every image; for tests)."""
        run = self.run_exits(x)
        ex = th.assign_exits(torch.stack([self.confidence(lg) for lg in run.logits], dim=1), self.thresholds)
        out = run.logits.permute(1, 0, 2)[torch.arange(x.shape[0], device=x.device), ex]
        fixed = self.exit_costs().of(self.thresholds.cpu())[0].to(x.device)[ex]
        flops = fixed + run.block_cost.gather(1, ex[:, None])[:, 0]
        offered = self.offered(ex)
        return InferenceOutput(out, flops, ex, run.kept.sum(-1) * (offered > 0), offered)

    def offered(self, exit_index: Tensor, vit: AdaptedViT | None = None) -> Tensor:
        """Patch tokens offered to the skippable sub-blocks (B, depth) of images leaving at
        ``exit_index`` (B,): every block an image ran (0 where nothing is skippable)."""
        vit = self.vit if vit is None else vit
        blocks = torch.arange(vit.depth, device=exit_index.device)[None]
        ran = blocks < torch.as_tensor(self.exit_depths, device=exit_index.device)[exit_index][:, None]
        return ran.float() * (vit.num_patches * vit.sites)

    # -- FLOPs -----------------------------------------------------------------------------------
    def exit_costs(self, vit: AdaptedViT | None = None, norm: bool = True) -> th.ExitCosts:
        """FLOPs of leaving at each exit outside the blocks (:class:`~.thresholds.ExitCosts`, on the CPU):
        the patch embedding, the evaluated heads, and at the last exit the final norm and head."""
        s = (self.vit if vit is None else vit).shape()
        fixed = [float(embed_flops(s, norm))] * self.num_exits
        fixed[-1] += head_flops(s, self.num_classes, norm=norm)
        heads = [cast(ExitHead, h).flops(norm) for h in self.exit_heads]
        return th.ExitCosts(torch.tensor(fixed, dtype=torch.float64), torch.tensor(heads, dtype=torch.float64))


def threshold_vector(values: float | list[float], n_early: int) -> Tensor:
    """Thresholds of the ``n_early`` early exits from one value or one per exit."""
    thr = torch.as_tensor(values, dtype=torch.float32).flatten()
    thr = thr.expand(n_early).clone() if thr.numel() == 1 else thr
    if thr.numel() != n_early:
        raise ConfigError(
            f"calibration.thresholds has {thr.numel()} values for {n_early} early exits; give one value or one "
            f"per exit."
        )
    return thr


__all__ = ["EarlyExitViT", "ExitRun", "threshold_vector"]
