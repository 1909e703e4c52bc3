"""``PredictionWriter``: ``predict`` writes one CSV row per image into the run folder."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, cast

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

if TYPE_CHECKING:
    from petl_lightning.tasks.classification import PETLModule

COLUMNS = ("path", "class_index", "class_name", "confidence", "exit_block", "keep_rate", "gflops")


class PredictionWriter(BasePredictionWriter):
    """Writes ``<default_root_dir>/<dirname>/<name>.csv`` during ``predict``: for every image its path,
    predicted class index and name, confidence (softmax probability of that class), the block after
    which it left (Dyn-Adapter's exit; the depth for the others), the share of patch tokens it kept
    (DyT; 1 for the others) and its executed GFLOPs. ``name`` is the DataModule's predict source
    (list file stem or image folder name). Written to a temporary file, renamed when complete.

    Args:
        dirname: sub-folder of the run folder.
    """

    def __init__(self, dirname: str = "predictions") -> None:
        super().__init__(write_interval="batch")
        self.dirname = dirname
        self.path: Path | None = None
        self._file: TextIO | None = None
        self._writer: Any = None
        self._tmp: Path | None = None

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dm = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning, undeclared on Trainer
        name = getattr(dm, "predict_name", "predictions")
        suffix = f".rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        self.path = Path(trainer.default_root_dir) / self.dirname / f"{name}{suffix}.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._file = open(self._tmp, "w", newline="")
        self._writer = csv.writer(self._file)
        self._writer.writerow(COLUMNS)

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        dm = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning, undeclared on Trainer
        paths = getattr(dm, "predict_paths", lambda: None)()
        names = getattr(dm, "class_names", None)
        depths = getattr(pl_module, "exit_depths", None) or [cast("PETLModule", pl_module).vit.depth]
        rows = zip(*(prediction[k].tolist() for k in ("pred", "confidence", "exit", "keep_rate", "gflops")))
        for i, (pred, conf, ex, keep, gf) in zip(batch_indices or range(len(prediction["pred"])), rows):
            path = str(paths[i]) if paths is not None else str(i)
            name = names[pred] if names and pred < len(names) else ""
            self._writer.writerow([path, pred, name, f"{conf:.6f}", depths[ex], f"{keep:.4f}", f"{gf:.6f}"])

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._file is None or self.path is None or self._tmp is None:
            return
        self._file.close()
        os.replace(self._tmp, self.path)
        self._file = None
        rank_zero_info(f"Predictions written to {self.path}")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self._file is not None and self._tmp is not None:
            self._file.close()
            self._tmp.unlink(missing_ok=True)
            self._file = None


__all__ = ["COLUMNS", "PredictionWriter"]
