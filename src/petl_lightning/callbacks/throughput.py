"""Lightning's ``ThroughputMonitor`` preset for ``(images, labels)`` batches."""

from __future__ import annotations

import warnings
from typing import Any

from lightning.pytorch.callbacks import ThroughputMonitor
from torch import Tensor


def images_in_batch(batch: Any) -> int:
    """Number of images in an ``(images, labels)`` batch, an image tensor, or a dict with ``image(s)``."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0])
    if isinstance(batch, (tuple, list)) and batch:
        return images_in_batch(batch[0])
    if isinstance(batch, dict):
        for key in ("images", "image", "x", "pixel_values"):
            if key in batch:
                return images_in_batch(batch[key])
    raise TypeError(f"Cannot count the images in a batch of type {type(batch).__name__}.")


class ImageThroughputMonitor(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` for image batches: logs ``train/device/samples_per_sec``
    and ``train/device/batches_per_sec`` (per device, averaged over the last ``window_size``
    batches), ``train/samples_per_sec`` / ``train/batches_per_sec`` (all devices) when distributed,
    running totals ``train/samples``, ``train/batches``, ``train/time``; the same under
    ``validate/`` and ``test/``.

    Preset so a recipe can list it without a Python callable: the batch size is the first tensor's
    length (:func:`images_in_batch`). No FLOPs are passed to Lightning's monitor: its MFU would need
    training FLOPs (forward + backward), while :class:`FlopsLogger` reports executed inference FLOPs.

    Args:
        window_size: batches to average over (Lightning's default 100 is longer than a VTAB-1K
            epoch at batch size 64).
        separator: between the stage and the metric name.
    """

    def __init__(self, window_size: int = 10, separator: str = "/") -> None:
        super().__init__(batch_size_fn=images_in_batch, window_size=window_size, separator=separator)
        # We deliberately pass no FLOPs (see the docstring); silence Lightning's reminder about it.
        warnings.filterwarnings("ignore", message=r".*ThroughputMonitor.*flops_per_batch", category=UserWarning)


__all__ = ["ImageThroughputMonitor", "images_in_batch"]
