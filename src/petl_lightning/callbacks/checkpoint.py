"""``PETLCheckpoint``: Lightning's ``ModelCheckpoint`` with the defaults every run of this package
needs, and ``AtomicCheckpointIO``: checkpoints written to a temporary file and renamed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` that writes a local checkpoint to a temporary file next to it
    and renames it into place, so an interrupt never leaves half a checkpoint (the CLI installs it)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path) or storage_options is not None:  # remote storage: Lightning's own writer
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            torch.save(checkpoint, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


class PETLCheckpoint(ModelCheckpoint):
    """``last.ckpt`` at every training epoch end, whatever the protocol, plus the best by
    ``monitor`` where validation logs it, in ``<default_root_dir>/checkpoints/`` (not inside a
    logger's version folder), so ``--ckpt_path last`` finds it from a new process.

    ``last.ckpt`` is written here rather than by ``ModelCheckpoint(save_last=True)``, which (Lightning
    2.6) refreshes it only in epochs that also saved a best checkpoint.

    Args:
        dirpath: folder (default ``<trainer.default_root_dir>/checkpoints``).
        monitor / mode / save_top_k / filename: as ``ModelCheckpoint``; ``monitor`` None (default):
            the task's own validation metric (the module's ``validation_metric``: ``val/acc`` for
            classification, ``val/mIoU`` for segmentation). Without a validation split no best
            checkpoint is kept (only ``last.ckpt``).
        **kwargs: further ``ModelCheckpoint`` arguments.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        monitor: str | None = None,
        mode: str = "max",
        save_top_k: int = 1,
        filename: str = "best-epoch{epoch}",
        auto_insert_metric_name: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("save_last", None)
        super().__init__(
            dirpath=dirpath,
            monitor=monitor,
            mode=mode,
            save_top_k=save_top_k,
            filename=filename,
            save_last=False,
            auto_insert_metric_name=auto_insert_metric_name,
            **kwargs,
        )

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        dm = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning, undeclared on Trainer
        if self.monitor is None:
            self.monitor = getattr(pl_module, "validation_metric", "val/acc")
        if stage == "fit" and (
            not trainer.enable_validation or (dm is not None and getattr(dm, "val_split", "") is None)
        ):
            self.monitor, self.save_top_k = None, 0  # no validation metric: keep last.ckpt only
        super().setup(trainer, pl_module, stage)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)  # the best by monitor, where one is logged
        if trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:  # type: ignore[attr-defined]
            return
        # Every process computes the epoch's metrics (each a collective under DDP) before the save's
        # barrier: the progress bar computes them on rank 0 only, and ModelCheckpoint reads them only
        # in epochs it saves a best checkpoint, so without this the processes' collectives cross and
        # hang at the first epoch end with no validation.
        trainer.callback_metrics  # noqa: B018 - read for its side effect
        self.last_model_path = os.path.join(str(self.dirpath), f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")
        trainer.save_checkpoint(self.last_model_path, self.save_weights_only)


__all__ = ["AtomicCheckpointIO", "PETLCheckpoint"]
