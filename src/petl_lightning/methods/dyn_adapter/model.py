"""Dyn-Adapter's LightningModule (Zhang et al., ECCV 2024, arXiv 2407.14302): image classification
over ``DynAdapterConfig``'s early-exit model, trained with a scheduled multi-exit loss and
bidirectional sparsity, run with per-image early exit. No official code exists: every number and
shape is our choice and an option (``groups.py``; ``docs/dyn_adapter.md``).

The module keeps its exit thresholds calibrated for ``calibration.budget`` (a share of the full
model's FLOPs) on held-out data by itself, with any ``Trainer``: at the last batch of every
validation epoch (before the statistics callbacks read them), at the end of fit when the last epoch
did not validate (``last.ckpt`` is then written again), and before testing when the checkpoint holds
no calibration for the budget given now. :meth:`DynAdapter.merge` folds a RepAdapter, ARC or LoRA
base into a plain timm ViT; :meth:`DynAdapter.export_exits` writes one program per exit.

With ``base="dyt"`` (ours; no published code combines the two) every block is DyT's, so both savings
compose: finished images leave the batch after each exit, and inside every block an image still runs,
only its kept tokens go through the skippable sub-block.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar, cast

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from petl_lightning.adapted import AdaptedViT
from petl_lightning.backbone import FrozenViT
from petl_lightning.deploy.stages import export_exit_stages
from petl_lightning.errors import ConfigError
from petl_lightning.methods.adapter.config import AdapterConfig
from petl_lightning.methods.arc.config import ARCConfig
from petl_lightning.methods.config import MethodConfig, as_group
from petl_lightning.methods.dyn_adapter import thresholds as th
from petl_lightning.methods.dyn_adapter.adapted import EarlyExitViT, threshold_vector
from petl_lightning.methods.dyn_adapter.config import DynAdapterConfig
from petl_lightning.methods.dyn_adapter.deploy import exit_stages
from petl_lightning.methods.dyn_adapter.groups import CalibrationConfig, ExitConfig, LossSchedule, SparsityConfig
from petl_lightning.methods.dyt.config import DyTConfig, default_adapter_scale
from petl_lightning.methods.dyt.skipping import TokenSkipping
from petl_lightning.methods.lora.config import LoRAConfig
from petl_lightning.methods.repadapter.config import RepAdapterConfig
from petl_lightning.methods.repadapter.layer import set_adapter_scale
from petl_lightning.methods.repadapter.model import RepAdapter
from petl_lightning.stats import InferenceOutput
from petl_lightning.tasks.classification import PETLModule

BASES = ("repadapter", "arc", "lora", "adapter", "dyt")
DEFAULT_ADAPTER_DIM = {"repadapter": 8, "arc": 50, "lora": 8, "adapter": 8, "dyt": 8}
#: The bases whose default adapter scale follows the learning rate (DyT's), else 1.0 (RepAdapter's
#: comes from the task: :meth:`DynAdapter.task_overrides`).
LR_SCALE_DEFAULTS = {"dyt": default_adapter_scale}
#: Dyn-Adapter's dyt base without DyT's complete-model terms (each costs a second forward, and the
#: exits' losses already train every block on real labels).
DYT_BASE_SKIPPING = TokenSkipping(w_complete_cls=0.0, w_distill=0.0)


def base_config(
    base: str, adapter_dim: int | None, adapter_groups: int, adapter_scale: float, skipping: TokenSkipping
) -> MethodConfig:
    """The PETL base's config from Dyn-Adapter's arguments (dropout is set per depth afterwards)."""
    if base not in BASES:
        raise ConfigError(f"Unknown base {base!r}; choose one of {', '.join(BASES)}.")
    dim = DEFAULT_ADAPTER_DIM[base] if adapter_dim is None else adapter_dim
    configs = {
        "repadapter": lambda: RepAdapterConfig(dim, adapter_groups, adapter_scale, "attn_mlp", 0.0),
        "arc": lambda: ARCConfig(dim, 0.0, "attn_mlp", "zeros"),
        "lora": lambda: LoRAConfig(dim, adapter_scale, 0.0, "attn"),
        "adapter": lambda: AdapterConfig(dim, adapter_scale, 0.0),
        "dyt": lambda: DyTConfig(dim, adapter_scale, 0.0, 1, skipping),
    }
    return cast(MethodConfig, configs[base]())


class DynAdapter(PETLModule):
    """Dyn-Adapter: early exits over a PETL base on a frozen ViT, with budgeted dynamic inference.

    ``forward`` returns the early-exit prediction ``(B, K)`` in every mode; :meth:`forward_exits`
    returns every exit's logits (the training path).

    Args:
        base: ``"repadapter"`` (default), ``"arc"``, ``"lora"``, ``"adapter"`` or ``"dyt"``.
        adapter_dim: the base's width or rank (None: 8; 50 for ARC).
        adapter_groups: RepAdapter's up-projection groups (2).
        adapter_scale: the base's branch scale (LoRA: ``alpha / r``). None: 1.0, except for the
            repadapter base, which takes RepAdapter's official per-task scale (:meth:`task_overrides`),
            and the dyt base, which takes DyT's lr-dependent default (:func:`default_adapter_scale`).
        exits / loss / sparsity / calibration: the option groups of
            :mod:`~petl_lightning.methods.dyn_adapter.groups` (dataclasses or dicts).
        skipping: DyT's token skipping (:class:`TokenSkipping`), for ``base="dyt"`` only.
        eval_all_exits: in test, also run every exit on every image (a second, full pass) to log
            ``test/acc_exit{b}`` per exit (validation always does: calibration needs it).
        **kwargs: :class:`PETLModule` arguments.
    """

    STRUCTURAL_HPARAMS = (
        *PETLModule.STRUCTURAL_HPARAMS,
        "base",
        "adapter_dim",
        "adapter_groups",
        "exits",
        "skipping.sites",
        "skipping.class_attention_prior",
    )
    #: The early-exit model class; a subclass with another ``confidence`` changes the exit rule.
    exit_model: ClassVar[type[EarlyExitViT]] = EarlyExitViT

    model: EarlyExitViT
    config: DynAdapterConfig

    def __init__(
        self,
        base: str = "repadapter",
        adapter_dim: int | None = None,
        adapter_groups: int = 2,
        adapter_scale: float | None = None,
        exits: ExitConfig = ExitConfig(),  # noqa: B008 - a frozen-by-convention default LightningCLI shows
        loss: LossSchedule = LossSchedule(),  # noqa: B008
        sparsity: SparsityConfig = SparsityConfig(),  # noqa: B008
        skipping: TokenSkipping = DYT_BASE_SKIPPING,
        calibration: CalibrationConfig = CalibrationConfig(),  # noqa: B008
        eval_all_exits: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        fixed = self.config.calibration.thresholds
        #: The last calibration (budget, policy, held-out accuracy and FLOPs); saved in checkpoints.
        self.calibration_result: dict[str, Any] | None = (
            None if fixed is None else {"budget": None, "thresholds": self.thresholds.tolist()}
        )
        self.exit_accuracy = nn.ModuleList(
            MulticlassAccuracy(self.num_classes, average="micro") for _ in self.exit_depths
        )
        self._held_out: list[th.ExitOutputs] = []
        self._total_steps: int | None = None

    def build_model(self, frozen: FrozenViT) -> EarlyExitViT:
        hp = self.hparams
        groups = {
            "exits": as_group(ExitConfig, hp.exits, "exits"),
            "loss": as_group(LossSchedule, hp.loss, "loss"),
            "sparsity": as_group(SparsityConfig, hp.sparsity, "sparsity"),
            "calibration": as_group(CalibrationConfig, hp.calibration, "calibration"),
        }
        skipping = as_group(TokenSkipping, hp.skipping, "skipping")
        if hp.adapter_scale is None and hp.base in LR_SCALE_DEFAULTS:
            hp["adapter_scale"] = LR_SCALE_DEFAULTS[hp.base](hp.lr)
        scale = 1.0 if hp.adapter_scale is None else float(hp.adapter_scale)
        base = base_config(hp.base, hp.adapter_dim, hp.adapter_groups, scale, skipping)
        if skipping != DYT_BASE_SKIPPING and not hasattr(base, "skipping"):
            raise ConfigError(
                f"skipping options apply to base='dyt' only (token skipping inside the blocks); this model's base "
                f"is {hp.base!r}. Set --model.init_args.base dyt, or drop the skipping options."
            )
        self.config = DynAdapterConfig(self.num_classes, base, **groups)
        # plain dicts: what weights-only checkpoint loading accepts
        hp.update({name: asdict(group) for name, group in (*groups.items(), ("skipping", skipping))})
        return self.config.build(frozen.vit, self.exit_model)

    @classmethod
    def task_overrides(cls, task: str, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """The repadapter base takes RepAdapter's official scale of the task."""
        return RepAdapter.task_overrides(task, {}) if hparams.get("base", "repadapter") == "repadapter" else {}

    @property
    def num_exits(self) -> int:
        return self.model.num_exits

    @property
    def exit_depths(self) -> list[int]:
        return self.model.exit_depths

    @property
    def thresholds(self) -> Tensor:
        return self.model.thresholds

    @property
    def loss_schedule(self) -> LossSchedule:
        return self.config.loss

    @property
    def calibrated(self) -> bool:
        return self.calibration_result is not None

    # -- forward ---------------------------------------------------------------------------------
    def forward_exits(self, x: Tensor) -> Tensor:
        """Every exit on every image: logits (E, B, K)."""
        return self.model.forward_exits(x)

    def infer(self, x: Tensor, vit: AdaptedViT | None = None) -> InferenceOutput:
        """Early exit with batch shrinking (:meth:`EarlyExitViT.infer`); ``vit``: another base to run,
        e.g. ``AdaptedViT(merged, merged.blocks)`` of ``merged = self.merge()`` (adapters then free)."""
        return self.model.infer(x, vit)

    # -- FLOPs and statistics --------------------------------------------------------------------
    def exit_costs(self, vit: AdaptedViT | None = None, norm: bool = True) -> th.ExitCosts:
        return self.model.exit_costs(vit, norm)

    def full_flops(self, norm: bool = True, merged: bool = False) -> int:
        """FLOPs per image of the base model without early exits (nor token skipping): the reference
        of the budget."""
        return self.model.full_flops(norm, merged)

    def inference_flops(self) -> int:
        """The held-out FLOPs of the last calibration (the full model before any)."""
        flops = (self.calibration_result or {}).get("gflops")
        return self.full_flops() if flops is None else int(flops * 1e9)

    def inference_stats(self) -> dict[str, Tensor]:
        """The base keys plus ``gflops_full`` (the base model without early exit), ``flops_ratio``,
        ``exit_depths`` and ``thresholds``."""
        stats = super().inference_stats()
        full = self.full_flops() / 1e9
        stats["gflops_full"] = torch.tensor(full, dtype=torch.float64)
        stats["flops_ratio"] = stats["gflops"].double().cpu() / full
        stats["exit_depths"] = torch.tensor(self.exit_depths, dtype=torch.float64)
        stats["thresholds"] = self.thresholds.detach().double().cpu()
        return stats

    # -- training --------------------------------------------------------------------------------
    def training_progress(self) -> float:
        """Share of training done (optimizer steps / total steps); 1.0 outside ``fit``."""
        trainer = self._trainer
        if trainer is None or not trainer.training:
            return 1.0
        if self._total_steps is None:
            total = trainer.estimated_stepping_batches
            self._total_steps = int(total) if math.isfinite(total) and total > 0 else 0
        return min(trainer.global_step / self._total_steps, 1.0) if self._total_steps else 1.0

    def loss_weights(self, progress: float) -> list[float]:
        """Weights (E,) of the exits' cross-entropies at training progress ``progress`` in [0, 1]."""
        return self.loss_schedule.weights(progress, self.num_exits)

    def training_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Weighted sum of every exit's cross-entropy plus the base's training terms (the dyt base:
        DyT's rate loss and its complete-model terms whose weights are above 0); the final exit's
        logits for train accuracy."""
        run = self.model.run_exits(x)  # training mode: the base's training path
        logged: dict[str, Tensor] = {}
        loss = run.logits.new_zeros(())
        for d, lg, w in zip(self.exit_depths, run.logits, self.loss_weights(self.training_progress())):
            ce = self.criterion(lg, y)
            loss = loss + w * ce
            logged[f"ce_exit{d}"], logged[f"w_exit{d}"] = ce.detach(), torch.tensor(w)
        complete = lambda: self.head(self.vit.forward_complete(x))  # noqa: E731 - run only if a term needs it
        for name, (w, value) in self.vit.training_terms(run.kept, run.logits[-1], y, complete, self.criterion).items():
            loss = loss + w * value
            logged[name] = value.detach()
        logged["keep_rate"] = self.vit.keep_rate(run.kept).detach()
        return loss, run.logits[-1], logged

    def on_train_start(self) -> None:
        self._total_steps = None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage != "fit" or self.hparams.base != "repadapter" or self.hparams.adapter_scale is not None:
            return
        task = getattr(getattr(self._trainer, "datamodule", None), "task", None)
        scale = self.task_overrides(task, self.hparams).get("adapter_scale") if task else None
        if scale is None:
            rank_zero_warn(f"DynAdapter: no official RepAdapter scale for task {task!r}; using adapter_scale 1.0.")
            return
        set_adapter_scale(self.vit, scale)
        self.hparams["adapter_scale"] = float(scale)

    def is_head_parameter(self, name: str) -> bool:
        return name.startswith(("model.head.", "model.exit_heads."))

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the PETL base (not the heads): the ones the gradient mask touches."""
        return [p for n, p in self.named_parameters() if p.requires_grad and not self.is_head_parameter(n)]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.config.sparsity.mask_gradients(self.adapter_parameters())

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        def step() -> None:
            super(DynAdapter, self).optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)

        self.config.sparsity.masked_update(self.adapter_parameters(), step)

    # -- calibration on held-out data ------------------------------------------------------------
    @torch.no_grad()
    def collect_exits(self, data: Any) -> th.ExitOutputs:
        """Every exit on every image of ``data`` (a DataModule's val split, a loader of ``(images,
        labels)``, one such pair, or ready :class:`~.thresholds.ExitOutputs`)."""
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
                parts.append(self.model.exit_table(self.model.run_exits(x.to(self.device)), torch.as_tensor(y)))
        finally:
            self.train(was_training)
        if not parts:
            raise ConfigError("Calibration got no batches; pass a loader of (images, labels).")
        return th.ExitOutputs.cat(parts)

    def calibrate(self, data: Any, budget: float | None = None, policy: str | None = None) -> dict[str, Any]:
        """Set the early exits' thresholds so the mean executed FLOPs on held-out ``data`` is at most
        ``budget`` x the full model's (default ``calibration.budget``), with the best accuracy there.
        Returns the thresholds and the held-out accuracy, GFLOPs, FLOPs ratio and exit shares."""
        budget = self.config.calibration.budget if budget is None else budget
        if budget is None or not 0.0 < budget <= 1.0:
            raise ConfigError(f"The calibration budget must be a share of the full FLOPs in (0, 1], got {budget}.")
        out, costs, full = self.collect_exits(data), self.exit_costs(), self.full_flops()
        policy = policy or self.config.calibration.policy
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
        policy = self.config.calibration.policy
        return th.accuracy_cost_curve(c, self.exit_costs(), self.full_flops(), list(budgets), ev, policy)

    def calibrates(self) -> bool:
        """Whether the module keeps its thresholds calibrated (a budget and no fixed thresholds)."""
        cal = self.config.calibration
        return cal.budget is not None and cal.thresholds is None

    def held_out_exits(self, gather: bool = True) -> th.ExitOutputs | None:
        """This validation epoch's exit table (all processes' with ``gather``), or None before any."""
        if not self._held_out:
            return None
        out = th.ExitOutputs.cat(self._held_out)
        if gather and self._trainer is not None and self.trainer.world_size > 1:

            def gathered(t: Tensor) -> Tensor:
                return cast(Tensor, self.all_gather(t.to(self.device))).flatten(0, 1).cpu()

            out = th.ExitOutputs(*(gathered(getattr(out, k)) for k in ("conf", "pred", "labels", "block_cost", "kept")))
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
        offered = self.model.offered(ex)
        as_logits = F.one_hot(pred, self.num_classes).double()  # the statistics need only each prediction
        result = InferenceOutput(as_logits, flops, ex, out.kept * (offered > 0), offered)
        self.inference_meter.update(result.to(self.device), out.labels.to(self.device))

    def calibrate_on_held_out(self) -> None:
        """Calibrate on this validation epoch's exit table (every process's) and record the statistics
        of this process's part at the new thresholds."""
        out = self.held_out_exits(gather=True)
        if out is None:
            return
        res = self.calibrate(out)
        local = self.held_out_exits(gather=False)
        assert local is not None  # this process's part of ``out``
        self.record_exits(local)
        keys = ("acc", "gflops", "flops_ratio")
        self.log_dict({f"calibration/{k}": float(res[k]) for k in keys}, on_step=False, on_epoch=True)

    def held_out_table(self) -> th.ExitOutputs | None:
        """The trainer's DataModule's held-out exit table, or None (with a warning) when it has none."""
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or getattr(dm, "val_split", None) is None:
            rank_zero_warn(
                "DynAdapter: no held-out split to calibrate the exit thresholds on (use the DataModule's "
                "protocol='train_val', or call model.calibrate(loader)); thresholds stay at "
                f"{self.thresholds.tolist()}."
            )
            return None
        return self.collect_exits(dm)

    # -- evaluation ------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._held_out = []

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Every exit on every image (calibration reads them); the statistics at today's thresholds."""
        x, y = batch
        self.check_labels(y)
        run = self.model.run_exits(x)
        table = self.model.exit_table(run, y)
        self._held_out.append(table)
        self.record_exits(table, reset=False)
        self.log("val/loss", F.cross_entropy(run.logits[-1], y), prog_bar=True, sync_dist=True, batch_size=x.shape[0])
        self._log_exit_accuracy(run.logits, y, "val")

    def on_validation_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """At the epoch's last batch, calibrate on its exit table (before the callbacks read the
        statistics at ``on_validation_epoch_end``)."""
        if self.trainer.sanity_checking or not self.calibrates():
            return
        if batch_idx + 1 == self.trainer.num_val_batches[dataloader_idx]:
            self.calibrate_on_held_out()

    def on_validation_epoch_end(self) -> None:
        out = self.held_out_exits()
        if out is None:
            return
        thr = self.thresholds.cpu()
        ex = th.assign_exits(out.conf, thr)
        acc = out.correct[torch.arange(ex.numel()), ex].double().mean()
        self.log("val/acc", float(acc), prog_bar=True)

    def on_train_end(self) -> None:
        """When the last epoch did not validate, calibrate on the held-out split now and write
        ``last.ckpt`` again (before the fit-end callbacks)."""
        if not self.calibrates():
            return
        res = self.calibration_result or {}
        if res.get("step") != self.trainer.global_step or self.held_out_exits() is None:
            table = self.held_out_table()
            if table is None:
                return
            res = self.calibrate(table)
            ckpt = getattr(self.trainer.checkpoint_callback, "last_model_path", "")
            if ckpt:
                self.trainer.save_checkpoint(ckpt)
        rank_zero_info(
            f"DynAdapter: calibrated for budget {res['budget']:g} on {res['images']} held-out images: "
            f"thresholds {[round(t, 4) for t in res['thresholds']]}, acc {res['acc']:.4f}, "
            f"{res['gflops']:.4f} GFLOPs ({res['flops_ratio']:.3f} of the full model), exit shares "
            f"{[round(s, 3) for s in res['exit_share']]}"
        )

    def on_test_start(self) -> None:
        """Calibrate on the held-out split first when the checkpoint holds no calibration for the
        budget given now (so a test-time ``calibration.budget`` wins)."""
        if not self.calibrates():
            return
        budget = self.config.calibration.budget
        if self.calibration_result is not None and self.calibration_result.get("budget") == budget:
            return
        table = self.held_out_table()
        if table is None:
            return
        res = self.calibrate(table)
        rank_zero_info(
            f"DynAdapter: calibrated for budget {budget:g} on held-out data before testing: "
            f"{res['flops_ratio']:.3f} of the full FLOPs, held-out acc {res['acc']:.4f}"
        )

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.eval_step(batch, "test")
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
        fixed = self.config.calibration.thresholds
        if fixed is not None:  # thresholds given now win over the stored ones
            checkpoint["state_dict"]["model.thresholds"] = threshold_vector(fixed, self.num_exits - 1)
        else:
            self.calibration_result = checkpoint.get("petl", {}).get("calibration")

    # -- export ----------------------------------------------------------------------------------
    def export_exits(
        self, folder: str | Path, format: str = "onnx", opset: int | None = None, keep_rate: float | None = None
    ) -> Path:
        """Write one program per exit (``onnx`` or ``torch_export``), ``deploy.json`` (the current
        thresholds) and a standalone early-exit ``driver.py`` into ``folder`` (``docs/deploy.md``);
        :meth:`export` writes the merged base without exits. A dyt base's blocks keep the top-k
        tokens at ``keep_rate`` (default ``skipping.fixed_keep_rate``). This module is not modified."""
        stages = exit_stages(self.model, keep_rate)
        return export_exit_stages(
            stages,
            self.exit_depths,
            self.thresholds.tolist(),
            self.config.calibration.confidence,
            self.export_metadata(),
            self.example_input().cpu(),
            folder,
            format,
            opset,
        )


__all__ = ["BASES", "DynAdapter", "base_config"]
