"""Segmentation data: batch format, joint transforms (nearest masks, alignment, seeding), ADE20K's
labels, every bad-input error, and the texture mosaics built from the DTD assets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import VTAB_ASSETS
from petl_lightning.data.ade20k import ADE20KDataModule
from petl_lightning.data.mosaics import build_texture_mosaics
from petl_lightning.data.segmentation import SegmentationFolderDataModule
from petl_lightning.errors import DataError, run_user_command

DTD10 = VTAB_ASSETS / "dtd10"  # ../shared/assets, or $PETL_ASSETS
PLAIN = [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]  # normalisation that leaves x = pixel / 255


def stripes(width: int, height: int, bounds: tuple[int, ...] = (5, 12)) -> np.ndarray:
    """A mask of vertical stripes of labels 0, 1, 2, ... (uneven widths, so a flip shows)."""
    cols = np.searchsorted(np.array(bounds), np.arange(width), side="right")
    return np.broadcast_to(cols, (height, width)).astype(np.uint8).copy()


def colour(mask: np.ndarray) -> np.ndarray:
    """An RGB image whose red channel is 40 * label (255 stays black), green 100."""
    rgb = np.zeros((*mask.shape, 3), np.uint8)
    rgb[..., 0] = np.where(mask == 255, 0, mask.astype(int) * 40)
    rgb[..., 1] = 100
    return rgb


def add_pair(split_dir: Path, stem: str, mask: np.ndarray, suffix: str = ".png") -> None:
    (split_dir / "images").mkdir(parents=True, exist_ok=True)
    (split_dir / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(colour(mask)).save(split_dir / "images" / f"{stem}{suffix}")
    Image.fromarray(mask, "L").save(split_dir / "masks" / f"{stem}.png")


def make_folder(root: Path, val: bool = True, test: bool = True) -> Path:
    """3 classes; train: three 20x16 pairs with an ignored corner; val: one; test: a 20x16 and a 12x18 pair."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("sky\ntree\nroad\n")
    for i in range(3):
        m = stripes(20, 16)
        m[:3, :3] = 255
        add_pair(root / "train", f"t{i}", m, ".jpg" if i == 0 else ".png")
    if val:
        add_pair(root / "val", "v0", stripes(20, 16))
    if test:
        add_pair(root / "test", "a", stripes(20, 16))
        add_pair(root / "test", "b", stripes(12, 18, (4, 8)))
    return root


def folder(root: Path, **kwargs) -> SegmentationFolderDataModule:
    kwargs = {"img_size": 16, "batch_size": 2, "num_workers": 0, "normalization": PLAIN, **kwargs}
    return SegmentationFolderDataModule(str(root), **kwargs)


def test_folder_batches_have_the_agreed_format(tmp_path: Path) -> None:
    dm = folder(make_folder(tmp_path / "roads"), normalization=[[0.5, 0.5, 0.5], [0.25, 0.25, 0.25]])
    assert (dm.num_classes, dm.class_names, dm.ignore_index, dm.task) == (3, ["sky", "tree", "road"], 255, "roads")
    assert dm.val_split == "val" and dm.mean == (0.5,) * 3 and dm.eval_batch_size == 2
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32 and y.shape == (2, 16, 16) and y.dtype == torch.int64
    assert set(y.unique().tolist()) <= {0, 1, 2, 255}
    # evaluation: a 20x16 image already has short side 16 and keeps its pixels; 12x18 becomes 16x24
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (2, 3, 24, 20) and y.shape == (2, 24, 20)
    red = (40 * stripes(20, 16) / 255 - 0.5) / 0.25
    torch.testing.assert_close(x[0, 0, :16], torch.tensor(red, dtype=torch.float32))
    torch.testing.assert_close(x[0, 1, :16], torch.full((16, 20), (100 / 255 - 0.5) / 0.25))
    assert (y[0, :16] == torch.from_numpy(stripes(20, 16)).long()).all()
    assert (y[0, 16:] == 255).all() and (x[0, :, 16:] == 0).all()  # padding: ignored, zero
    assert (y[1, :, 16:] == 255).all() and (x[1, :, :, 16:] == 0).all() and (y[1, :, :16] != 255).all()
    images, sizes = next(iter(dm.predict_dataloader()))
    assert images.shape == (2, 3, 24, 20) and sizes.dtype == torch.int64 and sizes.tolist() == [[16, 20], [24, 16]]
    assert dm.predict_name == "test" and [p.name for p in dm.predict_paths()] == ["a.png", "b.png"]
    assert len(dm.val_dataloader().dataset) == 1


