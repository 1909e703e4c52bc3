"""Your own images through the console script, each command a new process: every method's recipe
on an image folder (fit, test, predict from ``last``), the image folder and the list layout giving
equal results on the same images, an augmented and mixed fit resuming exactly, and bad input in one
line with nothing written."""

from __future__ import annotations

import csv
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from cli_helpers import ROOT, TINY_MODEL, assert_one_line_and_nothing_written, fit_interrupted, metric, run

pytestmark = pytest.mark.slow

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets" / "vtab1k" / "dtd10"
RECIPES = ("repadapter", "dyt", "arc", "dyn_adapter", "linear_probe")


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """dtd10 (1,200 real images, 10 classes) written as an image folder (``train/`` from
    train800val200, ``test/``), and the same files in the list layout, listed in the folder's order."""
    if not ASSETS.is_dir():
        pytest.skip(f"{ASSETS} is absent")
    base = tmp_path_factory.mktemp("dtd10")
    names = [ln.strip() for ln in (ASSETS / "classes.txt").read_text().splitlines() if ln.strip()]
    folder, task = base / "folder" / "dtd10", base / "lists" / "dtd10"
    for split, listed in (("train", "train800val200.txt"), ("test", "test.txt")):
        for line in (ASSETS / listed).read_text().splitlines():
            rel, label = line.rsplit(maxsplit=1)
            target = folder / split / f"{int(label):02d}_{names[int(label)]}" / Path(rel).name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ASSETS / rel, target)
        ordered = sorted((folder / split).rglob("*.jpg"))
        lines = [f"{p.relative_to(folder.parent).as_posix()} {int(p.parent.name[:2])}" for p in ordered]
        task.mkdir(parents=True, exist_ok=True)
        (task / f"{'train800val200' if split == 'train' else 'test'}.txt").write_text(
            "\n".join(f"../../folder/{ln}" for ln in lines) + "\n"
        )
    small = base / "small" / "dtd10"  # 20 training and 5 test images per class: for the slower checks
    for split, keep in (("train", 20), ("test", 5)):
        for class_dir in sorted((folder / split).iterdir()):
            for image in sorted(class_dir.iterdir())[:keep]:
                (small / split / class_dir.name).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(image, small / split / class_dir.name / image.name)
    return {"folder": folder, "lists": base / "lists", "small": small}


# A first exit after one of four blocks: cheap enough for Dyn-Adapter's default budget 0.5.
DYN_ADAPTER = (
    "--model.init_args.exits.blocks", "[1]", "--model.init_args.exits.hidden", "[0]",
    "--model.init_args.model_kwargs", "{depth: 4}",
)  # fmt: skip


def tiny(recipe: str, out: Path, *data: str) -> list[str]:
    """``recipe`` on a random two-block ViT-Ti at 32 px, one epoch, batch 50, under ``out``."""
    extra = {
        "dyn_adapter": DYN_ADAPTER,
        "linear_probe": (),
    }.get(recipe, ())
    return [
        "-c", str(ROOT / "recipes" / f"{recipe}.yaml"), *data,
        "--data.init_args.img_size", "32", "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "50",
        *TINY_MODEL, "--model.init_args.model_kwargs", "{depth: 2}", *extra,
        "--trainer.max_epochs", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(out),
    ]  # fmt: skip


def folder_args(root: Path, *more: str) -> tuple[str, ...]:
    return ("--data", "ImageFolderDataModule", "--data.init_args.root", str(root), *more)


def fit_then_test(args: list[str]) -> float:
    fit = run("fit", *args, timeout=300)
    assert fit.returncode == 0, fit.stderr[-3000:]
    test = run("test", *args, "--ckpt_path", "last", timeout=300)
    assert test.returncode == 0, test.stderr[-3000:]
    return metric(test.stdout, "test/acc")


