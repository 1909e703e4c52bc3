"""Weights & Biases through the CLI: ``-c recipes/loggers/wandb.yaml`` on a method recipe, offline
(``WANDB_MODE=offline``: the run directory holds the exit-share table, the bar plot, the FLOPs
scalars and the full effective configuration) and switched off (``WANDB_MODE=disabled``).

wandb 0.31 has no Python reader for the offline ``run-*.wandb`` file, so :func:`read_wandb_records`
parses its record log (LevelDB log format: 32 KiB blocks of checksum/length/type-framed chunks, each
record a ``wandb_internal_pb2.Record``).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # console-script processes: in make test, not in make test-fast

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
NUM_CLASSES = 5  # not any default of the model, so the linked value is visible


def make_tiny_vtab(
    root: Path, task: str = "tiny", num_classes: int = NUM_CLASSES, per_class: int = 4, size: int = 32, seed: int = 0
) -> Path:
    """A task in the VTAB-1K list layout: class-coloured noise PNGs and the four list files."""
    rng = np.random.default_rng(seed)
    task_dir = root / task
    (task_dir / "images").mkdir(parents=True, exist_ok=True)
    lists: dict[str, list[str]] = {"train800": [], "val200": [], "test": []}
    for split, n in (("train800", per_class), ("val200", per_class), ("test", per_class)):
        for c in range(num_classes):
            colour = np.array([(37 * c) % 256, (91 * c + 50) % 256, (151 * c + 100) % 256], dtype=np.float64)
            for i in range(n):
                img = np.clip(colour + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                rel = f"images/{split}_{c}_{i}.png"
                Image.fromarray(img).save(task_dir / rel)
                lists[split].append(f"{rel} {c}")
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for name, lines in lists.items():
        (task_dir / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return root


def read_wandb_records(path: Path) -> Iterator[Any]:
    """The ``Record`` protobufs of an offline ``run-*.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # zero padding
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:  # full
            payload = chunk
        elif kind == 2:  # first
            pending = chunk
            continue
        elif kind == 3:  # middle
            pending += chunk
            continue
        else:  # last
            payload, pending = pending + chunk, b""
        record = pb.Record()
        record.ParseFromString(payload)
        yield record


