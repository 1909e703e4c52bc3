"""VTAB-1K in the NOAH/SSF file-list layout, as a LightningDataModule.

Layout: ``<root>/<task>/{train800,val200,train800val200,test}.txt``, each line
``relative/path.jpg <int label>`` relative to the task folder. The transforms are the PETL papers'
(resize to a square with bicubic interpolation, ToTensor, normalisation, no augmentation); the
mean/std are those of the backbone's timm pretrained config by default (``normalization``).

The DataModule owns every data decision (lists, splits, transforms) and checks the data when it is
built, so a bad root, list, image or label fails before any training starts or any log is written.
With ``prepare=True`` a missing VTAB-1K task folder is built from TensorFlow Datasets by
``prepare_data()`` (``data/prepare.py``), and the checks run in ``setup()``, after it.
"""

from __future__ import annotations

import difflib
import os
import warnings
from pathlib import Path
from typing import Literal, cast

import lightning as L
from lightning.pytorch.utilities import AttributeDict
from torch.utils.data import DataLoader

from petl_lightning.data.lists import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EpochShuffleSampler,
    FileListDataset,
    Normalization,
    Sample,
    check_images,
    petl_transform,
    read_images,
    read_list,
    resolve_normalization,
)
from petl_lightning.data.tasks import GROUPS, LIST_FILES, VTAB_TASKS, TaskInfo, parse_tasks, tasks_in_group
from petl_lightning.errors import DataError

# Under protocol trainval_test, fit validates on nothing: val_dataloader() returns [] on purpose, and
# Lightning's "Total length of `list` across ranks is zero" warning would only alarm the user.
warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero")


