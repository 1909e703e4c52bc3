"""Running inference statistics (the ``inference_stats()`` contract), as a torchmetrics Metric.

Being a ``Metric`` means the counts are summed across processes under DDP for free. Each method
updates it from its own eval forward with what actually executed; callbacks read
``pl_module.inference_stats()`` and reset it at epoch end.

Keys of :meth:`InferenceStats.compute` (all tensors):

- ``images``: images seen since the last reset.
- ``gflops``: executed GFLOPs per image (mean), papers' convention (:mod:`petl_lightning.flops`).
- ``keep_rate``: share of patch tokens processed by the skippable sub-blocks, over all layers.
- ``keep_rate_per_layer``: the same per block, shape ``(depth,)``.
- ``exit_share``: share of images that left at each exit, shape ``(num_exits,)`` (static: ``[1.]``).
- ``exit_acc``: top-1 accuracy of the images that left at each exit (NaN where none left, or
  where no labels were given).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class InferenceStats(Metric):
    """Sums of executed work; see the module docstring for the keys."""

    full_state_update = False
    higher_is_better = None

    def __init__(self, depth: int, num_exits: int = 1) -> None:
        super().__init__()
        self.depth = depth
        self.num_exits = num_exits
        self.add_state("images", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("flops", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("kept", torch.zeros(depth, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("offered", torch.zeros(depth, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("exit_count", torch.zeros(num_exits, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("exit_labelled", torch.zeros(num_exits, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("exit_correct", torch.zeros(num_exits, dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        images: int,
        flops: float | Tensor,
        kept: Tensor | None = None,
        offered: Tensor | None = None,
        exit_index: Tensor | None = None,
        correct: Tensor | None = None,
    ) -> None:
        """Add a batch.

        Args:
            images: images in the batch.
            flops: total executed FLOPs of the batch (sum over its images).
            kept / offered: per-layer token counts processed by / offered to the skippable
                sub-block, shape ``(depth,)``, summed over the batch. Default: nothing skipped.
            exit_index: exit each image left at, shape ``(images,)``. Default: the last exit.
            correct: whether each image's prediction was right, shape ``(images,)`` (optional).
        """
        self.images += images
        self.flops += torch.as_tensor(flops, dtype=torch.float64, device=self.flops.device)
        if kept is not None and offered is not None:
            self.kept += kept.to(self.kept)
            self.offered += offered.to(self.offered)
        if exit_index is None:
            exit_index = torch.full((images,), self.num_exits - 1, device=self.exit_count.device)
        exit_index = exit_index.to(self.exit_count.device).long()
        self.exit_count += torch.bincount(exit_index, minlength=self.num_exits).to(self.exit_count)
        if correct is not None:
            correct = correct.to(self.exit_count.device)
            self.exit_labelled += torch.bincount(exit_index, minlength=self.num_exits).to(self.exit_count)
            self.exit_correct += torch.bincount(
                exit_index, weights=correct.double(), minlength=self.num_exits
            ).to(self.exit_count)

    def compute(self) -> dict[str, Tensor]:
        n = self.images.clamp(min=1)
        has_tokens = self.offered > 0
        per_layer = torch.where(has_tokens, self.kept / self.offered.clamp(min=1), torch.ones_like(self.kept))
        overall = self.kept.sum() / self.offered.sum() if bool(has_tokens.any()) else torch.ones((), dtype=torch.float64)
        nan = torch.full_like(self.exit_correct, float("nan"))
        return {
            "images": self.images.clone(),
            "gflops": self.flops / n / 1e9,
            "keep_rate": overall.to(self.kept.device),
            "keep_rate_per_layer": per_layer,
            "exit_share": self.exit_count / n,
            "exit_acc": torch.where(self.exit_labelled > 0, self.exit_correct / self.exit_labelled.clamp(min=1), nan),
        }


__all__ = ["InferenceStats"]
