"""Segmentation as a user runs it: the shipped recipes through ``petl-lightning`` in new processes on
texture mosaics from the real DTD images, with the real ViT-S/14 (:mod:`segmentation_cli_helpers`).
RepAdapter beats the frozen-backbone segmenter at the same small budget (fit, then ``test --ckpt_path
last`` in a new process), resumes from ``last.ckpt``, and ``predict`` writes palette PNGs of each
image's size; a foreign checkpoint and a colour mask are refused in one line with nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_helpers import TINY_MODEL, assert_one_line_and_nothing_written, files_under, metric, run
from segmentation_cli_helpers import EPOCHS, args, overlay

pytestmark = pytest.mark.slow


def test_repadapter_beats_the_frozen_segmenter_resumes_and_predicts_palette_masks(
    seg_mosaics: Path, frozen_seg_miou: float, tmp_path: Path
) -> None:
    config, out = overlay(tmp_path, seg_mosaics), tmp_path / "run"
    first = run("fit", *args("repadapter", config, out), "--trainer.max_epochs", str(EPOCHS - 1))
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run("fit", *args("repadapter", config, out), "--ckpt_path", "last")  # the last epoch, in a new process
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring states from the checkpoint" in resumed.stderr
    test = run("test", *args("repadapter", config, out), "--ckpt_path", "last")
    assert test.returncode == 0, test.stderr[-3000:]
    miou = metric(test.stdout, "test/mIoU")
    assert miou > frozen_seg_miou, (miou, frozen_seg_miou)
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
