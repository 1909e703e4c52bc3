"""ExitRateLogger, FlopsLogger and ImageThroughputMonitor on tiny random ViTs (CPU, seconds).

A small test module records known, made-up exits and token counts, so the logged numbers can be
checked exactly against what was recorded; the real dynamic methods (Dyn-Adapter, DyT) are checked
against an independent replay of their own forward passes, and the static ones against the
closed-form FLOPs of the frozen backbone.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from petl_lightning.callbacks import ExitRateLogger, FlopsLogger, ImageThroughputMonitor, images_in_batch
from petl_lightning.flops import vit_flops
from petl_lightning.methods.baselines import LinearProbe
from petl_lightning.plotting import inference_stats_figure
from petl_lightning.stats import InferenceOutput, InferenceStats
from petl_lightning.tasks.classification import PETLModule

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = dict(
    model_name="vit_tiny_patch16_224", pretrained=False, img_size=32, model_kwargs={"depth": 3, "patch_size": 16}
)  # 3 blocks, 4 patches + CLS
K = 4
N = 20


def data(n: int = N, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, K, (n,), generator=g)


def loader(n: int = N, batch_size: int = 6, seed: int = 0) -> DataLoader:
    return DataLoader(TensorDataset(*data(n, seed)), batch_size=batch_size)


def trainer(tmp_path: Path, callbacks: list, logger: Any = None, **kw: Any) -> L.Trainer:
    kw.setdefault("max_epochs", 1)
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        **kw,
    )


class FakeDynamic(PETLModule):
    """Records known statistics: image i leaves at exit ``exit_of(x_i)`` (from the sign of two
    pixels), costs ``(exit + 1)`` GFLOPs, and the 3 blocks keep 3, 2 and 1 of the 4 patch tokens."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.inference_meter = InferenceStats(self.vit.depth, num_exits=3)

    @staticmethod
    def exit_of(x: Tensor) -> Tensor:
        return (x[:, 0, 0, 0] > 0).long() + (x[:, 0, 0, 1] > 0).long()

    def infer(self, x: Tensor) -> InferenceOutput:
        b, ex = x.shape[0], self.exit_of(x)
        kept = torch.tensor([[3.0, 2.0, 1.0]], dtype=torch.float64).expand(b, 3)
        offered = torch.full((b, 3), 4.0, dtype=torch.float64)
        return InferenceOutput(self(x), (ex + 1).double() * 1e9, ex, kept, offered)


def metrics_of(tr: L.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in tr.callback_metrics.items()}


def test_fake_dynamic_module_logged_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = FakeDynamic(num_classes=K, **TINY)
    exits, flops = ExitRateLogger(charts=False), FlopsLogger()
    tr = trainer(tmp_path, [exits, flops])
    tr.test(model, loader(), verbose=False)
    m = metrics_of(tr)

    x, y = data()
    model.eval()
    with torch.no_grad():
        pred = model(x).argmax(-1)
    ex = FakeDynamic.exit_of(x)
    for k in range(3):
        share = float((ex == k).double().mean())
        assert m[f"test/exit_share/exit{k}"] == pytest.approx(share, abs=1e-6)
        if (ex == k).any():
            acc = float((pred[ex == k] == y[ex == k]).double().mean())
            assert m[f"test/exit_acc/exit{k}"] == pytest.approx(acc, abs=1e-6)
        else:
            assert f"test/exit_acc/exit{k}" not in m  # NaN: nothing left there, nothing logged
    assert len({m[f"test/exit_share/exit{k}"] for k in range(3)}) > 1  # the data exercise several exits
    for i, rate in enumerate([0.75, 0.5, 0.25]):
        assert m[f"test/keep_rate/block{i + 1:02d}"] == pytest.approx(rate)
    assert m["test/keep_rate"] == pytest.approx(0.5)
    gflops = float((ex + 1).double().mean())
    backbone = vit_flops(model.vit.shape(), K) / 1e9
    assert m["test/gflops_per_image"] == pytest.approx(gflops, rel=1e-6)
    assert m["test/gflops_backbone"] == pytest.approx(backbone, rel=1e-6)
    assert m["test/flops_vs_backbone"] == pytest.approx(gflops / backbone, rel=1e-5)
    assert m["test/images"] == N
    # Callbacks only read: the statistics stay until the module resets them at the next epoch's start.
    assert float(model.inference_stats()["images"]) == N
    assert exits.last_stats["test"]["images"].item() == N == flops.last_stats["test"]["images"].item()


