"""``Segmenter``: semantic segmentation over ``adapt(vit, method)``, a LightningModule.

    petl-lightning fit -c recipes/segmentation/repadapter.yaml
    petl-lightning test -c recipes/segmentation/repadapter.yaml --ckpt_path last

``method`` is any method's config (``RepAdapterConfig``, ``ARCConfig``, ``LoRAConfig``,
``AdapterConfig``, ``DyTConfig``) or None for the frozen-backbone baseline; the decode head is
UperNet or DINOv2's linear head (:mod:`.heads`). Training: per-pixel cross-entropy with an ignore
index (plus DyT's token-skipping terms, on pixels), AdamW with the head's own learning-rate scale,
linear warm-up then poly or cosine decay by iterations. Evaluation: whole-image or sliding-window
(:mod:`.inference`); mIoU, mAcc, aAcc and per-class IoU (:mod:`.metrics`); the statistics contract
(``inference_stats()``: executed GFLOPs per image, head included, and DyT's keep rates) as for
classification. ``predict`` returns the class map of each image (the CLI writes palette PNGs).
Checkpoints hold the trainable tensors only; the backbone is rebuilt from its source.
"""

from __future__ import annotations

import math
from collections import deque
from pathlib import Path
from typing import Any, ClassVar, Literal, cast

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import AttributeDict, rank_zero_info
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from petl_lightning.adapted import AdaptedViT
from petl_lightning.backbone import DEFAULT_MODEL, FrozenViT
from petl_lightning.deploy.programs import export_program, resolve_format
from petl_lightning.errors import ConfigError, DataError
from petl_lightning.methods.config import MethodConfig, config_from, config_to_dict
from petl_lightning.methods.dyn_adapter.config import DynAdapterConfig
from petl_lightning.methods.dyt.calibration import calibrate_agreement
from petl_lightning.stats import InferenceOutput, InferenceStats
from petl_lightning.tasks import checkpoints
from petl_lightning.tasks.classification import method_name
from petl_lightning.tasks.optimization import schedule_length
from petl_lightning.tasks.segmentation.heads import LinearHead, UperNetHead
from petl_lightning.tasks.segmentation.inference import slide_inference, whole_inference
from petl_lightning.tasks.segmentation.metrics import SegmentationMetrics
from petl_lightning.tasks.segmentation.model import SegmentationModel

NO_EARLY_EXIT = (
    "Dyn-Adapter's early exits stop a whole image at one block, but a segmentation map needs every "
    "pixel's prediction from the same multi-level features: use its base method (e.g. RepAdapterConfig) "
    "or DyTConfig (token skipping) for a cheaper segmenter."
)


