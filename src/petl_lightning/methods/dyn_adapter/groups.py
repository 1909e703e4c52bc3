"""Dyn-Adapter's option groups, by the paper's concepts, as dataclasses LightningCLI parses
(``--model.init_args.exits.blocks [3, 6, 9]``; ``--print_config`` shows one group per concept).

Dyn-Adapter has no public code and its full text was not at hand: every default below is our
choice (see ``docs/dyn_adapter.md``). Each group is checked when it is made; what depends on the
model's depth (exit blocks, per-block dropout) when the model is built.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from petl_lightning.errors import ConfigError

POOLS = ("cls_avg", "cls", "avg")
SCHEDULES = ("linear", "cosine", "step", "constant")
POLICIES = ("pareto", "geometric", "shared", "grid")
CONFIDENCES = ("max_softmax", "entropy")


@dataclass
class ExitConfig:
    """Balanced early heads: where the early exits sit and what they are.

    Attributes:
        blocks: blocks after which an early exit sits (1-based counts of blocks run); the final exit
            is always added. None: every quarter of the depth (``[3, 6, 9]`` on 12 blocks).
        hidden: MLP hidden width per early exit (0 = linear). None: ``256, 128, ...`` halving with
            depth, linear for the deepest early exit when there are 3 or more (heavier heads where
            features are shallower).
        dropout: dropout inside the early heads.
        pool: what an early head reads: ``"cls_avg"`` (CLS and mean patch token, each normalised,
            concatenated), ``"cls"`` or ``"avg"``. Measured on dtd10 (frozen ViT-S probes after block
            3): 0.53 / 0.63 / 0.64 for cls / avg / both.
        grad_scale: scale of an early exit's gradient reaching the blocks below it (0: stopped).
    """

    blocks: list[int] | None = None
    hidden: list[int] | None = None
    dropout: float = 0.1
    pool: Literal["cls_avg", "cls", "avg"] = "cls_avg"
    grad_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ConfigError(f"Unknown exits.pool {self.pool!r}; choose one of {', '.join(POOLS)}.")
        if not 0.0 <= self.grad_scale <= 1.0:
            raise ConfigError(f"exits.grad_scale must lie in [0, 1], got {self.grad_scale}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"exits.dropout must lie in [0, 1), got {self.dropout}.")

    def check(self, depth: int) -> None:
        """What depends on the model's depth: the exit blocks and one hidden width per early exit."""
        blocks = self.resolved_blocks(depth)
        hidden = self.resolved_hidden(len(blocks))
        if len(hidden) != len(blocks) or any(h < 0 for h in hidden):
            raise ConfigError(
                f"exits.hidden needs {len(blocks)} non-negative widths (one per early exit, 0 = linear), "
                f"got {self.hidden}."
            )

    def resolved_blocks(self, depth: int) -> list[int]:
        if self.blocks is None:
            blocks = sorted({round(depth * i / 4) for i in (1, 2, 3)} - {0, depth})
            if not blocks:
                raise ConfigError(f"A {depth}-block ViT has no room for early exits.")
            return blocks
        blocks = [int(b) for b in self.blocks]
        if not blocks or blocks != sorted(set(blocks)) or blocks[0] < 1 or blocks[-1] >= depth:
            raise ConfigError(
                f"exits.blocks must be increasing, distinct block counts in [1, {depth - 1}] (the final "
                f"exit after block {depth} is always added), got {self.blocks}."
            )
        return blocks

    def resolved_hidden(self, n_early: int) -> list[int]:
        if self.hidden is not None:
            return [int(h) for h in self.hidden]
        hidden = [max(256 >> i, 16) for i in range(n_early)]
        if n_early >= 3:
            hidden[-1] = 0
        return hidden


@dataclass
class LossSchedule:
    """Adaptive prioritisation: the early exits' loss weight over training progress ``t`` in [0, 1].

    Attributes:
        kind: ``"linear"`` or ``"cosine"`` ramp from ``start`` to ``end`` over ``ramp = (t0, t1)``;
            ``"step"`` (switch at ``t1``); ``"constant"`` (``end`` throughout). Default 0.1 -> 1.0
            over the first half: the deepest exit is learned first, the shallow ones raised after.
        start / end: the early exits' weight at the ramp's start and end.
        ramp: (t0, t1), shares of training.
        final_weight: the final exit's weight throughout.
    """

    kind: Literal["linear", "cosine", "step", "constant"] = "linear"
    start: float = 0.1
    end: float = 1.0
    ramp: tuple[float, float] = (0.0, 0.5)
    final_weight: float = 1.0

    def weights(self, progress: float, num_exits: int) -> list[float]:
        """The exits' loss weights (early exits, then the final one) at training progress ``progress``."""
        t0, t1 = self.ramp
        if self.kind == "constant":
            r = 1.0
        elif self.kind == "step":
            r = 1.0 if progress >= t1 else 0.0
        else:
            r = 1.0 if progress >= t1 else 0.0 if progress <= t0 else (progress - t0) / (t1 - t0)
            r = 0.5 * (1.0 - math.cos(math.pi * r)) if self.kind == "cosine" else r
        return [self.start + (self.end - self.start) * r] * (num_exits - 1) + [self.final_weight]

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ConfigError(f"Unknown loss.kind {self.kind!r}; choose one of {', '.join(SCHEDULES)}.")
        if len(self.ramp) != 2 or not 0.0 <= self.ramp[0] <= self.ramp[1] <= 1.0:
            raise ConfigError(f"loss.ramp must be (t0, t1) with 0 <= t0 <= t1 <= 1, got {tuple(self.ramp)}.")
        negative = [f"loss.{k}={getattr(self, k)}" for k in ("start", "end", "final_weight") if getattr(self, k) < 0]
        if negative:
            raise ConfigError(
                f"Exit loss weights must be non-negative (0 switches an exit's loss off): {', '.join(negative)}."
            )


