"""`HFImageDataModule`: a Hugging Face ``datasets`` dataset of labelled images, read offline.

``path`` is one of: a folder written by ``DatasetDict.save_to_disk`` (or a folder holding one
``Dataset.save_to_disk`` folder per split), read with ``datasets.load_from_disk``; any other local
folder, read as an ``imagefolder`` (``<path>/{train,validation,test}/<class>/<image>``; datasets
writes its Arrow cache under ``HF_DATASETS_CACHE``); or the name of a hub dataset already in the
Hugging Face cache (``load_dataset(name)`` finds it under ``HF_HUB_OFFLINE=1``). Rows keep the
dataset's order; class names come from the label column's ``ClassLabel`` feature when it has one.

``datasets`` is an optional extra (``pip install 'petl-lightning[hf]'``), imported only when a
module is built.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from petl_lightning.data.base import ImageClassificationDataModule
from petl_lightning.data.dataset import ImageSource
from petl_lightning.errors import DataError, require

#: Our split names -> the dataset's, by default (``val`` is used when the dataset has it).
DEFAULT_SPLITS = {"train": "train", "val": "validation", "test": "test"}
HUB_NAME = re.compile(r"[\w.-]+(/[\w.-]+)?")


def _datasets() -> Any:
    """The ``datasets`` package, or a one-line error naming the extra."""
    return require("datasets", "hf")


def _kind(feature: Any) -> str:
    """What a column holds, for errors (``string values``, ``Sequence``)."""
    dtype = getattr(feature, "dtype", None)
    return f"{dtype} values" if isinstance(dtype, str) else type(feature).__name__


class HFSource:
    """Rows of one split of a ``datasets.Dataset``: the image column decoded to RGB, the labels read once.

    Args:
        images: the split, narrowed to its image column (a decoding ``datasets.Image`` feature).
        split: the dataset's name of the split (images are named ``split[row]``).
        image_column: the image column's name.
        all_labels: the label of every row of the split, in row order.
        rows: the rows this source holds, in this order (default: all).
    """

    def __init__(
        self, images: Any, split: str, image_column: str, all_labels: list[int], rows: Sequence[int] | None = None
    ) -> None:
        self.images, self.split, self.image_column, self.all_labels = images, split, image_column, all_labels
        self.rows = list(range(len(all_labels))) if rows is None else list(rows)
        self._labels = [all_labels[r] for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def labels(self) -> list[int]:
        return self._labels

    def image(self, index: int) -> Image.Image:
        try:
            img = self.images[self.rows[index]][self.image_column]
            if not isinstance(img, Image.Image):
                raise ValueError(f"decoded to {type(img).__name__}, not an image")
            return img.convert("RGB")
        except (OSError, ValueError, SyntaxError) as err:  # PIL's and datasets' errors for a bad image
            raise DataError(f"{self.where(index)}: image cannot be read ({' '.join(str(err).split())}).") from None

    def name(self, index: int) -> str:
        return f"{self.split}[{self.rows[index]}]"

    def where(self, index: int) -> str:
        return self.name(index)

    def subset(self, indices: Sequence[int]) -> HFSource:
        return HFSource(self.images, self.split, self.image_column, self.all_labels, [self.rows[i] for i in indices])


class HFImageDataModule(ImageClassificationDataModule):
    """Labelled images of a Hugging Face ``datasets`` dataset (see the module doc for ``path``).

    Args:
        path: a ``save_to_disk`` folder, an ``imagefolder`` folder, or a hub dataset name in the cache.
        image_column: the column of images (a ``datasets.Image`` feature).
        label_column: the column of integer class indices (a ``ClassLabel`` or an integer ``Value``).
        splits: our split names (``train``, ``test``, optionally ``val``) -> the dataset's. Default
            ``train``->``train``, ``test``->``test`` and ``val``->``validation`` when the dataset has
            it; a given mapping must name splits that exist.
        name: the task's name (default: the folder's or the hub dataset's name).
        config: the hub dataset's configuration name, for datasets that have several.
        **kwargs: the base module's (:class:`ImageClassificationDataModule`): ``img_size``,
            ``batch_size``, ``normalization``, ``augmentation``, ``shots``, ...
    """

    def __init__(
        self,
        path: str,
        image_column: str = "image",
        label_column: str = "label",
        splits: dict[str, str] | None = None,
        name: str | None = None,
        config: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.path = path
        self.image_column, self.label_column = image_column, label_column
        self.splits = dict(splits) if splits is not None else None
        self.config = config
        local = Path(path).expanduser()
        self._name = name or (local.resolve().name if local.exists() else path.rstrip("/").split("/")[-1])
        self._classes: list[str] | None = None
        self.load()

    @property
    def task(self) -> str:
        return self._name

    @property
    def class_names(self) -> list[str] | None:
        return self._classes

    def count_classes(self) -> int:
        return len(self._classes) if self._classes is not None else super().count_classes()

    def label_hint(self) -> str:
        return (
            f"Labels come from column {self.label_column!r} (-1 marks an unlabelled row): use a labelled split, "
            f"or pass num_classes if the task has more classes."
        )

    def load_sources(self) -> dict[str, ImageSource]:
        """Open the dataset, map the splits, check the columns, read the labels."""
        self._classes = None
        data = self._open()
        mapping = self._split_mapping(data)
        sources: dict[str, ImageSource] = {}
        for ours, theirs in mapping.items():
            sources[ours] = self._source(data[theirs], theirs)
        return sources

    # -- reading ---------------------------------------------------------------------------------
    def _open(self) -> Mapping[str, Any]:
        """The dataset's splits: ``{split name: datasets.Dataset}``."""
        ds = _datasets()
        local = Path(self.path).expanduser()
        if local.is_dir():
            if (local / "state.json").is_file():
                raise DataError(
                    f"{str(local)!r} holds a single saved Dataset, with no splits: save a DatasetDict "
                    f"(train, test, optionally validation) there, or one Dataset folder per split under it."
                )
            saved = sorted(p for p in local.iterdir() if (p / "state.json").is_file())
            try:
                if (local / "dataset_dict.json").is_file():
                    return ds.load_from_disk(str(local))
                if saved:
                    return {p.name: ds.load_from_disk(str(p)) for p in saved}
                return ds.load_dataset("imagefolder", data_dir=str(local))
            except (OSError, ValueError) as err:  # a damaged save, a folder with no images
                raise DataError(
                    f"{str(local)!r} cannot be read as a saved dataset (save_to_disk) or an image folder "
                    f"(<split>/<class>/<image>): {' '.join(str(err).split())}"
                ) from None
        if local.exists() or not HUB_NAME.fullmatch(self.path):
            raise DataError(
                f"Dataset path {self.path!r} {'is not a folder' if local.exists() else 'not found'}: pass "
                f"--data.init_args.path a save_to_disk folder, an image folder, or the name of a hub dataset in "
                f"the Hugging Face cache."
            )
        try:
            return ds.load_dataset(self.path, self.config)
        except (OSError, ValueError) as err:  # offline and not cached: ConnectionError; unknown config: ValueError
            raise DataError(
                f"Dataset {self.path!r} is neither a local folder nor a hub dataset in the Hugging Face cache "
                f"({' '.join(str(err).split())}). Pass an existing folder, or download the dataset once online."
            ) from None

    def _split_mapping(self, data: Mapping[str, Any]) -> dict[str, str]:
        """Our split names -> the dataset's, checked against the splits it has."""
        have = list(data)
        if self.splits is None:
            mapping = {ours: theirs for ours, theirs in DEFAULT_SPLITS.items() if ours != "val" or theirs in have}
        else:
            mapping = self.splits
            unknown = sorted(set(mapping) - set(DEFAULT_SPLITS))
            absent = [s for s in ("train", "test") if s not in mapping]
            if unknown or absent:
                raise DataError(
                    f"splits={mapping} must map train and test (and optionally val) to the dataset's splits; "
                    f"{'unknown key ' + ', '.join(unknown) if unknown else 'missing ' + ' and '.join(absent)}."
                )
        for ours, theirs in mapping.items():
            if theirs not in have:
                raise DataError(
                    f"Dataset {self.path!r} has no split {theirs!r} (for {ours}); it has {', '.join(have)}. "
                    f"Map the splits with --data.init_args.splits '{{train: ..., test: ...}}'."
                )
        return mapping

    def _source(self, split: Any, split_name: str) -> HFSource:
        """One split as a source, after checking its columns and label type."""
        ds = _datasets()
        features = split.features
        for kind, column in (("image", self.image_column), ("label", self.label_column)):
            if column not in features:
                raise DataError(
                    f"Split {split_name!r} of {self.path!r} has no column {column!r}; its columns are "
                    f"{', '.join(features)}. Pass --data.init_args.{kind}_column."
                )
        image = features[self.image_column]
        if not isinstance(image, ds.Image):
            raise DataError(
                f"Column {self.image_column!r} of split {split_name!r} holds {_kind(image)}, not images: cast it with "
                f"dataset.cast_column({self.image_column!r}, datasets.Image()), or pass --data.init_args.image_column."
            )
        images = split.select_columns([self.image_column]).with_format(None)
        if not image.decode:
            images = images.cast_column(self.image_column, ds.Image())
        label = features[self.label_column]
        if isinstance(label, ds.ClassLabel):
            names = list(label.names)
            if self._classes is None:
                self._classes = names
            elif names != self._classes:
                raise DataError(
                    f"Split {split_name!r} names its classes differently from the others ({names[:3]}... vs "
                    f"{self._classes[:3]}...): every split needs the same ClassLabel."
                )
        elif not (isinstance(label, ds.Value) and re.fullmatch(r"u?int\d+", label.dtype)):
            raise DataError(
                f"Label column {self.label_column!r} of split {split_name!r} holds {_kind(label)}, not integer class "
                f"indices: encode it (dataset.class_encode_column({self.label_column!r})) or pass "
                f"--data.init_args.label_column."
            )
        labels = split.with_format("arrow")[self.label_column].to_pylist()
        return HFSource(images, split_name, self.image_column, [-1 if y is None else y for y in labels])


__all__ = ["DEFAULT_SPLITS", "HFImageDataModule", "HFSource"]
