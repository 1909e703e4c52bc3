"""The selection rules (last epoch, best val, max over test epochs) and ``TestAccuracyTracker``: its
per-epoch test accuracy equals ``trainer.test`` on that epoch's checkpoint, and tracking leaves
training unchanged."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from petl_lightning.callbacks import TestAccuracyTracker
from petl_lightning.callbacks.selection import EpochAccuracy, select
from petl_lightning.data.vtab import VTAB1kDataModule
from petl_lightning.methods.repadapter import RepAdapter

TINY = dict(model_name="vit_tiny_patch16_224", pretrained=False, img_size=32, model_kwargs={"depth": 2})


def test_rules_on_a_hand_made_history() -> None:
    h = [
        EpochAccuracy(0, test=0.50, val=0.60),
        EpochAccuracy(1, test=0.70, val=0.80),
        EpochAccuracy(2, test=0.72, val=0.80),  # val ties with epoch 1: the earlier one is kept
        EpochAccuracy(3, test=0.60, val=None),  # not validated
        EpochAccuracy(4, test=0.65, val=0.70),
    ]
    s = select(h)
    assert (s.last, s.last_epoch) == (0.65, 4)
    assert (s.best_val, s.best_val_epoch) == (0.70, 1)
    assert (s.max_test, s.max_test_epoch) == (0.72, 2)
    no_val = select([EpochAccuracy(0, 0.4), EpochAccuracy(1, 0.3)])
    assert no_val.best_val is None and no_val.best_val_epoch is None and no_val.max_test == 0.4
    with pytest.raises(ValueError):
        select([])


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from petl_lightning.demo import build_digits_task

    root = tmp_path_factory.mktemp("vtab")
    build_digits_task(root)
    return root


def fit(root: Path, folder: Path, tracker: TestAccuracyTracker | None) -> tuple[RepAdapter, VTAB1kDataModule]:
    L.seed_everything(0, verbose=False)
    dm = VTAB1kDataModule(str(root), "digits", protocol="train_val", img_size=32, batch_size=64, num_workers=0)
    model = RepAdapter(num_classes=10, lr=0.01, warmup_epochs=0, **TINY)
    every = ModelCheckpoint(dirpath=folder, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*([tracker] if tracker else []), every],
        default_root_dir=folder,
    )
    trainer.fit(model, datamodule=dm)
    return model, dm


def test_tracked_accuracies_equal_each_epochs_checkpoint(digits: Path, tmp_path: Path) -> None:
    tracker = TestAccuracyTracker(every_n_epochs=1)
    tracked, dm = fit(digits, tmp_path / "a", tracker)
    plain, _ = fit(digits, tmp_path / "b", None)
    for (name, a), b in zip(tracked.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), f"tracking changed training: {name}"
    # Epochs 0 and 1 tested during fit; the final epoch is trainer.test's (finish adds it).
    assert [h.epoch for h in tracker.history] == [0, 1]
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    accs, vals = [], []
    for epoch in range(3):
        model = RepAdapter.load_from_checkpoint(tmp_path / "a" / f"epoch={epoch}.ckpt", map_location="cpu")
        accs.append(trainer.test(model, datamodule=dm, verbose=False)[0]["test/acc"])
        vals.append(trainer.validate(model, datamodule=dm, verbose=False)[0]["val/acc"])
    for h in tracker.history:
        assert h.test == pytest.approx(accs[h.epoch], abs=1e-6)
        assert h.val == pytest.approx(vals[h.epoch], abs=1e-6)
    chosen = tracker.finish(2, accs[2])
    assert chosen.last == pytest.approx(accs[2]) and chosen.max_test == pytest.approx(max(accs), abs=1e-6)
    best = max(range(3), key=lambda e: vals[e])
    assert chosen.best_val_epoch == best and chosen.best_val == pytest.approx(accs[best], abs=1e-6)
    assert len({round(a, 6) for a in accs}) > 1  # the epochs differ, so the rules are exercised
    # The history travels in the checkpoint (a resumed fit keeps it).
    state = torch.load(tmp_path / "a" / "epoch=1.ckpt", map_location="cpu", weights_only=False)["callbacks"]
    saved = next(v for k, v in state.items() if k.startswith("TestAccuracyTracker"))
    assert [h["epoch"] for h in saved["history"]] == [0, 1]
