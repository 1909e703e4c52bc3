"""VTAB-1K in the NOAH/SSF file-list layout, as a LightningDataModule.

Layout: ``<root>/<task>/{train800,val200,train800val200,test}.txt``, each line
``relative/path.jpg <int label>`` relative to the task folder. The transforms are the PETL papers'
(resize to a square with bicubic interpolation, ToTensor, normalisation, no augmentation) unless
the base module's ``augmentation``/``eval_crop`` say otherwise; loaders, checks and the rest are
:class:`~petl_lightning.data.base.ImageClassificationDataModule`'s.

The DataModule checks the data when it is built, so a bad root, list, image or label fails before
any training starts or any log is written. With ``prepare=True`` a missing VTAB-1K task folder is
built from TensorFlow Datasets by ``prepare_data()`` (``data/prepare.py``), and the checks run in
``setup()``, after it.
"""

from __future__ import annotations

import difflib
import warnings
from pathlib import Path
from typing import Any, Literal, cast

from lightning.pytorch.utilities import AttributeDict

from petl_lightning.data.base import ImageClassificationDataModule
from petl_lightning.data.dataset import EpochShuffleSampler, FileSource, ImageSource
from petl_lightning.data.lists import Sample, read_list
from petl_lightning.data.tasks import GROUPS, LIST_FILES, VTAB_TASKS, TaskInfo, parse_tasks, tasks_in_group
from petl_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD, petl_transform, resolve_normalization
from petl_lightning.errors import DataError

# Under protocol trainval_test, fit validates on nothing: val_dataloader() returns [] on purpose, and
# Lightning's "Total length of `list` across ranks is zero" warning would only alarm the user.
warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero")