@dataclass
class SparsityConfig:
    """Bidirectional sparsity: dropout in the adapters by depth (forward) and a random mask on the
    adapters' gradient updates (backward).

    Attributes:
        adapter_dropout: ``[first, last]`` interpolated linearly over depth (default ``[0.3, 0.0]``:
            higher in shallow blocks), or one rate per block.
        grad_keep: each adapter parameter entry's update survives a step with this probability
            (1.0 = off). Heads are never masked.
        grad_mask_mode: ``"gradient"`` (Child-Tuning-F style: the gradient is multiplied by
            Bernoulli(keep)/keep) or ``"update"`` (the optimizer step is undone for masked entries).
    """

    adapter_dropout: list[float] = field(default_factory=lambda: [0.3, 0.0])
    grad_keep: float = 0.8
    grad_mask_mode: Literal["gradient", "update"] = "gradient"

    def __post_init__(self) -> None:
        if not 0.0 < self.grad_keep <= 1.0:
            raise ConfigError(
                f"sparsity.grad_keep must lie in (0, 1] (1.0 switches the mask off), got {self.grad_keep}."
            )
        if self.grad_mask_mode not in ("gradient", "update"):
            raise ConfigError(f"sparsity.grad_mask_mode must be 'gradient' or 'update', got {self.grad_mask_mode!r}.")

    def mask_gradients(self, params: list[nn.Parameter]) -> None:
        """``"gradient"`` mode, before the optimizer step: each gradient entry survives with
        probability ``grad_keep`` and is rescaled by ``1 / grad_keep``."""
        if self.grad_keep < 1.0 and self.grad_mask_mode == "gradient":
            for p in params:
                if p.grad is not None:
                    p.grad.mul_((torch.rand_like(p.grad) < self.grad_keep) / self.grad_keep)

    def masked_update(self, params: list[nn.Parameter], step: Callable[[], None]) -> None:
        """Run the optimizer ``step``; in ``"update"`` mode, undo it for each entry masked out."""
        if self.grad_keep >= 1.0 or self.grad_mask_mode != "update":
            step()
            return
        before = [p.detach().clone() for p in params]
        step()
        with torch.no_grad():
            for p, old in zip(params, before):
                p.copy_(torch.where(torch.rand_like(p) < self.grad_keep, p, old))

    def dropout_per_block(self, depth: int) -> list[float]:
        rates = [float(r) for r in self.adapter_dropout]
        if len(rates) == 2 and depth != 2:
            first, last = rates
            rates = [first + (last - first) * i / max(depth - 1, 1) for i in range(depth)]
        if len(rates) != depth or any(not 0.0 <= r < 1.0 for r in rates):
            raise ConfigError(
                f"sparsity.adapter_dropout must be [first, last] or {depth} rates, each in [0, 1); "
                f"got {list(self.adapter_dropout)}."
            )
        return rates


@dataclass
class CalibrationConfig:
    """How the early exits' confidence thresholds are chosen.

    Attributes:
        budget: share of the full model's FLOPs the held-out images may spend (in (0, 1]); the
            LightningModule calibrates for it at each validation epoch, at the end of fit and
            before testing when needed. None: no automatic calibration.
        policy: candidate thresholds (:func:`~petl_lightning.methods.dyn_adapter.thresholds.
            candidate_thresholds`): ``"pareto"`` (default), ``"geometric"``, ``"shared"``, ``"grid"``.
        confidence: ``"max_softmax"`` or ``"entropy"`` (1 - normalised entropy).
        thresholds: fixed thresholds of the early exits (one value, or one per exit): they count as
            calibrated and are not replaced automatically.
    """

    budget: float | None = 0.5
    policy: Literal["pareto", "geometric", "shared", "grid"] = "pareto"
    confidence: Literal["max_softmax", "entropy"] = "max_softmax"
    thresholds: list[float] | None = None

    def __post_init__(self) -> None:
        if self.budget is not None and not 0.0 < self.budget <= 1.0:
            raise ConfigError(f"calibration.budget must lie in (0, 1] (a share of the full FLOPs), got {self.budget}.")
        if self.policy not in POLICIES:
            raise ConfigError(f"Unknown calibration.policy {self.policy!r}; choose one of {', '.join(POLICIES)}.")
        if self.confidence not in CONFIDENCES:
            raise ConfigError(
                f"calibration.confidence must be one of {', '.join(CONFIDENCES)}, got {self.confidence!r}."
            )


__all__ = ["CalibrationConfig", "ExitConfig", "LossSchedule", "SparsityConfig"]
