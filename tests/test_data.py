"""VTAB1kDataModule: layout, protocols, transforms, determinism and every bad-input error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from petl_lightning.data.vtab import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VTAB_TASKS,
    EpochShuffleSampler,
    VTAB1kDataModule,
    resolve_normalization,
    tasks_in_group,
)
from petl_lightning.errors import DataError


def make_task(
    root: Path, task: str = "dtd", classes: int = 3, per_split: int = 4, size: int = 20, classes_txt: bool = False
) -> Path:
    """A small task folder in the VTAB-1K layout with random RGB images."""
    rng = np.random.default_rng(0)
    task_dir = root / task
    (task_dir / "images").mkdir(parents=True, exist_ok=True)
    lists: dict[str, list[str]] = {}
    for split in ("train800", "val200", "test"):
        lines = []
        for i in range(per_split):
            name = f"images/{split}_{i}.jpg"
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(task_dir / name)
            lines.append(f"{name} {i % classes}")
        lists[split] = lines
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for split, lines in lists.items():
        (task_dir / f"{split}.txt").write_text("\n".join(lines) + "\n")
    if classes_txt:
        (task_dir / "classes.txt").write_text("\n".join(f"c{i}" for i in range(classes)) + "\n")
    return task_dir


def test_registry_has_the_19_tasks_in_three_groups() -> None:
    assert len(VTAB_TASKS) == 19
    assert [len(tasks_in_group(g)) for g in ("natural", "specialized", "structured")] == [7, 4, 8]
    assert VTAB_TASKS["cifar"].num_classes == 100 and VTAB_TASKS["sun397"].num_classes == 397
    with pytest.raises(DataError, match="Unknown VTAB-1K group"):
        tasks_in_group("natrual")


def test_protocols_pick_the_right_lists(tmp_path: Path) -> None:
    make_task(tmp_path, "dtd")
    dm = VTAB1kDataModule(str(tmp_path), "dtd", img_size=32, batch_size=3, num_workers=0)
    assert dm.num_classes == 47 and dm.group == "natural"
    assert len(dm.train_dataloader().dataset) == 8 and dm.val_dataloader() == []
    assert len(dm.test_dataloader().dataset) == 4
    tv = VTAB1kDataModule(str(tmp_path), "dtd", protocol="train_val", img_size=32, num_workers=0)
    assert len(tv.train_dataloader().dataset) == 4 and len(tv.val_dataloader().dataset) == 4
    on_test = VTAB1kDataModule(str(tmp_path), "dtd", img_size=32, num_workers=0, val_on_test=True)
    assert on_test.val_split == "test"


def test_transform_is_the_petl_one(tmp_path: Path) -> None:
    task_dir = make_task(tmp_path, "dtd", size=20)
    Image.new("RGB", (20, 30), (255, 0, 0)).save(task_dir / "images/test_0.jpg")
    dm = VTAB1kDataModule(str(tmp_path), "dtd", img_size=48, num_workers=0)
    x, y = dm.dataset("test")[0]
    assert x.shape == (3, 48, 48) and y == 0
    expected = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x.mean(dim=(1, 2)), expected, atol=0.05, rtol=0)


def test_normalization_comes_from_the_backbone_cfg(tmp_path: Path) -> None:
    half, imagenet = ((0.5,) * 3, (0.5,) * 3), (IMAGENET_MEAN, IMAGENET_STD)
    assert resolve_normalization("backbone", "vit_base_patch16_224.orig_in21k") == half  # DyT's code
    assert resolve_normalization("backbone", "vit_small_patch14_dinov2") == imagenet
    assert resolve_normalization("backbone", None) == imagenet  # the rule without a backbone name ...
    assert resolve_normalization("backbone", "vit_base_patch16_224_in21k") == imagenet  # ... or a timm cfg
    assert resolve_normalization("imagenet", "vit_base_patch16_224.orig_in21k") == imagenet  # RepAdapter, ARC
    assert resolve_normalization([[0.1, 0.2, 0.3], [1, 2, 3]], None) == ((0.1, 0.2, 0.3), (1.0, 2.0, 3.0))
    for bad in ("imagnet", [[0.5, 0.5], [0.5]], [[0.5], [0.0]], [0.5, 0.5, 0.5], [[0.5], [0.5], [0.5]]):
        with pytest.raises(DataError, match="normalization"):
            resolve_normalization(bad, None)
    task_dir = make_task(tmp_path, "dtd", size=20)
    Image.new("RGB", (20, 20), (255, 0, 0)).save(task_dir / "images/test_0.jpg")
    dm = VTAB1kDataModule(
        str(tmp_path), "dtd", img_size=32, num_workers=0, backbone_name="vit_base_patch16_224.orig_in21k"
    )
    assert (dm.mean, dm.std) == half
    torch.testing.assert_close(
        dm.dataset("test")[0][0].mean(dim=(1, 2)), torch.tensor([1.0, -1.0, -1.0]), atol=0.05, rtol=0
    )


def test_cli_links_the_models_backbone_into_the_normalisation(tmp_path: Path) -> None:
    from petl_lightning.cli import PETLCLI

    make_task(tmp_path, "digits", classes=10, classes_txt=True)
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "linear_probe.yaml"
    args = [
        "-c",
        str(recipe),
        "--model.init_args.model_name=vit_tiny_patch16_224",  # its timm cfg: mean = std = 0.5
        "--model.init_args.pretrained=false",
        "--data.init_args.task=digits",
        f"--data.init_args.root={tmp_path}",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path / 'runs'}",
    ]
    cli = PETLCLI(args=args, run=False)
    assert cli.datamodule.hparams.backbone_name == "vit_tiny_patch16_224"
    assert (cli.datamodule.mean, cli.datamodule.std) == ((0.5,) * 3, (0.5,) * 3)
    cli = PETLCLI(args=[*args, "--data.init_args.normalization=imagenet"], run=False)
    assert (cli.datamodule.mean, cli.datamodule.std) == (IMAGENET_MEAN, IMAGENET_STD)


def test_prepare_defers_the_checks_of_a_missing_task_to_setup(tmp_path: Path) -> None:
    dm = VTAB1kDataModule(str(tmp_path), "eurosat", prepare=True, num_workers=0)
    assert dm.num_classes == 10 and dm.sources == {}
    make_task(tmp_path, "eurosat", classes=10)  # as prepare_data would
    dm.prepare_data()  # the folder is there: nothing to build, tfds is not imported
    dm.setup("fit")
    assert len(dm.train_dataloader().dataset) == 8
    with pytest.raises(DataError, match="Task folder .*dtd.* is missing.*prepare_data\\(\\) builds it"):
        VTAB1kDataModule(str(tmp_path), "dtd", prepare=True).setup("fit")


def test_custom_task_class_count(tmp_path: Path) -> None:
    make_task(tmp_path, "mytask", classes=3, classes_txt=True)
    assert VTAB1kDataModule(str(tmp_path), "mytask", num_workers=0).num_classes == 3
    make_task(tmp_path, "nolist", classes=2)
    dm = VTAB1kDataModule(str(tmp_path), "nolist", num_workers=0)
    assert dm.num_classes == 2 and dm.group == "custom"


def test_shuffle_depends_only_on_seed_and_epoch() -> None:
    a, b = EpochShuffleSampler(50, seed=3), EpochShuffleSampler(50, seed=3)
    torch.manual_seed(1)
    first = list(a)
    torch.manual_seed(2)
    assert list(b) == first
    b.set_epoch(1)
    assert list(b) != first and sorted(b) == list(range(50))


def test_cached_images_equal_decoded_ones(tmp_path: Path) -> None:
    make_task(tmp_path, "dtd")
    dm = VTAB1kDataModule(str(tmp_path), "dtd", img_size=32, num_workers=0, cache=True)
    ds = dm.dataset("test")
    first = ds[1][0]
    assert 1 in ds.cache
    torch.testing.assert_close(ds[1][0], first)


# -- bad input ---------------------------------------------------------------------------------------
def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data root .* does not exist.*--data.root"):
        VTAB1kDataModule(str(tmp_path / "nowhere"), "dtd")


def test_missing_task_folder_of_a_vtab_task(tmp_path: Path) -> None:
    make_task(tmp_path, "cifar")
    with pytest.raises(DataError, match="Task folder .*dtd.* is missing.*holds only: cifar"):
        VTAB1kDataModule(str(tmp_path), "dtd")


def test_unknown_task_suggests_names(tmp_path: Path) -> None:
    make_task(tmp_path, "cifar")
    with pytest.raises(DataError, match="Unknown task 'oxford_flowers'.*oxford_flowers102"):
        VTAB1kDataModule(str(tmp_path), "oxford_flowers")


def test_missing_list_file_names_the_expected_files(tmp_path: Path) -> None:
    task_dir = make_task(tmp_path, "dtd")
    (task_dir / "train800val200.txt").unlink()
    with pytest.raises(DataError, match="lacks train800val200.txt.*train800.txt, val200.txt"):
        VTAB1kDataModule(str(tmp_path), "dtd")
    VTAB1kDataModule(str(tmp_path), "dtd", protocol="train_val", num_workers=0)  # does not need it


def test_missing_image_names_file_and_line(tmp_path: Path) -> None:
    task_dir = make_task(tmp_path, "dtd")
    (task_dir / "images/test_2.jpg").unlink()
    with pytest.raises(DataError, match=r"test.txt:3: image .*test_2.jpg not found"):
        VTAB1kDataModule(str(tmp_path), "dtd")


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    task_dir = make_task(tmp_path, "dtd")
    (task_dir / "images/test_1.jpg").write_bytes(b"\xff\xd8 garbage")
    with pytest.raises(DataError, match=r"test.txt:2: image .*test_1.jpg is corrupt"):
        VTAB1kDataModule(str(tmp_path), "dtd", check_images="header")
    dm = VTAB1kDataModule(str(tmp_path), "dtd", num_workers=0)  # found when loaded, same message
    with pytest.raises(DataError, match=r"test.txt:2: image .*test_1.jpg cannot be read"):
        dm.dataset("test")[1]


def test_label_out_of_range(tmp_path: Path) -> None:
    task_dir = make_task(tmp_path, "eurosat")
    with (task_dir / "test.txt").open("a") as f:
        f.write("images/test_0.jpg 10\n")
    with pytest.raises(DataError, match=r"test.txt:5: label 10 is outside \[0, 10\)"):
        VTAB1kDataModule(str(tmp_path), "eurosat")


def test_malformed_line(tmp_path: Path) -> None:
    task_dir = make_task(tmp_path, "dtd")
    (task_dir / "test.txt").write_text("images/test_0.jpg cat\n")
    with pytest.raises(DataError, match=r"test.txt:1: expected '<relative image path> <integer label>'"):
        VTAB1kDataModule(str(tmp_path), "dtd")


def test_real_dtd10_assets(dtd10_root: Path) -> None:
    dm = VTAB1kDataModule(str(dtd10_root), "dtd10", img_size=56, num_workers=0, check_images="header")
    assert dm.num_classes == 10 and len(dm.dataset("train800val200")) == 1000 and len(dm.dataset("test")) == 200
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape[1:] == (3, 56, 56) and int(y.max()) < 10
