"""DyT's training terms besides the task loss, shared by DyT and Dyn-Adapter's ``dyt`` base.

- ``loss_rate``: ``(mean(mask) - r)^2``, pulling the training masks' keep rate to the target ``r``.
- ``loss_complete_cls``: the task criterion (label smoothing included) on the complete model (no
  token skipping).
- ``loss_distill``: ``KL(complete.detach() || dynamic)`` from the complete model to the dynamic one.

Only terms whose weight is above 0 are computed and returned; the complete model is run only when
one of its two terms has a weight.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

from petl_lightning.methods.dyt.skipping import TokenSkipping


def dyt_loss_terms(
    keep_rate: Tensor,
    skipping: TokenSkipping,
    logits: Tensor,
    labels: Tensor,
    complete: Callable[[], Tensor],
    criterion: Callable[[Tensor, Tensor], Tensor],
) -> dict[str, tuple[float, Tensor]]:
    """``{name: (weight, value)}`` for the training masks' keep rate (a scalar with the masks'
    straight-through gradient), the dynamic model's logits (B, K), the labels (B,), ``complete()``
    giving the complete model's logits, and the task's ``criterion``."""
    terms: dict[str, tuple[float, Tensor]] = {}
    if skipping.w_rate > 0:
        terms["loss_rate"] = (skipping.w_rate, (keep_rate - skipping.target_rate) ** 2)
    if skipping.w_complete_cls > 0 or skipping.w_distill > 0:
        full = complete()
        if skipping.w_complete_cls > 0:
            terms["loss_complete_cls"] = (skipping.w_complete_cls, criterion(full, labels))
        if skipping.w_distill > 0:
            kl = F.kl_div(logits.log_softmax(-1), full.detach().log_softmax(-1), log_target=True, reduction="batchmean")
            terms["loss_distill"] = (skipping.w_distill, kl)
    return terms


__all__ = ["dyt_loss_terms"]
