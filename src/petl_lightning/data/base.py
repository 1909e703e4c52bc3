"""`ImageClassificationDataModule`: what every image-classification source shares.

A source subclass says where the labelled images are (:meth:`load_sources`: one
:class:`~petl_lightning.data.dataset.ImageSource` per split it uses) and how many classes there
are; this base owns the rest: transforms and normalisation (the backbone's timm config by
default), optional augmentation seeded per image, few-shot draws, up-front checks with one-line
errors, the loaders with the seed-and-epoch shuffle that makes resumes exact, caching, and
``predict``'s list. Splits are named ``train``/``val``/``test`` unless the source names its own
(VTAB-1K's list files).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from petl_lightning.data.dataset import EpochKeyedSampler, FileSource, ImageDataset, ImageSource
from petl_lightning.data.lists import read_images
from petl_lightning.data.transforms import (
    Augmentation,
    EvalCrop,
    Normalization,
    eval_transform,
    resolve_crop_pct,
    resolve_normalization,
)
from petl_lightning.errors import DataError

CheckImages = Literal["exists", "header", "none"]


class ImageClassificationDataModule(L.LightningDataModule):
    """Labelled images for classification; subclasses implement :meth:`load_sources`.

    Args:
        img_size: square input size (224 in the papers; smaller for quick CPU runs).
        batch_size / eval_batch_size: loader batch sizes (eval defaults to batch_size).
        num_workers: loader workers (default: up to 4, at most the CPU count).
        seed: the data's seed: epoch ``e``'s order depends only on (seed, e), each augmented
            image on (seed, e, index), and the few-shot draw on the seed.
        normalization: ``backbone`` (default: the mean/std of ``backbone_name``'s timm pretrained
            config; ImageNet's when there is no name or no config), ``imagenet``, or ``[mean, std]``.
        backbone_name: the timm name of the backbone the images are for; the CLI links it from
            ``model.init_args.model_name``.
        augmentation: training-time augmentation (:class:`Augmentation`, timm's ``create_transform``);
            None (default): training images get the evaluation transform, as in the PETL papers.
        eval_crop: ``none`` (default: resize the whole image to a square, the PETL papers'),
            ``backbone`` (timm's centre crop with the backbone's ``crop_pct``) or a ``crop_pct``.
        shots: few-shot training: ``shots`` images per class drawn from the training split with
            ``seed`` (the protocols use 1, 2, 4, 8, 16); None: every training image.
        num_classes: override the class count (checked against the labels).
        check_images: ``exists`` (default; every listed image exists), ``header`` (also each
            header opens as an image), or ``none``. Checked when the module is built, in parallel.
        check_budget: seconds the image check may take (None: no limit); the rest is checked as
            images load, with one warning.
        cache: keep decoded, transformed images in memory (exact; not with ``augmentation``).
        pin_memory: pinned host memory for the loaders (default: when CUDA is available).
        persistent_workers: keep loader workers between epochs (with ``cache``, always).
        predict_list: what ``predict`` reads: a list file (relative paths, labels optional) or a
            folder of images; default the test split.
    """

    def __init__(
        self,
        img_size: int = 224,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        seed: int = 0,
        normalization: Normalization = "backbone",
        backbone_name: str | None = None,
        augmentation: Augmentation | None = None,
        eval_crop: EvalCrop = "none",
        shots: int | None = None,
        num_classes: int | None = None,
        check_images: CheckImages = "exists",
        check_budget: float | None = 60.0,
        cache: bool = False,
        pin_memory: bool | None = None,
        persistent_workers: bool = False,
        predict_list: str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("img_size", img_size), ("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and value < 1:
                raise DataError(f"{name} must be at least 1, got {value}.")
        if num_workers is not None and num_workers < 0:
            raise DataError(f"num_workers must be 0 (load in the main process) or more, got {num_workers}.")
        if shots is not None and shots < 1:
            raise DataError(f"shots must be at least 1 image per class (1, 2, 4, 8, 16 in the protocols), got {shots}.")
        if check_images not in ("exists", "header", "none"):
            raise DataError(f"check_images must be 'exists', 'header' or 'none', got {check_images!r}.")
        if cache and augmentation is not None:
            raise DataError("cache keeps transformed images, but augmentation changes them every epoch: turn one off.")
        # num_classes is resolved by the source and reaches the model through the CLI link; logging
        # the raw argument too would clash with the model's value in Lightning's hparams merge.
        self.save_hyperparameters(ignore=["num_classes"])
        self.img_size = img_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
        self.seed = seed
        self.mean, self.std = resolve_normalization(normalization, backbone_name)
        self.augmentation = augmentation
        self.crop_pct = resolve_crop_pct(eval_crop, backbone_name)
        self.transform = eval_transform(img_size, self.mean, self.std, self.crop_pct)
        self.train_transform = augmentation.transform(img_size, self.mean, self.std) if augmentation else self.transform
        self.shots = shots
        self.check_images, self.check_budget = check_images, check_budget
        self.cache = cache
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers
        self.predict_source = os.path.expanduser(predict_list) if predict_list else None
        self._num_classes_arg = num_classes
        self.num_classes = num_classes or 0  # set by load()
        self.sources: dict[str, ImageSource] = {}
        self._datasets: dict[str, ImageDataset] = {}

    # -- what a source implements ----------------------------------------------------------------
    def load_sources(self) -> dict[str, ImageSource]:
        """Read (and check the layout of) the splits this module uses: ``{split name: source}``."""
        raise NotImplementedError

    def count_classes(self) -> int:
        """The class count when ``num_classes`` is not given (default: the largest label + 1)."""
        return 1 + max(max(s.labels, default=-1) for s in self.sources.values())

    @property
    def task(self) -> str:
        """The task's name (per-task hyper-parameters, run folders, tables)."""
        raise NotImplementedError

    @property
    def group(self) -> str:
        """The benchmark group the task belongs to (``custom`` outside a benchmark)."""
        return "custom"

    @property
    def class_names(self) -> list[str] | None:
        """Names of the classes by index, where the source has them (predictions' ``class`` column)."""
        return None

    def label_hint(self) -> str:
        """How to fix a label outside the class range (said after the error)."""
        return "Fix the labels, or pass num_classes if the task has more classes."

    @property
    def train_split(self) -> str:
        return "train"

    @property
    def val_split(self) -> str | None:
        """``val`` where the data has one; else none during ``fit``, and ``validate`` evaluates the test split."""
        if "val" in self.sources:
            return "val"
        validating = self.trainer is not None and self.trainer.state.fn == "validate"
        return self.test_split if validating else None

    @property
    def test_split(self) -> str:
        return "test"

    # -- loading and checks ----------------------------------------------------------------------
    def load(self) -> None:
        """Read the splits, resolve the class count, check labels and images, draw the few shots (once)."""
        self.sources = self.load_sources()
        self.num_classes = self._num_classes_arg if self._num_classes_arg is not None else self.count_classes()
        for source in self.sources.values():
            labels = source.labels
            bad = next((i for i, y in enumerate(labels) if not 0 <= y < self.num_classes), None)
            if bad is not None:
                raise DataError(
                    f"{source.where(bad)}: label {labels[bad]} is outside [0, {self.num_classes}) for task "
                    f"{self.task!r}. {self.label_hint()}"
                )
        if self.shots is not None:
            self.sources[self.train_split] = self.few_shot(self.sources[self.train_split])
        if self.check_images != "none":
            for source in self.sources.values():
                if isinstance(source, FileSource):
                    source.check(self.check_images, self.check_budget)

    def few_shot(self, source: ImageSource) -> ImageSource:
        """``shots`` images of each class, drawn with ``seed`` (the same files for the same seed), in source order."""
        shots = int(self.shots or 0)
        labels = torch.tensor(source.labels)
        g = torch.Generator().manual_seed(self.seed)
        chosen: list[int] = []
        names = self.class_names
        for c in range(self.num_classes):
            members = (labels == c).nonzero().flatten()
            if len(members) < shots:
                name = f"{c} ({names[c]!r})" if names and c < len(names) else str(c)
                raise DataError(
                    f"shots={shots}: class {name} has only {len(members)} training images; lower shots to "
                    f"{max(len(members), 1)} or fewer."
                )
            chosen += members[torch.randperm(len(members), generator=g)[:shots]].tolist()
        return source.subset(sorted(chosen))

    def setup(self, stage: str | None = None) -> None:
        """Reads and checks the data (once; sources that can, do it when the module is built)."""
        if not self.sources:
            self.load()

    # -- datasets and loaders --------------------------------------------------------------------
    @property
    def predict_name(self) -> str:
        """A name for what ``predict`` reads (the list file's stem, the folder's name, or the test split's)."""
        if self.predict_source is None:
            return self.test_split
        return os.path.splitext(os.path.basename(os.path.normpath(self.predict_source)))[0]

    def predict_paths(self) -> list[str]:
        """What identifies each image ``predict`` reads, in dataset order."""
        source = self.dataset("predict").source
        return [source.name(i) for i in range(len(source))]

    def source(self, split: str) -> ImageSource:
        """The images of ``split`` (``predict``: :attr:`predict_source`, default the test split)."""
        self.setup()
        if split == "predict":
            if self.predict_source is not None:
                return FileSource(read_images(Path(self.predict_source)))
            return self.sources[self.test_split]
        if split not in self.sources:
            raise DataError(f"No split {split!r} in this data; it has {', '.join(self.sources)}.")
        return self.sources[split]

    def dataset(self, split: str) -> ImageDataset:
        """The dataset of ``split``: the training split with the training transform, others with the evaluation one."""
        if split not in self._datasets:
            train = split == self.train_split
            self._datasets[split] = ImageDataset(
                self.source(split),
                self.train_transform if train else self.transform,
                cache=self.cache,
                augment=train and self.augmentation is not None,
                seed=self.seed,
            )
        return self._datasets[split]

    def _loader(self, split: str, train: bool) -> DataLoader:
        ds = self.dataset(split)
        workers = self.num_workers
        return DataLoader(
            ds,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=EpochKeyedSampler(len(ds), self.seed) if train else None,
            num_workers=workers,
            pin_memory=self.pin_memory,
            persistent_workers=workers > 0 and (self.cache or self.persistent_workers),
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_split, train=True)

    def val_dataloader(self) -> DataLoader | list:
        split = self.val_split
        return self._loader(split, train=False) if split else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_split, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", train=False)


__all__ = ["CheckImages", "ImageClassificationDataModule"]
