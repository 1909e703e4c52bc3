"""`FGVCDataModule`: the five FGVC tasks in the JSON-split layout of the VPT line (VPT, ARC, ...).

Layout: ``<root>/<task>/{train,val,test}.json``, each a JSON object mapping an image path (relative
to the task's image folder) to its label, and the images under ``<root>/<task>/<image_dir>/``. The
labels are remapped to ``0..K-1`` in sorted order of the training labels (as the VPT code does) and
must number the benchmark's class count.

The image folder of each task (``images``, ``Images`` or the task folder itself) follows the
datasets' own archives as the VPT code reads them; it is INFERRED, not documented, so
``image_dir`` overrides it.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from petl_lightning.data.base import ImageClassificationDataModule
from petl_lightning.data.dataset import FileSource, ImageSource
from petl_lightning.data.lists import Sample
from petl_lightning.errors import DataError


@dataclass(frozen=True)
class FGVCTask:
    """One FGVC task: folder name, class count, default image folder inside it, the paper's name."""

    name: str
    num_classes: int
    image_dir: str
    title: str


FGVC_TASKS: dict[str, FGVCTask] = {
    t.name: t
    for t in [
        FGVCTask("cub", 200, "images", "CUB-200-2011"),
        FGVCTask("nabirds", 555, "images", "NABirds"),
        FGVCTask("oxford_flowers", 102, "", "Oxford Flowers"),
        FGVCTask("stanford_dogs", 120, "Images", "Stanford Dogs"),
        FGVCTask("stanford_cars", 196, "", "Stanford Cars"),
    ]
}

#: Which JSON splits each protocol fits on, validates on and tests on.
PROTOCOLS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "trainval_test": (("train", "val"), None),  # VPT's final runs: fit on train + val, test on test
    "train_val": (("train",), "val"),  # model selection on val
    "train_test": (("train",), None),  # ARC's FGVC script: fit on train, test on test
}


class FGVCDataModule(ImageClassificationDataModule):
    """One FGVC task (CUB-200-2011, NABirds, Oxford Flowers, Stanford Dogs, Stanford Cars).

    Args:
        root: the folder holding the task folders (``cub/``, ``nabirds/``, ...).
        task: ``cub``, ``nabirds``, ``oxford_flowers``, ``stanford_dogs`` or ``stanford_cars``.
        protocol: ``trainval_test`` (fit on train + val, test on test: VPT's final protocol),
            ``train_val`` (fit on train, validate on val) or ``train_test`` (fit on train, test on
            test, no validation: ARC's FGVC script).
        image_dir: the images' folder inside the task folder (default: the task's, see the module doc).
        **kwargs: the base module's (:class:`ImageClassificationDataModule`), e.g. ``shots`` for the
            few-shot protocols (k images per class drawn from the training split with ``seed``).
    """

    def __init__(
        self,
        root: str,
        task: str,
        protocol: Literal["trainval_test", "train_val", "train_test"] = "trainval_test",
        image_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if task not in FGVC_TASKS:
            close = difflib.get_close_matches(task, list(FGVC_TASKS), n=2)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise DataError(f"Unknown FGVC task {task!r}.{hint} The tasks: {', '.join(FGVC_TASKS)}.")
        if protocol not in PROTOCOLS:
            raise DataError(f"Unknown protocol {protocol!r}; use {', '.join(PROTOCOLS)}.")
        self.root = Path(root).expanduser()
        self.info = FGVC_TASKS[task]
        self.protocol = protocol
        self.task_dir = self.root / task
        self.image_root = self.task_dir / (self.info.image_dir if image_dir is None else image_dir)
        self._classes: list[int] = []
        self.load()

    @property
    def task(self) -> str:
        return self.info.name

    @property
    def group(self) -> str:
        return "fgvc"

    def count_classes(self) -> int:
        return len(self._classes)

    def label_hint(self) -> str:
        return "Fix the JSON file."

    def load_sources(self) -> dict[str, ImageSource]:
        """The JSON splits the protocol uses, their labels remapped to the training labels' order."""
        if not self.task_dir.is_dir():
            present = sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []
            raise DataError(
                f"FGVC task folder {str(self.task_dir)!r} is missing (the root holds: "
                f"{', '.join(present) or 'nothing'}). Lay out each task as <root>/<task>/{{train,val,test}}.json "
                f"plus its images (docs/data.md)."
            )
        fit_on, val_on = PROTOCOLS[self.protocol]
        needed = [*fit_on, *([val_on] if val_on else []), "test"]
        raw = {split: self._read_json(split) for split in needed}
        train_labels = sorted({label for split in fit_on for _, label in raw[split]})
        index = {label: i for i, label in enumerate(train_labels)}
        self._classes = train_labels
        if len(train_labels) != self.info.num_classes:
            raise DataError(
                f"{self.info.title} has {self.info.num_classes} classes but {' + '.join(f'{s}.json' for s in fit_on)} "
                f"in {str(self.task_dir)!r} label {len(train_labels)}: use the benchmark's split files."
            )
        sources: dict[str, FileSource] = {}
        for split in needed:
            json_file = self.task_dir / f"{split}.json"
            samples = []
            for n, (rel, label) in enumerate(raw[split], start=1):
                if label not in index:
                    raise DataError(
                        f"{json_file}:{n}: label {label} of {rel!r} is not a training label. Fix the JSON file."
                    )
                samples.append(Sample(self.image_root / rel, index[label], json_file, n))
            sources[split] = FileSource(samples)
        if len(fit_on) > 1:
            sources["train"] = FileSource([s for split in fit_on for s in sources.pop(split).samples])
        return dict(sources)

    def _read_json(self, split: str) -> list[tuple[str, int]]:
        path = self.task_dir / f"{split}.json"
        if not path.is_file():
            raise DataError(
                f"{str(path)!r} is missing: an FGVC task folder holds train.json, val.json and test.json "
                f"(image path -> label) for protocol {self.protocol!r}."
            )
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{str(path)!r} is not valid JSON ({err}); it maps image paths to labels.") from None
        if not isinstance(data, dict) or not data:
            raise DataError(f"{str(path)!r} must be a non-empty JSON object mapping image paths to integer labels.")
        bad = next(((k, v) for k, v in data.items() if not isinstance(v, int) or isinstance(v, bool)), None)
        if bad is not None:
            raise DataError(f"{str(path)!r}: the label of {bad[0]!r} is {bad[1]!r}, not an integer.")
        return list(data.items())


__all__ = ["FGVC_TASKS", "FGVCDataModule", "FGVCTask"]
