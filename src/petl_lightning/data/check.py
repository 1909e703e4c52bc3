"""``vtab-check``: verifies a VTAB-1K folder, built here or downloaded elsewhere, against the benchmark.

For each task folder: the four list files are there with VTAB-1K's sizes (800 / 200 / 1000 and the
task's published test size), ``train800val200`` is ``train800`` + ``val200``, every label is in
range, every listed image exists and opens, no image in the folder is in no list, no image is both
in a training list and in ``test`` (the same file, or the same bytes), and, where the folder has a
``manifest.json``, its list files are the ones the manifest describes. One line per problem.

Exact duplicates between train and test can be real (dSprites draws symmetric shapes at several
orientations alike), so a duplicate line is something to look at, not proof of a broken folder.
Pure Python and PIL: no TensorFlow. ``python -m petl_lightning.data.check --root DIR``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

from PIL import Image

from petl_lightning.data.lists import Sample, read_list
from petl_lightning.data.tasks import LIST_FILES, VTAB_TASKS, parse_tasks
from petl_lightning.data.vtab_splits import VTAB_SOURCES
from petl_lightning.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
TRAIN_LISTS = ("train800", "val200", "train800val200")


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def expected_sizes(task: str) -> dict[str, int]:
    """VTAB-1K's size of each list of ``task``."""
    return {"train800": 800, "val200": 200, "train800val200": 1000, "test": VTAB_SOURCES[task].test_size}


def _where(s: Sample) -> str:
    return f"{s.list_file.name}:{s.line}"


def _rel(s: Sample, task_dir: Path) -> str:
    return str(s.path.relative_to(task_dir)) if s.path.is_relative_to(task_dir) else str(s.path)


def _read_lists(task_dir: Path, task: str, problems: list[str]) -> dict[str, list[Sample]]:
    lists: dict[str, list[Sample]] = {}
    for name, size in expected_sizes(task).items():
        path = task_dir / f"{name}.txt"
        if not path.is_file():
            problems.append(f"{name}.txt is missing")
            continue
        try:
            lists[name] = read_list(path)
        except DataError as err:
            problems.append(str(err).replace(str(task_dir) + "/", ""))
            continue
        if len(lists[name]) != size:
            problems.append(f"{name}.txt lists {len(lists[name])} images; VTAB-1K's {name} has {size}")
    if all(n in lists for n in TRAIN_LISTS):
        parts = Counter((s.path, s.label) for s in lists["train800"] + lists["val200"])
        joint = Counter((s.path, s.label) for s in lists["train800val200"])
        if parts != joint:
            lost, extra = sum((parts - joint).values()), sum((joint - parts).values())
            problems.append(
                f"train800val200.txt is not train800.txt + val200.txt ({lost} of their lines are "
                f"not in it, {extra} of its lines are in neither)"
            )
    return lists


def _check_labels(lists: dict[str, list[Sample]], task: str, problems: list[str]) -> None:
    n = VTAB_TASKS[task].num_classes
    for samples in lists.values():
        problems += [f"{_where(s)}: label {s.label} is outside [0, {n})" for s in samples if not 0 <= s.label < n]


def _check_images(task_dir: Path, lists: dict[str, list[Sample]], problems: list[str]) -> set[Path]:
    """Missing, unreadable and unlisted images; returns the listed images that can be read."""
    listed: dict[Path, Sample] = {}
    for samples in lists.values():
        for s in samples:
            listed.setdefault(s.path, s)
    readable = set()
    for path, s in listed.items():
        if not path.is_file():
            problems.append(f"{_where(s)}: image {_rel(s, task_dir)} is missing")
            continue
        try:
            with Image.open(path):
                readable.add(path)
        except Exception:  # noqa: BLE001 - PIL raises many kinds for a file that is not an image
            problems.append(f"{_where(s)}: image {_rel(s, task_dir)} is not a readable image")
    on_disk = {p for p in task_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}
    problems += [f"image {p.relative_to(task_dir)} is in no list file" for p in sorted(on_disk - set(listed))]
    return readable


