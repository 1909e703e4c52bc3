"""Segmentation as a user runs it: the shipped recipes through ``petl-lightning`` in new processes on
texture mosaics built from the real DTD images (``../shared/assets``), with the real ViT-S/14.

A method must beat the frozen-backbone segmenter with the same head at the same small budget (fit,
then ``test --ckpt_path last`` in a new process); a fit resumes from ``last.ckpt``; ``predict``
writes palette PNGs of each image's size; a foreign checkpoint and a colour mask are refused in one
line with nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_helpers import TINY_MODEL, assert_one_line_and_nothing_written, files_under, metric, run
from conftest import VITS_WEIGHTS, VTAB_ASSETS

pytestmark = pytest.mark.slow

DTD10 = VTAB_ASSETS / "dtd10"
EPOCHS = 5  # the shared small budget: same epochs, lr, crop and head for every method


@pytest.fixture(scope="module")
def mosaics(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not DTD10.is_dir() or not VITS_WEIGHTS.is_file():
        pytest.skip(f"dtd10 or the ViT-S weights not found under {VTAB_ASSETS.parent} (shared assets absent)")
    from petl_lightning.data.mosaics import build_texture_mosaics

    counts = {"train": 200, "val": 0, "test": 100}
    return build_texture_mosaics(DTD10, tmp_path_factory.mktemp("data") / "mosaics", counts=counts)


def overlay(tmp: Path, mosaics: Path, head: str = "linear") -> Path:
    """What a user writes beside a shipped recipe for their own small task (a second ``-c``)."""
    path = tmp / "mosaics.yaml"
    path.write_text(
        f"""model:
  init_args:
    model_name: vit_small_patch14_dinov2
    checkpoint_path: {VITS_WEIGHTS}
    drop_path_rate: 0.0
    head: {head}
    warmup_iters: 0
data:
  class_path: petl_lightning.data.segmentation.SegmentationFolderDataModule
  init_args:
    root: {mosaics}
    img_size: 112
    batch_size: 16
    eval_batch_size: 50
    num_workers: 0
trainer:
  max_epochs: {EPOCHS}
  max_steps: -1
  val_check_interval: null
  check_val_every_n_epoch: 1
  log_every_n_steps: 5
"""
    )
    return path


def args(method: str, config: Path, out: Path) -> list[str]:
    return ["-c", f"recipes/segmentation/{method}.yaml", "-c", str(config), "--trainer.default_root_dir", str(out)]


def fit_and_test(method: str, config: Path, out: Path) -> float:
    fit = run("fit", *args(method, config, out))
    assert fit.returncode == 0, fit.stderr[-3000:]
    test = run("test", *args(method, config, out), "--ckpt_path", "last")
    assert test.returncode == 0, test.stderr[-3000:]
    return metric(test.stdout, "test/mIoU")


@pytest.fixture(scope="module")
def frozen_miou(mosaics: Path, tmp_path_factory: pytest.TempPathFactory) -> float:
    tmp = tmp_path_factory.mktemp("frozen")
    return fit_and_test("frozen", overlay(tmp, mosaics), tmp / "run")


def test_repadapter_beats_the_frozen_segmenter_resumes_and_predicts_palette_masks(
    mosaics: Path, frozen_miou: float, tmp_path: Path
) -> None:
    config, out = overlay(tmp_path, mosaics), tmp_path / "run"
    first = run("fit", *args("repadapter", config, out), "--trainer.max_epochs", str(EPOCHS - 1))
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run("fit", *args("repadapter", config, out), "--ckpt_path", "last")  # the last epoch, in a new process
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring states from the checkpoint" in resumed.stderr
    test = run("test", *args("repadapter", config, out), "--ckpt_path", "last")
    assert test.returncode == 0, test.stderr[-3000:]
    miou = metric(test.stdout, "test/mIoU")
    assert miou > frozen_miou + 0.01, (miou, frozen_miou)
    merged = metric(test.stdout, "test/gflops_per_image")  # the adapters fold: the backbone's cost
    assert merged == pytest.approx(metric(test.stdout, "test/gflops_backbone"), rel=0.01)

    predict = run("predict", *args("repadapter", config, out), "--ckpt_path", "last")
    assert predict.returncode == 0, predict.stderr[-3000:]
    rows = (out / "predictions" / "test.csv").read_text().splitlines()
    assert rows[0] == "path,mask,keep_rate,gflops" and len(rows) == 101
    hits = total = 0
    for row in rows[1:]:
        image_path, mask_file = row.split(",")[:2]
        png = Image.open(out / "predictions" / mask_file)
        assert png.mode == "P" and png.size == Image.open(image_path).size  # a palette PNG of the image's size
        truth = np.array(Image.open(Path(image_path).parents[1] / "masks" / Path(image_path).name))
        pred = np.array(png)
        hits, total = hits + int((pred == truth).sum()), total + truth.size
    assert hits / total > 0.3  # ten classes: chance is 0.1; the class maps agree with the truth

    foreign = tmp_path / "arc_test"
    refused = run("test", *args("arc", config, foreign), "--ckpt_path", str(out / "checkpoints" / "last.ckpt"))
    assert_one_line_and_nothing_written(refused, r"RepAdapterConfig", foreign)


@pytest.mark.parametrize("method", ["arc", "dyt"])
def test_method_beats_the_frozen_segmenter(method: str, mosaics: Path, frozen_miou: float, tmp_path: Path) -> None:
    miou = fit_and_test(method, overlay(tmp_path, mosaics), tmp_path / "run")
    assert miou > frozen_miou + 0.01, (method, miou, frozen_miou)


def test_a_colour_mask_is_one_line_and_nothing_written(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for split in ("train", "test"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        Image.new("RGB", (16, 16)).save(root / split / "images" / "a.png")
        Image.new("RGB", (16, 16), (1, 0, 0)).save(root / split / "masks" / "a.png")
    (root / "classes.txt").write_text("a\nb\n")
    out = tmp_path / "run"
    proc = run(
        "fit",
        "-c",
        "recipes/segmentation/frozen.yaml",
        "--data",
        "petl_lightning.data.segmentation.SegmentationFolderDataModule",
        "--data.init_args.root",
        str(root),
        "--data.init_args.img_size",
        "32",
        *TINY_MODEL,
        "--trainer.default_root_dir",
        str(out),
    )
    assert_one_line_and_nothing_written(proc, r"single-channel", out)
    assert not files_under(out)
