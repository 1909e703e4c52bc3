"""DyT's training terms besides the task loss, shared by DyT and Dyn-Adapter's ``dyt`` base.

- ``loss_rate``: ``(mean(mask) - r)^2``, pulling the training masks' keep rate to the target ``r``.
- ``loss_complete_cls``: cross-entropy of the complete model (no token skipping).
- ``loss_distill``: ``KL(complete.detach() || dynamic)`` from the complete model to the dynamic one.

Each term comes with its weight; a term whose weight is 0 is still reported (for the logs) but
adds nothing, and the complete model is only run when one of its two terms has a weight.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor


def dyt_loss_terms(
    masks: Tensor,
    target_rate: float,
    w_rate: float,
    logits: Tensor,
    labels: Tensor,
    complete: Callable[[], Tensor],
    w_complete_cls: float,
    w_distill: float,
) -> dict[str, tuple[float, Tensor]]:
    """``{name: (weight, value)}`` for the masks (any shape, 0/1 with straight-through gradients), the
    dynamic model's logits (B, K), the labels (B,) and ``complete()`` giving the complete model's logits."""
    terms = {"loss_rate": (w_rate, (masks.mean() - target_rate) ** 2)}
    if w_complete_cls > 0 or w_distill > 0:
        full = complete()
        terms["loss_complete_cls"] = (w_complete_cls, F.cross_entropy(full, labels))
        kl = F.kl_div(logits.log_softmax(-1), full.detach().log_softmax(-1), log_target=True, reduction="batchmean")
        terms["loss_distill"] = (w_distill, kl)
    return terms


__all__ = ["dyt_loss_terms"]
