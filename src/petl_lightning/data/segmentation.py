"""The shared :class:`SegmentationDataModule` and :class:`SegmentationFolderDataModule` for your own folders.

Batches are ``(images, masks)``: float ``(B, 3, H, W)`` normalised images and int64 ``(B, H, W)``
class indices with :data:`IGNORE_INDEX` (255) for pixels that count nowhere. Training samples are
``img_size`` squares (:class:`~petl_lightning.data.seg_transforms.SegTrainTransform`); evaluation
images keep their aspect ratio with the short side ``img_size`` and a batch is padded to its largest
image (masks with 255). ``predict`` batches are ``(images, sizes)``, ``sizes`` each image's
``(H, W)`` before padding.

Every check a run can fail on (missing files, unpaired images, sizes, mask modes, labels) runs when
the module is built, so ``petl-lightning fit`` stops with one line before it writes anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from petl_lightning.data.dataset import EpochKeyedSampler
from petl_lightning.data.lists import IMAGE_SUFFIXES
from petl_lightning.data.seg_dataset import (
    LabelMap,
    SegmentationDataset,
    SegmentationSample,
    check_pairs,
    list_images,
    pair_files,
    read_class_names,
)
from petl_lightning.data.seg_transforms import (
    IGNORE_INDEX,
    SegEvalTransform,
    SegTrainTransform,
    pad_collate,
    predict_collate,
)
from petl_lightning.data.transforms import Normalization, resolve_normalization
from petl_lightning.errors import DataError

SPLITS = ("train", "val", "test")


class SegmentationDataModule(L.LightningDataModule):
    """Image/mask pairs for semantic segmentation; subclasses implement :meth:`load_class_names`,
    :meth:`load_splits` and :attr:`task`, and call :meth:`load` at the end of their ``__init__``.

    Args:
        img_size: training crop side, and the short side evaluation images are resized to.
        batch_size: training batch size.
        eval_batch_size: validation/test/predict batch size (default batch_size; each batch is
            padded to its largest image).
        num_workers: loader workers (default: up to 4, at most the CPU count).
        seed: the data's seed: epoch ``e``'s order depends only on (seed, e), each augmented sample
            on (seed, e, index), so a resumed run sees what an uninterrupted one sees.
        normalization: ``backbone`` (default: the mean/std of ``backbone_name``'s timm pretrained
            config; ImageNet's when there is none), ``imagenet``, or ``[mean, std]``.
        backbone_name: the timm name of the backbone; the CLI links it from ``model.init_args.model_name``.
        scale_range: training rescale factors of the short side ``img_size`` (low, high).
        flip: random horizontal flips in training.
        photometric: random brightness, contrast, saturation and hue in training.
        num_classes: override the class count (at least the named classes, at most 255).
        pin_memory: pinned host memory for the loaders (default: when CUDA is available).
        predict_dir: a folder of images (searched recursively, sorted) for ``predict``; default the
            test split's images.
    """

    ignore_index: int = IGNORE_INDEX

    def __init__(
        self,
        img_size: int = 512,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        seed: int = 0,
        normalization: Normalization = "backbone",
        backbone_name: str | None = None,
        scale_range: tuple[float, float] = (0.5, 2.0),
        flip: bool = True,
        photometric: bool = True,
        num_classes: int | None = None,
        pin_memory: bool | None = None,
        predict_dir: str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("img_size", img_size), ("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and value < 1:
                raise DataError(f"{name} must be at least 1, got {value}.")
        if num_workers is not None and num_workers < 0:
            raise DataError(f"num_workers must be 0 (load in the main process) or more, got {num_workers}.")
        lo, hi = scale_range
        if not 0 < lo <= hi:
            raise DataError(f"scale_range must be (low, high) with 0 < low <= high, got {tuple(scale_range)}.")
        if num_classes is not None and not 1 <= num_classes <= IGNORE_INDEX:
            raise DataError(f"num_classes must lie in [1, {IGNORE_INDEX}] ({IGNORE_INDEX} marks ignored pixels).")
        # num_classes reaches the model through the CLI link; logging the raw argument too would clash
        # with the model's value in Lightning's hparams merge.
        self.save_hyperparameters(ignore=["num_classes"])
        self.img_size = img_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
        self.seed = seed
        self.mean, self.std = resolve_normalization(normalization, backbone_name)
        self.scale_range = (float(lo), float(hi))
        self.train_transform = SegTrainTransform(img_size, self.mean, self.std, self.scale_range, flip, photometric)
        self.transform = SegEvalTransform(img_size, self.mean, self.std)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.predict_dir = Path(predict_dir).expanduser() if predict_dir else None
        self._num_classes_arg = num_classes
        self.num_classes = 0  # set by load()
        self._class_names: list[str] = []
        self.splits: dict[str, list[SegmentationSample]] = {}
        self.labels = LabelMap(0)
        self._datasets: dict[str, SegmentationDataset] = {}

    # -- what a source implements ----------------------------------------------------------------
    def load_class_names(self) -> list[str]:
        """The names of the classes by index (their count is the class count)."""
        raise NotImplementedError

    def load_splits(self) -> dict[str, list[SegmentationSample]]:
        """The pairs of each split present (``train`` required, ``val``/``test`` optional), paired and listed."""
        raise NotImplementedError

    def label_lut(self) -> np.ndarray | None:
        """Mask file value -> class index (256 entries; None: the identity)."""
        return None

    def label_hint(self) -> str:
        """How to fix a mask value outside the classes."""
        return "fix the mask, or pass num_classes if the task has more classes."

    def check_splits(self) -> None:
        """The up-front checks of the pairs (default: headers: readable, single-channel, same size)."""
        for samples in self.splits.values():
            check_pairs(samples, None)

    def missing_test_hint(self) -> str:
        return "This data has no test split: pass predict_dir (a folder of images) to predict."

    @property
    def task(self) -> str:
        raise NotImplementedError

    # -- loading ---------------------------------------------------------------------------------
    def load(self) -> None:
        """Read the class names, resolve the class count, list and check the pairs (in ``__init__``)."""
        names = self.load_class_names()
        n = self._num_classes_arg or len(names)
        if n < len(names):
            raise DataError(
                f"num_classes={n} is fewer than the {len(names)} named classes of task {self.task!r}: drop "
                f"num_classes or the extra names."
            )
        if n > IGNORE_INDEX:
            raise DataError(f"Task {self.task!r} names {n} classes; at most {IGNORE_INDEX} fit (255 = ignore).")
        self.num_classes = n
        self._class_names = names + [f"class_{i}" for i in range(len(names), n)]
        self.labels = LabelMap(n, self.label_lut(), self.label_hint())
        self.splits = self.load_splits()
        if self.predict_dir is not None:
            if not self.predict_dir.is_dir():
                raise DataError(f"predict_dir {str(self.predict_dir)!r} is not a folder: pass a folder of images.")
            if not list_images(self.predict_dir, recursive=True):
                raise DataError(f"predict_dir {self.predict_dir} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
        self.check_splits()

    @property
    def class_names(self) -> list[str]:
        return self._class_names

    @property
    def train_split(self) -> str:
        return "train"

    @property
    def val_split(self) -> str | None:
        """``val`` where the data has one; else none during ``fit``, and ``validate`` evaluates the test split."""
        if "val" in self.splits:
            return "val"
        validating = self.trainer is not None and self.trainer.state.fn == "validate"
        return self.test_split if validating and self.test_split in self.splits else None

    @property
    def test_split(self) -> str:
        return "test"

    @property
    def predict_name(self) -> str:
        """The name of the folder ``predict`` reads (``predict_dir``'s, else the test split's)."""
        return self.predict_dir.name if self.predict_dir is not None else self.test_split

    def predict_paths(self) -> list[Path]:
        """The images ``predict`` reads, in loader order."""
        return [s.image for s in self.samples("predict")]

    def samples(self, split: str) -> list[SegmentationSample]:
        """The pairs of ``split`` (``predict``: images only, from ``predict_dir`` or the test split)."""
        if split == "predict":
            if self.predict_dir is not None:
                return [SegmentationSample(p) for p in list_images(self.predict_dir, recursive=True)]
            return [SegmentationSample(s.image) for s in self.samples(self.test_split)]
        if split not in self.splits:
            if split == self.test_split:
                raise DataError(self.missing_test_hint())
            raise DataError(f"No split {split!r} in this data; it has {', '.join(self.splits)}.")
        return self.splits[split]

    def dataset(self, split: str) -> SegmentationDataset:
        """The dataset of ``split``: the training split with the training transform, others with the evaluation one."""
        if split not in self._datasets:
            train = split == self.train_split
            self._datasets[split] = SegmentationDataset(
                self.samples(split),
                self.train_transform if train else self.transform,
                self.labels,
                augment=train,
                seed=self.seed,
            )
        return self._datasets[split]

    def _loader(self, split: str, train: bool) -> DataLoader:
        ds = self.dataset(split)
        batch_size = self.batch_size if train else self.eval_batch_size
        return DataLoader(
            ds,
            batch_size=batch_size,
            sampler=EpochKeyedSampler(len(ds), self.seed) if train else None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=predict_collate if split == "predict" else pad_collate,
            # a last training batch of one breaks batch norm in decode heads; keep at least one batch
            drop_last=train and len(ds) > batch_size,
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


class SegmentationFolderDataModule(SegmentationDataModule):
    """Your own segmentation data: ``<root>/{train,val,test}/{images,masks}/``.

    Each image (``.jpg``, ``.png``, ...) has a mask ``masks/<stem>.png``: a single-channel PNG of
    class indices of the image's size, 255 = ignore. ``<root>/classes.txt`` names the classes, one per
    line (line 1: label 0). ``val/`` is optional (without it, no validation) and so is ``test/``
    (without it, ``test`` refuses and ``predict`` needs ``predict_dir``). Pairs are taken in sorted
    image order. Every pair is checked when the module is built: pairing, sizes and mask modes from
    the headers, and (``check_labels``) every mask's values, decoded.

    Args:
        root: the folder holding ``classes.txt``, ``train/`` and optionally ``val/`` and ``test/``.
        name: the task's name (default: the root folder's name).
        check_labels: decode every mask up front and check its labels (fine for folders of a few
            thousand masks; off: each mask is checked as it loads).
        **kwargs: :class:`SegmentationDataModule`'s (``img_size``, ``batch_size``, ...).
    """

    def __init__(self, root: str, name: str | None = None, check_labels: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = Path(root).expanduser()
        self._name = name or self.root.resolve().name
        self.check_labels = check_labels
        self.load()

    @property
    def task(self) -> str:
        return self._name

    def load_class_names(self) -> list[str]:
        if not self.root.is_dir():
            raise DataError(
                f"Segmentation folder root {str(self.root)!r} does not exist. Pass --data.init_args.root, the folder "
                f"holding classes.txt and train/{{images,masks}}/ (val/ and test/ optional)."
            )
        return read_class_names(self.root / "classes.txt")

    def label_hint(self) -> str:
        return (
            f"fix the mask, add the class to {self.root / 'classes.txt'}, or pass num_classes if the task has "
            f"more classes."
        )

    def missing_test_hint(self) -> str:
        return (
            f"{str(self.root)!r} has no test/ folder: add test/images/ and test/masks/ to test, or pass "
            f"predict_dir (a folder of images) to predict."
        )

    def load_splits(self) -> dict[str, list[SegmentationSample]]:
        if not (self.root / "train").is_dir():
            raise DataError(
                f"{str(self.root)!r} has no train/ folder (it holds: "
                f"{', '.join(sorted(p.name for p in self.root.iterdir())) or 'nothing'}). A segmentation folder "
                f"holds train/images/ and train/masks/, val/ and test/ optional."
            )
        splits = {}
        for split in SPLITS:
            split_dir = self.root / split
            if not split_dir.is_dir():
                continue
            for sub in ("images", "masks"):
                if not (split_dir / sub).is_dir():
                    raise DataError(f"{split_dir} has no {sub}/ folder: a split holds images/ and masks/ (same stems).")
            pairs = pair_files(split_dir / "images", split_dir / "masks")
            if not pairs:
                raise DataError(
                    f"{split_dir / 'images'} holds no images ({', '.join(IMAGE_SUFFIXES)}): add image/mask pairs or "
                    f"remove {split_dir}."
                )
            splits[split] = pairs
        return splits

    def check_splits(self) -> None:
        for samples in self.splits.values():
            check_pairs(samples, self.labels if self.check_labels else None)


__all__ = [
    "IGNORE_INDEX",
    "SegmentationDataModule",
    "SegmentationFolderDataModule",
]
