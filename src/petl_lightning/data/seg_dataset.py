"""Segmentation samples on disk: image/mask pairing, the up-front checks (one-line errors naming the
file and the fix), mask decoding into class indices, and the dataset that turns pairs into tensors."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from petl_lightning.data.dataset import sample_seed, seeded
from petl_lightning.data.lists import IMAGE_SUFFIXES
from petl_lightning.data.seg_transforms import IGNORE_INDEX
from petl_lightning.errors import DataError

#: PIL modes of single-channel masks of class indices (grey, palette, 1-bit, 32- and 16-bit integer).
MASK_MODES = ("L", "P", "1", "I", "I;16", "I;16L", "I;16B", "I;16N")


@dataclass(frozen=True)
class SegmentationSample:
    """An image file and its mask file (None where only the image is read: ``predict``)."""

    image: Path
    mask: Path | None = None


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (not hidden; any case of the suffixes), sorted by path."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def pair_files(images_dir: Path, masks_dir: Path) -> list[SegmentationSample]:
    """Each image of ``images_dir`` with the mask ``<stem>.png`` of ``masks_dir``, in image order;
    a one-line :class:`DataError` for an image without a mask or a mask without an image."""
    images = list_images(images_dir)
    masks = list_images(masks_dir)
    by_stem: dict[str, Path] = {}
    for img in images:
        if img.stem in by_stem:
            raise DataError(f"Images {by_stem[img.stem]} and {img} share the stem {img.stem!r}: rename or remove one.")
        by_stem[img.stem] = img
    for mask in masks:
        if mask.suffix.lower() != ".png":
            raise DataError(
                f"Mask {mask} is not a PNG: masks must be lossless single-channel PNGs of class indices; save it "
                f"as {mask.with_suffix('.png').name}."
            )
        if mask.stem not in by_stem:
            raise DataError(
                f"Mask {mask} has no image {mask.stem}.<jpg|png|...> in {images_dir}: add the image or remove the mask."
            )
    mask_stems = {m.stem for m in masks}
    for img in images:
        if img.stem not in mask_stems:
            raise DataError(
                f"Image {img} has no mask: add {masks_dir / (img.stem + '.png')} (a single-channel PNG of class "
                f"indices, 255 = ignore) or remove the image."
            )
    return [SegmentationSample(img, masks_dir / f"{img.stem}.png") for img in images]


def read_mask(path: Path) -> np.ndarray:
    """The class indices of a mask file as a uint8 ``(H, W)`` array (one-line errors for a colour
    mask, an unreadable file, or values above 255)."""
    try:
        with Image.open(path) as m:
            if m.mode not in MASK_MODES:
                raise DataError(mask_mode_error(path, m.mode))
            arr = np.array(m)
    except FileNotFoundError:
        raise DataError(f"Mask {path} not found.") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"Mask {path} cannot be read ({err}).") from None
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise DataError(
                f"Mask {path} holds value {int(arr.max() if arr.max() > 255 else arr.min())}: class indices must be "
                f"0-254 with 255 = ignore."
            )
        arr = arr.astype(np.uint8)
    return arr


def mask_mode_error(path: Path, mode: str) -> str:
    return (
        f"Mask {path} has PIL mode {mode}: masks must be single-channel PNGs of class indices (mode L or P, "
        f"255 = ignore), not colour images; convert each colour to its class index."
    )


def read_rgb(path: Path) -> Image.Image:
    """The RGB image at ``path`` (a one-line error naming it when it cannot be read)."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"Image {path} not found.") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"Image {path} cannot be read ({err}).") from None


class LabelMap:
    """How a mask file's values become class indices (``lut``: 256 entries, 255 = ignore) and which
    file values are valid for ``num_classes`` classes; ``hint`` says how to fix an invalid one."""

    def __init__(self, num_classes: int, lut: np.ndarray | None = None, hint: str = "") -> None:
        self.lut = np.arange(256, dtype=np.uint8) if lut is None else lut.astype(np.uint8)
        self.valid = (self.lut < num_classes) | (self.lut == IGNORE_INDEX)
        self.num_classes, self.hint = num_classes, hint

    def check(self, raw: np.ndarray, path: Path) -> None:
        """A one-line :class:`DataError` for a value of ``raw`` (a mask file's values) outside the classes."""
        present = np.bincount(raw.ravel(), minlength=256) > 0
        bad = np.flatnonzero(present & ~self.valid)
        if bad.size:
            raise DataError(
                f"Mask {path} holds label {int(bad[0])}, outside the {self.num_classes} classes (255 = ignore): "
                f"{self.hint}"
            )

    def __call__(self, raw: np.ndarray, path: Path) -> np.ndarray:
        self.check(raw, path)
        return self.lut[raw]


