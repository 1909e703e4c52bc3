"""Builds VTAB-1K task folders from TensorFlow Datasets, once, atomically, with a manifest.

A task folder is written in the layout :class:`~petl_lightning.data.vtab.VTAB1kDataModule` reads:
``images/<list>/<index>.<ext>``, ``train800.txt``, ``val200.txt``, ``train800val200.txt``
(train800 + val200), ``test.txt``, ``classes.txt`` and ``manifest.json`` (source dataset and
version, the tfds slice of each list, image counts, class count, sha256 of each list file). The
slices and labels are VTAB's (:mod:`petl_lightning.data.vtab_splits`).

Images are the bytes tfds stores (JPEG or PNG as the source has them), copied unchanged: no
re-encoding loss, and two builds write identical files. Only dSprites, whose stored pixels are 0/1,
is decoded, multiplied by 255 as VTAB does, and written as PNG. Grey images stay one-channel; the
DataModule converts every image to RGB, which is VTAB's channel tiling.

Each task is written to a hidden temporary folder under the root and renamed to its name only when
complete, under a per-task lock file: an interrupted build leaves no task folder (its leftover is
removed by the next build), a finished task is skipped, and two processes never build the same task
at once. TensorFlow and tfds (``pip install 'petl-lightning[prepare]'``) are imported only here.

Before a task's first download, the hosts of its tfds download URLs are asked for an answer within a
few seconds (through urllib, so the proxy variables count as they do for tfds): offline, the build
stops at once with one line naming the URL and the manual-download folder where tfds takes the same
files from, instead of tfds' minutes of retries, and before the root, a lock or a tfds folder is made.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import logging
import os
import secrets
import shutil
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from petl_lightning.data.check import sha256_of
from petl_lightning.data.tasks import VTAB_TASKS, parse_tasks
from petl_lightning.data.vtab_splits import LISTS, VTAB_SOURCES, TaskSource, limit_spec, slice_size
from petl_lightning.errors import DataError, MissingExtraError, run_user_command
from petl_lightning.paths import check_output_folder

MISSING_EXTRA = "tensorflow-datasets is not installed: pip install 'petl-lightning[prepare]'"
PARTIAL = ".partial-"  # temporary task folders are named .<task>.partial-<random>
REACH_TIMEOUT = 5.0  # seconds a download host has to answer before the build stops


class ManualDownloadRequired(DataError):
    """A task whose tfds dataset must be downloaded by hand first."""


class DownloadUnreachable(DataError):
    """No download host of a task answers: offline, every task would fail alike, so the run stops."""


def _import_tfds() -> Any:
    """tfds, with TensorFlow kept off the GPUs (they belong to the training run).

    Importing this module has loaded torch and timm, and with them triton's native library, first:
    loading triton after TensorFlow segfaults (seen with tensorflow-cpu 2.21 and triton 3.x).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        with _native_stderr_silenced():
            import tensorflow as tf
            import tensorflow_datasets as tfds
    except ImportError:
        raise MissingExtraError(f"Cannot build VTAB-1K tasks: {MISSING_EXTRA}.") from None
    with contextlib.suppress(RuntimeError):  # already initialised: nothing to change
        tf.config.set_visible_devices([], "GPU")
    return tfds


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Sends file descriptor 2 to /dev/null: TensorFlow's C++ logging writes start-up lines there on
    import (once torch is loaded, ``TF_CPP_MIN_LOG_LEVEL`` no longer stops them), which would bury a
    one-line error. Python exceptions are raised after it is restored."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def _absl_warnings_silenced() -> Iterator[None]:
    """Holds back tfds' warnings (``Variant folder ... has no dataset_info.json`` for a dataset not yet
    prepared) while a builder is looked up: they are no problem, and would bury a one-line error."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _task_lock(root: Path, task: str) -> Iterator[None]:
    """An exclusive lock on ``root/.<task>.lock``, released by the OS if the process dies."""
    import fcntl

    with open(root / f".{task}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _source(task: str) -> TaskSource:
    if task not in VTAB_SOURCES:
        raise DataError(
            f"Cannot build task {task!r}: only the 19 VTAB-1K tasks can be built from TFDS "
            f"({', '.join(VTAB_SOURCES)}); put a custom task's folder under the root yourself."
        )
    return VTAB_SOURCES[task]


def _manual_dir(builder: Any, manual_dir: str | Path | None) -> Path:
    """Where tfds reads manual downloads: ``manual_dir`` or ``<tfds data dir>/downloads/manual``."""
    return Path(manual_dir).expanduser() if manual_dir else Path(str(builder.data_dir_root)) / "downloads" / "manual"


def _checked_builder(tfds: Any, src: TaskSource, data_dir: str | None, manual_dir: str | Path | None) -> Any:
    """The tfds builder of a task, checked before anything is written: where tfds has to download,
    the manual files are there and a download host answers."""
    try:
        with _absl_warnings_silenced():
            builder = tfds.builder(src.tfds_name, data_dir=data_dir)
            prepared = builder.is_prepared()
    except Exception as err:  # noqa: BLE001 - tfds raises several kinds for a missing builder/version
        raise DataError(
            f"{src.task}: tfds has no {src.tfds_name} ({_first_line(err)}); update tensorflow-datasets."
        ) from None
    if prepared:
        return builder
    manual = _manual_dir(builder, manual_dir)
    if src.manual:
        missing = [f for f in src.manual_files if not (manual / f).exists()]
        if missing:
            raise ManualDownloadRequired(
                f"{src.task}: tfds needs a manual download of {src.builder}: {src.manual}; tfds expects "
                f"{', '.join(missing)} in {manual}/ (set manual_dir to use another folder), then run again."
            )
    _check_reachable(builder, src, manual)
    return builder


def _download_and_prepare(tfds: Any, builder: Any, src: TaskSource, manual_dir: str | Path | None) -> None:
    """Downloads and prepares ``builder`` (if not done yet) and checks its split sizes against VTAB's;
    when tfds fails, the empty folders it left in its data folder are removed."""
    manual = _manual_dir(builder, manual_dir)
    try:
        with _new_empty_folders_removed_on_error(Path(str(builder.data_dir_root))):
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    except Exception as err:  # noqa: BLE001 - network, checksum and extraction errors of tfds
        raise DataError(
            f"{src.task}: tfds could not download and prepare {src.tfds_name} "
            f"({type(err).__name__}: {_first_line(err)}). Fix that and run again."
        ) from None
    for split, size in src.sizes.items():
        info = builder.info.splits.get(split)
        if info is not None and info.num_examples != size:
            raise DataError(
                f"{src.task}: tfds {builder.info.full_name} has {info.num_examples} examples in {split!r}, "
                f"VTAB-1K's slices assume {size}: use the dataset version VTAB defines ({src.tfds_name})."
            )


def _open_builder(tfds: Any, src: TaskSource, data_dir: str | None, manual_dir: str | Path | None) -> Any:
    """The tfds builder of a task, checked, downloaded and prepared."""
    builder = _checked_builder(tfds, src, data_dir, manual_dir)
    _download_and_prepare(tfds, builder, src, manual_dir)
    return builder


def _pending_downloads(builder: Any, manual: Path) -> dict[str, str]:
    """URL -> file name of what tfds would download for ``builder``: the URLs of its checksums file
    less those whose file is in ``manual`` (tfds takes it from there) or that its downloads folder
    records as done (tfds' ``*.INFO`` files). None under ``tfds.testing.mock_data``, which downloads
    nothing."""
    method = getattr(type(builder), "download_and_prepare", None)
    if getattr(method, "__module__", "").startswith("tensorflow_datasets.testing"):
        return {}
    downloads = Path(str(builder.data_dir_root)) / "downloads"
    done: set[str] = set()
    for info_file in [*downloads.glob("*.INFO"), *downloads.glob("*/*.INFO")]:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            done.update(json.loads(info_file.read_text()).get("urls", []))
    infos = getattr(builder, "url_infos", None) or {}
    return {
        url: info.filename or url
        for url, info in infos.items()
        if url not in done and not (info.filename and (manual / info.filename).exists())
    }


def _no_answer(url: str, timeout: float = REACH_TIMEOUT) -> str | None:
    """Why the server of ``url`` gives no answer within ``timeout`` seconds, or None when it answers
    (an HTTP error is an answer). urllib honours HTTPS_PROXY/HTTP_PROXY/NO_PROXY as tfds does; the
    request runs in a daemon thread so a hanging name lookup cannot hold the build either."""
    reasons: list[str | None] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
                reasons.append(None)
        except urllib.error.HTTPError:
            reasons.append(None)
        except (OSError, http.client.HTTPException, ValueError) as err:  # URLError and timeouts are OSErrors
            reasons.append(str(getattr(err, "reason", err)))

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1)
    return reasons[0] if reasons else f"no answer within {timeout:g} s"


def _check_reachable(builder: Any, src: TaskSource, manual: Path) -> None:
    """Raise :class:`DownloadUnreachable` unless one host of the task's pending downloads answers."""
    pending = _pending_downloads(builder, manual)
    hosts: dict[str, str] = {}  # host -> its first URL
    for url in pending:
        hosts.setdefault(urllib.parse.urlsplit(url).netloc, url)
    reasons = []
    for url in hosts.values():
        reason = _no_answer(url)
        if reason is None:
            return
        reasons.append(reason)
    if hosts:
        host, url = next(iter(hosts.items()))
        others = f", nor {len(hosts) - 1} other download hosts" if len(hosts) > 1 else ""
        raise DownloadUnreachable(
            f"{src.task}: cannot reach {host} to download {url} ({reasons[0]}{others}); connect to the "
            f"network (or set HTTPS_PROXY), or download {', '.join(pending.values())} by hand into "
            f"{manual}/ (or a folder given as --manual-dir) and run again."
        )


@contextlib.contextmanager
def _new_empty_folders_removed_on_error(top: Path, depth: int = 3) -> Iterator[None]:
    """On an error, removes the empty folders down to ``depth`` levels under ``top`` (and ``top``)
    that were not there before: tfds leaves its temporary download and dataset folders when a download
    fails. A folder that holds anything stays."""

    def folders() -> set[Path]:
        found = {top} if top.is_dir() else set()
        for level in range(1, depth + 1):
            found |= {p for p in top.glob("/".join(["*"] * level)) if p.is_dir()}
        return found

    before = folders()
    try:
        yield
    except BaseException:
        for folder in sorted(folders() - before, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):  # not empty: it stays
                folder.rmdir()
        raise


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def encode_image(raw: bytes, scale_pixels: bool) -> tuple[bytes, str]:
    """The bytes to write and their file suffix: tfds' stored JPEG/PNG unchanged, or (dSprites) the
    0/1 pixels times 255 as VTAB does (uint8 arithmetic), written as PNG."""
    if scale_pixels:
        with Image.open(io.BytesIO(raw)) as img:
            pixels = np.asarray(img) * np.uint8(255)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="PNG")
        return out.getvalue(), ".png"
    if raw[:3] == b"\xff\xd8\xff":
        return raw, ".jpg"
    if raw[:8] == b"\x89PNG\r\n\x1a\n":
        return raw, ".png"
    raise DataError(f"tfds gave an image that is neither JPEG nor PNG (starts {raw[:8]!r}).")


