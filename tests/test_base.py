"""PETLModule: optimiser groups, schedule, statistics, adapter-only checkpoints, resume."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from petl_lightning.data.vtab import EpochShuffleSampler
from petl_lightning.errors import CheckpointError, DataError, PETLError
from petl_lightning.methods.baselines import FullFinetune, LinearProbe
from petl_lightning.tasks.classification import PETLModule
from petl_lightning.tasks.optimization import warmup_cosine

TINY = dict(model_name="vit_tiny_patch16_224", pretrained=False, img_size=32)


class DropoutProbe(PETLModule):
    """A trainable, random (dropout) module between backbone and head: exercises RNG restore."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.adapter = nn.Sequential(nn.Dropout(0.3), nn.Linear(self.vit.dim, self.vit.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.adapter(self.vit(x)))


class TinyData(L.LightningDataModule):
    def __init__(self, n: int = 24, classes: int = 4) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.ds = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.ds, batch_size=8, sampler=EpochShuffleSampler(len(self.ds), seed=1))

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.ds, batch_size=8)


def trainer(tmp_path: Path, max_epochs: int, callbacks: list | None = None) -> L.Trainer:
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=callbacks or [],
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks or []),
    )


def test_warmup_cosine_shape() -> None:
    assert warmup_cosine(0, 10, 100, 1e-4, 0.0) == pytest.approx(1e-4)
    assert warmup_cosine(5, 10, 100, 0.0, 0.0) == pytest.approx(0.5)
    assert warmup_cosine(10, 10, 100, 0.0, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, 0.0, 0.0) == pytest.approx(0.5)
    assert warmup_cosine(100, 10, 100, 0.0, 0.01) == pytest.approx(0.01)


def test_backbone_is_frozen_and_only_the_head_trains() -> None:
    m = LinearProbe(num_classes=5, **TINY)
    s = m.parameter_summary()
    assert s["trainable"] == 192 * 5 + 5
    assert m.trainable_state_keys() == ["model.head.weight", "model.head.bias"]


def test_no_weight_decay_on_biases_norms_and_heads_unless_asked() -> None:
    m = DropoutProbe(num_classes=3, weight_decay=0.05, **TINY)
    decay, no_decay = m.parameter_groups()
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([192, 192])]  # adapter weight only
    m2 = DropoutProbe(num_classes=3, decay_head=True, decay_norm_and_bias=True, **TINY)
    assert len(m2.parameter_groups()[0]["params"]) == 4


def test_scheduler_follows_warmup_then_cosine(tmp_path: Path) -> None:
    m = LinearProbe(num_classes=4, lr=0.1, warmup_epochs=2, warmup_lr=0.0, min_lr=0.0, **TINY)
    lrs: list[float] = []

    class Record(Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer(tmp_path, 6, [Record()]).fit(m, TinyData())
    expected = [0.1 * warmup_cosine(e, 2, 6, 0.0, 0.0) for e in range(6)]
    assert lrs == pytest.approx(expected)
    assert lrs[2] == pytest.approx(0.1) and lrs[4] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi / 2)))


def test_loss_falls(tmp_path: Path) -> None:
    m = LinearProbe(num_classes=4, lr=0.05, warmup_epochs=0, **TINY)
    data = TinyData()
    x, y = data.ds.tensors
    m.eval()
    before = float(m.criterion(m(x), y))
    trainer(tmp_path, 15).fit(m, data)
    m.eval()
    assert float(m.criterion(m(x), y)) < 0.7 * before


def test_static_inference_stats() -> None:
    m = LinearProbe(num_classes=4, **TINY).eval()
    stats = m.inference_stats()  # nothing seen yet: the static defaults
    assert float(stats["keep_rate"]) == 1.0 and stats["exit_share"].tolist() == [1.0]
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(m(x), m.infer(x).logits)
    assert m.inference_meter.update_count == 0  # forward and infer record nothing: the steps do
    m.inference_meter.update(m.infer(x))
    stats = m.inference_stats()
    assert float(stats["images"]) == 3 and float(stats["gflops"]) == pytest.approx(float(stats["gflops_backbone"]))
    assert stats["keep_rate_per_layer"].shape == (12,)
    m.reset_inference_stats()
    assert m.inference_meter.update_count == 0