@pytest.mark.parametrize("recipe", ["repadapter", "dyt"])
def test_an_image_folder_trains_as_the_list_layout_of_the_same_images(
    recipe: str, twins: dict[str, Path], tmp_path: Path
) -> None:
    """Same images, same order, same seed: the same test accuracy from both layouts."""
    lists = ("--data.init_args.root", str(twins["lists"]), "--data.init_args.task", "dtd10")
    from_lists = fit_then_test(tiny(recipe, tmp_path / "lists", *lists))
    from_folder = fit_then_test(tiny(recipe, tmp_path / "folder", *folder_args(twins["folder"])))
    assert from_folder == pytest.approx(from_lists, abs=1e-6)
    a = torch.load(tmp_path / "lists" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "folder" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    for key, value in a["state_dict"].items():
        if value.is_floating_point():
            torch.testing.assert_close(b["state_dict"][key], value, atol=1e-6, rtol=0)


@pytest.mark.parametrize("recipe", ["arc", "dyn_adapter", "linear_probe"])
def test_every_recipe_fits_tests_and_predicts_an_image_folder(
    recipe: str, twins: dict[str, Path], tmp_path: Path
) -> None:
    """The recipe's VTAB-only data keys (task, protocol) do not get in the way; Dyn-Adapter
    calibrates its exits on a held-out 20 % of train/."""
    args = tiny(recipe, tmp_path, *folder_args(twins["small"], "--data.init_args.val_fraction", "0.2"))
    accuracy = fit_then_test(args)
    assert 0.0 <= accuracy <= 1.0
    predict = run("predict", *args, "--ckpt_path", "last", timeout=300)
    assert predict.returncode == 0, predict.stderr[-3000:]
    with open(tmp_path / "predictions" / "test.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 50 and rows[0]["path"].endswith(".jpg")
    assert {r["class_name"] for r in rows} <= {p.name for p in (twins["small"] / "train").iterdir()}


def test_augmented_mixed_fit_resumes_exactly(twins: dict[str, Path], tmp_path: Path) -> None:
    """RandAugment, random erasing and mixup/CutMix, interrupted by Ctrl-C after the first of two
    epochs and resumed: the same weights as an uninterrupted run."""
    augment = (
        "--data.init_args.augmentation", "{auto_augment: rand-m9-mstd0.5-inc1, re_prob: 0.25}",
        "--model.init_args.mixing", "{mixup_alpha: 0.8, cutmix_alpha: 1.0}",
        "--model.init_args.label_smoothing", "0.1", "--trainer.max_epochs", "2", "--data.init_args.batch_size", "20",
    )  # fmt: skip

    def args(out: Path) -> list[str]:
        return [*tiny("repadapter", out, *folder_args(twins["small"])), *augment]

    straight = run("fit", *args(tmp_path / "straight"), timeout=400)
    assert straight.returncode == 0, straight.stderr[-3000:]
    step = fit_interrupted(args(tmp_path / "killed"), tmp_path / "killed", tmp_path / "cwd")
    assert 0 < step < 20  # 10 steps an epoch
    resumed = run("fit", *args(tmp_path / "killed"), "--ckpt_path", "last", timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (
        torch.load(tmp_path / run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        for run_dir in ("straight", "killed")
    )
    assert a["global_step"] == b["global_step"] == 20
    worst = max(float((a["state_dict"][k] - b["state_dict"][k]).abs().max()) for k in a["state_dict"])
    assert worst <= 1e-6, worst


def test_bad_own_data_is_one_line_with_nothing_written(twins: dict[str, Path], tmp_path: Path) -> None:
    """Empty class folder, unreadable image, class only in test, too many shots, missing JSON,
    unknown column of a Hugging Face dataset."""
    src = twins["small"]

    def broken(name: str) -> Path:
        root = tmp_path / name / "dtd10"
        shutil.copytree(src, root)
        return root

    empty = broken("empty")
    for p in (empty / "train" / "03_bubbly").iterdir():
        p.unlink()
    unreadable = broken("unreadable")
    bad = sorted((unreadable / "train" / "06_cobwebbed").iterdir())[3]
    bad.write_bytes(b"\x00" * 64)
    only_test = broken("only_test")
    shutil.copytree(only_test / "test" / "00_banded", only_test / "test" / "10_zigzagged")
    fgvc = tmp_path / "fgvc" / "cub"
    fgvc.mkdir(parents=True)
    (fgvc / "train.json").write_text(json.dumps({"a.jpg": 1}))
    cases = [
        (folder_args(empty), r"Class folder .*03_bubbly' holds no images"),
        (folder_args(unreadable), rf"image {bad} cannot be read"),
        (folder_args(only_test), r"Class folder\(s\) 10_zigzagged of test/ are not in train/"),
        (folder_args(src, "--data.init_args.shots", "200"), r"shots=200: class 0 \('00_banded'\) has only 20 "),
        (
            ("--data", "FGVCDataModule", "--data.init_args.root", str(fgvc.parent), "--data.init_args.task", "cub"),
            r"val.json' is missing: an FGVC task folder holds train.json, val.json and test.json",
        ),
    ]
    try:
        import datasets
    except ImportError:  # the hf extra: its own tests say so; the other cases still run
        datasets = None
    if datasets is not None:
        rows = {"image": [str(p) for p in sorted((src / "test").rglob("*.jpg"))][:4], "label": [0, 1, 0, 1]}
        split = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
        datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "hf"))
        hf = ("--data", "HFImageDataModule", "--data.init_args.path", str(tmp_path / "hf"))
        cases.append(
            (
                (*hf, "--data.init_args.label_column", "labels"),
                r"has no column 'labels'; its columns are image, label. Pass --data.init_args.label_column",
            )
        )
    outs = [tmp_path / f"out{i}" for i in range(len(cases))]
    with ThreadPoolExecutor(3) as pool:  # each refusal is mostly start-up: three at a time
        procs = list(
            pool.map(lambda i: run("fit", *tiny("repadapter", outs[i], *cases[i][0]), timeout=300), range(len(cases)))
        )
    for proc, out, (_, message) in zip(procs, outs, cases):
        assert_one_line_and_nothing_written(proc, message, out)
