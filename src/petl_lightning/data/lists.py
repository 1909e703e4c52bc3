"""File lists, images and transforms of the VTAB-1K layout: parsing ``relative/path <label>`` lists
(or a folder of images for ``predict``), the dataset that decodes them with errors naming the file
and list line, the seed-and-epoch shuffle that makes resumes exact, and the PETL transform with its
normalisation (the backbone's timm mean/std, ImageNet's, or given)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset, Sampler
from torchvision import transforms as T

from petl_lightning.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


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


Normalization = Literal["backbone", "imagenet"] | list[list[float]]


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
        if backbone_name is None:
            return IMAGENET_MEAN, IMAGENET_STD
        from timm.models import get_pretrained_cfg

        try:
            cfg = get_pretrained_cfg(backbone_name)
        except RuntimeError:  # an unknown tag: the backbone itself reports the bad name
            cfg = None
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


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    list_file: Path
    line: int

    def where(self) -> str:
        return f"{self.list_file}:{self.line}"


def read_list(list_file: Path) -> list[Sample]:
    """Parse a VTAB-1K list file (``relative/path <int label>`` per line)."""
    if not list_file.is_file():
        raise DataError(f"List file not found: {list_file}.")
    samples = []
    base = list_file.parent
    for i, raw in enumerate(list_file.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{list_file}:{i}: expected '<relative image path> <integer label>', got {raw!r}.")
        samples.append(Sample(base / parts[0], int(parts[1]), list_file, i))
    if not samples:
        raise DataError(f"List file {list_file} is empty.")
    return samples


def read_images(source: Path) -> list[Sample]:
    """What ``predict`` reads: a list file (labels optional; -1 where absent) or a folder of images
    (searched recursively, sorted)."""
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"No images ({', '.join(IMAGE_SUFFIXES)}) under {source}.")
        return [Sample(p, -1, source, i) for i, p in enumerate(files, start=1)]
    if not source.is_file():
        raise DataError(
            f"Predict source {str(source)!r} not found: pass a list file or a folder of images "
            f"(--data.init_args.predict_list)."
        )
    samples = []
    for i, raw in enumerate(source.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        parts = line.rsplit(maxsplit=1)
        labelled = len(parts) == 2 and parts[1].lstrip("-").isdigit()
        samples.append(
            Sample(source.parent / (parts[0] if labelled else line), int(parts[1]) if labelled else -1, source, i)
        )
    if not samples:
        raise DataError(f"Predict list {source} is empty.")
    return samples


class FileListDataset(Dataset):
    """Images and labels from a parsed list; errors name the file and the list line."""

    def __init__(self, samples: Sequence[Sample], transform: T.Compose, cache: bool = False) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.cache: dict[int, Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        s = self.samples[index]
        if self.cache is not None and index in self.cache:
            return self.cache[index], s.label
        try:
            with Image.open(s.path) as img:
                x = self.transform(img.convert("RGB"))
        except FileNotFoundError:
            raise DataError(f"{s.where()}: image {s.path} not found.") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise DataError(f"{s.where()}: image {s.path} cannot be read ({err}).") from None
        if self.cache is not None:
            self.cache[index] = x
        return x, s.label


class EpochShuffleSampler(Sampler[int]):
    """Shuffles with a generator seeded by (seed, epoch): the order does not depend on the global
    RNG, so a run resumed from a checkpoint sees exactly the batches an uninterrupted run sees."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def check_images(samples: Sequence[Sample], mode: str) -> None:
    for s in samples:
        if not s.path.is_file():
            raise DataError(f"{s.where()}: image {s.path} not found.")
        if mode == "header":
            try:
                with Image.open(s.path) as img:
                    img.verify()
            except Exception as err:  # noqa: BLE001 - PIL raises many kinds for bad files
                raise DataError(f"{s.where()}: image {s.path} is corrupt or not an image ({err}).") from None


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EpochShuffleSampler",
    "FileListDataset",
    "Normalization",
    "Sample",
    "check_images",
    "petl_transform",
    "read_images",
    "read_list",
    "resolve_normalization",
]