def default_levels(depth: int, head: str) -> tuple[int, ...]:
    """The blocks a head reads by default: the last one (linear), or four at 1/3, 1/2, 2/3 and the end
    of the depth (UperNet on ViT-B: 4, 6, 8, 12); the last four on a model too shallow for that."""
    if head == "linear":
        return (depth,)
    levels = (depth // 3, depth // 2, 2 * depth // 3, depth)
    distinct = levels[0] >= 1 and len(set(levels)) == 4
    return levels if distinct else tuple(range(max(depth - 3, 1), depth + 1))


def warmup_decay(step: int, warmup: int, total: int, start: float, floor: float, schedule: str, power: float) -> float:
    """LR factor at optimizer step ``step``: linear ``start`` -> 1 over ``warmup`` steps, then poly
    (``(1 - t) ** power``) or cosine decay to ``floor`` at ``total``."""
    if warmup > 0 and step < warmup:
        return start + (1.0 - start) * step / warmup
    t = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
    decay = (1.0 - t) ** power if schedule == "poly" else 0.5 * (1.0 + math.cos(math.pi * t))
    return floor + (1.0 - floor) * decay


class Segmenter(L.LightningModule):
    """Semantic segmentation over an adapted frozen ViT (see the module docstring).

    Args:
        num_classes: classes (linked from ``data.num_classes`` by the CLI).
        method: the PETL method's config, or None: the frozen backbone (the baseline). In a recipe:
            ``method: {class_path: petl_lightning.RepAdapterConfig, init_args: {...}}``.
        head: ``upernet`` or ``linear``.
        levels: the blocks (1-based) the head reads; default 1/3, 1/2, 2/3 and the end of the depth
            for UperNet (4, 6, 8, 12 of 12), the last block for the linear head.
        head_channels: UperNet's width (mmseg's: 512).
        model_name / checkpoint_path / pretrained / img_size / drop_path_rate / model_kwargs / init_seed:
            the backbone (:class:`FrozenViT`); ``img_size`` is the training crop and the window size.
        lr / weight_decay: AdamW (DyT's ADE20K protocol: 1e-3, 0.05); no decay on biases and norms.
        head_lr_scale: the head's learning rate is ``lr * head_lr_scale`` (ours: 1.0 by default).
        schedule: ``poly`` (mmseg's, power ``poly_power``) or ``cosine``, by optimizer steps.
        warmup_iters / warmup_ratio / min_lr: linear warm-up from ``lr * warmup_ratio``; the decay ends at ``min_lr``.
        ignore_index: the label of pixels that count nowhere (255).
        inference: ``slide`` (windows of ``img_size`` every ``stride`` pixels) or ``whole``.
        stride: the sliding stride (default two thirds of the window, as mmseg's 341 of 512).
        agreement / calibration_batches: a token-skipping method with a threshold rule (DyT without
            ``skipping.fixed_keep_rate``): at each training epoch's end its inference threshold is set
            to the highest (up to ``skipping.threshold``) at which the dynamic segmenter predicts the
            complete model's class on a share ``agreement`` of the pixels of the epoch's last
            ``calibration_batches`` training batches (ours, as the classification DyT's rule per
            image). None: no calibration, the threshold stays ``skipping.threshold``.
    """

    STRUCTURAL_HPARAMS: ClassVar[tuple[str, ...]] = (
        "img_size",
        "model_kwargs",
        "pretrained",
        "init_seed",
        "head",
        "levels",
        "head_channels",
    )

    #: The validation metric the best checkpoint is kept by (``PETLCheckpoint``'s default monitor).
    validation_metric: ClassVar[str] = "val/mIoU"

    model: SegmentationModel

    def __init__(
        self,
        num_classes: int = 150,
        method: MethodConfig | None = None,
        head: Literal["upernet", "linear"] = "upernet",
        levels: list[int] | None = None,
        head_channels: int = 512,
        model_name: str = DEFAULT_MODEL,
        checkpoint_path: str | None = None,
        pretrained: bool = True,
        img_size: int | None = None,
        drop_path_rate: float = 0.0,
        model_kwargs: dict[str, Any] | None = None,
        init_seed: int = 0,
        lr: float = 1e-3,
        head_lr_scale: float = 1.0,
        weight_decay: float = 0.05,
        schedule: Literal["poly", "cosine"] = "poly",
        poly_power: float = 1.0,
        warmup_iters: int = 0,
        warmup_ratio: float = 1e-6,
        min_lr: float = 0.0,
        ignore_index: int = 255,
        inference: Literal["slide", "whole"] = "slide",
        stride: int | None = None,
        agreement: float | None = 0.99,
        calibration_batches: int = 2,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise DataError(f"num_classes must be at least 1, got {num_classes}.")
        if head not in ("upernet", "linear"):
            raise ConfigError(f"Unknown head {head!r}; choose upernet or linear.")
        if schedule not in ("poly", "cosine"):
            raise ConfigError(f"Unknown schedule {schedule!r}; choose poly or cosine.")
        if inference not in ("slide", "whole"):
            raise ConfigError(f"Unknown inference {inference!r}; choose slide or whole.")
        if agreement is not None and not 0.0 < agreement <= 1.0:
            raise ConfigError(f"agreement must lie in (0, 1] (a share of pixels), got {agreement}.")
        if calibration_batches < 1:
            raise ConfigError(f"calibration_batches must be at least 1, got {calibration_batches}.")
        if not lr > 0 or head_lr_scale < 0 or weight_decay < 0 or warmup_iters < 0 or min_lr < 0:
            raise ConfigError("lr must be positive and head_lr_scale, weight_decay, warmup_iters and min_lr 0 or more.")
        config = None if method is None else config_from(method)
        if isinstance(config, DynAdapterConfig):
            raise ConfigError(NO_EARLY_EXIT)
        self.save_hyperparameters()
        # the method as plain values: what weights-only checkpoint loading accepts, and a recipe's form
        self.hparams["method"] = None if config is None else config_to_dict(config)
        self.num_classes = num_classes
        frozen = FrozenViT(
            model_name, checkpoint_path, pretrained, img_size, drop_path_rate, model_kwargs, init_seed=init_seed
        )
        vit = frozen if config is None else config.build(frozen.vit)
        if not isinstance(vit, AdaptedViT):
            raise ConfigError(f"{type(config).__name__} does not give an adapted ViT a segmenter can read.")
        chosen = tuple(levels) if levels else default_levels(vit.depth, head)
        if head == "upernet":
            if len(chosen) != 4:
                raise ConfigError(
                    f"The UperNet head reads four blocks (e.g. levels: [4, 6, 8, 12]), got {list(chosen)}."
                )
            decode: nn.Module = UperNetHead(vit.dim, num_classes, head_channels)
        else:
            chosen = chosen[-1:]
            decode = LinearHead(vit.dim, num_classes)
        self.model = SegmentationModel(vit, decode, chosen).to(next(frozen.parameters()).device)
        self.stride = stride or max(1, 2 * vit.img_size // 3)
        self.val_metrics = SegmentationMetrics(num_classes, ignore_index)
        self.test_metrics = SegmentationMetrics(num_classes, ignore_index)
        self.inference_meter = InferenceStats(vit.depth)
        self.example_input_array = torch.zeros_like(vit.example_input(1))
        self.calibration_images: deque[Tensor] = deque(maxlen=calibration_batches)  # not saved
        self.class_names: list[str] = []
        self.input_normalization: dict[str, list[float]] | None = None
        self.strict_loading = False  # adapter-only checkpoints

    @property
    def hparams(self) -> AttributeDict:
        return cast(AttributeDict, L.LightningModule.hparams.fget(self))  # type: ignore[attr-defined]

    @property
    def vit(self) -> AdaptedViT:
        """The adapted ViT."""
        return self.model.vit

    @property
    def method(self) -> MethodConfig | None:
        """The method's config (None: the frozen baseline)."""
        return None if self.hparams.method is None else config_from(self.hparams.method)

    def setup(self, stage: str) -> None:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "mean") and hasattr(dm, "std"):
            self.input_normalization = {"mean": [float(v) for v in dm.mean], "std": [float(v) for v in dm.std]}
        names = list(getattr(dm, "class_names", None) or [])
        self.class_names = names if len(names) == self.num_classes else [str(i) for i in range(self.num_classes)]
        ignore = getattr(dm, "ignore_index", self.hparams.ignore_index)
        if ignore != self.hparams.ignore_index:
            raise ConfigError(
                f"The data marks ignored pixels {ignore} but the model's ignore_index is {self.hparams.ignore_index}: "
                f"set --model.init_args.ignore_index {ignore}."
            )

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Images (B, C, S, S) of the model's size to logits (B, K, S, S)."""
        return cast(Tensor, self.model(x))

    def infer(self, x: Tensor) -> InferenceOutput:
        """Images of any size to logits at their size (whole or sliding window) and what executed
        per image (summed over its windows)."""
        windows: list[InferenceOutput] = []

        def window(crop: Tensor) -> Tensor:
            out = self.model.infer(crop)
            windows.append(out)
            return out.logits

        size = self.vit.img_size
        if self.hparams.inference == "slide":
            logits = slide_inference(window, x, size, self.stride)
        else:
            logits = whole_inference(window, x, size)
        flops = torch.stack([w.flops for w in windows]).sum(0)
        kept = torch.stack([cast(Tensor, w.kept) for w in windows]).sum(0)
        offered = torch.stack([cast(Tensor, w.offered) for w in windows]).sum(0)
        return InferenceOutput(logits, flops, kept=kept, offered=offered)

    # -- training --------------------------------------------------------------------------------
    def check_labels(self, y: Tensor) -> None:
        """A one-line :class:`DataError` for a label outside the classes (other than ignore_index)."""
        valid = y[y != self.hparams.ignore_index]
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= self.num_classes):
            bad = int(valid.max()) if int(valid.max()) >= self.num_classes else int(valid.min())
            raise DataError(
                f"Mask label {bad} is outside [0, {self.num_classes}) and is not the ignore index "
                f"{self.hparams.ignore_index}: set model.num_classes to the data's class count."
            )

    def training_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-pixel cross-entropy, plus the method's own terms (DyT: the keep-rate loss and the
        complete model's terms, on pixels); the terms to log."""
        run = self.model.run(x)
        criterion = lambda logits, labels: F.cross_entropy(  # noqa: E731 - the task's criterion for the method's terms
            logits, labels, ignore_index=self.hparams.ignore_index
        )
        pixels = run.logits.permute(0, 2, 3, 1).reshape(-1, self.num_classes)
        labels = y.reshape(-1)
        complete = lambda: self.model.run(x, complete=True).logits.permute(0, 2, 3, 1).reshape(-1, self.num_classes)  # noqa: E731
        terms = {"loss_seg": (1.0, criterion(pixels, labels))}
        terms.update(self.vit.training_terms(run.kept, pixels, labels, complete, criterion))
        loss = sum((w * v for w, v in terms.values()), pixels.new_zeros(()))
        logged = {name: value.detach() for name, (_, value) in terms.items()}
        if self.vit.sites:
            logged["keep_rate"] = self.vit.keep_rate(run.kept).detach()
        return loss, logged

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        self.check_labels(y)
        loss, terms = self.training_loss(x, y)
        bs = x.shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=bs)
        for name, value in terms.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=True, batch_size=bs)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Keep the epoch's last training images; at its last batch, set a token-skipping method's
        inference threshold by pixel agreement on them (before the epoch-end checkpoint and
        validation, so both see it; the last batches, so a resumed run sees the same ones)."""
        skipping = getattr(self.vit, "skipping", None)
        if skipping is None or skipping.fixed_keep_rate is not None or self.hparams.agreement is None:
            return
        self.calibration_images.append(batch[0].detach())
        if self.trainer.is_last_batch:
            distributed = self.trainer.world_size > 1
            reduce = (lambda t: cast(Tensor, self.trainer.strategy.reduce(t, reduce_op="sum"))) if distributed else None
            result = calibrate_agreement(
                self.model, list(self.calibration_images), self.hparams.agreement, skipping.threshold, reduce=reduce
            )
            self.calibration_images.clear()
            for key, value in result.items():
                self.log(f"train/calibration_{key}", value)

    # -- evaluation ------------------------------------------------------------------------------
    def reset_inference_stats(self) -> None:
        self.inference_meter.reset()

    def inference_stats(self) -> dict[str, Tensor]:
        """Executed GFLOPs per image (head included), keep rates (overall and per block) since the last
        reset, ``gflops_backbone`` (the complete model's), and the one-exit shares of the contract."""
        meter = self.inference_meter
        if meter.update_count == 0:
            stats = {
                "images": torch.zeros((), dtype=torch.float64),
                "gflops": torch.tensor(self.model.full_flops(merged=True) / 1e9, dtype=torch.float64),
                "keep_rate": torch.ones((), dtype=torch.float64),
                "keep_rate_per_layer": torch.ones(meter.depth, dtype=torch.float64),
                "exit_share": torch.ones(1, dtype=torch.float64),
                "exit_acc": torch.full((1,), float("nan"), dtype=torch.float64),
            }
        else:
            stats = {
                k: v.reshape(-1) if k in ("exit_share", "exit_acc", "keep_rate_per_layer") else v
                for k, v in meter.compute().items()
            }
        stats["gflops_backbone"] = torch.tensor(self.model.full_flops() / 1e9, dtype=torch.float64)
        return stats

    def on_validation_epoch_start(self) -> None:
        self.reset_inference_stats()

    def on_test_epoch_start(self) -> None:
        self.reset_inference_stats()

    def on_predict_epoch_start(self) -> None:
        self.reset_inference_stats()

    def eval_step(self, batch: tuple[Tensor, Tensor], stage: str) -> InferenceOutput:
        x, y = batch
        self.check_labels(y)
        out = self.infer(x)
        self.inference_meter.update(out)
        (self.val_metrics if stage == "val" else self.test_metrics).update(out.logits, y)
        loss = F.cross_entropy(out.logits, y, ignore_index=self.hparams.ignore_index)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=True, batch_size=x.shape[0])
        return out

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """The logits, for callbacks that show them (``SegmentationPanel``)."""
        return {"logits": self.eval_step(batch, "val").logits}

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.eval_step(batch, "test")

    def log_metrics(self, stage: str, metrics: SegmentationMetrics, per_class: bool) -> None:
        result = metrics.compute()
        for key in ("mIoU", "mAcc", "aAcc"):
            self.log(f"{stage}/{key}", result[key].float(), prog_bar=key == "mIoU")
        if per_class:
            for name, iou in zip(self.class_names, result["IoU"].tolist()):
                self.log(f"{stage}/IoU/{name}", iou)
        metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self.log_metrics("val", self.val_metrics, per_class=False)

    def on_test_epoch_end(self) -> None:
        self.log_metrics("test", self.test_metrics, per_class=True)

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Per image: ``mask`` (its class map, H x W of the padded batch), ``size`` (its (H, W) before
        padding), ``keep_rate`` and ``gflops``."""
        x, sizes = batch if isinstance(batch, (tuple, list)) else (batch, None)
        out = self.infer(x)
        self.inference_meter.update(out)
        if sizes is None:
            sizes = torch.tensor([list(x.shape[-2:])] * x.shape[0])
        return {"mask": out.logits.argmax(1), "size": sizes, "keep_rate": out.keep_rate(), "gflops": out.flops / 1e9}

    # -- optimisation ----------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: adapters and head, each split into decayed weights and undecayed biases/norms;
        the head's at ``lr * head_lr_scale``."""
        hp = self.hparams
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                groups.setdefault((name.startswith("model.head."), p.ndim > 1), []).append(p)
        return [
            {
                "params": ps,
                "lr": hp.lr * (hp.head_lr_scale if head else 1.0),
                "weight_decay": hp.weight_decay if decay else 0.0,
            }
            for (head, decay), ps in sorted(groups.items())
        ]

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        total, _ = schedule_length(self.trainer)
        opt = torch.optim.AdamW(self.parameter_groups(), lr=hp.lr)
        floor = hp.min_lr / hp.lr

        def factor(step: int) -> float:
            return warmup_decay(step, hp.warmup_iters, total, hp.warmup_ratio, floor, hp.schedule, hp.poly_power)

        return {"optimizer": opt, "lr_scheduler": {"scheduler": LambdaLR(opt, factor), "interval": "step"}}

    def on_fit_start(self) -> None:
        params = list({id(p): p for p in self.parameters()}.values())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        total = sum(p.numel() for p in params)
        name = type(self.method).__name__ if self.method is not None else "frozen backbone"
        rank_zero_info(f"Segmenter ({name}, {self.hparams.head}): {trainable:,} trainable of {total:,} parameters")

    # -- export ----------------------------------------------------------------------------------
    def merge(self) -> SegmentationModel:
        """A copy with every adapter folded into a plain timm ViT (``MergeError`` where one cannot fold)."""
        return self.model.merge()

    def deploy_form(self, keep_rate: float | None = None) -> nn.Module:
        return self.model.deploy_form(keep_rate)

    def example_input(self, batch: int = 2) -> Tensor:
        return self.model.example_input(batch)

    def export_metadata(self, keep_rate: float | None = None) -> dict[str, Any]:
        hp = self.hparams
        norm = self.input_normalization or {"mean": list(IMAGENET_DEFAULT_MEAN), "std": list(IMAGENET_DEFAULT_STD)}
        return {
            "model_name": hp.model_name.split(".", 1)[0],
            "img_size": self.vit.img_size,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "mean": norm["mean"],
            "std": norm["std"],
            "method": type(self).__name__,
            "adapt": (hp.method or {}).get("class_path", "frozen"),
            "head": hp.head,
            "output": "logits (B, num_classes, img_size, img_size)",
        }

    def export(
        self, path: str | Path, format: str | None = None, opset: int | None = None, keep_rate: float | None = None
    ) -> Path:
        """Write the deployable segmenter (adapters folded, or DyT's top-``keep_rate`` form) as an ONNX
        or ``torch.export`` program with a dynamic batch: images (B, 3, S, S) to logits (B, K, S, S)."""
        fmt = resolve_format(path, format)
        if fmt == "safetensors":
            raise ConfigError("A segmenter exports programs (.onnx or .pt2): its head is not part of a timm model.")
        example = (self.example_input(2).to("cpu"),)
        form = self.deploy_form(keep_rate).to("cpu")
        return export_program(form, example, path, fmt, opset, metadata=self.export_metadata(keep_rate))

    # -- checkpoints -----------------------------------------------------------------------------
    def trainable_state_keys(self) -> list[str]:
        return checkpoints.trainable_state_keys(self, self.vit.vit)

    def checkpoint_identity(self) -> dict[str, Any]:
        """What a checkpoint must match: the task, the PETL method, the backbone and the classes."""
        return {
            "method": method_name(type(self)),
            "adapt": (self.hparams.method or {}).get("class_path", "frozen"),
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
            "class_names": self.class_names,
        }

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoints.check_checkpoint(
            checkpoint.get("state_dict"),
            checkpoint.get("petl", {}),
            self.checkpoint_identity(),
            self.state_dict(),
            self.trainable_state_keys(),
            f"Segmenter ({self.checkpoint_identity()['adapt']}, num_classes={self.num_classes})",
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_checkpoint(checkpoint)
        checkpoints.complete_state(self, checkpoint["state_dict"])
        meta = checkpoint.get("petl", {})
        self.input_normalization = meta.get("input_normalization") or self.input_normalization
        self.class_names = meta.get("class_names") or self.class_names
        if meta.get("rng") is not None:
            checkpoints.restore_rng(meta["rng"])


__all__ = ["NO_EARLY_EXIT", "Segmenter", "default_levels", "warmup_decay"]
