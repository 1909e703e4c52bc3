"""Image transforms: the PETL papers' square resize, timm's evaluation crop, and training-time
augmentation from timm's ``create_transform``, with the normalisation they share (the backbone's timm
mean/std, ImageNet's, or given)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torchvision import transforms as T

from petl_lightning.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Normalization = Literal["backbone", "imagenet"] | list[list[float]]
#: How evaluation images become ``img_size`` squares: ``"none"`` resizes the whole image to a square
#: (the PETL papers' VTAB-1K transform); ``"backbone"`` resizes the short side to
#: ``img_size / crop_pct`` with the backbone's timm ``crop_pct`` and crops the centre (timm's
#: evaluation transform); a float is that ``crop_pct``.
EvalCrop = Literal["none", "backbone"] | float


def petl_transform(
    img_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> T.Compose:
    """The PETL VTAB-1K transform: bicubic resize to a square, ToTensor, normalisation."""
    return T.Compose(
        [
            T.Resize((img_size, img_size), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def _pretrained_cfg(backbone_name: str | None) -> Any:
    """The timm pretrained config of ``backbone_name`` (only the config, no weights), or None."""
    if backbone_name is None:
        return None
    from timm.models import get_pretrained_cfg

    try:
        return get_pretrained_cfg(backbone_name)
    except RuntimeError:  # an unknown tag: the backbone itself reports the bad name
        return None


def resolve_normalization(
    normalization: Normalization, backbone_name: str | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` of a ``normalization`` setting.

    ``"imagenet"``: ImageNet's. ``"backbone"``: the ``mean``/``std`` of the timm pretrained config
    of ``backbone_name`` (only the config is read, no weights), e.g. 0.5/0.5 for
    ``vit_base_patch16_224.orig_in21k``; the rule when there is none (no name given, a name timm has
    no pretrained config for): ImageNet's, the PETL repos' usual choice. ``[mean, std]``: as given.
    """
    if normalization == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if normalization == "backbone":
        cfg = _pretrained_cfg(backbone_name)
        if cfg is None or not cfg.mean or not cfg.std:
            return IMAGENET_MEAN, IMAGENET_STD
        return tuple(cfg.mean), tuple(cfg.std)
    hint = "Use 'backbone', 'imagenet' or [mean, std] with 1 or 3 values each and positive std."
    if isinstance(normalization, str):
        raise DataError(f"Unknown normalization {normalization!r}. {hint}")
    try:
        mean, std = (tuple(float(v) for v in values) for values in normalization)
    except (TypeError, ValueError):
        raise DataError(f"normalization={normalization!r} is not [mean, std]. {hint}") from None
    if len(mean) != len(std) or len(mean) not in (1, 3) or min(std) <= 0:
        raise DataError(f"normalization={normalization!r}: mean and std need 1 or 3 values each, std > 0. {hint}")
    return mean, std


def resolve_crop_pct(eval_crop: EvalCrop, backbone_name: str | None) -> float | None:
    """The evaluation ``crop_pct`` of an ``eval_crop`` setting (None: the PETL square resize).
    ``"backbone"`` without a timm config (no name, an unknown one) uses timm's default 0.875."""
    if eval_crop == "none":
        return None
    if eval_crop == "backbone":
        cfg = _pretrained_cfg(backbone_name)
        return float(cfg.crop_pct) if cfg is not None and cfg.crop_pct else 0.875
    if isinstance(eval_crop, str) or not 0.0 < float(eval_crop) <= 1.0:
        raise DataError(f"eval_crop must be 'none', 'backbone' or a crop_pct in (0, 1], got {eval_crop!r}.")
    return float(eval_crop)


@dataclass(frozen=True)
class Augmentation:
    """Training-time augmentation, built by timm's ``create_transform`` (bicubic, the data's mean/std).

    Args:
        crop_mode: timm's ``train_crop_mode``: ``rrc`` (random-resized crop, the usual one), ``rkrc``
            (resize keeping the ratio with a random scale, then a centre crop), ``rkrr``.
        scale / ratio: the random-resized crop's area and aspect-ratio ranges.
        hflip: probability of a horizontal flip.
        auto_augment: a timm policy string, e.g. ``rand-m9-mstd0.5-inc1`` (RandAugment), or None.
        color_jitter: colour-jitter strength (0 = off; timm turns it off under ``auto_augment``).
        re_prob / re_mode: random-erasing probability and fill (``pixel``: per-pixel noise, ``const``).

    timm's increasing posterize (``inc1`` RandAugment policies) reaches 0 bits at magnitude 10,
    which Pillow 11 refuses; such a policy without its own ``mmax`` gets ``-mmax9`` (magnitudes
    capped at 9, where posterize keeps 1 bit), so ``rand-m9-mstd0.5-inc1`` trains instead of failing.

    Each image's random draws come from a generator seeded by (data seed, epoch, image index), so a
    seed gives the same augmented images whatever the worker count, and a resumed run sees what an
    uninterrupted one sees.
    """

    crop_mode: Literal["rrc", "rkrc", "rkrr"] = "rrc"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    auto_augment: str | None = None
    color_jitter: float = 0.0
    re_prob: float = 0.0
    re_mode: Literal["pixel", "const"] = "pixel"

    def __post_init__(self) -> None:
        for name in ("hflip", "re_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise DataError(f"augmentation.{name} must lie in [0, 1], got {value}.")
        lo, hi = self.scale
        if not 0.0 < lo <= hi <= 1.0:
            raise DataError(f"augmentation.scale must be (low, high) with 0 < low <= high <= 1, got {self.scale}.")
        if self.color_jitter < 0:
            raise DataError(f"augmentation.color_jitter must be 0 or more, got {self.color_jitter}.")

    @property
    def policy(self) -> str | None:
        """The timm policy string used (``auto_augment``, capped as the class docstring says)."""
        policy = self.auto_augment
        if policy and policy.startswith("rand") and "inc1" in policy.split("-") and "-mmax" not in policy:
            policy += "-mmax9"
        return policy

    def transform(self, img_size: int, mean: Sequence[float], std: Sequence[float]) -> Callable[..., Any]:
        """The training transform (PIL image to normalised tensor)."""
        from timm.data import create_transform

        try:
            return create_transform(
                img_size,
                is_training=True,
                train_crop_mode=self.crop_mode,
                scale=self.scale,
                ratio=self.ratio,
                hflip=self.hflip,
                color_jitter=self.color_jitter,
                auto_augment=self.policy,
                interpolation="bicubic",
                mean=tuple(mean),
                std=tuple(std),
                re_prob=self.re_prob,
                re_mode=self.re_mode,
            )
        except (AssertionError, ValueError, KeyError) as err:  # timm's refusal of a bad policy string
            raise DataError(
                f"augmentation.auto_augment={self.auto_augment!r} is not a timm policy ({err or 'unknown'}); "
                f"use e.g. 'rand-m9-mstd0.5-inc1'."
            ) from None


def eval_transform(
    img_size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float | None
) -> Callable[..., Any]:
    """The evaluation transform: the PETL square resize (``crop_pct`` None) or timm's centre crop."""
    if crop_pct is None:
        return petl_transform(img_size, mean, std)
    from timm.data import create_transform

    return create_transform(
        img_size, is_training=False, crop_pct=crop_pct, interpolation="bicubic", mean=tuple(mean), std=tuple(std)
    )


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Augmentation",
    "EvalCrop",
    "Normalization",
    "eval_transform",
    "petl_transform",
    "resolve_crop_pct",
    "resolve_normalization",
]
