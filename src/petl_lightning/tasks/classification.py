"""`PETLModule`: image classification over an adapted ViT, the task every method's LightningModule is.

The module trains ``self.model``, a :class:`~petl_lightning.adapted.ViTClassifier` (an adapted ViT
and a linear head) that a method builds in :meth:`PETLModule.build_model`; the backbone is a
:class:`~petl_lightning.backbone.FrozenViT` rebuilt from its source on load. The task adds the rest:
cross-entropy (optional label smoothing), torchmetrics top-1, AdamW with warm-up and cosine
(:mod:`.optimization`), optional mixup/CutMix with its soft-target loss (:mod:`.mixing`),
adapter-only checkpoints that name their method (:mod:`.checkpoints`), and
the statistics contract: ``forward(x)`` returns ``(B, num_classes)`` logits in every mode and
records nothing; ``infer(x)`` returns an :class:`~petl_lightning.stats.InferenceOutput` (logits
and what executed), which the evaluation steps add to the statistics the module resets at each
evaluation epoch's start.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, cast

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import AttributeDict, rank_zero_info, rank_zero_warn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from petl_lightning.adapted import AdaptedViT, ViTClassifier
from petl_lightning.backbone import DEFAULT_MODEL, FrozenViT
from petl_lightning.deploy.programs import export_model
from petl_lightning.errors import ConfigError, DataError
from petl_lightning.flops import vit_flops
from petl_lightning.stats import InferenceOutput, InferenceStats
from petl_lightning.tasks import checkpoints
from petl_lightning.tasks.mixing import ClassificationLoss, Mixing, mix_batch
from petl_lightning.tasks.optimization import parameter_groups, schedule_length, warmup_cosine_adamw


def method_name(cls: type) -> str:
    """``module.ClassName`` of a method class (what checkpoints record and the CLI compares)."""
    return f"{cls.__module__}.{cls.__qualname__}"


class PETLModule(L.LightningModule):
    """Image classification over an adapted ViT: the base of every method's LightningModule.

    Args:
        num_classes: classifier width (linked from ``data.num_classes`` by the CLI).
        model_name / checkpoint_path / pretrained / img_size / drop_path_rate / model_kwargs / init_seed:
            passed to :class:`FrozenViT`; only these are stored, never the backbone's weights.
        lr, weight_decay: AdamW.
        warmup_epochs: linear warm-up length in epochs (fractional allowed).
        warmup_lr / min_lr: learning rate at the start of warm-up / end of the cosine.
        scheduler_interval: ``"epoch"`` (as the official VTAB-1K scripts) or ``"step"``.
        label_smoothing: cross-entropy label smoothing (with ``mixing``: in the mixed targets).
        mixing: mixup/CutMix of training batches (:class:`~petl_lightning.tasks.mixing.Mixing`),
            trained with the soft-target cross-entropy; None (default): no mixing. Training
            accuracy is then measured against the unmixed labels.
        decay_norm_and_bias / decay_head: apply weight decay to 1-D parameters / head parameters
            (off by default).
        head_init: ``"default"`` (PyTorch's Linear init) or ``"zeros"``.
    """

    #: Hyper-parameters that define the trained architecture: when testing from a checkpoint, the
    #: checkpoint's values win over the command line (the method class, backbone and class count
    #: must match exactly; everything else, e.g. budgets, weights path, data, the command line wins).
    STRUCTURAL_HPARAMS: ClassVar[tuple[str, ...]] = ("img_size", "model_kwargs", "pretrained", "init_seed")
    #: The validation metric the best checkpoint is kept by (``PETLCheckpoint``'s default monitor).
    validation_metric: ClassVar[str] = "val/acc"

    model: ViTClassifier

    def __init__(
        self,
        num_classes: int = 100,
        model_name: str = DEFAULT_MODEL,
        checkpoint_path: str | None = None,
        pretrained: bool = True,
        img_size: int | None = None,
        drop_path_rate: float = 0.0,
        model_kwargs: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        warmup_epochs: float = 10.0,
        warmup_lr: float = 1e-7,
        min_lr: float = 1e-8,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        label_smoothing: float = 0.0,
        decay_norm_and_bias: bool = False,
        decay_head: bool = False,
        head_init: Literal["default", "zeros"] = "default",
        init_seed: int = 0,
        mixing: Mixing | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise DataError(f"num_classes must be at least 1, got {num_classes}.")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ConfigError(f"drop_path_rate must lie in [0, 1), got {drop_path_rate}.")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ConfigError(f"label_smoothing must lie in [0, 1], got {label_smoothing}.")
        rates = {"weight_decay": weight_decay, "warmup_epochs": warmup_epochs, "warmup_lr": warmup_lr, "min_lr": min_lr}
        for name, value in rates.items():
            if value < 0:
                raise ConfigError(f"{name} must be 0 or more, got {value}.")
        if not lr > 0:  # the schedule divides by it
            raise ConfigError(f"lr must be positive, got {lr}; the recipes use 1e-3.")
        self.save_hyperparameters()
        self.num_classes = num_classes
        frozen = FrozenViT(
            model_name, checkpoint_path, pretrained, img_size, drop_path_rate, model_kwargs, init_seed=init_seed
        )
        self.model = self.build_model(frozen)
        self.criterion = ClassificationLoss(label_smoothing)
        self.mixer = mixing.mixer(num_classes, label_smoothing) if mixing is not None and mixing.active else None
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.inference_meter = InferenceStats(self.vit.depth, num_exits=self.num_exits)
        self.example_input_array = torch.zeros_like(self.vit.example_input(1))  # the model summary's FLOPs column
        #: The data's input normalisation ({"mean": [...], "std": [...]}), read from the DataModule
        #: at setup and kept in checkpoints, so an exported model says how to feed it.
        self.input_normalization: dict[str, list[float]] | None = None
        # Adapter-only checkpoints: the frozen backbone is rebuilt from its source on load.
        self.strict_loading = False

    def build_model(self, frozen: FrozenViT) -> ViTClassifier:
        """The classifier this task trains over ``frozen`` (the method's adapted ViT and a head);
        methods override it, reading their options from ``self.hparams``. Here: the frozen ViT itself."""
        return ViTClassifier(frozen, self.num_classes, self.hparams.head_init)

    @property
    def vit(self) -> AdaptedViT:
        """The adapted ViT (``self.model.vit``)."""
        return self.model.vit

    @property
    def head(self) -> nn.Linear:
        """The final classifier (``self.model.head``)."""
        return self.model.head

    @property
    def num_exits(self) -> int:
        return 1

    @property
    def hparams(self) -> AttributeDict:
        """The saved hyper-parameters (Lightning's ``AttributeDict``: ``self.hparams.lr``). Read through
        Lightning's property by name, not ``super()``, which ``torch.compile`` cannot trace in a property."""
        return cast(AttributeDict, L.LightningModule.hparams.fget(self))  # type: ignore[attr-defined]

    @classmethod
    def task_overrides(cls, task: str, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """Per-task hyper-parameters for the configured ``hparams`` (e.g. RepAdapter's official
        scale), applied by the CLI and the VTAB runner to arguments the user left unset (``None``).
        None by default."""
        return {}

    def setup(self, stage: str) -> None:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "mean") and hasattr(dm, "std"):
            self.input_normalization = {"mean": [float(v) for v in dm.mean], "std": [float(v) for v in dm.std]}

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) to logits (B, num_classes)."""
        return cast(Tensor, self.model(x))

    def infer(self, x: Tensor) -> InferenceOutput:
        """The inference path and what it executed (a static method: its merged form's FLOPs)."""
        return self.model.infer(x)

    def training_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Loss, logits (for train accuracy) and extra terms to log. Override for extra losses.
        ``y``: class indices (B,), or soft targets (B, K) under mixing; ``self.criterion`` takes both."""
        logits = self(x)
        return self.criterion(logits, y), logits, {}

    # -- FLOPs and statistics --------------------------------------------------------------------
    def backbone_flops(self) -> int:
        """FLOPs per image of the frozen backbone plus a linear head (the reference for ratios)."""
        return vit_flops(self.vit.shape(), self.num_classes)

    def inference_flops(self) -> int:
        """Expected FLOPs per image of this method's inference form at its configured operating
        point: the merged form for static methods (the backbone's)."""
        return self.model.full_flops(merged=True)

    def inference_stats(self) -> dict[str, Tensor]:
        """Statistics since the last reset (see :mod:`petl_lightning.stats`), plus ``gflops_backbone``."""
        meter = self.inference_meter
        if meter.update_count == 0:
            stats = {
                "images": torch.zeros((), dtype=torch.float64),
                "gflops": torch.tensor(self.inference_flops() / 1e9, dtype=torch.float64),
                "keep_rate": torch.ones((), dtype=torch.float64),
                "keep_rate_per_layer": torch.ones(meter.depth, dtype=torch.float64),
                "exit_share": F.one_hot(torch.tensor(meter.num_exits - 1), meter.num_exits).double(),
                "exit_acc": torch.full((meter.num_exits,), float("nan"), dtype=torch.float64),
            }
        else:
            stats = {
                k: v.reshape(-1) if k in ("exit_share", "exit_acc", "keep_rate_per_layer") else v
                for k, v in meter.compute().items()
            }  # torchmetrics squeezes one-element results
        stats["gflops_backbone"] = torch.tensor(self.backbone_flops() / 1e9, dtype=torch.float64)
        return stats

    def reset_inference_stats(self) -> None:
        """Forget the counts (done at the start of every evaluation epoch)."""
        self.inference_meter.reset()

    def on_validation_epoch_start(self) -> None:
        self.reset_inference_stats()

    def on_test_epoch_start(self) -> None:
        self.reset_inference_stats()

    def on_predict_epoch_start(self) -> None:
        self.reset_inference_stats()

    # -- steps -----------------------------------------------------------------------------------
    def check_labels(self, y: Tensor) -> None:
        """A one-line :class:`DataError` for labels outside the head (instead of a CUDA assert)."""
        lo, hi = int(y.min()), int(y.max())  # one sync per batch
        if lo < 0 or hi >= self.num_classes:
            raise DataError(
                f"Label {hi if hi >= self.num_classes else lo} is outside [0, {self.num_classes}) for this "
                f"{self.num_classes}-class head. Set model.num_classes to the data's class count (the CLI "
                f"links data.num_classes automatically)."
            )

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        self.check_labels(y)
        x, target = mix_batch(self.mixer, x, y) if self.mixer is not None else (x, y)
        loss, logits, terms = self.training_loss(x, target)
        self.train_acc(logits.detach(), y)
        bs = x.shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=bs)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=bs)
        for name, value in terms.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=True, batch_size=bs)
        return loss

    def eval_step(self, batch: tuple[Tensor, Tensor], stage: str) -> InferenceOutput:
        """The inference path on a labelled batch: statistics, loss and accuracy of ``stage``."""
        x, y = batch
        self.check_labels(y)
        out = self.infer(x)
        self.inference_meter.update(out, y)
        metric = self.val_acc if stage == "val" else self.test_acc
        metric(out.logits, y)
        bs = x.shape[0]
        self.log(
            f"{stage}/loss", F.cross_entropy(out.logits, y), prog_bar=stage == "val", sync_dist=True, batch_size=bs
        )
        self.log(f"{stage}/acc", metric, prog_bar=True, batch_size=bs)
        return out

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.eval_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Per image: ``pred`` (class index), ``confidence`` (its softmax probability), ``exit``
        (index of the exit it left at), ``keep_rate`` (share of patch tokens kept) and ``gflops``."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        out = self.infer(x)
        self.inference_meter.update(out)
        prob = out.logits.float().softmax(dim=-1)
        confidence, pred = prob.max(dim=-1)
        exits = out.exit_index if out.exit_index is not None else torch.full_like(pred, self.num_exits - 1)
        return {
            "pred": pred,
            "confidence": confidence,
            "exit": exits,
            "keep_rate": out.keep_rate(),
            "gflops": out.flops / 1e9,
        }

    # -- optimisation ----------------------------------------------------------------------------
    def is_head_parameter(self, name: str) -> bool:
        """Whether a trainable parameter belongs to a classifier head (no weight decay by default)."""
        return name.startswith("model.head.")

    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: decayed weights, and non-decayed biases/norms/heads."""
        hp = self.hparams
        return parameter_groups(
            self.named_parameters(), hp.weight_decay, self.is_head_parameter, hp.decay_norm_and_bias, hp.decay_head
        )

    def configure_optimizers(self) -> Any:
        total, per_epoch = schedule_length(self.trainer)
        return warmup_cosine_adamw(self.parameter_groups(), self.hparams, total, per_epoch)

    # -- merging and export ----------------------------------------------------------------------
    def merge(self) -> VisionTransformer:
        """A plain fp32 timm ``VisionTransformer`` with this head and every adapter folded in, computing
        this module's eval-mode logits. Its ``state_dict`` loads with ``strict=True`` into
        ``timm.create_model(model_name, num_classes=..., img_size=..., **model_kwargs)``. This
        module is not modified."""
        return self.model.merge()

    def export_metadata(self, keep_rate: float | None = None) -> dict[str, Any]:
        """What a deployment needs to rebuild and feed the exported model without petl_lightning
        (``keep_rate``: a token-skipping method's export option, which it records)."""
        hp = self.hparams
        norm = self.input_normalization or {"mean": list(IMAGENET_DEFAULT_MEAN), "std": list(IMAGENET_DEFAULT_STD)}
        kwargs = {k: v for k, v in (hp.model_kwargs or {}).items() if k != "drop_path_rate"}
        return {
            "model_name": hp.model_name.split(".", 1)[0],
            "img_size": self.vit.img_size,
            "num_classes": self.num_classes,
            "model_kwargs": kwargs,
            "mean": norm["mean"],
            "std": norm["std"],
            "interpolation": "bicubic",
            "method": type(self).__name__,
        }

    def example_input(self, batch: int = 2) -> Tensor:
        """Random images of the size this module takes (what programs are traced with)."""
        return self.vit.example_input(batch)

    def deploy_form(self, keep_rate: float | None = None) -> nn.Module:
        """The module a deployment runs (what :meth:`export` traces), a copy: the merged model for
        static methods; ``keep_rate`` is DyT's option (its top-k form)."""
        return self.model.deploy_form(keep_rate)

    def export(
        self, path: str | Path, format: str | None = None, opset: int | None = None, keep_rate: float | None = None
    ) -> Path:
        """Write the deployable form to ``path`` with :meth:`export_metadata`: ``"safetensors"`` (the merged
        timm model's weights), ``"onnx"`` or ``"torch_export"`` (``.pt2``; programs with a dynamic batch).
        Default format: from the suffix. This module is not modified (``docs/deploy.md``)."""
        return export_model(self, path, format, opset, keep_rate)

    # -- summaries and warnings ------------------------------------------------------------------
    def parameter_summary(self) -> dict[str, int]:
        """Trainable and total parameter counts (shared tensors counted once)."""
        params = list({id(p): p for p in self.parameters()}.values())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        return {"trainable": trainable, "total": sum(p.numel() for p in params)}

    def on_fit_start(self) -> None:
        s = self.parameter_summary()
        rank_zero_info(
            f"{type(self).__name__}: {s['trainable']:,} trainable of {s['total']:,} parameters "
            f"({100 * s['trainable'] / max(s['total'], 1):.3f}%)"
        )
        epochs = self.trainer.max_epochs or 0
        if 0 < epochs <= self.hparams.warmup_epochs:
            rank_zero_warn(
                f"warmup_epochs={self.hparams.warmup_epochs:g} but max_epochs={epochs}: the learning rate "
                f"never leaves its warm-up; lower --model.init_args.warmup_epochs."
            )
        every = self.trainer.check_val_every_n_epoch
        dm = getattr(self.trainer, "datamodule", None)
        validates = self.trainer.enable_validation and getattr(dm, "val_split", "") is not None
        if validates and every is not None and 0 < epochs < every:
            rank_zero_warn(
                f"check_val_every_n_epoch={every} but max_epochs={epochs}: no validation epoch runs "
                f"during fit; lower --trainer.check_val_every_n_epoch."
            )

    # -- checkpoints -----------------------------------------------------------------------------
    def trainable_state_keys(self) -> list[str]:
        """State-dict keys this module saves: everything except the frozen backbone's tensors."""
        return checkpoints.trainable_state_keys(self, self.vit.vit)

    def checkpoint_identity(self) -> dict[str, Any]:
        """What a checkpoint must match to load into this module: method, backbone, classes."""
        return {
            "method": method_name(type(self)),
            "model_name": self.hparams.model_name,
            "num_classes": self.num_classes,
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = set(self.trainable_state_keys())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["petl"] = {
            **self.checkpoint_identity(),
            "rng": checkpoints.rng_to_checkpoint(),
            "input_normalization": self.input_normalization,
        }

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Raise :class:`CheckpointError` unless ``checkpoint`` was written by this method for the
        same backbone and classes and holds exactly this module's trainable tensors."""
        checkpoints.check_checkpoint(
            checkpoint.get("state_dict"),
            checkpoint.get("petl", {}),
            self.checkpoint_identity(),
            self.state_dict(),
            self.trainable_state_keys(),
            f"{type(self).__name__} (num_classes={self.num_classes})",
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_checkpoint(checkpoint)
        checkpoints.complete_state(self, checkpoint["state_dict"])
        meta = checkpoint.get("petl", {})
        self.input_normalization = meta.get("input_normalization") or self.input_normalization
        rng = meta.get("rng")
        if rng is not None:
            checkpoints.restore_rng(rng)


__all__ = ["PETLModule", "method_name"]
