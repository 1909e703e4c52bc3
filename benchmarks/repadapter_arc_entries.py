"""Benchmark entries for RepAdapter and ARC, each before and after merging.

Unmerged: the training form (backbone + adapters), whose FLOPs add the adapters' multiply-adds.
Merged: the plain timm ``VisionTransformer`` that ``merge()`` returns, whose FLOPs equal the
backbone's; its training step is the unmerged form's (training always runs unmerged).
"""

from __future__ import annotations

import torch
from benchmarks.common import Entry

from petl_lightning.methods.arc import ARC
from petl_lightning.methods.repadapter import RepAdapter


def _pair(name: str, method: RepAdapter | ARC, notes: str) -> list[Entry]:
    with torch.no_grad():  # non-zero adapters, so nothing is skipped as a no-op anywhere
        for p in method.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.02)
    method.eval()  # its forward returns logits and records nothing: timed as it is
    trainable = method.parameter_summary()["trainable"]
    merged = method.merge().eval().requires_grad_(False)
    return [
        Entry(f"{name} (unmerged)", method, trainable, method.model.full_flops() / 1e9, notes),
        Entry(
            f"{name} (merged)",
            merged,
            trainable,
            method.inference_flops() / 1e9,
            f"{notes}; plain timm ViT",
            train_module=method,
        ),
    ]


def entries(model_name: str, img_size: int, num_classes: int) -> list[Entry]:
    """RepAdapter (placement attn_mlp, adapter_dim 8, adapter_groups 2) and ARC (adapter_dim 50),
    unmerged and merged, on random weights."""
    common = dict(num_classes=num_classes, model_name=model_name, pretrained=False, img_size=img_size)
    return [
        *_pair(
            "RepAdapter",
            RepAdapter(adapter_dim=8, adapter_groups=2, adapter_scale=1.0, placement="attn_mlp", **common),
            "attn_mlp d=8 g=2",
        ),
        *_pair("ARC", ARC(adapter_dim=50, placement="attn_mlp", **common), "d=50 shared bases"),
    ]


__all__ = ["entries"]