@pytest.mark.parametrize("order", ["exits_first", "flops_first"])
def test_both_callbacks_read_the_same_epoch_and_stray_forwards_do_not_leak(tmp_path: Path, order: str) -> None:
    torch.manual_seed(0)
    model = FakeDynamic(num_classes=K, **TINY).eval()
    with torch.no_grad():
        model.inference_meter.update(model.infer(torch.randn(7, 3, 32, 32)))  # outside any loop: not this epoch's
    exits, flops = ExitRateLogger(charts=False), FlopsLogger()
    callbacks = [exits, flops] if order == "exits_first" else [flops, exits]
    tr = trainer(tmp_path, callbacks, max_epochs=2, num_sanity_val_steps=2, limit_train_batches=2)
    tr.fit(model, loader(), loader(n=14, seed=1))  # sanity check + 2 validation epochs
    tr.validate(model, loader(n=14, seed=1), verbose=False)
    for cb in (exits, flops):
        assert cb.last_stats["val"]["images"].item() == 14  # neither sanity batches nor stray images
    assert torch.equal(exits.last_stats["val"]["exit_share"], flops.last_stats["val"]["exit_share"])
    assert float(model.inference_stats()["images"]) == 14


def test_validation_epochs_do_not_accumulate(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = FakeDynamic(num_classes=K, **TINY)
    logger = CSVLogger(tmp_path, name="csv")
    tr = trainer(
        tmp_path,
        [ExitRateLogger(charts=False), FlopsLogger()],
        logger=logger,
        max_epochs=3,
        limit_train_batches=1,
        num_sanity_val_steps=0,
    )
    tr.fit(model, loader(), loader(n=10, seed=2))
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/images")]
    assert [float(r["val/images"]) for r in rows] == [10.0, 10.0, 10.0]
    assert len({r["val/exit_share/exit0"] for r in rows}) == 1  # same data, same shares every epoch


@pytest.mark.parametrize("method", ["linear_probe", "repadapter"])
def test_static_methods_report_no_skipping_and_merged_flops(tmp_path: Path, method: str) -> None:
    torch.manual_seed(0)
    if method == "linear_probe":
        model: PETLModule = LinearProbe(num_classes=K, **TINY)
    else:
        from petl_lightning.methods.repadapter import RepAdapter

        model = RepAdapter(num_classes=K, adapter_scale=1.0, **TINY)
    exits, flops = ExitRateLogger(), FlopsLogger()
    tr = trainer(tmp_path, [exits, flops])
    tr.test(model, loader(), verbose=False)
    m = metrics_of(tr)
    backbone = vit_flops(model.vit.shape(), K) / 1e9  # closed form; merged RepAdapter = plain ViT
    assert m["test/exit_share/exit0"] == 1.0 and m["test/keep_rate"] == 1.0
    assert not any(k.startswith("test/keep_rate/") for k in m)  # no per-block column of ones
    assert m["test/gflops_per_image"] == pytest.approx(backbone, rel=1e-6)
    assert m["test/flops_vs_backbone"] == pytest.approx(1.0, abs=1e-6)
    assert m["test/images"] == N


def test_dyn_adapter_shares_and_flops_match_its_forward(tmp_path: Path) -> None:
    from petl_lightning.methods.dyn_adapter import DynAdapter

    torch.manual_seed(0)
    model = DynAdapter(num_classes=K, exits={"blocks": [1, 2], "hidden": [16, 0]}, calibration={"budget": None}, **TINY)
    x, y = data()
    model.eval()
    with torch.no_grad():
        conf = model.model.confidence(model.forward_exits(x)).T
        middle = conf[:, :-1].sort(dim=0).values[N // 2 - 1 : N // 2 + 1]
        model.thresholds.copy_(middle.mean(dim=0))  # halfway between two confidences: batching cannot flip one
        ref = model.infer(x)
    exits, flops = ExitRateLogger(save_png=True), FlopsLogger()
    logger = TensorBoardLogger(tmp_path, name="tb")
    tr = trainer(tmp_path, [exits, flops], logger=logger)
    tr.test(model, loader(), verbose=False)
    m = metrics_of(tr)
    for k, d in enumerate(model.exit_depths):
        assert m[f"test/exit_share/block{d:02d}"] == pytest.approx(
            float((ref.exit_index == k).double().mean()), abs=1e-6
        )
    assert min(m["test/exit_share/block01"], m["test/exit_share/block02"]) > 0.2
    assert m["test/gflops_per_image"] == pytest.approx(float(ref.flops.mean()) / 1e9, rel=1e-6)
    assert m["test/flops_vs_full"] == pytest.approx(float(ref.flops.mean()) / model.full_flops(), rel=1e-6)
    assert m["test/flops_vs_backbone"] < 1.0
    thresholds = model.thresholds.tolist()
    assert m["test/exit_threshold/block01"] == pytest.approx(thresholds[0], rel=1e-6)
    # Charts: a PNG next to the logs and a TensorBoard figure.
    (png,) = exits.saved_pngs
    assert png.parent == Path(logger.log_dir) / "inference_stats"
    with Image.open(png) as img:
        assert img.size[0] > 200 and img.size[1] > 200
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    assert "test/inference_stats" in acc.Tags()["images"]
    assert acc.Scalars("test/exit_share/block01")[-1].value == pytest.approx(m["test/exit_share/block01"], abs=1e-6)


def test_dyt_keep_rates_match_its_dispatch_record(tmp_path: Path) -> None:
    from petl_lightning.methods.dyt import DyT

    torch.manual_seed(0)
    model = DyT(num_classes=K, **TINY)
    x, _ = data()
    model.eval()
    kept = torch.zeros(3, dtype=torch.float64)
    offered = torch.zeros(3, dtype=torch.float64)
    executed = 0.0
    with torch.no_grad():
        for xb in x.split(6):  # the loader's batches
            k = model.vit.forward_gathered(xb, model.vit.keep_count()).kept
            kept += k.sum(dim=(0, 2)).double()
            offered += xb.shape[0] * model.vit.num_patches
            executed += float((model.vit.executed_flops(k) + model.model.head_flops()).sum())
    exits, flops = ExitRateLogger(), FlopsLogger()
    tr = trainer(tmp_path, [exits, flops])
    tr.test(model, loader(), verbose=False)
    m = metrics_of(tr)
    for i in range(3):
        assert m[f"test/keep_rate/block{i + 1:02d}"] == pytest.approx(float(kept[i] / offered[i]), abs=1e-6)
    assert m["test/keep_rate"] == pytest.approx(float(kept.sum() / offered.sum()), abs=1e-6)
    assert 0.0 < m["test/keep_rate"] < 1.0
    assert m["test/gflops_per_image"] == pytest.approx(executed / N / 1e9, rel=1e-6)
    assert m["test/flops_vs_backbone"] < 1.0
    assert m["test/exit_share/exit0"] == 1.0


def test_throughput_monitor_logs_images_per_second(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = FakeDynamic(num_classes=K, **TINY)
    logger = CSVLogger(tmp_path, name="csv")
    tr = trainer(
        tmp_path,
        [ImageThroughputMonitor(window_size=2)],
        logger=logger,
        max_epochs=1,
        log_every_n_steps=1,
        limit_val_batches=0,
    )
    tr.fit(model, loader(n=24, batch_size=4))
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/device/samples_per_sec")]
    assert rows, "no train/device/samples_per_sec logged"
    for r in rows:
        rate, batches = float(r["train/device/samples_per_sec"]), float(r["train/device/batches_per_sec"])
        assert rate > 0 and math.isclose(rate, 4 * batches, rel_tol=1e-6)  # 4 images per batch
        assert float(r["train/samples"]) == 4 * float(r["train/batches"])


def test_module_without_statistics_is_skipped_with_a_warning(tmp_path: Path) -> None:
    class Plain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3 * 32 * 32, K)

        def test_step(self, batch: Any, batch_idx: int) -> None:
            self.lin(batch[0].flatten(1))

    exits = ExitRateLogger()
    with pytest.warns(UserWarning, match="inference_stats"):
        trainer(tmp_path, [exits, FlopsLogger()]).test(Plain(), loader(), verbose=False)
    assert exits.last_stats == {}


def test_images_in_batch_and_plot() -> None:
    x = torch.zeros(5, 3, 8, 8)
    assert images_in_batch((x, torch.zeros(5))) == 5
    assert images_in_batch({"image": x}) == 5 and images_in_batch(x) == 5
    with pytest.raises(TypeError):
        images_in_batch("not a batch")
    stats = {
        "exit_share": torch.tensor([0.5, 0.25, 0.25]),
        "exit_acc": torch.tensor([0.9, float("nan"), 0.5]),
        "exit_depths": torch.tensor([3.0, 6.0, 12.0]),
        "keep_rate_per_layer": torch.tensor([0.5] * 12),
        "keep_rate": torch.tensor(0.5),
        "gflops": torch.tensor(8.0),
        "gflops_backbone": torch.tensor(17.58),
    }
    fig = inference_stats_figure(stats, "test")
    assert len(fig.axes) == 2
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["3", "6", "12"]
    assert [round(p.get_height(), 3) for p in fig.axes[0].patches] == [0.5, 0.25, 0.25]
    assert "0.46x backbone" in fig._suptitle.get_text()