def check_pair(sample: SegmentationSample, labels: LabelMap | None) -> None:
    """From the headers: the image opens, the mask is single-channel and the image's size; with
    ``labels``, also decode the mask and check its values."""
    assert sample.mask is not None
    try:
        with Image.open(sample.image) as img:
            size = img.size
    except FileNotFoundError:
        raise DataError(f"Image {sample.image} not found.") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"Image {sample.image} cannot be read ({err}).") from None
    try:
        with Image.open(sample.mask) as m:
            mode, mask_size = m.mode, m.size
    except FileNotFoundError:
        raise DataError(f"Mask {sample.mask} not found.") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"Mask {sample.mask} cannot be read ({err}).") from None
    if mode not in MASK_MODES:
        raise DataError(mask_mode_error(sample.mask, mode))
    if mask_size != size:
        raise DataError(
            f"Mask {sample.mask} is {mask_size[0]}x{mask_size[1]} but its image {sample.image} is {size[0]}x{size[1]}: "
            f"a mask needs its image's size (one class index per pixel); resize it (nearest) or fix the pair."
        )
    if labels is not None:
        labels.check(read_mask(sample.mask), sample.mask)


def check_pairs(samples: Sequence[SegmentationSample], labels: LabelMap | None) -> None:
    """:func:`check_pair` on every sample (threads overlap the file reads); the first problem in order is raised."""
    if len(samples) > 64:
        with ThreadPoolExecutor(min(16, 4 * (os.cpu_count() or 1))) as pool:
            list(pool.map(lambda s: check_pair(s, labels), samples))
    else:
        for s in samples:
            check_pair(s, labels)


def read_class_names(path: Path) -> list[str]:
    """``classes.txt``: one class name per line, line 1 naming label 0 (trailing blank lines ignored)."""
    if not path.is_file():
        raise DataError(
            f"{path} not found: a segmentation folder needs classes.txt with one class name per line "
            f"(line 1 names label 0)."
        )
    names = [line.strip() for line in path.read_text().splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise DataError(f"{path} is empty: write one class name per line (line 1 names label 0).")
    if "" in names:
        raise DataError(f"{path}: line {names.index('') + 1} is empty; every line names a class (line 1: label 0).")
    return names


class SegmentationDataset(Dataset):
    """``(image, mask)`` of image/mask pairs through a joint transform, or ``(image, size)`` where a
    sample has no mask (``predict``; ``size`` = the transformed ``(H, W)``).

    Keys are an index, or ``(index, epoch)`` from :class:`EpochKeyedSampler`: with ``augment`` the
    transform draws from generators seeded by ``(seed, epoch, index)``.
    """

    def __init__(
        self,
        samples: Sequence[SegmentationSample],
        transform: Callable[..., tuple[Tensor, Tensor | None]],
        labels: LabelMap,
        augment: bool = False,
        seed: int = 0,
    ) -> None:
        self.samples, self.transform, self.labels = list(samples), transform, labels
        self.augment, self.seed = augment, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, Tensor]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        s = self.samples[index]
        image = tv_tensors.Image(F.pil_to_tensor(read_rgb(s.image)))
        if s.mask is None:
            x, _ = self.transform(image)
            return x, torch.tensor(x.shape[-2:], dtype=torch.int64)
        raw = read_mask(s.mask)
        if raw.shape != tuple(image.shape[-2:]):
            raise DataError(
                f"Mask {s.mask} is {raw.shape[1]}x{raw.shape[0]} but its image {s.image} is "
                f"{image.shape[-1]}x{image.shape[-2]}: a mask needs its image's size."
            )
        mask = tv_tensors.Mask(torch.from_numpy(self.labels(raw, s.mask))[None])
        if self.augment:
            with seeded(sample_seed(self.seed, epoch, index)):
                x, y = self.transform(image, mask)
        else:
            x, y = self.transform(image, mask)
        assert y is not None
        return x, y


__all__ = [
    "MASK_MODES",
    "LabelMap",
    "SegmentationDataset",
    "SegmentationSample",
    "check_pair",
    "check_pairs",
    "list_images",
    "pair_files",
    "read_class_names",
    "read_mask",
    "read_rgb",
]
