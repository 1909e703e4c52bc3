"""Faults of ``vtab-check`` and ``vtab-prepare`` from user testing, through the console script in new
processes: a truncated image is found, a broken folder prints a summary, an offline build stops at
once, a root under a file is one line; each leaves only the files it is for."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_helpers import WITH_TENSORFLOW, assert_one_line, files_under, run
from petl_lightning.data.vtab_splits import VTAB_SOURCES

pytestmark = pytest.mark.slow  # console-script processes: in make test, not in make test-fast

KITTI_TEST = VTAB_SOURCES["kitti"].test_size  # 711: the smallest VTAB-1K test list
LISTED = 1000 + KITTI_TEST


@pytest.fixture(scope="module")
def kitti_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sound kitti folder with VTAB-1K's list sizes; every image a distinct 4x4 PNG."""
    task_dir = tmp_path_factory.mktemp("vtab") / "kitti"
    lists: dict[str, list[str]] = {}
    k = 0
    for split, n in {"train800": 800, "val200": 200, "test": KITTI_TEST}.items():
        (task_dir / "images" / split).mkdir(parents=True)
        lists[split] = []
        for i in range(n):
            pixels = np.full((4, 4, 3), [k % 256, k // 256, 7], dtype=np.uint8)
            Image.fromarray(pixels).save(task_dir / f"images/{split}/{i:06d}.png")
            lists[split].append(f"images/{split}/{i:06d}.png {k % 4}")
            k += 1
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for split, lines in lists.items():
        (task_dir / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return task_dir.parent


def _copy(root: Path, tmp_path: Path) -> Path:
    shutil.copytree(root / "kitti", tmp_path / "kitti")
    return tmp_path / "kitti"


# -- (8) an image that opens but does not decode -----------------------------------------------------
def test_a_truncated_png_is_reported_with_its_list_line(kitti_root: Path, tmp_path: Path) -> None:
    task_dir = _copy(kitti_root, tmp_path)
    image = task_dir / "images/train800/000005.png"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(image)
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])  # the header opens; the pixels are cut
    with Image.open(image) as img:
        assert img.size == (64, 64)  # what a header-only check accepts
    before = files_under(tmp_path)
    proc = run("vtab-check", "--root", str(tmp_path))
    assert proc.returncode == 1, proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    assert out[0].startswith("kitti: train800.txt:6: image images/train800/000005.png cannot be decoded ("), out
    assert out[-1] == "vtab-check: 1 of 1 task folders have problems"
    assert len(out) == 2 and proc.stderr == ""
    assert files_under(tmp_path) == before  # the check writes nothing

    # out of decode budget: the image is only opened, and a line says so (nothing skipped silently)
    proc = run("vtab-check", "--root", str(tmp_path), "--decode-budget", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[0] == (
        f"kitti: the decode budget of 0 s ran out: 0 listed images decoded, {LISTED} only opened (header); "
        "pass --decode-budget inf to decode all"
    )


def test_a_bad_decode_budget_is_one_line(kitti_root: Path) -> None:
    for bad in ("soon", "-1"):
        proc = run("vtab-check", "--root", str(kitti_root), "--decode-budget", bad)
        assert_one_line(proc, rf"error: --decode-budget '{bad}' is not a number of seconds >= 0; pass e\.g\. 60")
        assert proc.stdout == ""


# -- (16) thousands of problems: a summary per task ------------------------------------------------
def test_many_problems_print_five_of_each_kind_and_the_counts(kitti_root: Path, tmp_path: Path) -> None:
    task_dir = _copy(kitti_root, tmp_path)
    for i in range(12):
        Image.new("RGB", (4, 4), (i, 1, 2)).save(task_dir / f"images/extra{i:02d}.png")
    for i in range(7):
        (task_dir / f"images/test/{i:06d}.png").unlink()

    proc = run("vtab-check", "--root", str(tmp_path))
    assert proc.returncode == 1, proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    missing = [ln for ln in out if ln.endswith(" is missing")]
    unlisted = [ln for ln in out if ln.endswith(" is in no list file")]
    assert missing == [f"kitti: test.txt:{i + 1}: image images/test/{i:06d}.png is missing" for i in range(5)]
    assert unlisted == [f"kitti: image images/extra{i:02d}.png is in no list file" for i in range(5)]
    assert out[-2:] == [
        "kitti: 19 problems: 7 missing images, 12 images in no list file (the first 5 of each kind are shown; "
        "--verbose prints every one)",
        "vtab-check: 1 of 1 task folders have problems",
    ]
    assert len(out) == 12

    proc = run("vtab-check", "--root", str(tmp_path), "--verbose")
    assert proc.returncode == 1
    out = proc.stdout.splitlines()
    assert sum(ln.endswith(" is missing") for ln in out) == 7
    assert sum(ln.endswith(" is in no list file") for ln in out) == 12
    assert len(out) == 20 and out[-1] == "vtab-check: 1 of 1 task folders have problems"


# -- (13) no network: fail at once, leave nothing ---------------------------------------------------
def _offline_env() -> dict[str, str]:
    """Every proxy variable points at a closed local port, so no download host answers, on any machine."""
    env = {k: v for k, v in WITH_TENSORFLOW.items() if k.lower() not in ("no_proxy", "https_proxy", "http_proxy")}
    dead = "http://127.0.0.1:9"
    return {**env, "HTTPS_PROXY": dead, "HTTP_PROXY": dead, "https_proxy": dead, "http_proxy": dead}


def test_prepare_offline_fails_fast_naming_the_url_and_the_manual_folder(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow_datasets", reason="tensorflow-datasets not installed (pip install '.[prepare]')")
    root, data_dir = tmp_path / "vtab", tmp_path / "tfds"
    start = time.monotonic()
    proc = run(
        "vtab-prepare", "--root", str(root), "--tasks", "dtd,kitti", "--data-dir", str(data_dir), env=_offline_env()
    )
    elapsed = time.monotonic() - start
    assert_one_line(
        proc,
        r"^error: dtd: cannot reach www\.robots\.ox\.ac\.uk to download "
        r"https://www\.robots\.ox\.ac\.uk/~vgg/data/dtd/download/dtd-r1\.0\.1\.tar\.gz \(.+\); .*download "
        rf"dtd-r1\.0\.1\.tar\.gz by hand into {re.escape(str(data_dir))}/downloads/manual/ "
        r"\(or a folder given as --manual-dir\)",
    )
    assert elapsed < 45, f"took {elapsed:.0f} s"  # tfds alone retries for 3.5 minutes
    assert not root.exists() and not data_dir.exists()  # no root, lock file or tfds folder


def test_prepare_removes_tfds_empty_folders_when_a_download_fails(tmp_path: Path) -> None:
    """A (wrong) file in the manual folder: no host is asked, tfds takes the file and refuses its
    checksum; the empty folders tfds made in its data folder are gone."""
    pytest.importorskip("tensorflow_datasets", reason="tensorflow-datasets not installed (pip install '.[prepare]')")
    manual, data_dir = tmp_path / "manual", tmp_path / "tfds"
    manual.mkdir()
    (manual / "dtd-r1.0.1.tar.gz").write_bytes(b"not the archive")
    args = [
        "--root",
        str(tmp_path / "vtab"),
        "--tasks",
        "dtd",
        "--data-dir",
        str(data_dir),
        "--manual-dir",
        str(manual),
    ]
    proc = run("vtab-prepare", *args, env=_offline_env())
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "error: dtd: tfds could not download and prepare dtd:3.*.* (NonMatchingChecksumError" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.splitlines()[-1] == "0 built, 0 already there, 1 not built: dtd."
    assert not data_dir.exists()
    assert os.listdir(tmp_path / "vtab") == [".dtd.lock"]  # no task folder, no partial one; the lock stays


# -- (12) a root under a regular file ----------------------------------------------------------------
def test_prepare_root_or_data_dir_under_a_file_is_one_line(tmp_path: Path) -> None:
    afile = tmp_path / "somefile"
    afile.write_text("x")
    proc = run("vtab-prepare", "--root", str(afile / "vtab"), "--tasks", "dtd")
    where = re.escape(str(afile))
    assert_one_line(
        proc, rf"^error: Cannot create the folder '{where}/vtab': '{where}' is not a folder; pass another --root\."
    )
    proc = run("vtab-prepare", "--root", str(tmp_path / "vtab"), "--tasks", "dtd", "--data-dir", str(afile))
    assert_one_line(proc, rf"^error: --data-dir '{where}' is an existing file; name a folder")
    assert os.listdir(tmp_path) == ["somefile"]  # no root, no folder, no lock file
