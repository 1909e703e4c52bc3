"""``TestAccuracyTracker``: test accuracy every few epochs during fit, so a run can report the three
selection rules papers use: the last epoch, the epoch best on the validation split, and the maximum
over epochs of test accuracy (the official RepAdapter / ARC / DyT repositories' rule, which selects on
the test set and so is not a clean estimate)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

SELECTION_LABELS = {
    "last": "last epoch",
    "best_val": "best val epoch",
    "max_test": "max over test epochs",
}
#: What the tables print under the ``max_test`` column.
MAX_TEST_NOTE = "max over test epochs: the official repos' selection, not a clean estimate"


@dataclass
class EpochAccuracy:
    """Accuracies (0-1) after training epoch ``epoch`` (0-based); ``val`` None where it did not validate."""

    epoch: int
    test: float
    val: float | None = None


@dataclass
class Selections:
    """Test accuracy (0-1) under each rule, and the epoch it came from (None where the rule does not apply)."""

    last: float
    last_epoch: int
    best_val: float | None
    best_val_epoch: int | None
    max_test: float
    max_test_epoch: int


def select(history: list[EpochAccuracy]) -> Selections:
    """The three rules over ``history`` (in epoch order). Best val takes the earliest epoch with the
    highest validation accuracy, as a checkpoint that saves on strict improvement does."""
    if not history:
        raise ValueError("select() needs at least one tested epoch.")
    last = history[-1]
    top = max(history, key=lambda h: h.test)  # max() keeps the earliest of equal values
    validated = [h for h in history if h.val is not None]
    best = max(validated, key=lambda h: h.val or 0.0) if validated else None
    return Selections(
        last=last.test,
        last_epoch=last.epoch,
        best_val=best.test if best else None,
        best_val_epoch=best.epoch if best else None,
        max_test=top.test,
        max_test_epoch=top.epoch,
    )


class TestAccuracyTracker(Callback):
    """Tests the module on the datamodule's test split after every ``every_n_epochs``-th training epoch
    (with the validation accuracy of that epoch, when it validated), logs ``epoch_test/acc`` and keeps
    the history in the checkpoint, so a resumed fit keeps the epochs before the interruption.

    The final epoch is left to ``trainer.test`` (``finish`` adds its accuracy), so a fit with
    ``every_n_epochs`` larger than ``max_epochs`` costs nothing extra. The pass runs the module's
    inference path (``infer``) in eval mode under the trainer's precision, like ``test_step``, and
    leaves the random state as it found it, so tracking does not change training.

    Args:
        every_n_epochs: test after epochs ``n-1, 2n-1, ...`` (0-based); 0 tracks only the final test.
    """

    __test__ = False  # not a pytest class

    def __init__(self, every_n_epochs: int = 10) -> None:
        super().__init__()
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be 0 or more (got {every_n_epochs}).")
        self.every_n_epochs = every_n_epochs
        self.history: list[EpochAccuracy] = []
        self._val: tuple[int, float] | None = None  # (epoch, val acc) of the latest validation

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        acc = trainer.callback_metrics.get("val/acc")
        if not trainer.sanity_checking and acc is not None and trainer.state.fn == "fit":
            self._val = (trainer.current_epoch, float(acc))

    def val_acc(self, epoch: int) -> float | None:
        """The validation accuracy of ``epoch`` if it validated."""
        return self._val[1] if self._val is not None and self._val[0] == epoch else None

    def due(self, trainer: Trainer, epoch: int) -> bool:
        """Whether epoch ``epoch`` is tested here (not the final one: ``trainer.test`` tests that)."""
        n = self.every_n_epochs
        final = trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs
        return n > 0 and (epoch + 1) % n == 0 and not final and all(h.epoch != epoch for h in self.history)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """After a resume: test the checkpoint's own epoch if it is due and missing (the checkpoint may
        have been written at validation end, before this epoch's test)."""
        if trainer.current_epoch > 0 and self.due(trainer, trainer.current_epoch - 1):
            self.track(trainer, pl_module, trainer.current_epoch - 1)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.due(trainer, trainer.current_epoch):
            self.track(trainer, pl_module, trainer.current_epoch)
            pl_module.log("epoch_test/acc", self.history[-1].test, on_epoch=True)

    def track(self, trainer: Trainer, pl_module: LightningModule, epoch: int) -> None:
        """Test now and record it as epoch ``epoch``."""
        acc = self.test_accuracy(trainer, pl_module)
        self.history.append(EpochAccuracy(epoch, acc, self.val_acc(epoch)))
        self.history.sort(key=lambda h: h.epoch)

    @torch.no_grad()
    def test_accuracy(self, trainer: Trainer, pl_module: LightningModule) -> float:
        """Top-1 accuracy of ``pl_module.infer`` on the test split (every rank runs the whole split)."""
        loader = trainer.datamodule.test_dataloader()  # type: ignore[attr-defined]
        device = pl_module.device
        devices = [device] if device.type == "cuda" else []
        was_training = pl_module.training
        pl_module.eval()
        correct = total = 0
        try:
            with torch.random.fork_rng(devices=devices), trainer.precision_plugin.forward_context():
                for x, y in loader:
                    x, y = x.to(device), y.to(device)
                    logits = pl_module.infer(x).logits  # type: ignore[operator]
                    correct += int((logits.argmax(dim=-1) == y).sum())
                    total += y.numel()
        finally:
            pl_module.train(was_training)
        return correct / max(total, 1)

    def finish(self, epoch: int, test_acc: float) -> Selections:
        """Add the final test (``trainer.test`` after fit) as epoch ``epoch`` and apply the rules."""
        self.history = [h for h in self.history if h.epoch != epoch]
        self.history.append(EpochAccuracy(epoch, test_acc, self.val_acc(epoch)))
        return select(self.history)

    def state_dict(self) -> dict[str, Any]:
        return {"history": [asdict(h) for h in self.history], "val": self._val}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [EpochAccuracy(**h) for h in state_dict.get("history", [])]
        val = state_dict.get("val")
        self._val = (int(val[0]), float(val[1])) if val else None


__all__ = ["MAX_TEST_NOTE", "SELECTION_LABELS", "EpochAccuracy", "Selections", "TestAccuracyTracker", "select"]
