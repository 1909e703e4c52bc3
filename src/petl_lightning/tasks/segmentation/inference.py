"""Segmentation inference over images of any size: whole-image or sliding-window (as mmseg's
``whole`` and ``slide`` modes), for a model that takes square ``crop x crop`` images.

- ``whole``: the image is resized to ``crop x crop``, and the logits back to the image's size (ours:
  mmseg's whole mode feeds the image at its own size, which a ViT with fixed position embeddings
  cannot take).
- ``slide``: ``crop x crop`` windows every ``stride`` pixels, the last one flush with the border (an
  image smaller than a window is zero-padded to it first); overlapping logits are averaged.

An image the size of one crop gives the same logits either way (one window, no resize).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from petl_lightning.tasks.segmentation.heads import resize

Logits = Callable[[Tensor], Tensor]


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Start offsets of the windows along one side: every ``stride``, the last ending at ``size``."""
    if size <= crop:
        return [0]
    starts = list(range(0, size - crop, stride))
    return [*starts, size - crop]


def whole_inference(model: Logits, images: Tensor, crop: int) -> Tensor:
    """Logits (B, K, H, W) of ``images`` (B, C, H, W) resized to ``crop`` and back."""
    size = images.shape[-2:]
    if tuple(size) == (crop, crop):
        return model(images)
    return resize(model(resize(images, (crop, crop))), size)


def slide_inference(model: Logits, images: Tensor, crop: int, stride: int) -> Tensor:
    """Logits (B, K, H, W) averaged over ``crop x crop`` windows every ``stride`` pixels."""
    h, w = images.shape[-2:]
    padded = F.pad(images, (0, max(crop - w, 0), 0, max(crop - h, 0)))
    ph, pw = padded.shape[-2:]
    total: Tensor | None = None
    count = torch.zeros(1, 1, ph, pw, device=images.device, dtype=images.dtype)
    for y in window_starts(ph, crop, stride):
        for x in window_starts(pw, crop, stride):
            logits = model(padded[..., y : y + crop, x : x + crop])
            if total is None:
                total = logits.new_zeros(logits.shape[0], logits.shape[1], ph, pw)
            total[..., y : y + crop, x : x + crop] += logits
            count[..., y : y + crop, x : x + crop] += 1
    assert total is not None  # at least one window
    return (total / count)[..., :h, :w]


__all__ = ["slide_inference", "whole_inference", "window_starts"]
