"""AdamW with linear warm-up then cosine decay, epoch- or step-wise, and the parameter groups every
classification task uses (no weight decay on biases, norms and heads unless asked)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(t: float, warmup: float, total: float, start: float, floor: float) -> float:
    """LR factor at (fractional) epoch ``t``: linear ``start``->1 over ``warmup``, cosine 1->``floor``."""
    if warmup > 0 and t < warmup:
        return start + (1.0 - start) * t / warmup
    span = max(total - warmup, 1e-8)
    progress = min(max((t - warmup) / span, 0.0), 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parameter_groups(
    named: Iterable[tuple[str, nn.Parameter]],
    weight_decay: float,
    is_head: Callable[[str], bool],
    decay_norm_and_bias: bool = False,
    decay_head: bool = False,
) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: decayed weights, and non-decayed biases/norms/heads."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in named:
        if not p.requires_grad:
            continue
        skip = (p.ndim <= 1 and not decay_norm_and_bias) or (is_head(name) and not decay_head)
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine_adamw(
    groups: list[dict[str, Any]],
    hp: Any,
    max_epochs: int | None,
    stepping_batches: float,
) -> dict[str, Any]:
    """AdamW over ``groups`` at ``hp.lr`` and its schedule (``hp``: lr, warmup_epochs, warmup_lr,
    min_lr, scheduler_interval) for a run of ``max_epochs`` epochs (none or -1: one) of
    ``stepping_batches`` optimizer steps in all, in Lightning's ``configure_optimizers`` format."""
    epochs = max_epochs if max_epochs and max_epochs > 0 else 1
    opt = torch.optim.AdamW(groups, lr=hp.lr)
    start, floor = hp.warmup_lr / hp.lr, hp.min_lr / hp.lr
    # the scheduler counts optimizer steps or epochs; either way factor() takes its count in epochs
    step_wise = hp.scheduler_interval == "step"
    steps_per_epoch = max(1, int(stepping_batches) // epochs) if step_wise else 1

    def factor(count: int) -> float:
        return warmup_cosine(count / steps_per_epoch, hp.warmup_epochs, epochs, start, floor)

    sched = LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": hp.scheduler_interval}}


__all__ = ["parameter_groups", "warmup_cosine", "warmup_cosine_adamw"]
