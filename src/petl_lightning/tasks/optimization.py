"""AdamW with linear warm-up then cosine decay, epoch- or step-wise, and the parameter groups every
classification task uses (no weight decay on biases, norms and heads unless asked)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from petl_lightning.errors import ConfigError


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


def schedule_length(trainer: Any) -> tuple[int, int]:
    """``(optimizer steps in the run, optimizer steps per epoch)`` of a fitting ``trainer``, or a
    one-line :class:`ConfigError` for a run with no end (the schedule needs a length)."""
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise ConfigError(
            f"max_epochs={trainer.max_epochs} with no max_steps: the learning-rate schedule needs the "
            f"run's length; set --trainer.max_steps N or a finite --trainer.max_epochs."
        )
    if trainer.train_dataloader is None:  # max_epochs=-1 with max_steps: Lightning has not read the data yet
        trainer.fit_loop.setup_data()
    batches = trainer.num_training_batches
    per_epoch = math.ceil(batches / trainer.accumulate_grad_batches) if math.isfinite(batches) else int(total)
    return int(total), per_epoch


def warmup_cosine_adamw(
    groups: list[dict[str, Any]],
    hp: Any,
    total_steps: int,
    steps_per_epoch: int,
) -> dict[str, Any]:
    """AdamW over ``groups`` at ``hp.lr`` and its schedule (``hp``: lr, warmup_epochs, warmup_lr,
    min_lr, scheduler_interval) for a run of ``total_steps`` optimizer steps, ``steps_per_epoch`` a
    training epoch, in Lightning's ``configure_optimizers`` format. Warm-up is counted in epochs (a
    fraction of an epoch when the run is shorter than one)."""
    steps_per_epoch = max(1, steps_per_epoch)
    epochs = max(total_steps, 1) / steps_per_epoch
    opt = torch.optim.AdamW(groups, lr=hp.lr)
    start, floor = hp.warmup_lr / hp.lr, hp.min_lr / hp.lr
    # the scheduler counts optimizer steps or epochs; either way factor() takes its count in epochs
    per_count = steps_per_epoch if hp.scheduler_interval == "step" else 1

    def factor(count: int) -> float:
        return warmup_cosine(count / per_count, hp.warmup_epochs, epochs, start, floor)

    sched = LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": hp.scheduler_interval}}


__all__ = ["parameter_groups", "schedule_length", "warmup_cosine", "warmup_cosine_adamw"]
