"""Callbacks that log what a module executed at inference: exit shares, token keep rates, FLOPs.

They read the module only through its public statistics contract,
``pl_module.inference_stats()`` / ``pl_module.reset_inference_stats()`` (see
:mod:`petl_lightning.stats`), like Lightning's ``LearningRateMonitor`` reads the optimizers.

- :class:`ExitRateLogger`: per-exit shares and accuracies (Dyn-Adapter), per-block token keep rates
  (DyT), as scalars and as bar charts (W&B: a ``wandb.Table`` + ``wandb.plot.bar``; TensorBoard: a
  matplotlib figure; optionally a PNG next to the logs).
- :class:`FlopsLogger`: executed GFLOPs per image and their ratio to the frozen backbone.
- :class:`ImageThroughputMonitor`: Lightning's ``ThroughputMonitor`` preset for ``(images, labels)``
  batches, so a recipe can name it without a Python callable.

Distributed runs: the statistics are a torchmetrics ``Metric``, so ``inference_stats()`` sums the
counts of every process; its ``compute()`` is a collective call, so these callbacks read it on every
rank at the same hook, log the (identical) scalars through ``pl_module.log`` and draw the charts on
rank zero only. Under ``DistributedSampler`` an evaluation set whose size is not a multiple of the
world size is padded with repeated images, which the counts then include (``{stage}/images`` shows
it); use such sizes or evaluate on one device for exact numbers.

Static methods (RepAdapter, ARC, the baselines) report no skipping (one exit, keep rate 1) and the
FLOPs of their merged form, so the same callbacks belong in every recipe.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

def exit_labels(stats: dict[str, Tensor]) -> list[str]:
    """Names of the exits: ``block03`` (the exit after 3 blocks) when the module reports
    ``exit_depths``, else ``exit0``, ``exit1``, ..."""
    n = int(stats["exit_share"].numel())
    depths = stats.get("exit_depths")
    if depths is not None and int(depths.numel()) == n:
        return [f"block{int(d):02d}" for d in depths.tolist()]
    return [f"exit{k}" for k in range(n)]


def block_labels(stats: dict[str, Tensor]) -> list[str]:
    """Names of the blocks of ``keep_rate_per_layer``: ``block01`` ... (1-based, as exit depths)."""
    return [f"block{i + 1:02d}" for i in range(int(stats["keep_rate_per_layer"].numel()))]


def has_exits(stats: dict[str, Tensor]) -> bool:
    """Whether the module has more than one exit (an exit chart says something)."""
    return int(stats["exit_share"].numel()) > 1


def skips_tokens(stats: dict[str, Tensor]) -> bool:
    """Whether any block processed fewer than all of its tokens (a keep-rate chart says something)."""
    return bool((stats["keep_rate_per_layer"] < 1.0).any())


def plot_inference_stats(stats: dict[str, Tensor], title: str = "", charts: tuple[str, ...] | None = None) -> Any:
    """A matplotlib figure with bar charts of the exit shares (annotated with each exit's accuracy
    where known) and of the per-block token keep rates.

    Args:
        stats: the dict returned by ``pl_module.inference_stats()``.
        title: figure title.
        charts: which panels, ``("exits", "keep")`` or a subset; default: the ones with content
            (exits when there is more than one, keep rates when any block skipped tokens), or the
            exit panel alone when neither has.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    if charts is None:
        charts = tuple(c for c, on in (("exits", has_exits(stats)), ("keep", skips_tokens(stats))) if on) or ("exits",)
    fig = Figure(figsize=(4.2 * len(charts) + 0.6, 3.4), dpi=110)
    axes = fig.subplots(1, len(charts), squeeze=False)
    for ax, chart in zip(axes[0], charts):
        if chart == "exits":
            labels, share = exit_labels(stats), stats["exit_share"].double().cpu()
            names = [lab.removeprefix("block").lstrip("0") or "0" for lab in labels]
            bars = ax.bar(names, share.tolist(), color="#4C72B0")
            acc = stats.get("exit_acc")
            for k, bar in enumerate(bars):
                text = f"{share[k]:.2f}"
                if acc is not None and not math.isnan(float(acc[k])):
                    text += f"\nacc {float(acc[k]):.2f}"
                ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                            va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
            ax.set_ylim(0, 1.15)
            ax.set_xlabel("exit (after block)")
            ax.set_ylabel("share of images")
            ax.set_title("exit shares", fontsize=9)
        elif chart == "keep":
            labels, keep = block_labels(stats), stats["keep_rate_per_layer"].double().cpu()
            ax.bar([lab.removeprefix("block").lstrip("0") for lab in labels], keep.tolist(), color="#55A868")
            overall = float(stats["keep_rate"])
            ax.axhline(overall, color="gray", linestyle="--", linewidth=1)
            ax.set_ylim(0, 1.05)
            ax.set_xlabel("block")
            ax.set_ylabel("share of patch tokens kept")
            ax.set_title(f"token keep rate (overall {overall:.2f})", fontsize=9)
        else:
            raise ValueError(f"Unknown chart {chart!r}; use 'exits' or 'keep'.")
        ax.grid(axis="y", alpha=0.3)
    gflops = stats.get("gflops")
    suffix = ""
    if gflops is not None and "gflops_backbone" in stats:
        suffix = f"  {float(gflops):.3g} GFLOPs/img ({float(gflops) / float(stats['gflops_backbone']):.2f}x backbone)"
    fig.suptitle(f"{title}{suffix}".strip(), fontsize=9)
    fig.tight_layout()
    return fig


