"""Data-loading throughput (images/s of the training loader) of the three layouts on the same images.

    python benchmarks/data_throughput.py                       # dtd10's 1000 training images, 224 px
    python benchmarks/data_throughput.py --batches 4 --repeats 1 --workers 0   # a quick check

The VTAB-1K list layout (``VTAB1kDataModule``), an image folder (``ImageFolderDataModule``) and a
Hugging Face ``datasets`` folder (``HFImageDataModule``) are built from one VTAB-1K task's training
list (``train800val200.txt``) in a temporary folder: the same JPEG files, copied (folder) or their
bytes stored in Arrow (datasets). Each configuration (layout x augmentation on/off x loader workers)
builds its DataModule, draws one warm-up batch (workers start), then times ``--batches`` batches of
the training loader; configurations run round-robin for ``--repeats`` rounds and the table shows
the median. Augmentation "on" is timm's random-resized crop, RandAugment and random erasing 0.25;
"off" is the PETL papers' bicubic square resize. No model runs. The main process runs torch with
one thread by default, as loader workers do: on a busy 2-core machine two OpenMP threads in
``ToTensor``/``Normalize`` ran 10-25x slower than one.

The default policy is ``rand-m9-mstd0.5-inc1`` (``Augmentation`` caps its magnitude at 9, see its
docstring).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from petl_lightning.data.base import ImageClassificationDataModule
from petl_lightning.data.folder import ImageFolderDataModule
from petl_lightning.data.hf import HFImageDataModule
from petl_lightning.data.transforms import Augmentation
from petl_lightning.data.vtab import VTAB1kDataModule

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets" / "vtab1k"
POLICY = "rand-m9-mstd0.5-inc1"
LAYOUTS = ("list (VTAB1kDataModule)", "image folder (ImageFolderDataModule)", "datasets (HFImageDataModule)")


def read_pairs(list_file: Path) -> list[tuple[str, int]]:
    """``(relative path, label)`` of each line of a VTAB-1K list file."""
    pairs = [line.rsplit(maxsplit=1) for line in list_file.read_text().splitlines() if line.strip()]
    return [(rel, int(label)) for rel, label in pairs]


def build_layouts(task_dir: Path, work: Path) -> tuple[Path, Path]:
    """An image folder (``train/``, ``test/`` by class) and a ``datasets`` folder of the task's
    ``train800val200``/``test`` lists, under ``work``: ``(folder root, datasets path)``."""
    import datasets

    names = (task_dir / "classes.txt").read_text().split() if (task_dir / "classes.txt").is_file() else None
    splits = {"train": read_pairs(task_dir / "train800val200.txt"), "test": read_pairs(task_dir / "test.txt")}
    folder = work / "folder" / task_dir.name
    for split, pairs in splits.items():
        for rel, label in pairs:
            target = folder / split / (names[label] if names else f"{label:03d}") / Path(rel).name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(task_dir / rel, target)
    label_feature = datasets.ClassLabel(names=names) if names else datasets.Value("int64")
    features = datasets.Features({"image": datasets.Image(), "label": label_feature})
    hf = work / "datasets" / task_dir.name
    datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {
                    "image": [{"bytes": (task_dir / rel).read_bytes(), "path": rel} for rel, _ in pairs],
                    "label": [label for _, label in pairs],
                },
                features=features,
            )
            for split, pairs in splits.items()
        }
    ).save_to_disk(str(hf))
    return folder, hf


def data_module(
    layout: str, args: argparse.Namespace, paths: tuple[Path, Path], augment: bool, workers: int
) -> ImageClassificationDataModule:
    """The layout's DataModule over the same training images (checks off: only loading is timed)."""
    common = dict(
        img_size=args.img_size,
        batch_size=args.batch_size,
        num_workers=workers,
        normalization="imagenet",
        augmentation=Augmentation(auto_augment=args.auto_augment, re_prob=0.25) if augment else None,
        check_images="none",
        pin_memory=False,
    )
    if layout.startswith("list"):
        return VTAB1kDataModule(str(args.root), args.task, **common)
    if layout.startswith("image folder"):
        return ImageFolderDataModule(str(paths[0]), **common)
    return HFImageDataModule(str(paths[1]), **common)


def throughput(dm: ImageClassificationDataModule, batches: int) -> float:
    """Images/s of ``batches`` training batches after one warm-up batch (cycling epochs if needed)."""
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)
    images, start = 0, time.perf_counter()
    for _ in range(batches):
        try:
            x, _ = next(it)
        except StopIteration:
            it = iter(loader)
            x, _ = next(it)
        images += len(x)
    elapsed = time.perf_counter() - start
    del it
    return images / elapsed


def cpu_name() -> str:
    """The CPU's model name where Linux says it, else the architecture."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
    return names[0] if names else platform.machine()


def datasets_version() -> str:
    import datasets

    return str(datasets.__version__)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=ASSETS, help="VTAB-1K root holding the task folder")
    p.add_argument("--task", default="dtd10", help="task folder with train800val200.txt and test.txt")
    p.add_argument("--work-dir", type=Path, default=None, help="where to build the layouts (default: a temp folder)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=24, help="timed batches per configuration (within one epoch)")
    p.add_argument("--repeats", type=int, default=3, help="round-robin rounds (the table shows the median)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="loader worker counts")
    p.add_argument("--auto-augment", default=POLICY, help="timm RandAugment policy of the augmented rows")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the main process (workers use 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    task_dir = args.root / args.task
    if not (task_dir / "train800val200.txt").is_file():
        raise SystemExit(f"{task_dir} has no train800val200.txt: pass --root and --task of a VTAB-1K task.")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="data_throughput_"))
    try:
        start = time.perf_counter()
        paths = build_layouts(task_dir, work)
        built = time.perf_counter() - start
        configs = [(layout, aug, w) for layout in LAYOUTS for aug in (False, True) for w in args.workers]
        rates: dict[tuple[str, bool, int], list[float]] = {c: [] for c in configs}
        for _ in range(args.repeats):
            for layout, aug, w in configs:
                dm = data_module(layout, args, paths, aug, w)
                rates[(layout, aug, w)].append(throughput(dm, args.batches))
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print("| layout | augmentation | workers | images/s (min-max) |\n|---|---|---:|---:|")
    for (layout, aug, w), r in rates.items():
        label = f"on ({args.auto_augment}, erasing 0.25)" if aug else "off (square resize)"
        print(f"| {layout} | {label} | {w} | {statistics.median(r):.0f} ({min(r):.0f}-{max(r):.0f}) |")
    print(
        f"\n- {args.task}: {args.batches} batches of {args.batch_size} at {args.img_size} px after one warm-up batch, "
        f"median of {args.repeats} round-robin rounds; layouts built in {built:.1f} s.\n"
        f"- Machine: {os.cpu_count()} CPUs ({cpu_name()}), "
        f"torch threads in the main process: {torch.get_num_threads()}; torch {torch.__version__}, "
        f"datasets {datasets_version()}, Python {platform.python_version()}."
    )


if __name__ == "__main__":
    main()
