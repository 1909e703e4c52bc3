"""``PredictionWriter``: ``predict`` writes one CSV row per image into the run folder (and, for a
segmenter, each image's class map as a palette PNG beside it)."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, cast

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image

from petl_lightning.callbacks.masks import write_mask_png

if TYPE_CHECKING:
    from petl_lightning.tasks.classification import PETLModule

COLUMNS = ("path", "class_index", "class_name", "confidence", "exit_block", "keep_rate", "gflops")
#: A segmenter's rows: the image, its class map (a palette PNG, relative to the CSV), what executed.
MASK_COLUMNS = ("path", "mask", "keep_rate", "gflops")


class PredictionWriter(BasePredictionWriter):
    """Writes ``<default_root_dir>/<dirname>/<name>.csv`` during ``predict``: for every image its path,
    predicted class index and name, confidence (softmax probability of that class), the block after
    which it left (Dyn-Adapter's exit; the depth for the others), the share of patch tokens it kept
    (DyT; 1 for the others) and its executed GFLOPs. ``name`` is the DataModule's predict source
    (list file stem or image folder name). Written to a temporary file, renamed when complete.
    A segmenter's predictions (a ``mask`` per image) are written as palette PNGs of the image's own
    size in ``<dirname>/<name>/<image stem>.png``, and the CSV lists them (:data:`MASK_COLUMNS`).

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
        dense = hasattr(pl_module, "class_names")  # a segmenter names its classes; its rows list mask files
        self._writer.writerow(MASK_COLUMNS if dense else COLUMNS)

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
        if "mask" in prediction:
            self.write_masks(prediction, batch_indices, paths)
            return
        names = getattr(dm, "class_names", None)
        depths = getattr(pl_module, "exit_depths", None) or [cast("PETLModule", pl_module).vit.depth]
        rows = zip(*(prediction[k].tolist() for k in ("pred", "confidence", "exit", "keep_rate", "gflops")))
        for i, (pred, conf, ex, keep, gf) in zip(batch_indices or range(len(prediction["pred"])), rows):
            path = str(paths[i]) if paths is not None else str(i)
            name = names[pred] if names and pred < len(names) else ""
            self._writer.writerow([path, pred, name, f"{conf:.6f}", depths[ex], f"{keep:.4f}", f"{gf:.6f}"])

    def write_masks(self, prediction: dict[str, Any], batch_indices: Any, paths: Any) -> None:
        """Each image's class map, cropped to its size before padding and resized (nearest) to the
        image file's size, as ``<csv stem>/<image stem>.png``; one CSV row each."""
        assert self.path is not None
        folder = self.path.with_suffix("")
        masks, sizes = prediction["mask"], prediction["size"].tolist()
        keep, gflops = prediction["keep_rate"].tolist(), prediction["gflops"].tolist()
        for j, i in enumerate(batch_indices or range(len(masks))):
            source = Path(paths[i]) if paths is not None else None
            h, w = sizes[j]
            size = Image.open(source).size if source is not None and source.is_file() else None
            out = folder / f"{source.stem if source is not None else i}.png"
            write_mask_png(masks[j, :h, :w], out, size)
            row = [str(source or i), f"{folder.name}/{out.name}", f"{keep[j]:.4f}", f"{gflops[j]:.6f}"]
            self._writer.writerow(row)

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


__all__ = ["COLUMNS", "MASK_COLUMNS", "PredictionWriter"]