def test_predict_dir_and_missing_splits(tmp_path: Path) -> None:
    shots = tmp_path / "shots"
    shots.mkdir()
    Image.new("RGB", (32, 8)).save(shots / "wide.jpg")
    dm = folder(make_folder(tmp_path / "d", val=False, test=False), predict_dir=str(shots))
    assert dm.val_split is None and dm.val_dataloader() == []
    images, sizes = next(iter(dm.predict_dataloader()))
    assert images.shape == (1, 3, 16, 64) and sizes.tolist() == [[16, 64]] and dm.predict_name == "shots"
    with pytest.raises(DataError, match="no test/ folder.*predict_dir") as err:
        dm.test_dataloader()
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="predict_dir"):
        folder(tmp_path / "d", predict_dir=str(tmp_path / "nowhere"))


def interior(mask: torch.Tensor) -> torch.Tensor:
    """Pixels whose 3x3 neighbourhood holds their own label only (away from label edges and ignore)."""
    keep = mask != 255
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            keep &= torch.roll(mask, (dy, dx), (0, 1)) == mask
    keep[[0, -1]] = False
    keep[:, [0, -1]] = False
    return keep


def test_training_masks_stay_nearest_and_aligned_with_the_image(tmp_path: Path) -> None:
    root = tmp_path / "big"
    (root).mkdir()
    (root / "classes.txt").write_text("a\nb\nc\nd\n")
    m = stripes(48, 40, (7, 20, 31))
    m[30:, 40:] = 255
    add_pair(root / "train", "s", m)
    dm = folder(root, img_size=24, photometric=False)
    ds = dm.dataset("train")
    for epoch in range(16):
        x, y = ds[(0, epoch)]
        assert x.shape == (3, 24, 24) and y.shape == (24, 24)
        assert set(y.unique().tolist()) <= {0, 1, 2, 3, 255}
        labelled = y != 255
        agree = (x[0] * 255 - 40 * y).abs() < 20  # red encodes the label
        assert agree[interior(y)].all() and agree[labelled].float().mean() > 0.75, epoch  # edges blend
        assert ((x[1] * 255 - 100).abs() < 1)[labelled].all()  # no photometric change, padding is ignored