def _write_list(tfds: Any, builder: Any, src: TaskSource, name: str, spec: str, out: Path) -> list[str]:
    """Writes the images of one list and returns its lines ``images/<name>/<index>.<ext> <label>``."""
    num_classes = VTAB_TASKS[src.task].num_classes
    folder = out / "images" / name
    folder.mkdir(parents=True)
    ds = builder.as_dataset(
        split=spec,
        shuffle_files=False,
        decoders={src.image_key: tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(interleave_cycle_length=1),
    )
    lines = []
    for i, example in enumerate(tfds.as_numpy(ds)):
        label = src.label(example)
        if not 0 <= label < num_classes:
            raise DataError(
                f"{src.task}: example {i} of tfds {spec!r} maps to label {label}, outside "
                f"[0, {num_classes}): the tfds data is not what VTAB-1K defines."
            )
        data, suffix = encode_image(example[src.image_key], src.scale_pixels)
        rel = f"images/{name}/{i:06d}{suffix}"
        (out / rel).write_bytes(data)
        lines.append(f"{rel} {label}")
    return lines


def _class_names(builder: Any, src: TaskSource) -> list[str]:
    names = src.class_names or builder.info.features[src.label_key].names
    if len(names) != VTAB_TASKS[src.task].num_classes:
        raise DataError(
            f"{src.task}: tfds has {len(names)} classes in {src.label_key!r}, VTAB-1K has "
            f"{VTAB_TASKS[src.task].num_classes}: use the dataset version VTAB defines ({src.tfds_name})."
        )
    return list(names)


def _write_task(tfds: Any, builder: Any, src: TaskSource, out: Path, test_limit: int | None) -> None:
    """Every file of a task folder, written into ``out``."""
    specs = dict(src.lists)
    if test_limit is not None:
        specs["test"] = limit_spec(specs["test"], test_limit, src.sizes)
    rows: dict[str, list[str]] = {}
    for name in LISTS:
        rows[name] = _write_list(tfds, builder, src, name, specs[name], out)
        if len(rows[name]) != slice_size(specs[name], src.sizes):
            raise DataError(
                f"{src.task}: tfds gave {len(rows[name])} examples for {specs[name]!r}, expected "
                f"{slice_size(specs[name], src.sizes)}."
            )
    rows["train800val200"] = rows["train800"] + rows["val200"]
    specs["train800val200"] = f"{specs['train800']}+{specs['val200']}"
    classes = _class_names(builder, src)
    for name, lines in rows.items():
        (out / f"{name}.txt").write_text("\n".join(lines) + "\n")
    (out / "classes.txt").write_text("\n".join(classes) + "\n")
    files = [f"{n}.txt" for n in rows] + ["classes.txt"]
    manifest = {
        "task": src.task,
        "source": {
            "tfds_builder": src.builder,
            "tfds_version_pattern": src.version,
            "dataset": builder.info.full_name,
            "version": str(builder.info.version),
            "tensorflow_datasets": tfds.__version__,
        },
        "splits": {n: {"tfds_split": specs[n], "images": len(rows[n])} for n in rows},
        "canonical": test_limit is None,
        "num_classes": len(classes),
        "label": src.label_rule,
        "images": "decoded, pixels x 255 as VTAB, PNG" if src.scale_pixels else "tfds-stored bytes, unchanged",
        "sha256": {f: sha256_of(out / f) for f in files},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def prepare_task(
    root: str | Path,
    task: str,
    data_dir: str | None = None,
    manual_dir: str | Path | None = None,
    test_limit: int | None = None,
) -> bool:
    """Builds ``root/task`` from tfds unless it exists; returns whether it was built.

    Args:
        root: the VTAB-1K root (created if missing).
        task: one of the 19 VTAB-1K tasks.
        data_dir: tfds' data folder (downloads and prepared datasets; default: tfds' own).
        manual_dir: where manual downloads are (default: tfds' ``<data_dir>/downloads/manual``).
        test_limit: keep only the first ``test_limit`` test images (quick builds; the manifest marks
            the folder non-canonical, and ``vtab-check`` reports its test size).
    """
    src = _source(task)
    root = Path(root).expanduser()
    if (root / task).is_dir():
        return False  # finished before (a task folder only ever appears complete)
    tfds = _import_tfds()
    builder = _checked_builder(tfds, src, data_dir, manual_dir)  # offline or files missing: nothing made yet
    root.mkdir(parents=True, exist_ok=True)
    with _task_lock(root, task):
        if (root / task).is_dir():
            return False  # built by another process while this one waited for the lock
        for stale in root.glob(f".{task}{PARTIAL}*"):
            shutil.rmtree(stale)  # left by a killed build; the lock says no build is running
        _download_and_prepare(tfds, builder, src, manual_dir)
        tmp = root / f".{task}{PARTIAL}{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            _write_task(tfds, builder, src, tmp, test_limit)
            tmp.rename(root / task)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return True


@dataclass
class PrepareReport:
    """What :func:`prepare_tasks` did: tasks built, skipped (already there) and failed (with why)."""

    built: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def prepare_tasks(
    root: str | Path,
    tasks: Sequence[str],
    data_dir: str | None = None,
    manual_dir: str | Path | None = None,
    test_limit: int | None = None,
) -> PrepareReport:
    """Builds each missing task; a task that fails (e.g. needs a manual download) does not stop the others."""
    for task in tasks:
        _source(task)  # every name is checked before anything is built
    report = PrepareReport()
    for task in tasks:
        start = time.perf_counter()
        try:
            built = prepare_task(root, task, data_dir, manual_dir, test_limit)
        except DownloadUnreachable:
            raise  # offline: the other tasks would fail alike
        except DataError as err:
            report.failed[task] = str(err)
            manual = isinstance(err, ManualDownloadRequired)
            print(f"{task}: {'needs a manual download' if manual else 'failed'}, not built", flush=True)
            continue
        (report.built if built else report.skipped).append(task)
        print(
            f"{task}: {'built' if built else 'already there, skipped'} ({time.perf_counter() - start:.1f} s)",
            flush=True,
        )
    return report


def prepare_main(argv: list[str] | None = None) -> int:
    """``petl-lightning vtab-prepare --root DIR [--tasks all]``: exit 0 when every task is
    there, 1 when some could not be built (each said why), 2 for bad input or no network."""
    p = argparse.ArgumentParser(
        prog="petl-lightning vtab-prepare", description="Build VTAB-1K task folders from TensorFlow Datasets."
    )
    p.add_argument("--root", required=True, help="the VTAB-1K root (task folders go here)")
    p.add_argument("--tasks", default="all", help="all, natural, specialized, structured or a comma list")
    p.add_argument("--data-dir", default=None, help="tfds data folder (default: tfds' own, ~/tensorflow_datasets)")
    p.add_argument("--manual-dir", default=None, help="manual downloads (default: <data-dir>/downloads/manual)")
    p.add_argument("--test-limit", type=int, default=None, help="keep only the first N test images (not VTAB-1K)")
    args = p.parse_args(argv)
    status = [0]

    def go() -> None:
        tasks = parse_tasks(args.tasks)
        check_output_folder(args.root, "--root")
        if args.data_dir is not None:
            check_output_folder(args.data_dir, "--data-dir")
        report = prepare_tasks(args.root, tasks, args.data_dir, args.manual_dir, args.test_limit)
        for reason in report.failed.values():
            print(f"error: {reason}", file=sys.stderr)
        print(
            f"{len(report.built)} built, {len(report.skipped)} already there, {len(report.failed)} not built"
            f"{': ' + ', '.join(report.failed) if report.failed else ''}."
        )
        status[0] = 1 if report.failed else 0

    return run_user_command(go) or status[0]


if __name__ == "__main__":
    sys.exit(prepare_main())
