"""`PETLModule`: what every method shares.

A frozen :class:`~petl_lightning.backbone.FrozenViT`, a linear head on the pooled features,
cross-entropy (optional label smoothing), torchmetrics top-1, AdamW with linear warm-up then cosine
(epoch- or step-wise), adapter-only checkpoints, and the ``inference_stats()`` contract.

A method subclasses it, builds its blocks after ``super().__init__(...)``, and overrides
:meth:`forward_tokens` (and, for dynamic inference or extra losses, :meth:`forward` and
:meth:`training_loss`). Static methods inherit the static statistics: nothing skipped, FLOPs of
their merged form (:meth:`inference_flops`).
"""

from __future__ import annotations

import math
import random
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics.classification import MulticlassAccuracy

from petl_lightning.backbone import DEFAULT_MODEL, FrozenViT, frozen_state_ids
from petl_lightning.errors import CheckpointError, DataError
from petl_lightning.flops import vit_flops
from petl_lightning.stats import InferenceStats


def warmup_cosine(t: float, warmup: float, total: float, start: float, floor: float) -> float:
    """LR factor at (fractional) epoch ``t``: linear ``start``→1 over ``warmup``, cosine 1→``floor``."""
    if warmup > 0 and t < warmup:
        return start + (1.0 - start) * t / warmup
    span = max(total - warmup, 1e-8)
    progress = min(max((t - warmup) / span, 0.0), 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class PETLModule(L.LightningModule):
    """Base of every method.

    Args:
        num_classes: classifier width (linked from ``data.num_classes`` by the CLI).
        model_name / checkpoint_path / pretrained / img_size / drop_path_rate / model_kwargs:
            passed to :class:`FrozenViT`; only these are stored, never the backbone's weights.
        lr, weight_decay: AdamW.
        warmup_epochs: linear warm-up length in epochs (fractional allowed).
        warmup_lr / min_lr: learning rate at the start of warm-up / end of the cosine.
        scheduler_interval: ``"epoch"`` (as the official VTAB-1K scripts) or ``"step"``.
        label_smoothing: cross-entropy label smoothing.
        decay_norm_and_bias / decay_head: apply weight decay to 1-D parameters / head parameters
            (off by default).
        head_init: ``"default"`` (PyTorch's Linear init) or ``"zeros"``.
    """

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
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise DataError(f"num_classes must be at least 1, got {num_classes}.")
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.vit = FrozenViT(model_name, checkpoint_path, pretrained, img_size, drop_path_rate, model_kwargs)
        self.head = nn.Linear(self.vit.dim, num_classes)
        if head_init == "zeros":
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.inference_meter = InferenceStats(self.vit.depth, num_exits=1)
        # Adapter-only checkpoints: the frozen backbone is rebuilt from its source on load.
        self.strict_loading = False

    # -- forward ---------------------------------------------------------------------------------
    def forward_tokens(self, tokens: Tensor) -> Tensor:
        """Run the blocks on embedded tokens (B, N, D). Methods override this with their blocks."""
        return self.vit.blocks(tokens)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images to pooled features (B, D)."""
        return self.vit.pool(self.forward_tokens(self.vit.embed(x)))

    def forward(self, x: Tensor) -> Tensor:
        """Images to logits; in eval mode, also records the (static) executed FLOPs."""
        logits = self.head(self.forward_features(x))
        if not self.training:
            self.inference_meter.update(images=x.shape[0], flops=x.shape[0] * self.inference_flops())
        return logits

    def training_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Loss, logits (for train accuracy) and extra terms to log. Override for extra losses."""
        logits = self(x)
        return self.criterion(logits, y), logits, {}

    # -- FLOPs and statistics --------------------------------------------------------------------
    def backbone_flops(self) -> int:
        """FLOPs per image of the frozen backbone plus a linear head (the reference for ratios)."""
        return vit_flops(self.vit.shape(), self.num_classes)

    def inference_flops(self) -> int:
        """FLOPs per image of this method's static inference form (merged where it can merge)."""
        return self.backbone_flops()

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
            stats = dict(meter.compute())
            # torchmetrics squeezes one-element results; keep the documented shapes.
            stats["exit_share"] = stats["exit_share"].reshape(-1)
            stats["exit_acc"] = stats["exit_acc"].reshape(-1)
            stats["keep_rate_per_layer"] = stats["keep_rate_per_layer"].reshape(-1)
        stats["gflops_backbone"] = torch.tensor(self.backbone_flops() / 1e9, dtype=torch.float64)
        return stats

    def reset_inference_stats(self) -> None:
        """Forget the counts (callbacks call this at each eval epoch's end)."""
        self.inference_meter.reset()

    # -- steps -----------------------------------------------------------------------------------
    def _check_labels(self, y: Tensor) -> None:
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise DataError(
                f"Label {int(y.max()) if int(y.max()) >= self.num_classes else int(y.min())} is outside "
                f"[0, {self.num_classes}) for this {self.num_classes}-class head. Set model.num_classes "
                f"to the data's class count (the CLI links data.num_classes automatically)."
            )

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        self._check_labels(y)
        loss, logits, terms = self.training_loss(x, y)
        self.train_acc(logits.detach(), y)
        bs = x.shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=bs)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=bs)
        for name, value in terms.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=True, batch_size=bs)
        return loss

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        self._check_labels(y)
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        metric = self.val_acc if stage == "val" else self.test_acc
        metric(logits, y)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=True, batch_size=x.shape[0])
        self.log(f"{stage}/acc", metric, prog_bar=True, batch_size=x.shape[0])
        return logits

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x)

    # -- optimisation ----------------------------------------------------------------------------
    def is_head_parameter(self, name: str) -> bool:
        """Whether a trainable parameter belongs to a classifier head (no weight decay by default)."""
        return name.startswith("head.")

    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: decayed weights, and non-decayed biases/norms/heads."""
        hp = self.hparams
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            skip = (p.ndim <= 1 and not hp.decay_norm_and_bias) or (
                self.is_head_parameter(name) and not hp.decay_head
            )
            (no_decay if skip else decay).append(p)
        return [
            {"params": decay, "weight_decay": hp.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        opt = torch.optim.AdamW(self.parameter_groups(), lr=hp.lr)
        max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        start, floor = hp.warmup_lr / hp.lr, hp.min_lr / hp.lr
        if hp.scheduler_interval == "step":
            steps_per_epoch = max(1, int(self.trainer.estimated_stepping_batches) // max_epochs)

            def factor(step: int) -> float:
                return warmup_cosine(step / steps_per_epoch, hp.warmup_epochs, max_epochs, start, floor)
        else:

            def factor(epoch: int) -> float:
                return warmup_cosine(float(epoch), hp.warmup_epochs, max_epochs, start, floor)

        sched = LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": hp.scheduler_interval}}

    # -- summaries and checkpoints ---------------------------------------------------------------
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

    def trainable_state_keys(self) -> list[str]:
        """State-dict keys this module saves: everything except the frozen backbone's tensors."""
        frozen = frozen_state_ids(self.vit)
        return [k for k, v in self.state_dict(keep_vars=True).items() if id(v) not in frozen]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = set(self.trainable_state_keys())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        # Tensors and plain Python values only, so Lightning's weights_only loading accepts them.
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        checkpoint["petl_rng"] = {
            "torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "python": random.getstate(),
        }

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Raise :class:`CheckpointError` unless ``checkpoint`` holds exactly this module's trainable
        tensors with matching shapes (called by the CLI before any training or logging starts)."""
        state = checkpoint.get("state_dict")
        if not isinstance(state, dict):
            raise CheckpointError("This file holds no 'state_dict'; it is not a petl_lightning checkpoint.")
        own = self.state_dict()
        expected = self.trainable_state_keys()
        missing = [k for k in expected if k not in state]
        unknown = [k for k in state if k not in own]
        wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in expected if k in state and state[k].shape != own[k].shape]
        if missing or unknown or wrong:
            problems = []
            if wrong:
                problems.append("shape mismatch " + "; ".join(wrong[:3]))
            if missing:
                problems.append(f"missing {missing[:3]}")
            if unknown:
                problems.append(f"unknown {unknown[:3]}")
            raise CheckpointError(
                f"Checkpoint does not fit {type(self).__name__} (num_classes={self.num_classes}): "
                f"{'; '.join(problems)}. Was it written by another method, task or configuration?"
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_checkpoint(checkpoint)
        # The frozen backbone was rebuilt from its own source: complete the adapter-only state with
        # its tensors (replacing any a full checkpoint carries), so the load is whole and silent.
        own = self.state_dict()
        trainable = set(self.trainable_state_keys())
        checkpoint["state_dict"].update({k: v for k, v in own.items() if k not in trainable})
        rng = checkpoint.get("petl_rng")
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            kind, keys, pos, has_gauss, cached = rng["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
            random.setstate(rng["python"])


__all__ = ["PETLModule", "warmup_cosine"]
