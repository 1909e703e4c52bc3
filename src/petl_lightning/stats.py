"""What an inference forward executed, and its running sums (the ``inference_stats()`` contract).

Every method's ``infer(x)`` returns an :class:`InferenceOutput`: the logits and, per image, the
executed FLOPs, the exit it left at and the patch tokens its skippable sub-blocks processed. The
step methods (``validation_step``, ``test_step``, ``predict_step``) add it to the module's
:class:`InferenceStats`, a torchmetrics ``Metric`` (so counts sum across DDP processes); the module
resets it at the start of each evaluation epoch and callbacks only read
``pl_module.inference_stats()``. Everything stays on the device (no host sync per batch).

Keys of :meth:`InferenceStats.compute` (all tensors):

- ``images``: images seen since the last reset.
- ``gflops``: executed GFLOPs per image (mean), papers' convention (:mod:`petl_lightning.flops`).
- ``keep_rate``: share of patch tokens processed by the skippable sub-blocks, over all layers run.
- ``keep_rate_per_layer``: the same per block, shape ``(depth,)`` (1 where nothing was offered).
- ``exit_share``: share of images that left at each exit, shape ``(num_exits,)`` (static: ``[1.]``).
- ``exit_acc``: top-1 accuracy of the images that left at each exit (NaN where none left, or where
  no labels were given).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics import Metric


@dataclass
class InferenceOutput:
    """One batch's inference: logits and what executed, per image."""

    logits: Tensor  # (B, K)
    flops: Tensor  # (B,) executed FLOPs per image, papers' convention
    exit_index: Tensor | None = None  # (B,) long; None: every image at the last exit
    kept: Tensor | None = None  # (B, depth) patch tokens the skippable sub-blocks processed
    offered: Tensor | None = None  # (B, depth) patch tokens offered to them (0 for blocks not run)

    def to(self, device: torch.device | str) -> InferenceOutput:
        """The same output with every tensor on ``device``."""
        return InferenceOutput(
            *(
                None if t is None else t.to(device)
                for t in (self.logits, self.flops, self.exit_index, self.kept, self.offered)
            )  # type: ignore[arg-type]
        )

    def keep_rate(self) -> Tensor:
        """Share of offered patch tokens each image kept (B,); 1 where nothing is skippable."""
        if self.kept is None or self.offered is None:
            return torch.ones(self.logits.shape[0], device=self.logits.device)
        return keep_share(self.kept, self.offered)


def keep_share(kept: Tensor, offered: Tensor) -> Tensor:
    """Share of the offered patch tokens (B, depth) each image kept (B,) float64; 1 where none were offered."""
    total = offered.sum(1).double()
    return torch.where(total > 0, kept.sum(1).double() / total.clamp(min=1), torch.ones_like(total))


class InferenceStats(Metric):
    """Sums of executed work; see the module docstring for the keys."""

    full_state_update = False
    higher_is_better = None

    images: Tensor
    flops: Tensor
    kept: Tensor
    offered: Tensor
    exit_count: Tensor
    exit_labelled: Tensor
    exit_correct: Tensor

    def __init__(self, depth: int, num_exits: int = 1) -> None:
        super().__init__()
        self.depth = depth
        self.num_exits = num_exits
        f64 = torch.float64
        self.add_state("images", torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        self.add_state("flops", torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        self.add_state("kept", torch.zeros(depth, dtype=f64), dist_reduce_fx="sum")
        self.add_state("offered", torch.zeros(depth, dtype=f64), dist_reduce_fx="sum")
        self.add_state("exit_count", torch.zeros(num_exits, dtype=f64), dist_reduce_fx="sum")
        self.add_state("exit_labelled", torch.zeros(num_exits, dtype=f64), dist_reduce_fx="sum")
        self.add_state("exit_correct", torch.zeros(num_exits, dtype=f64), dist_reduce_fx="sum")

    def update(self, out: InferenceOutput, target: Tensor | None = None) -> None:
        """Add a batch; ``target`` (B,) labels, when known, give each exit's accuracy."""
        b = out.logits.shape[0]
        self.images += b
        self.flops += out.flops.to(self.flops).sum()
        if out.kept is not None and out.offered is not None:
            self.kept += out.kept.to(self.kept).sum(0)
            self.offered += out.offered.to(self.offered).sum(0)
        ex = out.exit_index
        ex = torch.full((b,), self.num_exits - 1, device=self.exit_count.device) if ex is None else ex
        ex = ex.to(self.exit_count.device).long()
        counts = torch.bincount(ex, minlength=self.num_exits).to(self.exit_count)
        self.exit_count += counts
        if target is not None:
            correct = (out.logits.argmax(dim=-1) == target).to(self.exit_count.device).double()
            self.exit_labelled += counts
            self.exit_correct += torch.bincount(ex, weights=correct, minlength=self.num_exits).to(self.exit_count)

    def compute(self) -> dict[str, Tensor]:
        n = self.images.clamp(min=1)
        has = self.offered > 0
        per_layer = torch.where(has, self.kept / self.offered.clamp(min=1), torch.ones_like(self.kept))
        total = self.offered.sum()
        overall = torch.where(total > 0, self.kept.sum() / total.clamp(min=1), torch.ones_like(total))
        nan = torch.full_like(self.exit_correct, float("nan"))
        return {
            "images": self.images.clone(),
            "gflops": self.flops / n / 1e9,
            "keep_rate": overall,
            "keep_rate_per_layer": per_layer.reshape(-1),
            "exit_share": (self.exit_count / n).reshape(-1),
            "exit_acc": torch.where(
                self.exit_labelled > 0, self.exit_correct / self.exit_labelled.clamp(min=1), nan
            ).reshape(-1),
        }


__all__ = ["InferenceOutput", "InferenceStats", "keep_share"]