class VTAB1kDataModule(L.LightningDataModule):
    """A VTAB-1K task (or a custom task in the same layout).

    Args:
        root: folder holding the task folders (``cifar/``, ``dtd/``, ...).
        task: one of the 19 VTAB-1K names, or any other folder in the same layout (a custom task:
            its class count comes from ``classes.txt`` or else from the largest label + 1).
        protocol: ``trainval_test`` (fit on train800val200, test on test; the papers' protocol) or
            ``train_val`` (fit on train800, validate on val200: model selection, calibration).
        img_size: square input size (224 in the papers; smaller for quick CPU runs).
        batch_size / eval_batch_size: loader batch sizes (eval defaults to batch_size).
        num_workers: loader workers (default: up to 4, at most the CPU count).
        val_on_test: under ``trainval_test``, also validate on the test list during fit (the
            official repos do; it is selection on test, so off by default).
        num_classes: override the class count (checked against the labels).
        check_images: ``exists`` (default; every listed image must exist), ``header`` (also open
            each image's header), or ``none``. Checked when the module is built.
        cache: keep decoded, transformed images in memory (no augmentation, so it is exact).
        seed: shuffling seed; the order of epoch ``e`` depends only on (seed, e).
        predict_list: what ``predict`` reads: a list file (relative paths, labels optional) or a
            folder of images; default the task's ``test.txt``.
        normalization: ``backbone`` (default: the mean/std of ``backbone_name``'s timm pretrained
            config; ImageNet's when there is no name or no config), ``imagenet``, or ``[mean, std]``.
        backbone_name: the timm name of the backbone the images are for; the CLI links it from
            ``model.init_args.model_name``.
        prepare: build the task folder from TensorFlow Datasets in ``prepare_data()`` if it is
            missing (the 19 VTAB-1K tasks; needs ``pip install 'petl-lightning[prepare]'``). The
            folder then need not exist when the module is built: it is read and checked in ``setup()``.
        tfds_data_dir: tfds' data folder for ``prepare`` (default: tfds' own, ``~/tensorflow_datasets``);
            manual downloads go in its ``downloads/manual/``.
    """

    def __init__(
        self,
        root: str,
        task: str,
        protocol: Literal["trainval_test", "train_val"] = "trainval_test",
        img_size: int = 224,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        val_on_test: bool = False,
        num_classes: int | None = None,
        check_images: Literal["exists", "header", "none"] = "exists",
        cache: bool = False,
        seed: int = 0,
        normalization: Normalization = "backbone",
        backbone_name: str | None = None,
        prepare: bool = False,
        tfds_data_dir: str | None = None,
        predict_list: str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("img_size", img_size), ("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and value < 1:
                raise DataError(f"{name} must be at least 1, got {value}.")
        if num_workers is not None and num_workers < 0:
            raise DataError(f"num_workers must be 0 (load in the main process) or more, got {num_workers}.")
        # num_classes is resolved below and reaches the model through the CLI link; logging the raw
        # argument too would clash with the model's value in Lightning's hparams merge.
        self.save_hyperparameters(ignore=["num_classes"])
        self.root = Path(root).expanduser()
        self.task = task
        self.protocol = protocol
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
        self.mean, self.std = resolve_normalization(normalization, backbone_name)
        self.transform = petl_transform(img_size, self.mean, self.std)
        self.predict_source = Path(predict_list).expanduser() if predict_list else None
        self.cache = cache
        self.seed = seed
        self.prepare, self.tfds_data_dir = prepare, tfds_data_dir
        self.check_images = check_images
        self._num_classes_arg = num_classes
        self.info = VTAB_TASKS.get(task)
        self.task_dir = self.root / task
        self.splits: dict[str, list[Sample]] = {}
        self._datasets: dict[str, FileListDataset] = {}
        if prepare and self.info is None:
            raise DataError(
                f"prepare=True builds the 19 VTAB-1K tasks from TensorFlow Datasets; {task!r} is not one of "
                f"them. Put a custom task's folder under the root and leave prepare off."
            )
        if prepare and not self.task_dir.is_dir():
            info = cast(TaskInfo, self.info)  # prepare=True: a VTAB-1K task (checked above)
            self.num_classes = info.num_classes if num_classes is None else num_classes  # read in setup()
        else:
            self._load()

    def _load(self) -> None:
        """Finds and reads the task's lists and checks labels and images (once)."""
        self.task_dir = self._find_task_dir()
        self.splits = self._read_splits()
        self.num_classes = self._resolve_num_classes(self._num_classes_arg)
        self._check_labels()
        if self.check_images != "none":
            for name in self._used_lists():
                check_images(self.splits[name], self.check_images)

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

    def _resolve_num_classes(self, override: int | None) -> int:
        if override is not None:
            return override
        if self.info is not None:
            return self.info.num_classes
        classes = self.task_dir / "classes.txt"
        if classes.is_file():
            return len([ln for ln in classes.read_text().splitlines() if ln.strip()])
        return 1 + max(s.label for split in self.splits.values() for s in split)

    def _check_labels(self) -> None:
        for samples in self.splits.values():
            for s in samples:
                if not 0 <= s.label < self.num_classes:
                    raise DataError(
                        f"{s.where()}: label {s.label} is outside [0, {self.num_classes}) for task "
                        f"{self.task!r}. Fix the list file, or pass num_classes if the task has more classes."
                    )

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

    def setup(self, stage: str | None = None) -> None:
        """Reads and checks the task (already done at construction unless ``prepare`` deferred it)."""
        if not self.splits:
            self._load()

    @property
    def group(self) -> str:
        """``natural``/``specialized``/``structured`` for VTAB-1K tasks, ``custom`` otherwise."""
        return self.info.group if self.info else "custom"

    @property
    def class_names(self) -> list[str] | None:
        """Class names from the task's ``classes.txt`` (one per line), if it has one."""
        path = self.task_dir / "classes.txt"
        return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else None

    @property
    def predict_name(self) -> str:
        """A name for what ``predict`` reads (the list file's stem or the folder's name)."""
        return self.predict_source.stem if self.predict_source is not None else "test"

    def predict_paths(self) -> list[Path]:
        """The image paths ``predict`` reads, in dataset order."""
        return [s.path for s in self.dataset("predict").samples]

    def dataset(self, split: str) -> FileListDataset:
        """The dataset of a list (``train800``, ``val200``, ``train800val200``, ``test``, or
        ``predict``: :attr:`predict_source`, default ``test``)."""
        self.setup()
        if split not in self._datasets:
            samples: list[Sample] | None
            if split == "predict":
                samples = read_images(self.predict_source) if self.predict_source is not None else self.splits["test"]
            else:
                samples = self.splits.get(split)
            if samples is None:
                samples = read_list(self.task_dir / f"{split}.txt")
            self._datasets[split] = FileListDataset(samples, self.transform, cache=self.cache)
        return self._datasets[split]

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

    def _loader(self, split: str, train: bool) -> DataLoader:
        ds = self.dataset(split)
        return DataLoader(
            ds,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=EpochShuffleSampler(len(ds), self.seed) if train else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0 and self.cache,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_split, train=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_split, train=False) if self.val_split else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", train=False)


__all__ = [
    "GROUPS",
    "LIST_FILES",
    "parse_tasks",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VTAB_TASKS",
    "TaskInfo",
    "VTAB1kDataModule",
    "FileListDataset",
    "EpochShuffleSampler",
    "petl_transform",
    "read_list",
    "resolve_normalization",
    "tasks_in_group",
]