def test_augmentation_depends_on_seed_epoch_and_index_only(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d")
    a, b = folder(root, seed=3).dataset("train"), folder(root, seed=3).dataset("train")
    first = a[(1, 4)]
    torch.manual_seed(123)  # the global generator does not matter
    for u, v in zip(first, b[(1, 4)]):
        assert torch.equal(u, v)
    assert any(not torch.equal(u, v) for u, v in zip(first, a[(1, 5)]))
    serial = [batch[1] for batch in folder(root, seed=3, batch_size=1).train_dataloader()]
    parallel = [batch[1] for batch in folder(root, seed=3, batch_size=1, num_workers=1).train_dataloader()]
    assert all(torch.equal(u, v) for u, v in zip(serial, parallel)) and len(serial) == 3


def make_ade(root: Path, object_info: bool = False) -> Path:
    ade = root / "ADEChallengeData2016"
    values = np.array([[0, 1, 150, 1]] * 4, np.uint8).repeat(2, axis=1)  # 4x8
    for split, n in (("training", 2), ("validation", 1)):
        (ade / "images" / split).mkdir(parents=True)
        (ade / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            name = f"ADE_{split[:5]}_{i:08d}"
            Image.new("RGB", (8, 4), (10, 20, 30)).save(ade / "images" / split / f"{name}.jpg")
            Image.fromarray(values, "L").save(ade / "annotations" / split / f"{name}.png")
    if object_info:
        rows = ["Idx,Ratio,Train,Val,Name"] + [f"{i},0.01,1,1,name{i};other{i}" for i in range(1, 151)]
        (ade / "objectInfo150.csv").write_text("\n".join(rows).replace("name2;", "building;"))
    return root


def test_ade20k_reduces_the_zero_label(tmp_path: Path) -> None:
    root = make_ade(tmp_path / "data")
    dm = ADE20KDataModule(str(root), img_size=4, batch_size=2, num_workers=0)
    assert (dm.num_classes, dm.task, dm.class_names[149], dm.val_split) == (150, "ade20k", "class_149", "val")
    _, y = next(iter(dm.val_dataloader()))
    assert y[0, 0].tolist() == [255, 255, 0, 0, 149, 149, 0, 0]
    assert len(dm.dataset("train")) == 2 and len(dm.test_dataloader().dataset) == 1
    assert dm.predict_name == "validation" and dm.predict_paths()[0].name == "ADE_valid_00000000.jpg"
    x, y = dm.dataset("train")[(0, 0)]
    assert set(y.unique().tolist()) <= {0, 149, 255}

    named = ADE20KDataModule(str(make_ade(tmp_path / "named", True) / "ADEChallengeData2016"), num_workers=0)
    assert named.class_names[:3] == ["name1", "building", "name3"] and len(named.class_names) == 150
    bad = np.full((4, 8), 151, np.uint8)
    Image.fromarray(bad, "L").save(root / "ADEChallengeData2016/annotations/validation/ADE_valid_00000000.png")
    with pytest.raises(DataError, match="label 151"):
        ADE20KDataModule(str(root), img_size=4, num_workers=0).dataset("val")[0]
    with pytest.raises(DataError, match="is not ADE20K"):
        ADE20KDataModule(str(tmp_path), num_workers=0)


def _no_mask(root: Path) -> None:
    (root / "train/masks/t1.png").unlink()


def _no_image(root: Path) -> None:
    (root / "train/images/t1.png").unlink()


def _size(root: Path) -> None:
    Image.fromarray(stripes(20, 15), "L").save(root / "train/masks/t2.png")


def _label(root: Path) -> None:
    m = stripes(20, 16)
    m[5, 5] = 7
    Image.fromarray(m, "L").save(root / "val/masks/v0.png")


def _rgb(root: Path) -> None:
    Image.fromarray(colour(stripes(20, 16))).save(root / "train/masks/t1.png")


def _classes(root: Path) -> None:
    (root / "classes.txt").unlink()


def _empty(root: Path) -> None:
    for sub in ("images", "masks"):
        for p in (root / "val" / sub).iterdir():
            p.unlink()


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (_no_mask, r"t1\.png has no mask: add .*masks/t1\.png"),
        (_no_image, r"masks/t1\.png has no image"),
        (_size, r"t2\.png is 20x15 but its image .* is 20x16"),
        (_label, r"v0\.png holds label 7, outside the 3 classes .*classes\.txt"),
        (_rgb, r"t1\.png has PIL mode RGB: masks must be single-channel PNGs of class indices.*not colour images"),
        (_classes, r"classes\.txt not found"),
        (_empty, r"val/images holds no images"),
    ],
)
def test_bad_folders_are_one_line_errors_at_construction(tmp_path: Path, break_it, message: str) -> None:
    root = make_folder(tmp_path / "d")
    break_it(root)
    with pytest.raises(DataError, match=message) as err:
        folder(root)
    assert "\n" not in str(err.value)


