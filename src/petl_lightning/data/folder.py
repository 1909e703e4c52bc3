"""`ImageFolderDataModule`: your own images in torchvision's ImageFolder layout.

Layout: ``<root>/train/<class>/<image>``, ``<root>/test/<class>/<image>`` and optionally
``<root>/val/<class>/<image>`` (else a seeded ``val_fraction`` of ``train/`` per class, or no
validation). Class indices are the sorted class-folder names of ``train/``, the same in every
split; images are taken in sorted path order (class by class), so a run is reproducible from the
folder alone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from petl_lightning.data.base import ImageClassificationDataModule
from petl_lightning.data.dataset import FileSource, ImageSource
from petl_lightning.data.lists import IMAGE_SUFFIXES, Sample
from petl_lightning.errors import DataError

SPLITS = ("train", "val", "test")


def _images_under(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, any case of the suffixes), sorted by path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath, f) for f in filenames if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(found)


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


class ImageFolderDataModule(ImageClassificationDataModule):
    """Images in ``<root>/{train,val,test}/<class>/`` folders.

    Args:
        root: the folder holding ``train/``, ``test/`` and optionally ``val/``.
        val_fraction: without ``val/``, hold out this share of each class's training images for
            validation (drawn with ``seed``; at least one per class when above 0); 0: no validation.
        name: the task's name (default: the root folder's name).
        **kwargs: the base module's (:class:`ImageClassificationDataModule`): ``img_size``,
            ``batch_size``, ``normalization``, ``augmentation``, ``shots``, ``check_images``, ...
    """

    def __init__(self, root: str, val_fraction: float = 0.0, name: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"val_fraction must lie in [0, 1), got {val_fraction}.")
        self.root = Path(root).expanduser()
        self.val_fraction = val_fraction
        self._name = name or self.root.resolve().name
        self._classes: list[str] = []
        self.load()

    @property
    def task(self) -> str:
        return self._name

    @property
    def class_names(self) -> list[str]:
        return self._classes

    def count_classes(self) -> int:
        return len(self._classes)

    def label_hint(self) -> str:
        return "Labels come from the class folders of train/: pass num_classes only if there are more classes."

    def load_sources(self) -> dict[str, ImageSource]:
        """Walk ``train/`` (the classes), then ``val/`` and ``test/``, checking each against them."""
        if not self.root.is_dir():
            raise DataError(
                f"Image folder root {str(self.root)!r} does not exist. Pass --data.init_args.root, the folder "
                f"holding train/<class>/ and test/<class>/ (val/<class>/ optional)."
            )
        present = [s for s in SPLITS if (self.root / s).is_dir()]
        missing = [s for s in ("train", "test") if s not in present]
        if missing:
            raise DataError(
                f"{str(self.root)!r} has no {' or '.join(f'{m}/' for m in missing)} folder (it holds: "
                f"{', '.join(sorted(p.name for p in self.root.iterdir())) or 'nothing'}). An image folder "
                f"holds train/<class>/<image> and test/<class>/<image>, val/<class>/<image> optional."
            )
        if "val" in present and self.val_fraction > 0:
            raise DataError(
                f"val_fraction={self.val_fraction} holds out part of train/, but {str(self.root / 'val')!r} "
                f"exists: remove one (val/ is used as it is)."
            )
        self._classes = _class_folders(self.root / "train")
        if not self._classes:
            raise DataError(
                f"{str(self.root / 'train')!r} has no class folders: put each class's images in train/<class>/."
            )
        sources: dict[str, ImageSource] = {split: FileSource(self._walk(split)) for split in present}
        if self.val_fraction > 0:
            train, val = self._hold_out(sources["train"])
            sources["train"], sources["val"] = train, val
        return sources

    def _walk(self, split: str) -> list[Sample]:
        split_dir = self.root / split
        classes = _class_folders(split_dir)
        extra = sorted(set(classes) - set(self._classes))
        if extra:
            raise DataError(
                f"Class folder(s) {', '.join(extra)} of {split}/ are not in train/: a class the model never "
                f"trains on cannot be tested. Add its training images to train/{extra[0]}/ or remove it from {split}/."
            )
        absent = [c for c in self._classes if c not in classes]
        if absent and split != "train":
            raise DataError(
                f"{split}/ has no folder for class(es) {', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''} "
                f"of train/: every class needs images in every split (or drop the class from train/)."
            )
        samples = []
        for label, name in enumerate(self._classes):
            images = _images_under(split_dir / name)
            if not images:
                raise DataError(
                    f"Class folder {str(split_dir / name)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}): add "
                    f"its images or remove the folder."
                )
            samples += [Sample(p, label) for p in images]
        return samples

    def _hold_out(self, train: ImageSource) -> tuple[ImageSource, ImageSource]:
        """A seeded per-class split of ``train`` into (train, val), each in source order."""
        labels = torch.tensor(train.labels)
        g = torch.Generator().manual_seed(self.seed)
        held: list[int] = []
        for c in range(len(self._classes)):
            members = (labels == c).nonzero().flatten()
            k = max(1, round(self.val_fraction * len(members)))
            if k >= len(members):
                raise DataError(
                    f"val_fraction={self.val_fraction} leaves class {self._classes[c]!r} ({len(members)} images) "
                    f"no training image: lower val_fraction or add a val/ folder."
                )
            held += members[torch.randperm(len(members), generator=g)[:k]].tolist()
        keep = sorted(set(range(len(train))) - set(held))
        return train.subset(keep), train.subset(sorted(held))


__all__ = ["ImageFolderDataModule"]
