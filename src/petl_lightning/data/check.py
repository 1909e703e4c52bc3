"""``vtab-check``: verifies a VTAB-1K folder, built here or downloaded elsewhere, against the benchmark.

For each task folder: the four list files are there with VTAB-1K's sizes (800 / 200 / 1000 and the
task's published test size), ``train800val200`` is ``train800`` + ``val200``, every label is in
range, every listed image exists and decodes, no image in the folder is in no list, no image is both
in a training list and in ``test`` (the same file, or the same bytes), and, where the folder has a
``manifest.json``, its list files are the ones the manifest describes.

Every listed image is decoded (not just its header opened: a truncated PNG opens fine and stops a run
later), within a time budget per task; images left when it runs out are only opened, and a line says
how many. A broken folder can have thousands of problems of one kind, so each kind prints its first
few lines, then one line counts every kind; ``--verbose`` prints every line.

Exact duplicates between train and test can be real (dSprites draws symmetric shapes at several
orientations alike), so a duplicate line is something to look at, not proof of a broken folder.
Pure Python and PIL: no TensorFlow. ``python -m petl_lightning.data.check --root DIR``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from petl_lightning.data.lists import Sample, read_list
from petl_lightning.data.tasks import LIST_FILES, VTAB_TASKS, parse_tasks
from petl_lightning.data.vtab_splits import VTAB_SOURCES
from petl_lightning.errors import ConfigError, DataError, run_user_command

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
TRAIN_LISTS = ("train800", "val200", "train800val200")
DECODE_BUDGET = 60.0  # seconds of decoding per task; VTAB-1K's largest tasks (74k images) need more
EXAMPLES = 5  # lines printed per kind of problem without --verbose

# The kinds of problem, in the words of the count line ("3 missing images, 1797 images in no list file").
KINDS = {
    "folder": "missing task folders",
    "lists": "list-file problems",
    "labels": "labels out of range",
    "missing": "missing images",
    "unreadable": "images that cannot be decoded",
    "unlisted": "images in no list file",
    "duplicates": "test images also in training",
    "manifest": "manifest mismatches",
}


@dataclass(frozen=True)
class Problem:
    """One problem of a task folder: its kind (a key of :data:`KINDS`) and its line."""

    kind: str
    text: str


@dataclass
class TaskReport:
    """What checking one task folder found: its problems, and how many listed images were decoded or
    (the decode budget spent) only opened."""

    problems: list[Problem] = field(default_factory=list)
    decoded: int = 0
    header_only: int = 0


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
    return f"{s.list_file.name}:{s.line}" if s.list_file is not None else str(s.path)


def _rel(s: Sample, task_dir: Path) -> str:
    return str(s.path.relative_to(task_dir)) if s.path.is_relative_to(task_dir) else str(s.path)


def _read_lists(task_dir: Path, task: str, problems: list[Problem]) -> dict[str, list[Sample]]:
    lists: dict[str, list[Sample]] = {}
    for name, size in expected_sizes(task).items():
        path = task_dir / f"{name}.txt"
        if not path.is_file():
            problems.append(Problem("lists", f"{name}.txt is missing"))
            continue
        try:
            lists[name] = read_list(path)
        except DataError as err:
            problems.append(Problem("lists", str(err).replace(str(task_dir) + "/", "")))
            continue
        if len(lists[name]) != size:
            problems.append(
                Problem("lists", f"{name}.txt lists {len(lists[name])} images; VTAB-1K's {name} has {size}")
            )
    if all(n in lists for n in TRAIN_LISTS):
        parts = Counter((s.path, s.label) for s in lists["train800"] + lists["val200"])
        joint = Counter((s.path, s.label) for s in lists["train800val200"])
        if parts != joint:
            lost, extra = sum((parts - joint).values()), sum((joint - parts).values())
            problems.append(
                Problem(
                    "lists",
                    f"train800val200.txt is not train800.txt + val200.txt ({lost} of their lines are "
                    f"not in it, {extra} of its lines are in neither)",
                )
            )
    return lists


def _check_labels(lists: dict[str, list[Sample]], task: str, problems: list[Problem]) -> None:
    n = VTAB_TASKS[task].num_classes
    for samples in lists.values():
        problems += [
            Problem("labels", f"{_where(s)}: label {s.label} is outside [0, {n})")
            for s in samples
            if not 0 <= s.label < n
        ]


def _check_images(task_dir: Path, lists: dict[str, list[Sample]], budget: float, report: TaskReport) -> set[Path]:
    """Missing, undecodable and unlisted images; returns the listed images that can be read. Images
    are decoded until ``budget`` seconds have passed, then only opened (header)."""
    listed: dict[Path, Sample] = {}
    for samples in lists.values():
        for s in samples:
            listed.setdefault(s.path, s)
    readable = set()
    deadline = time.monotonic() + budget
    for path, s in listed.items():
        where, rel = _where(s), _rel(s, task_dir)
        if not path.is_file():
            report.problems.append(Problem("missing", f"{where}: image {rel} is missing"))
            continue
        decode = time.monotonic() < deadline
        try:
            with Image.open(path) as img:
                if decode:
                    img.load()
        except Exception as err:  # noqa: BLE001 - PIL raises many kinds for a file that is not an image
            report.problems.append(Problem("unreadable", f"{where}: image {rel} cannot be decoded ({err})"))
        else:
            readable.add(path)
        if decode:
            report.decoded += 1
        else:
            report.header_only += 1
    on_disk = {p for p in task_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}
    report.problems += [
        Problem("unlisted", f"image {p.relative_to(task_dir)} is in no list file")
        for p in sorted(on_disk - set(listed))
    ]
    return readable


def _check_duplicates(
    task_dir: Path, lists: dict[str, list[Sample]], readable: set[Path], problems: list[Problem]
) -> None:
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
            text = f"{_where(s)}: test image {_rel(s, task_dir)} is also listed in {_where(train[path])}"
            problems.append(Problem("duplicates", text))
        elif path in readable and (twin := by_digest.get(sha256_of(path))) is not None:
            text = (
                f"{_where(s)}: test image {_rel(s, task_dir)} has the same bytes as training image "
                f"{_rel(twin, task_dir)} ({_where(twin)})"
            )
            problems.append(Problem("duplicates", text))


def _check_manifest(task_dir: Path, problems: list[Problem]) -> None:
    path = task_dir / "manifest.json"
    if not path.is_file():
        return
    try:
        digests = json.loads(path.read_text()).get("sha256", {})
    except (json.JSONDecodeError, AttributeError):
        problems.append(Problem("manifest", "manifest.json is not a JSON object"))
        return
    for name, digest in digests.items():
        if (task_dir / name).is_file() and sha256_of(task_dir / name) != digest:
            problems.append(Problem("manifest", f"{name} is not the file manifest.json describes (sha256 differs)"))


def inspect_task(task_dir: Path, task: str, decode_budget: float = math.inf) -> TaskReport:
    """Every problem of one VTAB-1K task folder (none: the folder is sound), decoding listed images for
    at most ``decode_budget`` seconds."""
    report = TaskReport()
    if not task_dir.is_dir():
        report.problems.append(Problem("folder", f"task folder {task_dir} is missing"))
        return report
    lists = _read_lists(task_dir, task, report.problems)
    _check_labels(lists, task, report.problems)
    readable = _check_images(task_dir, lists, decode_budget, report)
    _check_duplicates(task_dir, lists, readable, report.problems)
    _check_manifest(task_dir, report.problems)
    return report


def check_task(task_dir: Path, task: str, decode_budget: float = math.inf) -> list[str]:
    """Every problem of one VTAB-1K task folder, one line each (empty: the folder is sound)."""
    return [f"{task}: {p.text}" for p in inspect_task(task_dir, task, decode_budget).problems]


def summary_lines(task: str, problems: list[Problem], verbose: bool = False) -> list[str]:
    """The lines printed for a task's problems: the first :data:`EXAMPLES` of each kind (all with
    ``verbose``), and, when some were left out, one line counting each kind."""
    counts = Counter(p.kind for p in problems)
    seen: Counter[str] = Counter()
    lines = []
    for p in problems:
        seen[p.kind] += 1
        if verbose or seen[p.kind] <= EXAMPLES:
            lines.append(f"{task}: {p.text}")
    if len(lines) < len(problems):
        kinds = ", ".join(f"{counts[k]} {label}" for k, label in KINDS.items() if counts[k])
        lines.append(
            f"{task}: {len(problems)} problems: {kinds} (the first {EXAMPLES} of each kind are shown; "
            f"--verbose prints every one)"
        )
    return lines


def _tasks(spec: str, root: Path) -> list[str]:
    if spec == "present":
        return [t for t in VTAB_TASKS if (root / t).is_dir()]
    return parse_tasks(spec)


def _budget(text: str) -> float:
    """Seconds of ``--decode-budget``: a number >= 0, or ``inf``."""
    try:
        budget = float(text)
    except ValueError:
        budget = -1.0
    if not budget >= 0:  # also refuses nan
        raise ConfigError(
            f"--decode-budget {text!r} is not a number of seconds >= 0; pass e.g. 60, 0 (open headers only) "
            f"or inf (decode every image)."
        )
    return budget


def check_main(argv: list[str] | None = None) -> int:
    """``petl-lightning vtab-check --root DIR [--tasks present] [--decode-budget S] [--verbose]``: 0
    when every checked task is sound, 1 when problems were found, 2 for bad input."""
    p = argparse.ArgumentParser(
        prog="petl-lightning vtab-check", description="Verify VTAB-1K task folders against the benchmark's splits."
    )
    p.add_argument("--root", required=True, help="the VTAB-1K root holding the task folders")
    p.add_argument(
        "--tasks",
        default="present",
        help="present (every VTAB-1K task folder under the root), all, a group, or a comma list",
    )
    p.add_argument(
        "--decode-budget",
        default=str(DECODE_BUDGET),
        metavar="SECONDS",
        help=f"seconds per task spent decoding listed images (default {DECODE_BUDGET:g}); the rest are only "
        "opened, and a line says how many; 0: open only, inf: decode all",
    )
    p.add_argument("--verbose", action="store_true", help=f"print every problem (default: {EXAMPLES} of each kind)")
    try:
        args = p.parse_args(argv)
    except SystemExit as exit_:  # usage errors (status 2) and --help (status 0)
        return int(exit_.code or 0)
    status = [0]

    def go() -> None:
        status[0] = _check(Path(args.root).expanduser(), args.tasks, _budget(args.decode_budget), args.verbose)

    return run_user_command(go) or status[0]


def _check(root: Path, spec: str, budget: float, verbose: bool) -> int:
    """Checks and reports each task under ``root``; the exit status (0 sound, 1 problems)."""
    if not root.is_dir():
        raise DataError(f"VTAB-1K root {str(root)!r} does not exist; pass the folder holding cifar/, dtd/, ...")
    tasks = _tasks(spec, root)
    if not tasks:
        raise DataError(f"No VTAB-1K task folder under {str(root)!r} (looked for {', '.join(VTAB_TASKS)}).")
    failing = 0
    for task in tasks:
        report = inspect_task(root / task, task, budget)
        for line in summary_lines(task, report.problems, verbose):
            print(line, flush=True)
        if report.header_only:
            print(
                f"{task}: the decode budget of {budget:g} s ran out: {report.decoded} listed images decoded, "
                f"{report.header_only} only opened (header); pass --decode-budget inf to decode all",
                flush=True,
            )
        if report.problems:
            failing += 1
        else:
            sizes = "/".join(str(n) for n in expected_sizes(task).values())
            print(f"{task}: ok ({sizes} images in {', '.join(LIST_FILES)})", flush=True)
    print(
        f"vtab-check: {failing} of {len(tasks)} task folders have problems"
        if failing
        else f"vtab-check: all {len(tasks)} task folders are sound"
    )
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(check_main())