class VTAB1kDataModule(ImageClassificationDataModule):
    """A VTAB-1K task (or a custom task in the same layout).

    Args:
        root: folder holding the task folders (``cifar/``, ``dtd/``, ...).
        task: one of the 19 VTAB-1K names, or any other folder in the same layout (a custom task:
            its class count comes from ``classes.txt`` or else from the largest label + 1).
        protocol: ``trainval_test`` (fit on train800val200, test on test; the papers' protocol) or
            ``train_val`` (fit on train800, validate on val200: model selection, calibration).
        val_on_test: under ``trainval_test``, also validate on the test list during fit (the
            official repos do; it is selection on test, so off by default).
        prepare: build the task folder from TensorFlow Datasets in ``prepare_data()`` if it is
            missing (the 19 VTAB-1K tasks; needs ``pip install 'petl-lightning[prepare]'``). The
            folder then need not exist when the module is built: it is read and checked in ``setup()``.
        tfds_data_dir: tfds' data folder for ``prepare`` (default: tfds' own, ``~/tensorflow_datasets``);
            manual downloads go in its ``downloads/manual/``.
        **kwargs: the base module's (:class:`ImageClassificationDataModule`): ``img_size``,
            ``batch_size``, ``normalization``, ``augmentation``, ``shots``, ``check_images``, ``cache``,
            ``predict_list``, ...
    """

    def __init__(
        self,
        root: str,
        task: str,
        protocol: Literal["trainval_test", "train_val"] = "trainval_test",
        val_on_test: bool = False,
        prepare: bool = False,
        tfds_data_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.root = Path(root).expanduser()
        self._task = task
        self.protocol = protocol
        self.prepare, self.tfds_data_dir = prepare, tfds_data_dir
        self.info = VTAB_TASKS.get(task)
        self.task_dir = self.root / task
        if prepare and self.info is None:
            raise DataError(
                f"prepare=True builds the 19 VTAB-1K tasks from TensorFlow Datasets; {task!r} is not one of "
                f"them. Put a custom task's folder under the root and leave prepare off."
            )
        if prepare and not self.task_dir.is_dir():
            info = cast(TaskInfo, self.info)  # prepare=True: a VTAB-1K task (checked above)
            self.num_classes = info.num_classes if self._num_classes_arg is None else self._num_classes_arg
        else:
            self.load()

    @property
    def task(self) -> str:
        return self._task

    def load_sources(self) -> dict[str, ImageSource]:
        """The lists the protocol uses, after checking the root, the task folder and the list files."""
        self.task_dir = self._find_task_dir()
        return {name: FileSource(samples) for name, samples in self._read_splits().items()}

    def count_classes(self) -> int:
        """The registry's count for a VTAB-1K task; ``classes.txt`` or the largest label + 1 for a custom one."""
        if self.info is not None:
            return self.info.num_classes
        names = self.class_names
        return len(names) if names is not None else super().count_classes()

    def label_hint(self) -> str:
        return "Fix the list file, or pass num_classes if the task has more classes."

    # -- validation ------------------------------------------------------------------------------
    def _find_task_dir(self) -> Path:
        if not self.root.is_dir():
            raise DataError(
                f"VTAB-1K data root {str(self.root)!r} does not exist. Pass --data.root (or root=) the "
                f"folder that holds the task folders (cifar/, dtd/, ...)."
            )
        task_dir = self.root / self.task
        if task_dir.is_dir():
            return task_dir
        present = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if self.info is not None:
            fix = (
                "prepare_data() builds it (a Trainer calls it before setup)"
                if self.prepare
                else "Download/extract it there, or pass prepare=True (--data.init_args.prepare true) to build it "
                "from TensorFlow Datasets"
            )
            raise DataError(
                f"Task folder {str(task_dir)!r} is missing. {self.task!r} is a VTAB-1K task, but the root "
                f"holds only: {', '.join(present) or '(nothing)'}. {fix}."
            )
        close = difflib.get_close_matches(self.task, list(VTAB_TASKS) + present, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise DataError(
            f"Unknown task {self.task!r}: not one of the 19 VTAB-1K tasks and no folder {str(task_dir)!r}."
            f"{hint} Folders in the root: {', '.join(present) or '(none)'}."
        )

    def _used_lists(self) -> list[str]:
        if self.protocol == "train_val":
            return ["train800", "val200", "test"]
        return ["train800val200", "test"]

    def _read_splits(self) -> dict[str, list[Sample]]:
        if self.protocol not in ("trainval_test", "train_val"):
            raise DataError(f"Unknown protocol {self.protocol!r}; use 'trainval_test' or 'train_val'.")
        missing = [f"{n}.txt" for n in self._used_lists() if not (self.task_dir / f"{n}.txt").is_file()]
        if missing:
            raise DataError(
                f"Task folder {str(self.task_dir)!r} lacks {', '.join(missing)}. A VTAB-1K task folder holds "
                f"{', '.join(LIST_FILES)} (lines '<relative image path> <label>')."
            )
        return {n: read_list(self.task_dir / f"{n}.txt") for n in self._used_lists()}

    # -- Lightning hooks -------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Builds the task folder from TensorFlow Datasets if it is missing (``data/prepare.py``).

        Lightning calls this on local rank 0 only, before ``setup`` runs on every process; a task
        that exists is skipped without importing tfds. Without ``prepare=True`` the folder had to
        exist when the module was built, so there is nothing to do.
        """
        if self.task_dir.is_dir():
            return
        from petl_lightning.data.prepare import prepare_task

        prepare_task(self.root, self.task, data_dir=self.tfds_data_dir)

    @property
    def group(self) -> str:
        """``natural``/``specialized``/``structured`` for VTAB-1K tasks, ``custom`` otherwise."""
        return self.info.group if self.info else "custom"

    @property
    def class_names(self) -> list[str] | None:
        """Class names from the task's ``classes.txt`` (one per line), if it has one."""
        path = self.task_dir / "classes.txt"
        return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else None

    def source(self, split: str) -> ImageSource:
        """A list of the task (``train800``, ``val200``, ``train800val200``, ``test``; lists the
        protocol does not use are read when asked for) or ``predict``."""
        self.setup()
        if split != "predict" and split not in self.sources:
            self.sources[split] = FileSource(read_list(self.task_dir / f"{split}.txt"))
        return super().source(split)

    @property
    def train_split(self) -> str:
        return "train800" if self.protocol == "train_val" else "train800val200"

    @property
    def val_split(self) -> str | None:
        """val200 under ``train_val``. Under ``trainval_test`` there is no held-out list: ``fit`` runs
        no validation unless ``val_on_test``, and the ``validate`` command evaluates the test list."""
        if self.protocol == "train_val":
            return "val200"
        validating = self.trainer is not None and self.trainer.state.fn == "validate"
        return "test" if cast(AttributeDict, self.hparams).val_on_test or validating else None


__all__ = [
    "GROUPS",
    "LIST_FILES",
    "parse_tasks",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VTAB_TASKS",
    "TaskInfo",
    "VTAB1kDataModule",
    "EpochShuffleSampler",
    "petl_transform",
    "read_list",
    "resolve_normalization",
    "tasks_in_group",
]