def test_unchecked_labels_fail_when_loaded_and_the_cli_prints_one_line(tmp_path: Path, capsys) -> None:
    root = make_folder(tmp_path / "d")
    _label(root)
    dm = folder(root, check_labels=False)
    with pytest.raises(DataError, match="label 7"):
        dm.dataset("val")[0]
    assert run_user_command(lambda: folder(root)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Mask ") and err.count("\n") == 1
    assert folder(root, check_labels=False, num_classes=8).class_names[3:] == [f"class_{i}" for i in range(3, 8)]
    with pytest.raises(DataError, match="fewer than the 3 named classes"):
        folder(root, num_classes=2)


@pytest.fixture(scope="module")
def mosaics(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not DTD10.is_dir():
        pytest.skip(f"dtd10 assets not found at {DTD10} (shared assets absent)")
    return build_texture_mosaics(
        DTD10, tmp_path_factory.mktemp("m") / "mosaics", counts={"train": 8, "val": 2, "test": 4}
    )


def test_mosaics_are_texture_partitions_without_leakage(mosaics: Path) -> None:
    manifest = json.loads((mosaics / "mosaics.json").read_text())
    for split, n in (("train", 8), ("val", 2), ("test", 4)):
        masks = sorted((mosaics / split / "masks").iterdir())
        assert len(masks) == n == len(list((mosaics / split / "images").iterdir()))
        for mask_path, sources in zip(masks, manifest["sources"][split]):
            with Image.open(mask_path) as m, Image.open(str(mask_path).replace("masks", "images")) as img:
                assert (m.mode, m.size, img.mode, img.size) == ("L", (112, 112), "RGB", (112, 112))
                labels = np.unique(np.array(m))
            assert 3 <= len(labels) <= 6 and labels.max() < 10 and len(sources) == len(labels)
            assert all(s.startswith("images/") for s in sources)  # relative to the source folder
    listed = {
        split: {line.split()[0] for line in (DTD10 / name).read_text().splitlines() if line.strip()}
        for split, name in (("train", "train800.txt"), ("val", "val200.txt"), ("test", "test.txt"))
    }
    for split in ("train", "val", "test"):
        used = {s for mosaic in manifest["sources"][split] for s in mosaic}
        assert used <= listed[split]
        assert not used & (set().union(*listed.values()) - listed[split])  # no image of another split
    assert (mosaics / "classes.txt").read_text().split() == (DTD10 / "classes.txt").read_text().split()


def test_mosaics_are_reused_refused_and_loaded(mosaics: Path, tmp_path: Path) -> None:
    stamps = {p: p.stat().st_mtime_ns for p in mosaics.rglob("*")}
    again = build_texture_mosaics(DTD10, mosaics, counts={"train": 8, "val": 2, "test": 4})
    assert again == mosaics and {p: p.stat().st_mtime_ns for p in mosaics.rglob("*")} == stamps
    with pytest.raises(DataError, match="not empty"):
        build_texture_mosaics(DTD10, mosaics, counts={"train": 9})
    small = [build_texture_mosaics(DTD10, tmp_path / f"s{i}", counts={"train": 2}, seed=5) for i in range(2)]
    assert [p.read_bytes() for p in sorted(small[0].rglob("*.png"))] == [
        p.read_bytes() for p in sorted(small[1].rglob("*.png"))
    ]
    dm = SegmentationFolderDataModule(str(mosaics), img_size=112, batch_size=4, num_workers=0)
    assert dm.num_classes == 10 and dm.class_names[0] == "banded" and dm.val_split == "val"
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (4, 3, 112, 112) and y.shape == (4, 112, 112) and int(y.max()) < 10
    with Image.open(mosaics / "test/masks/test_0000.png") as m:
        assert torch.equal(y[0], torch.from_numpy(np.array(m)).long())