def summarize_run(run_file: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(config, history rows) of an offline run: config keys merged over all config records."""
    config: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    for rec in read_wandb_records(run_file):
        kind = rec.WhichOneof("record_type")
        if kind == "config":
            for item in rec.config.update:
                key = item.key or "/".join(item.nested_key)
                config[key] = json.loads(item.value_json)
        elif kind == "history":
            history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return config, history


TINY_BACKBONE = [
    "--model.init_args.model_name=vit_tiny_patch16_224",
    "--model.init_args.checkpoint_path=null",
    "--model.init_args.pretrained=false",
    "--model.init_args.img_size=32",
    "--model.init_args.model_kwargs={depth: 3, patch_size: 8}",
]


def tiny_fit_args(recipe: str, data_root: Path, *model_args: str) -> list[str]:
    """``fit`` of a method recipe shrunk to a tiny random ViT on the tiny task, W&B stacked."""
    return [
        "fit",
        "-c",
        str(RECIPES / recipe),
        "-c",
        str(RECIPES / "loggers" / "wandb.yaml"),
        *TINY_BACKBONE,
        *model_args,
        f"--data.init_args.root={data_root}",
        "--data.init_args.task=tiny",
        "--data.init_args.protocol=train_val",
        "--data.init_args.img_size=32",
        "--data.init_args.batch_size=10",
        "--data.init_args.eval_batch_size=10",
        "--data.init_args.num_workers=0",
        "--trainer.max_epochs=1",
        "--trainer.check_val_every_n_epoch=1",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.logger.init_args.project=petl-test",
    ]


def tiny_dyn_adapter_args(data_root: Path) -> list[str]:
    return tiny_fit_args(
        "dyn_adapter.yaml",
        data_root,
        "--model.init_args.exits.blocks=[1, 2]",
        "--model.init_args.exits.hidden=[32, 0]",
        "--model.init_args.calibration.thresholds=[0.2]",
    )


def run_cli(args: list[str]) -> Any:
    from petl_lightning.cli import PETLCLI

    return PETLCLI(args=args)


@pytest.fixture
def tiny_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # the recipe's relative save_dir (runs/) lands in tmp
    return make_tiny_vtab(tmp_path / "vtab")


def test_wandb_offline_run_holds_exit_table_flops_and_effective_config(
    tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))  # wandb's own files stay in tmp too
    # A wandb service left running by an earlier test resolves a relative save_dir in *its* working
    # directory (seen in CI): start from no service, and give the run an absolute directory.
    wandb.teardown()
    try:
        cli = run_cli([*tiny_dyn_adapter_args(tiny_root), f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"])
        metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    finally:
        wandb.finish()
        wandb.teardown()  # stop the wandb service, so the offline run file is complete on disk

    runs = sorted((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline run under runs/wandb, found {runs}"
    run = runs[0]

    # The exit-share table, as a media file: 3 exits, shares summing to 1, equal to the logged scalars.
    tables = sorted((run / "files" / "media" / "table" / "val").glob("exit_share_table_*.table.json"))
    assert tables, f"no exit-share table in {run / 'files'}"
    table = json.loads(tables[-1].read_text())
    assert table["columns"] == ["exit", "share", "accuracy"]
    assert [row[0] for row in table["data"]] == ["block01", "block02", "block03"]
    assert math.isclose(sum(row[1] for row in table["data"]), 1.0, abs_tol=1e-6)
    for label, share, _acc in table["data"]:
        assert math.isclose(share, metrics[f"val/exit_share/{label}"], abs_tol=1e-6)

    config, history = summarize_run(next(run.glob("run-*.wandb")))
    logged: dict[str, Any] = {}
    for row in history:
        logged.update(row)

    # FLOPs scalars reached the run: executed GFLOPs below the backbone's (images left early).
    for key in (
        "val/gflops_per_image",
        "val/gflops_backbone",
        "val/flops_vs_backbone",
        "val/images",
        "val/exit_share/block01",
        "val/acc",
    ):
        assert key in logged, f"{key} not in the run history; have {sorted(logged)[:40]}"
    assert math.isclose(logged["val/gflops_per_image"], metrics["val/gflops_per_image"], rel_tol=1e-6)
    assert logged["val/flops_vs_backbone"] < 1.0
    assert logged["val/images"] == NUM_CLASSES * 4
    # The bar plot is registered as a W&B bar panel over the same table.
    panel = config["_wandb/visualize/val/exit_share_chart"]
    assert panel["panel_config"]["panelDefId"] == "wandb/bar/v0"

    # The full effective configuration, including the num_classes linked from the data.
    model_cfg, data_cfg, trainer_cfg = config["model"], config["data"], config["trainer"]
    assert model_cfg["class_path"] == "petl_lightning.methods.dyn_adapter.DynAdapter"
    assert model_cfg["init_args"]["num_classes"] == NUM_CLASSES
    assert model_cfg["init_args"]["exits"]["blocks"] == [1, 2]
    assert model_cfg["init_args"]["model_name"] == "vit_tiny_patch16_224"
    assert data_cfg["init_args"]["task"] == "tiny" and data_cfg["init_args"]["protocol"] == "train_val"
    assert trainer_cfg["max_epochs"] == 1
    assert any(cb["class_path"].endswith("ExitRateLogger") for cb in trainer_cfg["callbacks"])
    assert "seed_everything" in config


def test_wandb_disabled_runs_and_writes_nothing(
    tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DyT through the same W&B stack with W&B switched off: keep-rate tables and charts are made
    for a disabled run without error, the scalars still reach the trainer, no W&B files appear."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    try:
        cli = run_cli(tiny_fit_args("dyt.yaml", tiny_root))
    finally:
        wandb.finish()
        wandb.teardown()
    metrics = cli.trainer.callback_metrics
    assert float(metrics["val/images"]) == NUM_CLASSES * 4
    assert 0.0 < float(metrics["val/keep_rate"]) < 1.0 and "val/keep_rate/block03" in metrics
    assert 0.0 < float(metrics["val/flops_vs_backbone"]) < 1.0
    assert not list(tmp_path.rglob("offline-run-*")) and not list(tmp_path.rglob("run-*.wandb"))


def test_one_flag_wandb_logger_parses(capsys: pytest.CaptureFixture[str]) -> None:
    """The documented one-flag form selects W&B without the logger file."""
    import yaml

    from petl_lightning.cli import PETLCLI

    with pytest.raises(SystemExit) as exc:
        PETLCLI(
            args=[
                "fit",
                "-c",
                str(RECIPES / "linear_probe.yaml"),
                "--trainer.logger=WandbLogger",
                "--trainer.logger.project=my-project",
                "--print_config",
            ]
        )
    assert exc.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    logger = cfg["trainer"]["logger"]
    assert logger["class_path"] == "lightning.pytorch.loggers.WandbLogger"
    assert logger["init_args"]["project"] == "my-project"


def make_tiny_segmentation(root: Path, n: int = 4) -> Path:
    """Two classes: each 32x32 image is dark where its mask is 0 and bright where it is 1."""
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("dark\nbright\n")
    for split in ("train", "val"):
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            mask = np.zeros((32, 32), np.uint8)
            mask[:, 6 + 6 * i :] = 1  # every image different (W&B stores each distinct file once)
            Image.fromarray(np.repeat(mask[..., None] * 200 + 20, 3, axis=2)).save(root / split / "images" / f"{i}.png")
            Image.fromarray(mask, "L").save(root / split / "masks" / f"{i}.png")
    return root


def test_wandb_segmentation_panel_holds_images_with_truth_and_prediction_masks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    root = make_tiny_segmentation(tmp_path / "seg")
    wandb.teardown()
    try:
        run_cli(
            [
                "fit",
                "-c",
                str(RECIPES / "segmentation" / "frozen.yaml"),
                "-c",
                str(RECIPES / "loggers" / "wandb.yaml"),
                *TINY_BACKBONE,
                "--model.init_args.head_channels=8",
                "--model.init_args.levels=null",
                "--model.init_args.model_kwargs={depth: 4, patch_size: 8}",
                "--model.init_args.warmup_iters=0",
                "--data=petl_lightning.data.segmentation.SegmentationFolderDataModule",
                f"--data.init_args.root={root}",
                "--data.init_args.img_size=32",
                "--data.init_args.batch_size=2",
                "--data.init_args.eval_batch_size=4",
                "--data.init_args.num_workers=0",
                "--trainer.max_epochs=1",
                "--trainer.max_steps=-1",
                "--trainer.val_check_interval=null",
                "--trainer.check_val_every_n_epoch=1",
                "--trainer.num_sanity_val_steps=0",
                "--trainer.enable_progress_bar=false",
                f"--trainer.default_root_dir={tmp_path / 'run'}",
                "--trainer.logger.init_args.project=petl-test",
                f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            ]
        )
    finally:
        wandb.finish()
        wandb.teardown()
    run = next((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    images = sorted((run / "files" / "media" / "images" / "val").glob("segmentation_*.png"))
    assert len(images) == 4  # num_images of the panel: the first validation batch
    overlays = [np.array(Image.open(m)) for m in (run / "files" / "media" / "images" / "mask").rglob("*.png")]
    for truth in sorted((root / "val" / "masks").glob("*.png")):  # each truth is an overlay, as class indices
        assert any(np.array_equal(np.array(Image.open(truth)), o) for o in overlays), truth
    assert len(overlays) > 4  # and the predictions
    config, history = summarize_run(next(run.glob("run-*.wandb")))
    assert any("val/mIoU" in row for row in history)
