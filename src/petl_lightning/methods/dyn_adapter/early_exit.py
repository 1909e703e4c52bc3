"""`EarlyExitModule`: what an early-exit method needs besides its exits, with the statistics contract.

A subclass provides ``forward_exits(x) -> (E, B, K)``, ``confidence(logits) -> (B,)``,
``exit_costs() -> ExitCosts``, ``full_flops()``, ``exit_depths``, ``thresholds`` (a buffer) and
``calibration_config``; this class collects every exit's confidence and prediction on held-out
images (:class:`~.thresholds.ExitOutputs`), calibrates the thresholds on them for a FLOPs budget,
records the statistics the dynamic path would give at the current thresholds, logs validation and
test, and keeps the calibration in checkpoints (a test-time ``calibration.thresholds`` wins).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from petl_lightning.errors import ConfigError
from petl_lightning.methods.base import PETLModule
from petl_lightning.methods.dyn_adapter import thresholds as th
from petl_lightning.methods.dyn_adapter.config import CalibrationConfig
from petl_lightning.stats import InferenceOutput


class EarlyExitModule(PETLModule):
    """Held-out exit tables, calibration, validation/test logging and checkpointed calibration."""

    exit_depths: list[int]
    thresholds: Tensor
    calibration_config: CalibrationConfig
    exit_accuracy: nn.ModuleList
    #: Patch tokens each block offers skippable sub-blocks (token-skipping bases; else 0).
    skippable_tokens: int = 0
    #: The last calibration (budget, policy, held-out accuracy and FLOPs); saved in checkpoints.
    calibration_result: dict[str, Any] | None = None
    _held_out: list[th.ExitOutputs]

    def forward_exits(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def run_exits(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Every exit on every image: logits (E, B, K) and, where the blocks' cost varies per image
        (token skipping), each image's block FLOPs up to each exit (B, E) and patch tokens kept per
        block (B, depth); else ``None``s."""
        return self.forward_exits(x), None, None

    def offered(self, exit_index: Tensor) -> Tensor:
        """Patch tokens offered to the skippable sub-blocks (B, depth): every block an image ran
        (for images leaving at ``exit_index`` (B,))."""
        depth = self.exit_depths[-1]
        blocks = torch.arange(depth, device=exit_index.device)[None]
        ran = blocks < torch.as_tensor(self.exit_depths, device=exit_index.device)[exit_index][:, None]
        return ran.long() * self.skippable_tokens

    def confidence(self, logits: Tensor) -> Tensor:
        raise NotImplementedError

    def exit_costs(self, merged: bool = False, norm: bool = True) -> th.ExitCosts:
        raise NotImplementedError

    def full_flops(self, merged: bool = False, norm: bool = True) -> int:
        raise NotImplementedError

    @property
    def calibrated(self) -> bool:
        return self.calibration_result is not None

    # -- calibration -----------------------------------------------------------------------------
    @torch.no_grad()
    def collect_exits(self, data: Any) -> th.ExitOutputs:
        """Every exit on every image of ``data`` (a DataModule's val split, a loader of ``(images,
        labels)``, one such pair, or ready :class:`ExitOutputs`)."""
        if isinstance(data, th.ExitOutputs):
            return data
        if isinstance(data, L.LightningDataModule):
            if getattr(data, "val_split", "val200") is None:
                raise ConfigError(
                    "Threshold calibration needs held-out data, but the DataModule has no validation "
                    "split (protocol trainval_test trains on train800val200). Use protocol='train_val' "
                    "(calibrates on val200), or pass a DataLoader."
                )
            data = data.val_dataloader()
        pair = isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor)
        batches, was_training, parts = [tuple(data)] if pair else data, self.training, []
        self.eval()
        try:
            for x, y in (bt[:2] for bt in batches):
                parts.append(self.exit_outputs(*self.run_exits(x.to(self.device)), torch.as_tensor(y)))
        finally:
            self.train(was_training)
        if not parts:
            raise ConfigError("Calibration got no batches; pass a loader of (images, labels).")
        return th.ExitOutputs.cat(parts)

    def exit_outputs(self, logits: Tensor, block_cost: Tensor | None, kept: Tensor | None, y: Tensor) -> th.ExitOutputs:
        """The table of every exit's logits (E, B, K), with :meth:`run_exits`' block costs and kept tokens."""
        conf = torch.stack([self.confidence(lg) for lg in logits], dim=1)
        cost = None if block_cost is None else block_cost.double().cpu()
        return th.ExitOutputs(
            conf.cpu(), logits.argmax(dim=-1).T.cpu(), y.cpu(), cost, None if kept is None else kept.cpu()
        )

    def calibrate(self, data: Any, target: float | None = None, policy: str | None = None) -> dict[str, Any]:
        """Set the early exits' thresholds so the mean executed FLOPs on held-out ``data`` is at most
        ``target`` x the full model's (default ``calibration.budget``), with the best accuracy there.
        Returns the thresholds and the held-out accuracy, GFLOPs, FLOPs ratio and exit shares."""
        budget = self.calibration_config.budget if target is None else target
        if budget is None or not 0.0 < budget <= 1.0:
            raise ConfigError(f"The calibration target must be a FLOPs budget in (0, 1], got {budget}.")
        out, costs, full = self.collect_exits(data), self.exit_costs(), self.full_flops()
        policy = policy or self.calibration_config.policy
        thr, acc, cost, share = th.search_thresholds(out, costs, budget * full, policy)  # type: ignore[arg-type]
        self.thresholds.copy_(thr.to(self.thresholds))
        res = dict(budget=budget, policy=policy, thresholds=thr.tolist(), acc=acc, gflops=cost / 1e9)
        res.update(flops_ratio=cost / full, exit_share=share.tolist(), images=int(out.labels.numel()))
        self.calibration_result = {**res, "step": int(self.global_step) if self._trainer else 0}
        return dict(self.calibration_result)

    def curve(
        self, calib: Any, evaluate: Any = None, budgets: Sequence[float] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    ) -> list[dict[str, Any]]:
        """Accuracy vs executed GFLOPs: thresholds searched on ``calib`` for each budget, measured on
        ``evaluate`` (default ``calib``); this module's thresholds are left alone."""
        c = self.collect_exits(calib)
        ev = None if evaluate is None else self.collect_exits(evaluate)
        return th.accuracy_cost_curve(
            c, self.exit_costs(), self.full_flops(), list(budgets), ev, self.calibration_config.policy
        )

    # -- evaluation ------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._held_out = []

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Every exit on every image (calibration reads them); the statistics at today's thresholds."""
        x, y = batch
        self._check_labels(y)
        logits, block_cost, kept = self.run_exits(x)
        self._held_out.append(self.exit_outputs(logits, block_cost, kept, y))
        self.record_exits(self._held_out[-1], reset=False)
        self.log("val/loss", F.cross_entropy(logits[-1], y), prog_bar=True, sync_dist=True, batch_size=x.shape[0])
        self._log_exit_accuracy(logits, y, "val")

    def held_out_exits(self, gather: bool = True) -> th.ExitOutputs | None:
        """This validation epoch's exit table (all processes' with ``gather``), or None before any."""
        if not self._held_out:
            return None
        out = th.ExitOutputs.cat(self._held_out)
        if gather and self._trainer is not None and self.trainer.world_size > 1:

            def gathered(t: Tensor) -> Tensor:
                return cast(Tensor, self.all_gather(t.to(self.device))).flatten(0, 1).cpu()

            block = None if out.block_cost is None else gathered(out.block_cost)
            kept = None if out.kept is None else gathered(out.kept)
            out = th.ExitOutputs(gathered(out.conf), gathered(out.pred), gathered(out.labels), block, kept)
        return out

    def record_exits(self, out: th.ExitOutputs, reset: bool = True) -> None:
        """Add an exit table to the statistics at the current thresholds (``reset``: replace them,
        as after a calibration); the same counts the dynamic path would record on those images."""
        if reset:
            self.reset_inference_stats()
        thr = self.thresholds.cpu()
        ex = th.assign_exits(out.conf, thr)
        pred = out.pred[torch.arange(ex.numel()), ex]
        flops = out.cost_of(self.exit_costs(), thr[None], ex[None])[0]
        as_logits = F.one_hot(pred, self.num_classes).double()  # the statistics need only each prediction
        kept = offered = None
        if out.kept is not None:
            offered = self.offered(ex)
            kept = out.kept * (offered > 0)
        result = InferenceOutput(as_logits, flops, ex, kept, offered)
        self.inference_meter.update(result.to(self.device), out.labels.to(self.device))

    def on_validation_epoch_end(self) -> None:
        out = self.held_out_exits()
        if out is not None:
            thr = self.thresholds.cpu()
            ex = th.assign_exits(out.conf, thr)
            acc = out.correct[torch.arange(ex.numel()), ex].double().mean()
            self.log("val/acc", float(acc), prog_bar=True)
            self.log("val/gflops", float(out.cost_of(self.exit_costs(), thr[None], ex[None]).mean()) / 1e9)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        out = self._eval_step(batch, "test")
        self.log("test/gflops", out.flops.mean() / 1e9, sync_dist=True, batch_size=out.flops.numel())
        if self.hparams.eval_all_exits:
            self._log_exit_accuracy(self.forward_exits(batch[0]), batch[1], "test")

    def _log_exit_accuracy(self, logits: Tensor, y: Tensor, stage: str) -> None:
        for d, lg, module in zip(self.exit_depths, logits, self.exit_accuracy):
            metric = cast(MulticlassAccuracy, module)
            metric(lg, y)
            self.log(f"{stage}/acc_exit{d}", metric, batch_size=y.shape[0])

    # -- checkpoints -----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["petl"]["calibration"] = self.calibration_result

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        fixed = self.calibration_config.thresholds
        if fixed is not None:  # thresholds given now win over the stored ones
            checkpoint["state_dict"]["thresholds"] = self.calibration_config.threshold_vector(
                fixed, len(self.exit_depths) - 1
            )
        else:
            self.calibration_result = checkpoint.get("petl", {}).get("calibration")


__all__ = ["EarlyExitModule"]
