"""`ADE20KDataModule`: the ADE20K scene-parsing benchmark (SceneParsing / ADEChallengeData2016), 150 classes."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from petl_lightning.data.seg_dataset import SegmentationSample, pair_files
from petl_lightning.data.seg_transforms import IGNORE_INDEX
from petl_lightning.data.segmentation import SegmentationDataModule
from petl_lightning.errors import DataError

ADE_FOLDER = "ADEChallengeData2016"
ADE_CLASSES = 150


class ADE20KDataModule(SegmentationDataModule):
    """ADE20K as the benchmark uses it: ``ADEChallengeData2016/{images,annotations}/{training,validation}/``.

    Annotations hold 0 (``other``) to 150; as the benchmark's ``reduce_zero_label``, 0 becomes the
    ignore index 255 and every other label ``L`` becomes ``L - 1``, so the 150 classes are 0-149.
    ``train`` is ``training`` (20,210 images) and both ``val`` and ``test`` are ``validation``
    (2,000): the official test images come without annotations. Class names come from
    ``objectInfo150.csv`` (or the release's tab-separated ``objectInfo150.txt``; columns Idx, Ratio,
    Train, Val, Name; the first of a name's synonyms is used) beside ``images/``, else ``class_<i>``.
    Pairing, mask modes and sizes are checked from the headers when the module is built; label
    values as each mask loads.

    Args:
        root: ``ADEChallengeData2016/`` or the folder that holds it.
        **kwargs: :class:`~petl_lightning.data.segmentation.SegmentationDataModule`'s (``img_size``, ...).
    """

    def __init__(self, root: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        given = Path(root).expanduser()
        self.root = given / ADE_FOLDER if (given / ADE_FOLDER).is_dir() else given
        if not (self.root / "images").is_dir() or not (self.root / "annotations").is_dir():
            raise DataError(
                f"{str(given)!r} is not ADE20K: pass the {ADE_FOLDER}/ folder (holding images/ and annotations/, "
                f"each with training/ and validation/) or the folder that holds it."
            )
        self.load()

    @property
    def task(self) -> str:
        return "ade20k"

    @property
    def predict_name(self) -> str:
        return self.predict_dir.name if self.predict_dir is not None else "validation"

    def label_lut(self) -> np.ndarray:
        lut = np.arange(256) - 1
        lut[0] = lut[IGNORE_INDEX] = IGNORE_INDEX
        return lut.astype(np.uint8)

    def label_hint(self) -> str:
        return f"ADE20K annotations hold 0 (other) to {ADE_CLASSES}; the file is not an ADE20K annotation."

    def load_class_names(self) -> list[str]:
        for name, delimiter in (("objectInfo150.csv", ","), ("objectInfo150.txt", "\t")):
            path = self.root / name
            if path.is_file():
                return _object_info(path, delimiter)
        return [f"class_{i}" for i in range(ADE_CLASSES)]

    def load_splits(self) -> dict[str, list[SegmentationSample]]:
        splits = {}
        for split, folder in (("train", "training"), ("val", "validation")):
            images, masks = self.root / "images" / folder, self.root / "annotations" / folder
            for d in (images, masks):
                if not d.is_dir():
                    raise DataError(f"{d} not found: the ADE20K release has images/ and annotations/{folder}/.")
            pairs = pair_files(images, masks)
            if not pairs:
                raise DataError(f"{images} holds no images: unpack the full {ADE_FOLDER} release there.")
            splits[split] = pairs
        splits["test"] = splits["val"]
        return splits


def _object_info(path: Path, delimiter: str) -> list[str]:
    """The 150 class names of ``objectInfo150`` (rows Idx 1-150; the first synonym of each Name)."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter=delimiter))
    try:
        by_index = {int(str(r["Idx"]).strip()): str(r["Name"]).split(";")[0].strip() for r in rows}
    except (KeyError, ValueError, AttributeError):
        raise DataError(
            f"{path} is not objectInfo150 (columns Idx, Ratio, Train, Val, Name): restore it or remove it."
        ) from None
    if sorted(by_index) != list(range(1, ADE_CLASSES + 1)):
        raise DataError(f"{path} lists {len(by_index)} classes, not Idx 1-{ADE_CLASSES}: restore it or remove it.")
    return [by_index[i] for i in range(1, ADE_CLASSES + 1)]


__all__ = ["ADE_CLASSES", "ADE20KDataModule"]
