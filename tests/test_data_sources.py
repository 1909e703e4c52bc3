"""Your own images: the image-folder and FGVC sources, few-shot draws, seeded augmentation and
mixup's soft-target loss (in process; the console-script runs are in test_data_sources_cli.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from petl_lightning.data.fgvc import FGVC_TASKS, FGVCDataModule
from petl_lightning.data.folder import ImageFolderDataModule
from petl_lightning.data.transforms import Augmentation
from petl_lightning.errors import ConfigError, DataError
from petl_lightning.tasks.mixing import ClassificationLoss, Mixing, mix_batch


def image(path: Path, seed: int, size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


def folder(root: Path, classes: tuple[str, ...] = ("cat", "dog", "eel"), per_class: int = 5) -> Path:
    """``root/{train,test}/<class>/<n>.png`` with random images."""
    for s, split in enumerate(("train", "test")):
        for c, name in enumerate(classes):
            for i in range(per_class):
                image(root / split / name / f"{i:02d}.png", 100 * s + 10 * c + i)
    return root


def dm(root: Path, **kwargs) -> ImageFolderDataModule:
    return ImageFolderDataModule(str(root), img_size=16, num_workers=0, **kwargs)


# -- image folders ---------------------------------------------------------------------------------
def test_image_folder_classes_are_the_sorted_train_folders_in_every_split(tmp_path: Path) -> None:
    data = dm(folder(tmp_path / "pets"))
    assert data.task == "pets" and data.class_names == ["cat", "dog", "eel"] and data.num_classes == 3
    assert data.val_split is None  # no val/ and no val_fraction: no validation
    for split in ("train", "test"):
        source = data.source(split)
        assert source.labels == [0] * 5 + [1] * 5 + [2] * 5
        assert [Path(source.name(i)).parent.name for i in range(15)] == ["cat"] * 5 + ["dog"] * 5 + ["eel"] * 5


def test_val_fraction_holds_out_the_same_images_per_class_for_a_seed(tmp_path: Path) -> None:
    root = folder(tmp_path / "pets", per_class=10)
    a, b, c = dm(root, val_fraction=0.2), dm(root, val_fraction=0.2), dm(root, val_fraction=0.2, seed=1)
    val = [a.source("val").name(i) for i in range(len(a.source("val")))]
    assert a.val_split == "val" and a.source("val").labels == [0, 0, 1, 1, 2, 2]
    assert val == [b.source("val").name(i) for i in range(6)]
    assert val != [c.source("val").name(i) for i in range(6)]
    assert not set(val) & {a.source("train").name(i) for i in range(24)}  # disjoint, 24 + 6 = 30


def test_a_val_folder_is_used_as_it_is(tmp_path: Path) -> None:
    root = folder(tmp_path / "pets")
    for c in ("cat", "dog", "eel"):
        image(root / "val" / c / "v.png", 7)
    assert len(dm(root).source("val")) == 3
    with pytest.raises(DataError, match=r"val_fraction=0.2 holds out part of train/, but .*val' exists"):
        dm(root, val_fraction=0.2)


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda r: [p.unlink() for p in (r / "train" / "dog").iterdir()], r"Class folder .*train/dog' holds no images"),
        (lambda r: image(r / "test" / "fox" / "0.png", 1), r"Class folder\(s\) fox of test/ are not in train/"),
        (
            lambda r: [p.unlink() for p in (r / "test" / "eel").iterdir()] and (r / "test" / "eel").rmdir(),
            r"test/ has no folder for class\(es\) eel of train/",
        ),
        (lambda r: [p.unlink() for p in (r / "test").rglob("*.png")] and None, r"holds no images"),
    ],
)
def test_bad_image_folders_are_one_line(tmp_path: Path, break_it, message: str) -> None:
    root = folder(tmp_path / "pets")
    break_it(root)
    with pytest.raises(DataError, match=message):
        dm(root)


def test_missing_splits_and_unreadable_images_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"Image folder root .*nowhere' does not exist"):
        dm(tmp_path / "nowhere")
    (tmp_path / "flat" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"has no test/ folder .*An image folder holds train/<class>/<image>"):
        dm(tmp_path / "flat")
    root = folder(tmp_path / "pets")
    bad = root / "train" / "dog" / "03.png"
    bad.write_text("not an image")
    with pytest.raises(DataError, match=rf"image {bad} is corrupt or not an image"):
        dm(root, check_images="header")
    loaded = dm(root)  # the default check only sees that files exist; loading names the bad one
    with pytest.raises(DataError, match=rf"^image {bad} cannot be read"):
        loaded.dataset("train")[8]


# -- FGVC ------------------------------------------------------------------------------------------
def fgvc_task(root: Path, task: str, per_class: int = 2, labels_from: int = 1) -> Path:
    """A mock FGVC task: the benchmark's class count (labels from ``labels_from``, as the JSON files
    number them), ``per_class`` tiny images per class in train, one in val and test."""
    info = FGVC_TASKS[task]
    task_dir = root / task
    for split, n in (("train", per_class), ("val", 1), ("test", 1)):
        entries = {}
        for c in range(info.num_classes):
            for i in range(n):
                rel = f"c{c:03d}/{split}_{i}.png"
                image(task_dir / info.image_dir / rel, c * 10 + i, size=4)
                entries[rel] = c + labels_from
        (task_dir / f"{split}.json").write_text(json.dumps(entries))
    return task_dir


@pytest.fixture(scope="module")
def fgvc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fgvc")
    for task in ("cub", "oxford_flowers"):
        fgvc_task(root, task, per_class=3)
    return root


def test_fgvc_tasks_load_with_the_benchmarks_class_counts(fgvc_root: Path) -> None:
    for task, classes in (("cub", 200), ("oxford_flowers", 102)):
        data = FGVCDataModule(str(fgvc_root), task, img_size=8, num_workers=0)
        assert data.num_classes == classes and data.group == "fgvc"
        assert len(data.source("train")) == classes * 4 and data.val_split is None  # train + val
        assert min(data.source("test").labels) == 0 and max(data.source("test").labels) == classes - 1  # remapped
    selecting = FGVCDataModule(str(fgvc_root), "cub", protocol="train_val", img_size=8, num_workers=0)
    assert len(selecting.source("train")) == 600 and selecting.val_split == "val"
    assert len(FGVCDataModule(str(fgvc_root), "cub", protocol="train_test", img_size=8).source("train")) == 600


@pytest.mark.parametrize("shots", [1, 2])
def test_few_shot_draws_k_per_class_the_same_for_a_seed(fgvc_root: Path, shots: int) -> None:
    def drawn(seed: int) -> list[str]:
        data = FGVCDataModule(str(fgvc_root), "cub", "train_test", img_size=8, num_workers=0, shots=shots, seed=seed)
        train = data.source("train")
        assert np.bincount(train.labels).tolist() == [shots] * 200
        return [train.name(i) for i in range(len(train))]

    assert drawn(0) == drawn(0) and drawn(0) != drawn(1)


def test_bad_fgvc_input_is_one_line(fgvc_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"shots=4: class 0 has only 3 training images; lower shots to 3"):
        FGVCDataModule(str(fgvc_root), "cub", "train_test", img_size=8, shots=4)
    with pytest.raises(DataError, match=r"Unknown FGVC task 'cubs'. Did you mean 'cub'"):
        FGVCDataModule(str(fgvc_root), "cubs")
    with pytest.raises(DataError, match=r"FGVC task folder .*stanford_dogs' is missing .*holds: cub, oxford_flowers"):
        FGVCDataModule(str(fgvc_root), "stanford_dogs")
    task_dir = fgvc_task(tmp_path, "oxford_flowers", per_class=1)
    (task_dir / "val.json").unlink()
    with pytest.raises(DataError, match=r"val.json' is missing: an FGVC task folder holds train.json, val.json"):
        FGVCDataModule(str(tmp_path), "oxford_flowers")
    train = json.loads((task_dir / "train.json").read_text())
    (task_dir / "train.json").write_text(json.dumps(dict(list(train.items())[:-1])))  # one class fewer
    with pytest.raises(DataError, match=r"Oxford Flowers has 102 classes but train.json .* label 101"):
        FGVCDataModule(str(tmp_path), "oxford_flowers", protocol="train_test")


# -- augmentation ----------------------------------------------------------------------------------
AUG = Augmentation(auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5, color_jitter=0.4)


def test_augmentation_depends_on_seed_epoch_and_image_only(tmp_path: Path) -> None:
    root = folder(tmp_path / "pets")
    ds = dm(root, augmentation=AUG).dataset("train")
    torch.manual_seed(1)
    first = ds[(3, 0)][0]
    torch.manual_seed(2)  # the global generators do not matter ...
    np.random.seed(5)
    assert torch.equal(ds[(3, 0)][0], first)
    assert not torch.equal(ds[(3, 1)][0], first)  # ... the epoch does
    assert not torch.equal(dm(root, augmentation=AUG, seed=1).dataset("train")[(3, 0)][0], first)
    state = torch.get_rng_state()
    ds[(4, 0)]
    assert torch.equal(torch.get_rng_state(), state)  # training's own draws are untouched
    evaluation = dm(root, augmentation=AUG).dataset("test")
    assert torch.equal(evaluation[2][0], evaluation[2][0])  # evaluation images are not augmented


def test_augmented_batches_do_not_depend_on_the_worker_count(tmp_path: Path) -> None:
    root = folder(tmp_path / "pets")

    def batches(workers: int, epoch: int) -> list[torch.Tensor]:
        loader = ImageFolderDataModule(
            str(root), img_size=16, num_workers=workers, batch_size=4, augmentation=AUG
        ).train_dataloader()
        loader.sampler.set_epoch(epoch)
        return [x for x, _ in loader]

    zero = batches(0, 1)
    assert all(torch.equal(a, b) for a, b in zip(zero, batches(2, 1), strict=True))
    assert not torch.equal(zero[0], batches(0, 2)[0])


def test_bad_augmentation_options_are_one_line(tmp_path: Path) -> None:
    root = folder(tmp_path / "pets")
    with pytest.raises(DataError, match=r"auto_augment='bogus' is not a timm policy \(Unknown AA policy bogus\)"):
        dm(root, augmentation=Augmentation(auto_augment="bogus"))
    with pytest.raises(DataError, match=r"augmentation.re_prob must lie in \[0, 1\]"):
        Augmentation(re_prob=2)
    with pytest.raises(DataError, match="cache keeps transformed images, but augmentation"):
        dm(root, augmentation=AUG, cache=True)
    with pytest.raises(DataError, match=r"eval_crop must be 'none', 'backbone' or a crop_pct"):
        dm(root, eval_crop=1.5)


def test_eval_crop_uses_the_backbones_crop_pct(tmp_path: Path) -> None:
    root = folder(tmp_path / "pets")
    assert dm(root, eval_crop="backbone", backbone_name="vit_base_patch16_224.augreg_in21k").crop_pct == 0.9
    assert dm(root).crop_pct is None and dm(root, eval_crop=0.875).crop_pct == 0.875
    assert dm(root, eval_crop=0.5).dataset("test")[0][0].shape == (3, 16, 16)


# -- mixup / CutMix --------------------------------------------------------------------------------
def test_mixup_loss_is_the_soft_target_formula_on_a_hand_built_batch() -> None:
    """Images 0..3 are constant; batch mode mixes image i with image 3 - i by one lam, and the
    targets are the label-smoothed one-hots mixed by that lam."""
    classes, smoothing = 5, 0.1
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 8, 8).clone()
    y = torch.tensor([0, 3, 1, 4])
    np.random.seed(0)
    mixed, target = mix_batch(Mixing(mixup_alpha=0.8).mixer(classes, smoothing), x.clone(), y)
    lam = 1 - float(mixed[0, 0, 0, 0]) / 3.0  # image 0 is 0s and image 3 is 3s: lam * 0 + (1 - lam) * 3
    assert 0 < lam < 1
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))
    one_hot = torch.full((4, classes), smoothing / classes)
    one_hot[torch.arange(4), y] += 1 - smoothing
    torch.testing.assert_close(target, lam * one_hot + (1 - lam) * one_hot.flip(0))
    logits = torch.randn(4, classes, generator=torch.Generator().manual_seed(1))
    by_hand = -(target * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(ClassificationLoss(smoothing)(logits, target), by_hand)
    # the same as lam * CE(y) + (1 - lam) * CE(flipped y), both label-smoothed
    ce = ClassificationLoss(smoothing)
    torch.testing.assert_close(ce(logits, target), lam * ce(logits, y) + (1 - lam) * ce(logits, y.flip(0)))


def test_an_odd_batch_mixes_all_but_the_last_image() -> None:
    x = torch.randn(5, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 0])
    np.random.seed(3)
    mixed, target = mix_batch(Mixing(cutmix_alpha=1.0).mixer(4, 0.0), x.clone(), y)
    assert torch.equal(mixed[4], x[4]) and target[4].tolist() == [1.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(target.sum(-1), torch.ones(5))
    with pytest.raises(ConfigError, match=r"mixing.prob must lie in \[0, 1\]"):
        Mixing(mixup_alpha=1.0, prob=2.0)


# -- recipes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "recipe", sorted(p.name for p in (Path(__file__).parents[1] / "recipes" / "full").glob("*.yaml"))
)
def test_full_dataset_recipes_build_their_data_with_augmentation(recipe: str, tmp_path: Path) -> None:
    """Each recipe parses with the CLI's own parser, and its data section builds on an image folder:
    random-resized crops and flips for training, the 0.875 centre crop for evaluation."""
    from petl_lightning.vtab.plan import parse_fit_config

    root = folder(tmp_path / "pets")
    path = Path(__file__).parents[1] / "recipes" / "full" / recipe
    cfg = parse_fit_config(["-c", str(path), "--data.init_args.root", str(root)])
    assert cfg["data"]["class_path"] == "petl_lightning.data.folder.ImageFolderDataModule"
    args = {**cfg["data"]["init_args"], "img_size": 16, "num_workers": 0, "batch_size": 4}
    args["augmentation"] = Augmentation(**args["augmentation"])
    data = ImageFolderDataModule(**args)
    assert data.crop_pct == 0.875 and data.augmentation.crop_mode == "rrc"
    assert cfg["model"]["init_args"]["weight_decay"] == 0.01 and cfg["model"]["init_args"]["warmup_epochs"] == 20
    x, _ = next(iter(data.train_dataloader()))
    assert x.shape == (4, 3, 16, 16)


def test_increasing_posterize_policies_are_capped_below_zero_bits() -> None:
    """timm's ``inc1`` posterize at magnitude 10 asks Pillow for 0 bits, which it refuses; the cap at
    9 keeps every RandAugment draw at 1 bit or more."""
    from timm.data.auto_augment import AugmentOp

    with pytest.raises(ValueError, match="bits must be between"):
        AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)(Image.new("RGB", (8, 8)))
    assert Augmentation(auto_augment="rand-m9-mstd0.5-inc1").policy == "rand-m9-mstd0.5-inc1-mmax9"
    assert Augmentation(auto_augment="rand-m9-mstd0.5-inc1-mmax8").policy == "rand-m9-mstd0.5-inc1-mmax8"
    assert Augmentation(auto_augment="rand-m9-mstd0.5").policy == "rand-m9-mstd0.5"
    transform = Augmentation(auto_augment="rand-m9-mstd0.5-inc1").transform(8, (0.5,) * 3, (0.5,) * 3)
    (rand_augment,) = [t for t in transform.transforms if type(t).__name__ == "RandAugment"]
    assert {op.magnitude_max for op in rand_augment.ops} == {9}
    AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=9)(Image.new("RGB", (8, 8)))  # the cap: 1 bit


def test_the_image_check_stops_at_its_budget_and_says_so(tmp_path: Path) -> None:
    """Past ``check_budget`` the rest is left to loading (which names a bad file): one warning."""
    from petl_lightning.data.dataset import FileSource
    from petl_lightning.data.lists import Sample

    samples = [Sample(tmp_path / f"{i}.png", 0) for i in range(1500)]  # none exist; 1,500 checks in threads
    with pytest.raises(DataError, match=r"image .*\.png not found"):
        FileSource(samples).check("exists", budget_s=60.0)
    with pytest.warns(UserWarning, match=r"Checked 0 of 1500 images in the 0 s check budget; the rest are checked"):
        FileSource(samples).check("exists", budget_s=0.0)
