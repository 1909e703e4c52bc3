"""Callbacks that log what a module executed at inference: exit shares, token keep rates, FLOPs.

They only read the module, through its public statistics contract ``pl_module.inference_stats()``
(see :mod:`petl_lightning.stats`), like Lightning's ``LearningRateMonitor`` reads the optimizers;
the module resets its statistics at the start of each evaluation epoch.

Distributed runs: the statistics are a torchmetrics ``Metric``, so ``inference_stats()`` sums the
counts of every process; its ``compute()`` is a collective call, so these callbacks read it on every
rank at the same hook, log the (identical) scalars through ``pl_module.log`` and draw the charts on
rank zero only. Under ``DistributedSampler`` an evaluation set whose size is not a multiple of the
world size is padded with repeated images, which the counts then include (``{stage}/images``).

Static methods (RepAdapter, ARC, the baselines) report no skipping (one exit, keep rate 1) and the
FLOPs of their merged form, so the same callbacks belong in every recipe.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from petl_lightning.errors import MissingExtraError

if TYPE_CHECKING:
    from petl_lightning.tasks.classification import PETLModule

VECTOR_KEYS = ("keep_rate_per_layer", "exit_share", "exit_acc", "exit_depths", "thresholds")


def read_inference_stats(pl_module: LightningModule) -> dict[str, Tensor]:
    """``pl_module.inference_stats()`` as CPU float64 tensors, per-exit / per-block entries 1-D."""
    out = {}
    for k, v in cast("PETLModule", pl_module).inference_stats().items():
        v = v.detach().double().cpu()
        out[k] = v.reshape(-1) if k in VECTOR_KEYS else v
    return out


class InferenceStatsCallback(Callback):
    """Common part: read ``inference_stats()`` at the end of each evaluation epoch, on every rank,
    and hand it to :meth:`log_stats`.

    Attributes:
        last_stats: the statistics last read, per stage (``"val"``, ``"test"``, ``"predict"``), as
            CPU float64 tensors; handy in notebooks after ``trainer.test(...)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.last_stats: dict[str, dict[str, Tensor]] = {}
        self._warned = False

    def log_stats(self, trainer: Trainer, pl_module: LightningModule, stage: str, stats: dict[str, Tensor]) -> None:
        """Log ``stats`` of ``stage``; runs on every rank (use ``trainer.is_global_zero`` for media)."""

    def _read(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "inference_stats", None)):
            if not self._warned:
                rank_zero_warn(
                    f"{type(self).__name__}: {type(pl_module).__name__} has no inference_stats(); nothing "
                    f"is logged. Use a petl_lightning module (a PETLModule)."
                )
                self._warned = True
            return
        if trainer.sanity_checking:
            return
        stats = read_inference_stats(pl_module)  # collective under DDP: every rank calls it
        self.last_stats[stage] = stats
        self.log_stats(trainer, pl_module, stage, stats)

    @staticmethod
    def _log(pl_module: LightningModule, stage: str, values: dict[str, float]) -> None:
        """Log scalars through the module (every logger, ``callback_metrics``, checkpoint monitors).
        The values are already global, so the mean over ranks (``sync_dist``) leaves them as they are."""
        if stage == "predict":
            return  # Lightning does not log during predict; last_stats keeps the numbers
        for key, value in values.items():
            if not math.isnan(value):
                pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=True)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._read(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._read(trainer, pl_module, "test")

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._read(trainer, pl_module, "predict")


class ExitRateLogger(InferenceStatsCallback):
    """Logs where images left (Dyn-Adapter) and how many tokens each block kept (DyT).

    At the end of every validation / test epoch, from ``pl_module.inference_stats()``:

    - scalars ``{stage}/exit_share/blockDD`` (share of images that left after block DD) and
      ``{stage}/exit_acc/blockDD`` (their accuracy, where known), ``{stage}/keep_rate`` and
      ``{stage}/keep_rate/blockDD``, ``{stage}/exit_threshold/blockDD`` when the module reports
      thresholds;
    - bar charts on rank zero: with a ``WandbLogger`` a table and a bar plot per chart
      (``{stage}/exit_share_table`` + ``{stage}/exit_share_chart``, ``{stage}/keep_rate_table`` +
      ``{stage}/keep_rate_chart``), and the figure ``{stage}/inference_stats`` for every logger
      that takes images or figures (W&B, TensorBoard);
      with ``save_png`` a PNG in ``<log_dir>/inference_stats/``.

    Args:
        charts: draw the bar charts (only those with content).
        per_block: also log one keep-rate scalar per block. Default (None): only when some block
            skipped tokens in that epoch.
        save_png: also save each chart as ``<log_dir>/inference_stats/{stage}_step{N}.png``.
    """

    def __init__(self, charts: bool = True, per_block: bool | None = None, save_png: bool = False) -> None:
        super().__init__()
        self.charts, self.per_block, self.save_png = charts, per_block, save_png
        self.saved_pngs: list[Path] = []

    def scalars(self, stage: str, stats: dict[str, Tensor]) -> dict[str, float]:
        """The scalars this callback logs for ``stats``."""
        from petl_lightning.plotting import block_labels, exit_labels, skips_tokens

        out: dict[str, float] = {}
        exits = exit_labels(stats)
        for label, share in zip(exits, stats["exit_share"].tolist()):
            out[f"{stage}/exit_share/{label}"] = share
        for label, acc in zip(exits, stats["exit_acc"].tolist()):
            out[f"{stage}/exit_acc/{label}"] = acc  # NaN (no image left there) is skipped
        thresholds = stats.get("thresholds")
        if thresholds is not None and int(thresholds.numel()) == len(exits) - 1:
            for label, thr in zip(exits, thresholds.tolist()):
                out[f"{stage}/exit_threshold/{label}"] = thr if math.isfinite(thr) else float("nan")
        out[f"{stage}/keep_rate"] = float(stats["keep_rate"])
        if self.per_block or (self.per_block is None and skips_tokens(stats)):
            for label, rate in zip(block_labels(stats), stats["keep_rate_per_layer"].tolist()):
                out[f"{stage}/keep_rate/{label}"] = rate
        return out

    def log_stats(self, trainer: Trainer, pl_module: LightningModule, stage: str, stats: dict[str, Tensor]) -> None:
        self._log(pl_module, stage, self.scalars(stage, stats))
        if not (self.charts or self.save_png):
            return
        log_dir = trainer.log_dir if self.save_png else None  # a collective under DDP: every rank reads it
        if not trainer.is_global_zero:
            return
        from petl_lightning.plotting import has_exits, inference_stats_figure, log_figure, save_figure, skips_tokens

        wanted = tuple(c for c, on in (("exits", has_exits(stats)), ("keep", skips_tokens(stats))) if on)
        if not wanted:
            return
        step = trainer.global_step
        if self.charts:
            self._wandb_charts(trainer, stage, stats, wanted, step)
        try:
            fig = inference_stats_figure(stats, f"{type(pl_module).__name__} {stage} (step {step})", wanted)
        except MissingExtraError as err:
            if not self._warned:
                rank_zero_warn(f"ExitRateLogger draws no figures: {err}")
                self._warned = True
            return
        if self.save_png:
            root = Path(log_dir or trainer.default_root_dir) / "inference_stats"
            self.saved_pngs.append(save_figure(fig, root / f"{stage}_step{step}.png"))
        if self.charts:
            log_figure(trainer, f"{stage}/inference_stats", fig)

    @staticmethod
    def _wandb_charts(
        trainer: Trainer, stage: str, stats: dict[str, Tensor], wanted: tuple[str, ...], step: int
    ) -> None:
        from lightning.pytorch.loggers import WandbLogger

        from petl_lightning.plotting import block_labels, exit_labels

        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        import wandb

        media: dict[str, Any] = {}
        if "exits" in wanted:
            rows = [
                [label, float(s), None if math.isnan(float(a)) else float(a)]
                for label, s, a in zip(exit_labels(stats), stats["exit_share"], stats["exit_acc"])
            ]
            table = wandb.Table(data=rows, columns=["exit", "share", "accuracy"])
            media[f"{stage}/exit_share_table"] = table
            media[f"{stage}/exit_share_chart"] = wandb.plot.bar(
                table, "exit", "share", title=f"{stage}: share of images per exit"
            )
        if "keep" in wanted:
            rows = [[label, float(r)] for label, r in zip(block_labels(stats), stats["keep_rate_per_layer"])]
            table = wandb.Table(data=rows, columns=["block", "keep_rate"])
            media[f"{stage}/keep_rate_table"] = table
            media[f"{stage}/keep_rate_chart"] = wandb.plot.bar(
                table, "block", "keep_rate", title=f"{stage}: token keep rate per block"
            )
        for lg in loggers:
            lg.log_metrics(media, step=step)


class FlopsLogger(InferenceStatsCallback):
    """Logs the executed inference cost at the end of every validation / test epoch.

    Scalars, from ``pl_module.inference_stats()``: ``{stage}/gflops_per_image`` (executed GFLOPs
    per image, papers' convention: one multiply-add = one FLOP), ``{stage}/gflops_backbone`` (the
    frozen backbone with a linear head), ``{stage}/flops_vs_backbone`` (their ratio), ``{stage}/images``
    and, when the module reports ``gflops_full`` (Dyn-Adapter: the model without early exits),
    ``{stage}/flops_vs_full``.
    """

    def scalars(self, stage: str, stats: dict[str, Tensor]) -> dict[str, float]:
        """The scalars this callback logs for ``stats``."""
        gflops, backbone = float(stats["gflops"]), float(stats["gflops_backbone"])
        out = {
            f"{stage}/gflops_per_image": gflops,
            f"{stage}/gflops_backbone": backbone,
            f"{stage}/flops_vs_backbone": gflops / backbone if backbone > 0 else float("nan"),
            f"{stage}/images": float(stats["images"]),
        }
        full = stats.get("gflops_full")
        if full is not None and float(full) > 0:
            out[f"{stage}/flops_vs_full"] = gflops / float(full)
        return out

    def log_stats(self, trainer: Trainer, pl_module: LightningModule, stage: str, stats: dict[str, Tensor]) -> None:
        self._log(pl_module, stage, self.scalars(stage, stats))


__all__ = ["ExitRateLogger", "FlopsLogger", "InferenceStatsCallback", "read_inference_stats"]
