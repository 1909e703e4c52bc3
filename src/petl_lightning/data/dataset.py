"""Where images come from and how they become tensors: an :class:`ImageSource` (labelled images that
name their origin in errors: files from a list or a folder, rows of a Hugging Face dataset), the
dataset that decodes and transforms them (seeded per image when augmenting), and the seed-and-epoch
shuffle that makes resumes exact."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Protocol

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from petl_lightning.data.lists import Sample
from petl_lightning.errors import DataError


class ImageSource(Protocol):
    """Labelled images, indexable; errors name where an image came from."""

    def __len__(self) -> int: ...

    @property
    def labels(self) -> list[int]: ...

    def image(self, index: int) -> Image.Image:
        """The RGB image at ``index`` (a one-line :class:`DataError` naming it when it cannot be read)."""
        ...

    def name(self, index: int) -> str:
        """What identifies image ``index`` to a user (a path, ``split[row]``): predictions' first column."""
        ...

    def where(self, index: int) -> str:
        """Where image ``index`` is declared (``list.txt:12``, ``train[3]``), for error messages."""
        ...

    def subset(self, indices: Sequence[int]) -> ImageSource:
        """The images at ``indices``, in that order."""
        ...


class FileSource:
    """Image files with labels (``Sample``s of a list file, a folder walk or a JSON split)."""

    def __init__(self, samples: Sequence[Sample]) -> None:
        self.samples = list(samples)
        self._labels = [s.label for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return self._labels

    def image(self, index: int) -> Image.Image:
        s = self.samples[index]
        try:
            with Image.open(s.path) as img:
                return img.convert("RGB")
        except FileNotFoundError:
            raise DataError(f"{s.describe()} not found.") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise DataError(f"{s.describe()} cannot be read ({err}).") from None

    def name(self, index: int) -> str:
        return str(self.samples[index].path)

    def where(self, index: int) -> str:
        return self.samples[index].where()

    def subset(self, indices: Sequence[int]) -> FileSource:
        return FileSource([self.samples[i] for i in indices])

    def check(self, mode: str, budget_s: float | None = None) -> None:
        """``exists``: every file exists (stat calls in parallel); ``header``: also each header opens
        as an image. After ``budget_s`` seconds the rest is left to loading, which names a bad file
        as it meets it (one warning says how many were checked)."""
        if mode == "none" or not self.samples:
            return
        deadline = None if budget_s is None else time.monotonic() + budget_s

        def problem(s: Sample) -> str | None:
            if deadline is not None and time.monotonic() > deadline:
                return "skipped"
            if not s.path.is_file():
                return f"{s.describe()} not found."
            if mode == "header":
                try:
                    with Image.open(s.path) as img:
                        img.verify()
                except Exception as err:  # noqa: BLE001 - PIL raises many kinds for bad files
                    return f"{s.describe()} is corrupt or not an image ({err})."
            return None

        if len(self.samples) > 1000:  # stat calls wait on the disk: threads overlap them
            with ThreadPoolExecutor(min(16, 4 * (os.cpu_count() or 1))) as pool:
                results = list(pool.map(problem, self.samples))
        else:
            results = [problem(s) for s in self.samples]
        for r in results:
            if r is not None and r != "skipped":
                raise DataError(r)
        skipped = results.count("skipped")
        if skipped:
            rank_zero_warn(
                f"Checked {len(results) - skipped} of {len(results)} images in the {budget_s:g} s check budget; "
                f"the rest are checked as they load (raise check_budget to check them all up front)."
            )


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of image ``index`` in ``epoch`` (distinct per triple, within 2**63)."""
    return (seed * 1_000_003 + epoch) * 10_000_019 + index


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seeds torch's, Python's and NumPy's global generators (the ones torchvision's and timm's
    transforms draw from) for the block, and restores them after, so a transform's draws depend on
    ``seed`` only and training's own random draws are untouched."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class ImageDataset(Dataset):
    """``(image tensor, label)`` of a source through a transform.

    Keys are an index, or ``(index, epoch)`` from :class:`EpochKeyedSampler`: a random (augmenting)
    transform then draws from generators seeded by ``(seed, epoch, index)``. ``cache`` keeps the
    transformed tensors (only for a deterministic transform, where that is exact).
    """

    def __init__(
        self,
        source: ImageSource,
        transform: Callable[..., Any],
        cache: bool = False,
        augment: bool = False,
        seed: int = 0,
    ) -> None:
        self.source, self.transform, self.augment, self.seed = source, transform, augment, seed
        self.labels = source.labels
        self.cache: dict[int, Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        label = self.labels[index]
        if self.cache is not None and index in self.cache:
            return self.cache[index], label
        img = self.source.image(index)
        if self.augment:
            with seeded(sample_seed(self.seed, epoch, index)):
                x = self.transform(img)
        else:
            x = self.transform(img)
        if self.cache is not None:
            self.cache[index] = x
        return x, label


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


class EpochKeyedSampler(Sampler[tuple[int, int]]):
    """:class:`EpochShuffleSampler`'s order as ``(index, epoch)`` keys, which tell an
    :class:`ImageDataset` the epoch its augmentation is seeded with (workers cannot see the sampler)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.order = EpochShuffleSampler(n, seed)

    def set_epoch(self, epoch: int) -> None:
        self.order.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((i, self.order.epoch) for i in self.order)


__all__ = [
    "EpochKeyedSampler",
    "EpochShuffleSampler",
    "FileSource",
    "ImageDataset",
    "ImageSource",
    "sample_seed",
    "seeded",
]
