"""Mixup/CutMix (timm's ``Mixup``) and the loss that takes what it makes: soft targets.

Mixing happens in the training step on whole batches; the targets become label-smoothed class
distributions, so the loss is the soft-target cross-entropy ``mean_i sum_c -t_ic log softmax(z_i)_c``
(timm's ``SoftTargetCrossEntropy``). Without mixing, targets stay class indices and the loss is
PyTorch's cross-entropy with label smoothing, as before. One criterion takes both, so every method's
loss terms work under mixing unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import Tensor, nn

from petl_lightning.errors import ConfigError


class ClassificationLoss(nn.Module):
    """Cross-entropy of logits against class indices (with ``label_smoothing``) or against soft
    targets (B, K) from mixing, which already carry the smoothing."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.soft = SoftTargetCrossEntropy()

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if target.is_floating_point():
            return self.soft(logits, target)
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)


@dataclass(frozen=True)
class Mixing:
    """Mixup and CutMix of training batches (timm's ``Mixup``, batch mode).

    Args:
        mixup_alpha: Beta(alpha, alpha) of mixup's mixing weight; 0 = no mixup.
        cutmix_alpha: Beta(alpha, alpha) of CutMix's box area; 0 = no CutMix.
        prob: probability that a batch is mixed at all.
        switch_prob: with both on, the probability of CutMix rather than mixup for a batch.

    The mixing weight and boxes are drawn from NumPy's global generator (seeded by
    ``seed_everything``, saved in checkpoints), so runs repeat and resume exactly.
    """

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5

    def __post_init__(self) -> None:
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ConfigError(f"mixing alphas must be 0 or more, got {self.mixup_alpha} and {self.cutmix_alpha}.")
        for name in ("prob", "switch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"mixing.{name} must lie in [0, 1], got {getattr(self, name)}.")

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def mixer(self, num_classes: int, label_smoothing: float) -> Mixup:
        return Mixup(
            mixup_alpha=self.mixup_alpha,
            cutmix_alpha=self.cutmix_alpha,
            prob=self.prob,
            switch_prob=self.switch_prob,
            mode="batch",
            label_smoothing=label_smoothing,
            num_classes=num_classes,
        )


def mix_batch(mixer: Mixup, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Mixed images and soft targets. timm's batch mode pairs image i with image B-1-i and needs an
    even batch; an odd batch's last image is left unmixed, with its smoothed one-hot target."""
    if x.shape[0] % 2 == 0:
        return mixer(x, y)
    head_x, head_y = mixer(x[:-1].clone(), y[:-1])
    smooth = mixer.label_smoothing
    last = torch.full((1, head_y.shape[1]), smooth / head_y.shape[1], device=y.device, dtype=head_y.dtype)
    last[0, y[-1]] += 1.0 - smooth
    return torch.cat([head_x, x[-1:]]), torch.cat([head_y, last])


__all__ = ["ClassificationLoss", "Mixing", "mix_batch"]