def _check_duplicates(task_dir: Path, lists: dict[str, list[Sample]], readable: set[Path], problems: list[str]) -> None:
    train: dict[Path, Sample] = {}
    for name in TRAIN_LISTS:
        for s in lists.get(name, []):
            train.setdefault(s.path, s)  # named by the first list that has it
    test = {s.path: s for s in lists.get("test", [])}
    by_digest: dict[str, Sample] = {}
    for path, s in train.items():
        if path in readable:
            by_digest.setdefault(sha256_of(path), s)
    for path, s in test.items():
        if path in train:
            problems.append(f"{_where(s)}: test image {_rel(s, task_dir)} is also listed in {_where(train[path])}")
        elif path in readable and (twin := by_digest.get(sha256_of(path))) is not None:
            problems.append(
                f"{_where(s)}: test image {_rel(s, task_dir)} has the same bytes as training image "
                f"{_rel(twin, task_dir)} ({_where(twin)})"
            )


def _check_manifest(task_dir: Path, problems: list[str]) -> None:
    path = task_dir / "manifest.json"
    if not path.is_file():
        return
    try:
        digests = json.loads(path.read_text()).get("sha256", {})
    except (json.JSONDecodeError, AttributeError):
        problems.append("manifest.json is not a JSON object")
        return
    for name, digest in digests.items():
        if (task_dir / name).is_file() and sha256_of(task_dir / name) != digest:
            problems.append(f"{name} is not the file manifest.json describes (sha256 differs)")


def check_task(task_dir: Path, task: str) -> list[str]:
    """Every problem of one VTAB-1K task folder, one line each (empty: the folder is sound)."""
    if not task_dir.is_dir():
        return [f"{task}: task folder {task_dir} is missing"]
    problems: list[str] = []
    lists = _read_lists(task_dir, task, problems)
    _check_labels(lists, task, problems)
    readable = _check_images(task_dir, lists, problems)
    _check_duplicates(task_dir, lists, readable, problems)
    _check_manifest(task_dir, problems)
    return [f"{task}: {p}" for p in problems]


def _tasks(spec: str, root: Path) -> list[str]:
    if spec == "present":
        return [t for t in VTAB_TASKS if (root / t).is_dir()]
    return parse_tasks(spec)


def check_main(argv: list[str] | None = None) -> int:
    """``petl-lightning vtab-check --root DIR [--tasks present]``: 0 when every checked task is sound,
    1 when problems were found (one line each), 2 for bad input."""
    p = argparse.ArgumentParser(
        prog="petl-lightning vtab-check", description="Verify VTAB-1K task folders against the benchmark's splits."
    )
    p.add_argument("--root", required=True, help="the VTAB-1K root holding the task folders")
    p.add_argument(
        "--tasks",
        default="present",
        help="present (every VTAB-1K task folder under the root), all, a group, or a comma list",
    )
    try:
        args = p.parse_args(argv)
    except SystemExit as exit_:  # usage errors (status 2) and --help (status 0)
        return int(exit_.code or 0)
    root = Path(args.root).expanduser()
    try:
        if not root.is_dir():
            raise DataError(f"VTAB-1K root {str(root)!r} does not exist; pass the folder holding cifar/, dtd/, ...")
        tasks = _tasks(args.tasks, root)
        if not tasks:
            raise DataError(f"No VTAB-1K task folder under {str(root)!r} (looked for {', '.join(VTAB_TASKS)}).")
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failing = 0
    for task in tasks:
        problems = check_task(root / task, task)
        for line in problems:
            print(line)
        if problems:
            failing += 1
        else:
            sizes = "/".join(str(n) for n in expected_sizes(task).values())
            print(f"{task}: ok ({sizes} images in {', '.join(LIST_FILES)})")
    print(
        f"vtab-check: {failing} of {len(tasks)} task folders have problems"
        if failing
        else f"vtab-check: all {len(tasks)} task folders are sound"
    )
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(check_main())
