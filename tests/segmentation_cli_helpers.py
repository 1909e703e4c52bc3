"""What the segmentation console tests share: the overlay a user writes beside a shipped recipe for
the real ViT-S/14 at 112 px on the texture mosaics (the ``seg_mosaics`` fixture), and fit-then-test
in new processes (the ``frozen_seg_miou`` fixture is the frozen-backbone baseline)."""

from __future__ import annotations

from pathlib import Path

from cli_helpers import metric, run
from conftest import VITS_WEIGHTS

EPOCHS = 5  # the shared small budget: same epochs, lr, crop and head for every method


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
