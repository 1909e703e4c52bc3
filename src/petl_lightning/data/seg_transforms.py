"""Joint image/mask transforms for semantic segmentation, and the collates that pad a batch.

Images travel as ``tv_tensors.Image`` (uint8, then float) and masks as ``tv_tensors.Mask`` (uint8
class indices, 255 = ignore), so torchvision's v2 functions resize masks with nearest-neighbour
interpolation and never invent labels. Random draws come from torch's global generator; the dataset
seeds it per (seed, epoch, index) around each call (:func:`~petl_lightning.data.dataset.seeded`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

#: The mask value of pixels that count in no loss or metric (unlabelled, padding).
IGNORE_INDEX = 255


def short_side_size(height: int, width: int, short: int) -> tuple[int, int]:
    """``(height, width)`` scaled so the shorter side is ``short``, keeping the aspect ratio."""
    scale = short / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def _chance(p: float = 0.5) -> bool:
    return bool(torch.rand(()) < p)


def photometric_distort(img: Tensor) -> Tensor:
    """mmseg's ``PhotoMetricDistortion`` on a float image in [0, 1]: each with probability 0.5, a
    brightness shift of up to 32/255, a contrast factor in [0.5, 1.5] (a plain multiply, as mmseg's),
    a saturation factor in [0.5, 1.5] and a hue shift of up to 18/180 of the hue circle; contrast
    comes first or last at random."""
    if _chance():
        img = (img + _uniform(-32, 32) / 255).clamp(0, 1)
    contrast_first = _chance()

    def contrast(x: Tensor) -> Tensor:
        return (x * _uniform(0.5, 1.5)).clamp(0, 1) if _chance() else x

    if contrast_first:
        img = contrast(img)
    if _chance():
        img = F.adjust_saturation(img, _uniform(0.5, 1.5))
    if _chance():
        img = F.adjust_hue(img, _uniform(-0.1, 0.1))
    if not contrast_first:
        img = contrast(img)
    return img


class SegTrainTransform:
    """The training transform; it follows mmseg's ADE20K pipeline.

    Random rescale so the short side is ``img_size`` times a factor drawn from ``scale_range``
    (aspect ratio kept; bilinear for the image, nearest for the mask); a random ``img_size`` crop,
    redrawn up to 10 times while one class covers over ``cat_max_ratio`` of its labelled pixels
    (mmseg's ``cat_max_ratio``); a horizontal flip with probability 0.5; the photometric distortion
    (image only); float and normalisation; then padding to ``img_size`` at the bottom and right where
    the rescaled image was smaller (image 0 after normalisation, as mmseg's data preprocessor and the
    evaluation collate pad; mask ``IGNORE_INDEX``). Every output is ``img_size x img_size``.
    """

    def __init__(
        self,
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        scale_range: tuple[float, float] = (0.5, 2.0),
        flip: bool = True,
        photometric: bool = True,
        cat_max_ratio: float = 0.75,
    ) -> None:
        self.img_size, self.mean, self.std = img_size, list(mean), list(std)
        self.scale_range, self.flip, self.photometric = scale_range, flip, photometric
        self.cat_max_ratio = cat_max_ratio

    def _crop_box(self, mask: Tensor) -> tuple[int, int, int, int]:
        """``(top, left, height, width)`` of the crop, with mmseg's ``cat_max_ratio`` retries."""
        h, w = mask.shape[-2:]
        ch, cw = min(h, self.img_size), min(w, self.img_size)
        box = (0, 0, ch, cw)
        for _ in range(10):
            top = int(torch.randint(h - ch + 1, ()))
            left = int(torch.randint(w - cw + 1, ()))
            box = (top, left, ch, cw)
            if self.cat_max_ratio >= 1.0:
                break
            counts = torch.bincount(mask[..., top : top + ch, left : left + cw].flatten(), minlength=256)
            counts = counts[:IGNORE_INDEX][counts[:IGNORE_INDEX] > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return box

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask) -> tuple[Tensor, Tensor]:
        """A uint8 ``(3, H, W)`` image and its uint8 ``(1, H, W)`` mask -> float ``(3, S, S)``, int64 ``(S, S)``."""
        h, w = image.shape[-2:]
        size = short_side_size(h, w, max(1, round(self.img_size * _uniform(*self.scale_range))))
        image = F.resize(image, list(size), antialias=True)
        mask = F.resize(mask, list(size))
        top, left, ch, cw = self._crop_box(mask)
        image, mask = F.crop(image, top, left, ch, cw), F.crop(mask, top, left, ch, cw)
        if self.flip and _chance():
            image, mask = F.horizontal_flip(image), F.horizontal_flip(mask)
        x = F.to_dtype(image, torch.float32, scale=True)
        if self.photometric:
            x = photometric_distort(x)
        x = F.normalize(x, self.mean, self.std)
        pad = [0, 0, self.img_size - cw, self.img_size - ch]
        if pad[2] or pad[3]:
            x, mask = F.pad(x, pad, fill=0), F.pad(mask, pad, fill=IGNORE_INDEX)
        return x.as_subclass(Tensor), mask.as_subclass(Tensor)[0].long()


class SegEvalTransform:
    """The evaluation transform: resize so the short side is ``img_size`` (aspect ratio kept; bilinear
    image, nearest mask; an image already that size is left as it is), float, normalisation. No crop:
    :func:`pad_collate` pads a batch to its largest image."""

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.img_size, self.mean, self.std = img_size, list(mean), list(std)

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask | None = None) -> tuple[Tensor, Tensor | None]:
        h, w = image.shape[-2:]
        if min(h, w) != self.img_size:
            size = list(short_side_size(h, w, self.img_size))
            image = F.resize(image, size, antialias=True)
            mask = None if mask is None else F.resize(mask, size)
        x = F.normalize(F.to_dtype(image, torch.float32, scale=True), self.mean, self.std).as_subclass(Tensor)
        return x, None if mask is None else mask.as_subclass(Tensor)[0].long()


def pad_collate(batch: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Stack ``(image, mask)`` pairs, padding each at the bottom and right to the batch's largest
    height and width: images with 0 (after normalisation), masks with ``IGNORE_INDEX``."""
    h = max(x.shape[-2] for x, _ in batch)
    w = max(x.shape[-1] for x, _ in batch)
    images = torch.zeros(len(batch), batch[0][0].shape[0], h, w, dtype=batch[0][0].dtype)
    masks = torch.full((len(batch), h, w), IGNORE_INDEX, dtype=torch.int64)
    for i, (x, m) in enumerate(batch):
        images[i, :, : x.shape[-2], : x.shape[-1]] = x
        masks[i, : m.shape[-2], : m.shape[-1]] = m
    return images, masks


def predict_collate(batch: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Stack ``(image, size)`` pairs: images padded as in :func:`pad_collate`, sizes ``(B, 2)`` int64."""
    images, _ = pad_collate([(x, x.new_zeros(0, 0)) for x, _ in batch])
    return images, torch.stack([s for _, s in batch]).long()


__all__ = [
    "IGNORE_INDEX",
    "SegEvalTransform",
    "SegTrainTransform",
    "pad_collate",
    "photometric_distort",
    "predict_collate",
    "short_side_size",
]
