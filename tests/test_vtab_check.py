"""vtab-check (data/check.py) on hand-made VTAB-1K folders: no TensorFlow needed."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from petl_lightning.data.check import check_main, check_task
from petl_lightning.data.vtab_splits import VTAB_SOURCES

KITTI_TEST = VTAB_SOURCES["kitti"].test_size  # 711: the smallest VTAB-1K test list


def make_vtab_task(root: Path, task: str = "kitti") -> Path:
    """A task folder with VTAB-1K's exact list sizes; every image is a distinct 4x4 PNG."""
    task_dir = root / task
    sizes = {"train800": 800, "val200": 200, "test": VTAB_SOURCES[task].test_size}
    lists: dict[str, list[str]] = {}
    k = 0
    for split, n in sizes.items():
        (task_dir / "images" / split).mkdir(parents=True)
        lines = []
        for i in range(n):
            pixels = np.full((4, 4, 3), [k % 256, k // 256, 7], dtype=np.uint8)
            Image.fromarray(pixels).save(task_dir / f"images/{split}/{i:06d}.png")
            lines.append(f"images/{split}/{i:06d}.png {k % 4}")
            k += 1
        lists[split] = lines
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for split, lines in lists.items():
        (task_dir / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return task_dir


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vtab")
    make_vtab_task(root)
    return root


def test_a_sound_folder_passes(clean_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert check_task(clean_root / "kitti", "kitti") == []
    assert check_main(["--root", str(clean_root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"kitti: ok (800/200/1000/{KITTI_TEST} images in train800.txt, val200.txt, train800val200.txt, test.txt)",
        "vtab-check: all 1 task folders are sound",
    ]


def test_catches_a_deleted_image_a_train_test_duplicate_and_a_bad_label(
    clean_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task_dir = tmp_path / "kitti"
    shutil.copytree(clean_root / "kitti", task_dir)
    (task_dir / "images/val200/000017.png").unlink()
    shutil.copyfile(task_dir / "images/train800/000005.png", task_dir / "images/test/000100.png")
    lines = (task_dir / "test.txt").read_text().splitlines()
    lines[41] = "images/test/000041.png 4"  # kitti has 4 classes
    (task_dir / "test.txt").write_text("\n".join(lines) + "\n")
    assert check_main(["--root", str(tmp_path)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "kitti: test.txt:42: label 4 is outside [0, 4)",
        "kitti: val200.txt:18: image images/val200/000017.png is missing",
        "kitti: test.txt:101: test image images/test/000100.png has the same bytes as training image "
        "images/train800/000005.png (train800.txt:6)",
        "vtab-check: 1 of 1 task folders have problems",
    ]


def test_sizes_lists_extra_images_and_manifest(clean_root: Path, tmp_path: Path) -> None:
    task_dir = tmp_path / "kitti"
    shutil.copytree(clean_root / "kitti", task_dir)
    test_lines = (task_dir / "test.txt").read_text().splitlines()
    (task_dir / "test.txt").write_text("\n".join(test_lines[:-1] + [test_lines[0]]) + "\n")  # 711 lines, one twice
    val_lines = (task_dir / "val200.txt").read_text().splitlines()
    (task_dir / "val200.txt").write_text("\n".join(val_lines[:-1]) + "\n")
    (task_dir / "manifest.json").write_text('{"sha256": {"train800.txt": "0000"}}')
    assert check_task(task_dir, "kitti") == [
        "kitti: val200.txt lists 199 images; VTAB-1K's val200 has 200",
        "kitti: train800val200.txt is not train800.txt + val200.txt (0 of their lines are not in it, 1 of its "
        "lines are in neither)",
        f"kitti: image images/test/{KITTI_TEST - 1:06d}.png is in no list file",
        "kitti: train800.txt is not the file manifest.json describes (sha256 differs)",
    ]


def test_a_train_path_listed_in_test_and_a_malformed_list(clean_root: Path, tmp_path: Path) -> None:
    task_dir = tmp_path / "kitti"
    shutil.copytree(clean_root / "kitti", task_dir)
    lines = (task_dir / "test.txt").read_text().splitlines()
    lines[0] = "images/train800/000003.png 3"
    (task_dir / "test.txt").write_text("\n".join(lines) + "\n")
    (task_dir / "train800.txt").write_text("images/train800/000000.png zero\n")
    problems = check_task(task_dir, "kitti")
    assert (
        problems[0] == "kitti: train800.txt:1: expected '<relative image path> <integer label>', got "
        "'images/train800/000000.png zero'."
    )
    assert "kitti: test.txt:1: test image images/train800/000003.png is also listed in train800val200.txt:4" in problems
    assert "kitti: image images/test/000000.png is in no list file" in problems


def test_bad_input_exits_2_and_missing_folders_are_problems(
    clean_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert check_main(["--root", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert check_main(["--root", str(tmp_path)]) == 2  # no VTAB-1K task folder in it
    assert "No VTAB-1K task folder" in capsys.readouterr().err
    assert check_main(["--root", str(clean_root), "--tasks", "kitty"]) == 2
    assert "Unknown VTAB-1K task 'kitty'" in capsys.readouterr().err
    assert check_main(["--root", str(clean_root), "--tasks", "kitti,dtd"]) == 1
    assert f"dtd: task folder {clean_root / 'dtd'} is missing" in capsys.readouterr().out
