"""``ExitCalibration``: Dyn-Adapter's exit thresholds calibrated for its FLOPs budget on held-out data,
during fit and before test, with the accuracy-vs-GFLOPs curve drawn at the end of fit."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import AttributeDict, rank_zero_info, rank_zero_warn

from petl_lightning.callbacks.stats import InferenceStatsCallback
from petl_lightning.errors import ConfigError, MissingExtraError

if TYPE_CHECKING:
    from petl_lightning.methods.dyn_adapter.early_exit import EarlyExitModule

CURVE_FILE = "dyn_adapter_curve.png"
CURVE_KEY = "dyn_adapter/acc_vs_gflops"


class ExitCalibration(Callback):
    """Keeps a Dyn-Adapter module calibrated for its ``calibration.budget`` (a share of the full
    model's FLOPs) on held-out data:

    - at every validation epoch end, from the exits the validation step already computed (cheap),
      so the exit shares and GFLOPs logged during fit are those of calibrated thresholds;
    - at the end of fit when the last epoch did not validate (it runs the held-out split once and
      re-saves ``last.ckpt``), then draws the accuracy-vs-GFLOPs curve (``<log_dir>/dyn_adapter_curve.png``,
      also sent to the loggers) with every single exit's point;
    - before testing, when the checkpoint holds no calibration or one for another budget (so a
      test-time ``--model.init_args.calibration.budget`` wins).

    Fixed ``calibration.thresholds`` or ``budget: null`` switch it off. It must come before the
    callbacks that read ``inference_stats()`` (ExitRateLogger, FlopsLogger) in ``trainer.callbacks``.

    Args:
        curve: draw the curve at the end of fit.
        budgets: the curve's budgets.
    """

    def __init__(self, curve: bool = True, budgets: list[float] | None = None) -> None:
        super().__init__()
        self.curve = curve
        self.budgets = budgets or [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
        self.curve_path: Path | None = None

    @staticmethod
    def _exits(pl_module: LightningModule) -> EarlyExitModule:
        """``pl_module`` as the early-exit module it is whenever :meth:`_active` holds."""
        return cast("EarlyExitModule", pl_module)

    @staticmethod
    def _active(pl_module: LightningModule) -> bool:
        cfg = getattr(pl_module, "calibration_config", None)
        return cfg is not None and cfg.budget is not None and cfg.thresholds is None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning, undeclared
        ours = [cb for cb in callbacks if cb is self or isinstance(cb, InferenceStatsCallback)]
        if ours and ours[0] is not self:
            raise ConfigError(
                f"ExitCalibration must come before {type(ours[0]).__name__} in trainer.callbacks (it "
                f"sets the thresholds the statistics are read at); move it up in the recipe."
            )

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not self._active(pl_module):
            return
        module = self._exits(pl_module)
        out = module.held_out_exits(gather=True)
        if out is None:
            return
        res = module.calibrate(out)
        local = module.held_out_exits(gather=False)
        assert local is not None  # this process's part of ``out``
        module.record_exits(local)
        module.log_dict(
            {"calib/acc": res["acc"], "calib/gflops": res["gflops"], "calib/flops_ratio": res["flops_ratio"]}
        )

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._active(pl_module):
            return
        module = self._exits(pl_module)
        res = module.calibration_result or {}
        dm = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning, undeclared on Trainer
        held_out = module.held_out_exits(gather=True)
        if res.get("step") != trainer.global_step or held_out is None:  # the last epoch did not validate
            held_out = self._held_out(module, dm)
            if held_out is None:
                return
            res = module.calibrate(held_out)
            ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "")
            if ckpt:
                trainer.save_checkpoint(ckpt)
        rank_zero_info(
            f"DynAdapter: calibrated for budget {res['budget']:g} on {res['images']} held-out images: "
            f"thresholds {[round(t, 4) for t in res['thresholds']]}, acc {res['acc']:.4f}, "
            f"{res['gflops']:.4f} GFLOPs ({res['flops_ratio']:.3f} of the full model), exit shares "
            f"{[round(s, 3) for s in res['exit_share']]}"
        )
        if self.curve and trainer.is_global_zero:
            try:
                self.draw_curve(trainer, module, held_out)
            except MissingExtraError as err:
                rank_zero_warn(f"ExitCalibration draws no curve: {err}")

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._active(pl_module):
            return
        module = self._exits(pl_module)
        budget = module.calibration_config.budget
        res = module.calibration_result
        if res is not None and res.get("budget") == budget:
            return
        held_out = self._held_out(module, trainer.datamodule)  # type: ignore[attr-defined]  # undeclared
        if held_out is None:
            return
        res = module.calibrate(held_out)
        rank_zero_info(
            f"DynAdapter: calibrated for budget {budget:g} on held-out data before testing: "
            f"{res['flops_ratio']:.3f} of the full FLOPs, held-out acc {res['acc']:.4f}"
        )

    @staticmethod
    def _held_out(pl_module: EarlyExitModule, dm: Any) -> Any:
        if dm is None or getattr(dm, "val_split", None) is None:
            rank_zero_warn(
                "ExitCalibration: no held-out split to calibrate the exit thresholds on (use the "
                "DataModule's protocol='train_val', or call model.calibrate(loader)); thresholds stay "
                f"at {pl_module.thresholds.tolist()}."
            )
            return None
        return pl_module.collect_exits(dm)

    def draw_curve(self, trainer: Trainer, pl_module: EarlyExitModule, held_out: Any) -> None:
        """Save and log the accuracy-vs-GFLOPs curve of ``held_out`` (exits' confidences)."""
        if held_out is None:
            return
        from petl_lightning.methods.dyn_adapter.thresholds import single_exit_points
        from petl_lightning.plotting import accuracy_gflops_figure, log_figure, save_figure

        out = pl_module.collect_exits(held_out)
        points = pl_module.curve(out, budgets=self.budgets)
        fig = accuracy_gflops_figure(
            {f"Dyn-Adapter ({cast(AttributeDict, pl_module.hparams).base}), early exit": points},
            single_exit_points(out, pl_module.exit_costs()),
            "held-out accuracy vs GFLOPs",
        )
        self.curve_path = save_figure(fig, Path(trainer.log_dir or trainer.default_root_dir) / CURVE_FILE)
        log_figure(trainer, CURVE_KEY, fig, self.curve_path)
        rank_zero_info(f"DynAdapter: accuracy-vs-GFLOPs curve saved to {self.curve_path}")


__all__ = ["CURVE_FILE", "ExitCalibration"]
