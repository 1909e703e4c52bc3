"""DyT's inference threshold set on data (ours, not the paper's): for a keep rate, or for agreement
with the complete model. Both are bisections on one threshold shared by every dispatcher; the
threshold is a buffer, so checkpoints and exports carry it."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol, cast

import torch
from torch import Tensor

from petl_lightning.errors import ConfigError
from petl_lightning.methods.dyt.adapted import DyTViT
from petl_lightning.stats import InferenceOutput


def image_batches(data: Iterable[Any], device: torch.device, max_batches: int | None = None) -> list[Tensor]:
    """The image tensors of a loader of ``(images, labels)`` (or of images), on ``device``."""
    images = []
    for i, batch in enumerate(data):
        if max_batches is not None and i >= max_batches:
            break
        images.append((batch[0] if isinstance(batch, (tuple, list)) else batch).to(device))
    if not images:
        raise ConfigError("Calibration got no batches; pass a DataLoader of images (or of (images, labels)).")
    return images


def calibrate_keep_rate(vit: DyTViT, images: list[Tensor], keep_rate: float, iters: int = 12) -> dict[str, float]:
    """Set one threshold so the gathered path keeps a share ``keep_rate`` of the patch tokens of
    ``images``; returns the threshold on ``sigmoid(logit)`` and the keep rate it gives
    (:meth:`DyTViT.calibrate_keep_rate`)."""
    return vit.calibrate_keep_rate(images, keep_rate, iters)


class DispatchedModel(Protocol):
    """A model over a :class:`DyTViT` whose predictions the agreement calibration compares: a
    classifier (:class:`~petl_lightning.adapted.ViTClassifier`, logits (B, K)) or a segmenter
    (logits (B, K, H, W))."""

    vit: Any
    training: bool

    def infer(self, x: Tensor) -> InferenceOutput: ...

    def complete_logits(self, x: Tensor) -> Tensor: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...


@torch.no_grad()
def calibrate_agreement(
    model: DispatchedModel,
    images: list[Tensor],
    agreement: float,
    max_threshold: float,
    iters: int = 6,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, float]:
    """Set one threshold, the highest up to ``max_threshold``, at which ``model`` (a classifier or a
    segmenter over a :class:`DyTViT`) predicts the complete model's class on a share ``agreement`` of
    the predictions on ``images`` (images, or pixels for a segmenter). A
    bisection in ``(0, max_threshold]`` (0 keeps every token: the complete model), ``iters`` steps.
    ``reduce`` sums counts over the processes of a distributed run, so every one sets the same
    threshold. Returns the threshold, the agreement and the keep rate on ``images``."""
    if not 0.0 < agreement <= 1.0:
        raise ConfigError(f"The agreement target must lie in (0, 1] (a share of predictions), got {agreement}.")
    vit = cast(DyTViT, model.vit)

    def measure(threshold: float) -> tuple[float, float]:
        """Agreement share and keep rate on ``images`` at a shared threshold."""
        vit.set_threshold(threshold)
        counts = torch.zeros(4, dtype=torch.float64, device=images[0].device)
        for x, target in zip(images, targets, strict=True):
            out = model.infer(x)
            counts[0] += (out.logits.argmax(1) == target).sum()
            counts[1] += target.numel()
            counts[2] += cast(Tensor, out.kept).sum()
            counts[3] += cast(Tensor, out.offered).sum()
        if reduce is not None:
            counts = reduce(counts)
        return float(counts[0] / counts[1]), float(counts[2] / counts[3])

    was_training = model.training
    model.eval()
    try:
        targets = [model.complete_logits(x).argmax(1) for x in images]
        hi = max_threshold
        share, keep = measure(hi)
        if share < agreement:  # agreement rises as the threshold falls (more tokens kept)
            lo, share, keep = 0.0, 1.0, 1.0
            for _ in range(iters):
                mid = 0.5 * (lo + hi)
                at_mid = measure(mid)
                if at_mid[0] >= agreement:
                    lo, (share, keep) = mid, at_mid
                else:
                    hi = mid
            vit.set_threshold(lo)  # the highest that met the target (its share and keep are kept above)
    finally:
        model.train(was_training)
    return {"threshold": vit.threshold, "agreement": share, "keep_rate": keep}


__all__ = ["calibrate_agreement", "calibrate_keep_rate", "image_batches"]
