"""Baselines: a linear probe on frozen features, and full fine-tuning."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor

from petl_lightning.stats import InferenceOutput
from petl_lightning.tasks.classification import PETLModule


class LinearProbe(PETLModule):
    """Train only the linear head on the frozen backbone's pooled features.

    Args:
        cache_features: remember each image's features (keyed by a hash of its pixels), so every
            epoch after the first costs only the head. Exact because the backbone is frozen and the
            VTAB-1K transforms are deterministic; switched off automatically with drop-path, augmentation
            or mixing.
        **kwargs: :class:`PETLModule` arguments.
    """

    def __init__(self, cache_features: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cache_features = cache_features and self.hparams.drop_path_rate == 0
        self._feature_cache: dict[bytes, Tensor] = {}

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if self.cache_features and (self.mixer is not None or getattr(dm, "augmentation", None) is not None):
            self.cache_features = False  # every augmented or mixed image is new: a cache would only grow
            self._feature_cache.clear()

    @staticmethod
    def _key(image: Tensor) -> bytes:
        return hashlib.blake2b(image.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).digest()

    def features(self, x: Tensor) -> Tensor:
        """The frozen backbone's pooled features (B, D), from the cache where an image was seen."""
        if not self.cache_features:
            return self.vit.run(x).features
        keys = [self._key(img) for img in x]
        todo = [i for i, k in enumerate(keys) if k not in self._feature_cache]
        if todo:
            with torch.no_grad():
                feats = self.vit.run(x[todo]).features
            for i, f in zip(todo, feats):
                self._feature_cache[keys[i]] = f.detach().cpu()
        return torch.stack([self._feature_cache[k] for k in keys]).to(device=x.device, dtype=x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def infer(self, x: Tensor) -> InferenceOutput:
        flops = torch.full((x.shape[0],), float(self.inference_flops()), dtype=torch.float64, device=x.device)
        return InferenceOutput(self(x), flops)


class FullFinetune(PETLModule):
    """Fine-tune every backbone parameter (the reference PETL methods are compared with).

    Its checkpoints hold the whole model, unlike the adapter-only checkpoints of the PETL methods.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("lr", 1e-4)
        super().__init__(**kwargs)
        self.vit.requires_grad_(True)

    def trainable_state_keys(self) -> list[str]:
        return list(self.state_dict().keys())


__all__ = ["FullFinetune", "LinearProbe"]
