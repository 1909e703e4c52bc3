"""Segmentation metrics from one confusion matrix (torchmetrics, summed across processes), as the
benchmarks report them (mmseg's ``IoUMetric``): per-class IoU and accuracy, their means over the
classes that occur (``mIoU``, ``mAcc``), and the overall pixel accuracy (``aAcc``). Pixels labelled
``ignore_index`` are not counted."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix


class SegmentationMetrics(MulticlassConfusionMatrix):
    """``update(logits_or_preds, target)`` with (B, K, H, W) logits or (B, H, W) class indices and
    (B, H, W) targets; ``compute()`` gives ``mIoU``, ``mAcc``, ``aAcc`` (scalars) and ``IoU``, ``Acc``
    (per class, NaN for a class absent from both the targets and the predictions / the targets)."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        super().__init__(num_classes, ignore_index=ignore_index, normalize=None, validate_args=False)

    def update(self, preds: Tensor, target: Tensor) -> None:
        if preds.ndim == target.ndim + 1:
            preds = preds.argmax(dim=1)
        super().update(preds.reshape(-1), target.reshape(-1))

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        cm = super().compute().double()  # rows: target, columns: prediction
        hits, target, predicted = cm.diagonal(), cm.sum(1), cm.sum(0)
        union = target + predicted - hits
        nan = torch.full_like(hits, float("nan"))
        iou = torch.where(union > 0, hits / union.clamp(min=1), nan)
        acc = torch.where(target > 0, hits / target.clamp(min=1), nan)
        return {
            "mIoU": iou.nanmean(),
            "mAcc": acc.nanmean(),
            "aAcc": hits.sum() / cm.sum().clamp(min=1),
            "IoU": iou,
            "Acc": acc,
        }


__all__ = ["SegmentationMetrics"]
