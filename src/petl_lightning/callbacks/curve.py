"""``ExitCurveLogger``: Dyn-Adapter's held-out accuracy against executed GFLOPs over FLOPs budgets,
drawn at the end of fit (the module calibrates its thresholds itself; this only draws)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from petl_lightning.errors import MissingExtraError

CURVE_FILE = "dyn_adapter_curve.png"
CURVE_KEY = "dyn_adapter/acc_vs_gflops"


class ExitCurveLogger(Callback):
    """At the end of fit, on rank zero: the accuracy-vs-GFLOPs curve of a module with early exits on
    its held-out split (thresholds searched per budget), with every single exit's point, saved to
    ``<log_dir>/dyn_adapter_curve.png`` and sent to the loggers that take figures. It reads the module
    through its public methods (``collect_exits``, ``curve``, ``exit_costs``); other modules are skipped.

    Args:
        budgets: the curve's budgets (shares of the full model's FLOPs).
    """

    def __init__(self, budgets: list[float] | None = None) -> None:
        super().__init__()
        self.budgets = budgets or [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
        self.curve_path: Path | None = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dm = getattr(trainer, "datamodule", None)
        if not hasattr(pl_module, "curve") or getattr(dm, "val_split", None) is None:
            return
        folder = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: every rank
        if not trainer.is_global_zero:
            return
        try:
            self.draw(trainer, pl_module, pl_module.collect_exits(dm), folder)  # type: ignore[operator]
        except MissingExtraError as err:
            rank_zero_warn(f"ExitCurveLogger draws no curve: {err}")

    def draw(self, trainer: Trainer, pl_module: Any, held_out: Any, folder: Path) -> None:
        """Save the curve of ``held_out`` (an exit table) in ``folder`` and log it."""
        from petl_lightning.methods.dyn_adapter.thresholds import single_exit_points
        from petl_lightning.plotting import accuracy_gflops_figure, log_figure, save_figure

        points = pl_module.curve(held_out, budgets=self.budgets)
        fig = accuracy_gflops_figure(
            {f"Dyn-Adapter ({pl_module.hparams.base}), early exit": points},
            single_exit_points(held_out, pl_module.exit_costs()),
            "held-out accuracy vs GFLOPs",
        )
        self.curve_path = save_figure(fig, folder / CURVE_FILE)
        log_figure(trainer, CURVE_KEY, fig, self.curve_path)
        rank_zero_info(f"DynAdapter: accuracy-vs-GFLOPs curve saved to {self.curve_path}")


__all__ = ["CURVE_FILE", "ExitCurveLogger"]
