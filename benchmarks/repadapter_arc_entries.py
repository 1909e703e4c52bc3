"""Benchmark entries for RepAdapter and ARC, each before and after merging.

Unmerged: the training form (backbone + adapters), whose FLOPs add the adapters' multiply-adds.
Merged: the plain timm ``VisionTransformer`` that ``merge()`` returns, whose FLOPs equal the
backbone's; its training step is the unmerged form's (training always runs unmerged).
"""

from __future__ import annotations

import torch
from benchmarks.common import Entry
from torch import Tensor, nn

from petl_lightning.methods.arc import ARC
from petl_lightning.methods.base import PETLModule
from petl_lightning.methods.repadapter import RepAdapter


class _Logits(nn.Module):
    """Images -> logits through a method's unmerged forward (without the statistics meter)."""

    def __init__(self, method: PETLModule) -> None:
        super().__init__()
        self.method = method

    def forward(self, x: Tensor) -> Tensor:
        return self.method.head(self.method.forward_features(x))


def _pair(name: str, method: RepAdapter | ARC, notes: str) -> list[Entry]:
    with torch.no_grad():  # non-zero adapters, so nothing is skipped as a no-op anywhere
        for p in method.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.02)
    method.eval()
    trainable = method.parameter_summary()["trainable"]
    unmerged = _Logits(method).eval()
    merged = method.merge().eval().requires_grad_(False)
    return [
        Entry(f"{name} (unmerged)", unmerged, trainable, method.unmerged_flops() / 1e9, notes),
        Entry(
            f"{name} (merged)",
            merged,
            trainable,
            method.inference_flops() / 1e9,
            f"{notes}; plain timm ViT",
            train_module=unmerged,
        ),
    ]


def entries(model_name: str, img_size: int, num_classes: int) -> list[Entry]:
    """RepAdapter (repblock, r=8, g=2) and ARC (r=50), unmerged and merged, on random weights."""
    common = dict(num_classes=num_classes, model_name=model_name, pretrained=False, img_size=img_size)
    return [
        *_pair("RepAdapter", RepAdapter(scale=1.0, **common), "repblock r=8 g=2"),
        *_pair("ARC", ARC(**common), "r=50 shared bases"),
    ]


__all__ = ["entries"]