VECTOR_KEYS = ("keep_rate_per_layer", "exit_share", "exit_acc", "exit_acc_all", "exit_depths", "thresholds")


def _to_cpu(stats: dict[str, Tensor]) -> dict[str, Tensor]:
    """CPU float64 copies; per-exit / per-block entries as 1-D tensors (torchmetrics squeezes
    one-element results of ``compute()`` to 0-d, e.g. ``exit_share`` of a one-exit module)."""
    out = {}
    for k, v in stats.items():
        if isinstance(v, Tensor):
            v = v.detach().double().cpu()
            if k in VECTOR_KEYS:
                v = v.reshape(-1)
        out[k] = v
    return out


class InferenceStatsCallback(Callback):
    """Common part: read ``inference_stats()`` at the end of each evaluation epoch, on every rank,
    hand it to :meth:`log_stats`, and reset the statistics.

    The statistics are also reset at the start of each evaluation epoch (so eval-mode forwards made
    outside the loop do not leak in). Of several such callbacks, the last one in
    ``trainer.callbacks`` resets at the epoch end, after all have read the same numbers.

    Attributes:
        last_stats: the statistics last read, per stage (``"val"``, ``"test"``, ``"predict"``), as
            CPU float64 tensors; handy in notebooks after ``trainer.test(...)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.last_stats: dict[str, dict[str, Tensor]] = {}
        self._warned = False

    # -- overridden by the concrete callbacks ----------------------------------------------------
    def log_stats(self, trainer: Trainer, pl_module: LightningModule, stage: str, stats: dict[str, Tensor]) -> None:
        """Log ``stats`` of ``stage``; runs on every rank (use ``trainer.is_global_zero`` for media)."""

    # -- helpers ---------------------------------------------------------------------------------
    def _supported(self, pl_module: LightningModule) -> bool:
        ok = callable(getattr(pl_module, "inference_stats", None)) and callable(
            getattr(pl_module, "reset_inference_stats", None)
        )
        if not ok and not self._warned:
            rank_zero_warn(
                f"{type(self).__name__}: {type(pl_module).__name__} has no inference_stats() / "
                f"reset_inference_stats(); nothing is logged. Use a petl_lightning module (a PETLModule)."
            )
            self._warned = True
        return ok

    @staticmethod
    def _is_last(trainer: Trainer, callback: Callback) -> bool:
        ours = [cb for cb in trainer.callbacks if isinstance(cb, InferenceStatsCallback)]
        return not ours or ours[-1] is callback

    def _reset(self, pl_module: LightningModule) -> None:
        if self._supported(pl_module):
            pl_module.reset_inference_stats()

    def _epoch_end(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self._supported(pl_module):
            return
        if not trainer.sanity_checking:
            stats = _to_cpu(pl_module.inference_stats())  # collective under DDP: every rank calls it
            self.last_stats[stage] = stats
            self.log_stats(trainer, pl_module, stage, stats)
        if self._is_last(trainer, self):
            pl_module.reset_inference_stats()

    @staticmethod
    def _log(pl_module: LightningModule, stage: str, values: dict[str, float]) -> None:
        """Log scalars through the module (every logger, ``callback_metrics``, checkpoint monitors).
        The values are already global, so the mean over ranks (``sync_dist``) leaves them as they are."""
        if stage == "predict":
            return  # Lightning does not log during predict; last_stats keeps the numbers
        for key, value in values.items():
            if not math.isnan(value):
                pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=True)

    # -- Lightning hooks -------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset(pl_module)

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset(pl_module)

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset(pl_module)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_end(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_end(trainer, pl_module, "test")

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_end(trainer, pl_module, "predict")


class ExitRateLogger(InferenceStatsCallback):
    """Logs where images left (Dyn-Adapter) and how many tokens each block kept (DyT).

    At the end of every validation / test epoch, from ``pl_module.inference_stats()``:

    - scalars ``{stage}/exit_share/blockDD`` (share of images that left after block DD) and
      ``{stage}/exit_acc/blockDD`` (their accuracy, where known), ``{stage}/keep_rate`` and
      ``{stage}/keep_rate/blockDD`` (share of patch tokens block DD's skippable sub-block processed),
      ``{stage}/exit_threshold/blockDD`` when the module reports thresholds;
    - bar charts on rank zero: with a ``WandbLogger`` a table and a bar plot per chart
      (``{stage}/exit_share_table`` + ``{stage}/exit_share_chart``, ``{stage}/keep_rate_table`` +
      ``{stage}/keep_rate_chart``); with a ``TensorBoardLogger`` a figure ``{stage}/inference_stats``;
      with ``save_png`` a PNG in ``<log_dir>/inference_stats/``.

    then resets the statistics. Static modules log one exit with share 1 and keep rates 1.

    Args:
        charts: draw the bar charts (only those with content: exits when there are several, keep
            rates when some block skipped tokens).
        per_block: also log one keep-rate scalar per block (the overall one is always logged).
            Default (None): only when some block skipped tokens in that epoch, so static and
            exit-only modules do not log a column of ones per block.
        save_png: also save each chart as ``<log_dir>/inference_stats/{stage}_step{N}.png``.
    """

    def __init__(self, charts: bool = True, per_block: bool | None = None, save_png: bool = False) -> None:
        super().__init__()
        self.charts = charts
        self.per_block = per_block
        self.save_png = save_png
        self.saved_pngs: list[Path] = []

    def scalars(self, stage: str, stats: dict[str, Tensor]) -> dict[str, float]:
        """The scalars this callback logs for ``stats``."""
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
        if not trainer.is_global_zero or not (self.charts or self.save_png):
            return
        wanted = tuple(c for c, on in (("exits", has_exits(stats)), ("keep", skips_tokens(stats))) if on)
        if not wanted:
            return
        step = trainer.global_step
        if self.charts:
            self._wandb_charts(trainer, stage, stats, wanted, step)
        needs_figure = self.save_png or (self.charts and self._tensorboards(trainer))
        if not needs_figure:
            return
        fig = plot_inference_stats(stats, f"{type(pl_module).__name__} {stage} (step {step})", wanted)
        if self.save_png:
            root = Path(trainer.log_dir or trainer.default_root_dir) / "inference_stats"
            root.mkdir(parents=True, exist_ok=True)
            path = root / f"{stage}_step{step}.png"
            fig.savefig(path)
            self.saved_pngs.append(path)
        if self.charts:
            for tb in self._tensorboards(trainer):
                tb.experiment.add_figure(f"{stage}/inference_stats", fig, global_step=step, close=False)

    @staticmethod
    def _tensorboards(trainer: Trainer) -> list[Any]:
        from lightning.pytorch.loggers import TensorBoardLogger

        return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]

    @staticmethod
    def _wandb_charts(trainer: Trainer, stage: str, stats: dict[str, Tensor], wanted: tuple[str, ...], step: int) -> None:
        from lightning.pytorch.loggers import WandbLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        import wandb

        media: dict[str, Any] = {}
        if "exits" in wanted:
            rows = [[label, float(s), None if math.isnan(float(a)) else float(a)]
                    for label, s, a in zip(exit_labels(stats), stats["exit_share"], stats["exit_acc"])]
            table = wandb.Table(data=rows, columns=["exit", "share", "accuracy"])
            media[f"{stage}/exit_share_table"] = table
            media[f"{stage}/exit_share_chart"] = wandb.plot.bar(
                table, "exit", "share", title=f"{stage}: share of images per exit")
        if "keep" in wanted:
            rows = [[label, float(r)] for label, r in zip(block_labels(stats), stats["keep_rate_per_layer"])]
            table = wandb.Table(data=rows, columns=["block", "keep_rate"])
            media[f"{stage}/keep_rate_table"] = table
            media[f"{stage}/keep_rate_chart"] = wandb.plot.bar(
                table, "block", "keep_rate", title=f"{stage}: token keep rate per block")
        for lg in loggers:
            lg.log_metrics(media, step=step)


class FlopsLogger(InferenceStatsCallback):
    """Logs the executed inference cost at the end of every validation / test epoch.

    Scalars, from ``pl_module.inference_stats()``: ``{stage}/gflops_per_image`` (executed GFLOPs
    per image, papers' convention: one multiply-add = one FLOP), ``{stage}/gflops_backbone`` (the
    frozen backbone with a linear head), ``{stage}/flops_vs_backbone`` (their ratio: below 1 where
    tokens or blocks were skipped, 1 for merged static methods), ``{stage}/images`` (how many images
    the average is over) and, when the module reports ``gflops_full`` (Dyn-Adapter: the model
    without early exits), ``{stage}/flops_vs_full``. Then resets the statistics.
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


def images_in_batch(batch: Any) -> int:
    """Number of images in an ``(images, labels)`` batch, an image tensor, or a dict with ``image(s)``."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0])
    if isinstance(batch, (tuple, list)) and batch:
        return images_in_batch(batch[0])
    if isinstance(batch, dict):
        for key in ("images", "image", "x", "pixel_values"):
            if key in batch:
                return images_in_batch(batch[key])
    raise TypeError(f"Cannot count the images in a batch of type {type(batch).__name__}.")


class ImageThroughputMonitor(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` for image batches: logs ``train/device/samples_per_sec``
    and ``train/device/batches_per_sec`` (per device, averaged over the last ``window_size``
    batches), ``train/samples_per_sec`` / ``train/batches_per_sec`` (all devices) when distributed,
    running totals ``train/samples``, ``train/batches``, ``train/time``; the same under
    ``validate/`` and ``test/``.

    Preset so a recipe can list it without a Python callable: the batch size is the first tensor's
    length (:func:`images_in_batch`). No FLOPs are passed to Lightning's monitor: its MFU would need
    training FLOPs (forward + backward), while :class:`FlopsLogger` reports executed inference FLOPs.

    Args:
        window_size: batches to average over (Lightning's default 100 is longer than a VTAB-1K
            epoch at batch size 64).
        separator: between the stage and the metric name.
    """

    def __init__(self, window_size: int = 10, separator: str = "/") -> None:
        super().__init__(batch_size_fn=images_in_batch, window_size=window_size, separator=separator)
        # We deliberately pass no FLOPs (see the docstring); silence Lightning's reminder about it.
        warnings.filterwarnings("ignore", message=r".*ThroughputMonitor.*flops_per_batch", category=UserWarning)


def read_inference_stats(pl_module: LightningModule) -> dict[str, Tensor]:
    """``pl_module.inference_stats()`` as CPU float64 tensors (for notebooks and scripts)."""
    return _to_cpu(pl_module.inference_stats())


__all__ = [
    "ExitRateLogger", "FlopsLogger", "ImageThroughputMonitor", "InferenceStatsCallback", "block_labels",
    "exit_labels", "images_in_batch", "plot_inference_stats", "read_inference_stats",
]