def test_labels_outside_the_head_are_a_clear_error() -> None:
    m = LinearProbe(num_classes=3, **TINY)
    with pytest.raises(DataError, match=r"Label 7 is outside \[0, 3\)"):
        m.training_step((torch.randn(2, 3, 32, 32), torch.tensor([0, 7])), 0)


@pytest.mark.parametrize("lr", [0.0, -1e-3])
def test_non_positive_learning_rate_is_a_clear_error(lr: float) -> None:
    with pytest.raises(PETLError, match="lr must be positive"):
        LinearProbe(num_classes=3, lr=lr, **TINY)


def test_checkpoint_holds_only_trainable_tensors_and_reloads(tmp_path: Path) -> None:
    m = DropoutProbe(num_classes=4, **TINY)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, filename="last")
    trainer(tmp_path, 1, [ckpt_cb]).fit(m, TinyData())
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert sorted(ckpt["state_dict"]) == ["adapter.1.bias", "adapter.1.weight", "model.head.bias", "model.head.weight"]
    again = DropoutProbe.load_from_checkpoint(tmp_path / "last.ckpt")
    torch.testing.assert_close(again.head.weight, m.head.weight)
    torch.testing.assert_close(again.vit.vit.blocks[0].attn.qkv.weight.shape, m.vit.vit.blocks[0].attn.qkv.weight.shape)


def test_checkpoint_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    m = LinearProbe(num_classes=4, **TINY)
    trainer(tmp_path, 1, [ModelCheckpoint(dirpath=tmp_path, filename="last")]).fit(m, TinyData())
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    with pytest.raises(CheckpointError, match=r"num_classes 4 \(checkpoint\) vs 7 \(this run\)"):
        LinearProbe(num_classes=7, **TINY).check_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match=r"method '.*LinearProbe' \(checkpoint\) vs '.*DropoutProbe'"):
        DropoutProbe(num_classes=4, **TINY).check_checkpoint(ckpt)
    del ckpt["petl"]  # a checkpoint without our identity record: the tensors themselves are checked
    with pytest.raises(
        CheckpointError, match=r"shape mismatch model.head.weight: checkpoint \(4, 192\) vs model \(7, 192\)"
    ):
        LinearProbe(num_classes=7, **TINY).check_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="missing"):
        DropoutProbe(num_classes=4, **TINY).check_checkpoint(ckpt)


def test_full_finetune_trains_the_backbone() -> None:
    m = FullFinetune(num_classes=3, **TINY)
    assert m.parameter_summary()["trainable"] == m.parameter_summary()["total"]
    assert "model.vit.vit.blocks.0.attn.qkv.weight" in m.trainable_state_keys()


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    """Stop after epoch 2 of 5, resume from the checkpoint: same weights as running 5 straight."""

    def run(dirpath: Path, stop_after: int | None = None, ckpt_path: str | None = None) -> DropoutProbe:
        L.seed_everything(7, verbose=False)
        model = DropoutProbe(num_classes=4, lr=0.01, warmup_epochs=1, **TINY)

        class Kill(Callback):
            def on_train_epoch_end(self, trainer, pl_module) -> None:
                if stop_after is not None and trainer.current_epoch + 1 == stop_after:
                    trainer.should_stop = True

        cbs = [ModelCheckpoint(dirpath=dirpath, save_last=True, save_top_k=0), Kill()]
        trainer(dirpath, 5, cbs).fit(model, TinyData(), ckpt_path=ckpt_path)
        return model

    straight = run(tmp_path / "a")
    run(tmp_path / "b", stop_after=2)
    resumed = run(tmp_path / "c", ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)
