"""DyT's LightningModule (Dynamic Tuning, Zhao et al., NeurIPS 2024, arXiv 2403.11808): image
classification over ``DyTConfig``'s adapted ViT (:class:`~petl_lightning.methods.dyt.adapted.DyTViT`).

Training runs the masked path twice per step: the dynamic model (Gumbel-sigmoid masks, hard forward
and straight-through gradient) and the complete model (no masks), with the paper's loss
``CE(dynamic) + CE(complete) + KL(complete.detach() || dynamic) + 2 * (mean(mask) - r)^2``
(:mod:`~petl_lightning.methods.dyt.loss`); each term has a weight (0 switches it off; with both
complete-model terms off, the second forward is skipped). At inference, skipped tokens really skip
the work (``skipping.inference="gather"``).

The rate loss constrains the keep rate of the *training* masks; the inference rule keeps more
wherever logits are positive but small, until training has made the dispatchers decisive (the paper
trains 100 epochs). :meth:`DyT.calibrate_keep_rate` (ours) sets the inference threshold so a chosen
keep rate holds on given images; :meth:`DyT.calibrate_agreement` (ours, on by default through
``agreement``) lowers it at every epoch end until the dynamic model predicts the complete model's
class on a chosen share of the images: after a short budget the threshold rule skips tokens the
model still needs (docs/dyt.md, "Short budgets").

Code-vs-paper notes: the official VTAB script uses d=16 (paper: 8), hard-codes weight decay 1e-4,
warms up for 10 epochs, normalises with mean/std 0.5 and selects the best epoch on the test set
(see ``recipes/dyt.yaml``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any, cast

import torch
from torch import Tensor

from petl_lightning.adapted import ViTClassifier
from petl_lightning.backbone import FrozenViT
from petl_lightning.errors import ConfigError
from petl_lightning.methods.config import as_group
from petl_lightning.methods.dyt.adapted import DyTViT
from petl_lightning.methods.dyt.calibration import calibrate_agreement, calibrate_keep_rate, image_batches
from petl_lightning.methods.dyt.config import DyTConfig, default_adapter_scale
from petl_lightning.methods.dyt.skipping import TokenSkipping
from petl_lightning.tasks.classification import PETLModule


class DyT(PETLModule):
    """Dynamic Tuning on a frozen ViT.

    Args:
        adapter_dim: adapter bottleneck d (paper VTAB: 8; official VTAB script: 16; elsewhere 64).
        adapter_scale: adapter output scale (official VTAB code: 1.0, which ``recipes/dyt.yaml``
            sets). None (ours): ``min(1, (1e-3 / lr) ** 1.3)``
            (:func:`~petl_lightning.methods.dyt.config.default_adapter_scale`), stored in the hparams
            as the value trained.
        adapter_dropout: dropout inside the adapter (official: 0.1).
        num_experts: 1 = plain adapter; N > 1 = DyT-dagger's MoE adapter (paper: N=4).
        skipping: the token skipping group (:class:`~petl_lightning.methods.dyt.skipping.TokenSkipping`):
            sites, target rate, temperature, threshold, fixed keep rate, inference path, the rate
            and complete-model loss weights, the dispatchers' init and learning rate.
        w_cls: weight of CE(dynamic) (paper: 1).
        agreement: at the last batch of every training epoch, :meth:`calibrate_agreement` lowers the
            inference threshold from ``skipping.threshold`` (never raises it) to the highest value at
            which the dynamic model predicts the complete model's class on this share of the
            epoch's last ``agreement_batches`` training batches (ours; 0.99 is our choice). None:
            the threshold stays ``skipping.threshold`` (the paper; ``recipes/dyt.yaml``). Not run
            under ``skipping.fixed_keep_rate``, where no threshold decides.
        agreement_batches: how many of each epoch's last training batches it checks.
        **kwargs: :class:`PETLModule` arguments.
    """

    STRUCTURAL_HPARAMS = (
        *PETLModule.STRUCTURAL_HPARAMS,
        "adapter_dim",
        "num_experts",
        "skipping.sites",
        "skipping.class_attention_prior",
    )

    def __init__(
        self,
        adapter_dim: int = 8,
        adapter_scale: float | None = None,
        adapter_dropout: float = 0.1,
        num_experts: int = 1,
        skipping: TokenSkipping = TokenSkipping(),  # noqa: B008 - a frozen-by-convention default LightningCLI shows
        w_cls: float = 1.0,
        agreement: float | None = 0.99,
        agreement_batches: int = 4,
        **kwargs: Any,
    ) -> None:
        if w_cls < 0:
            raise ConfigError(f"Loss weights must be non-negative (0 switches a term off): w_cls={w_cls}.")
        if agreement is not None and not 0.0 < agreement <= 1.0:
            raise ConfigError(f"agreement must lie in (0, 1] (a share of images) or be None, got {agreement}.")
        if agreement_batches < 1:
            raise ConfigError(f"agreement_batches must be at least 1, got {agreement_batches}.")
        super().__init__(**kwargs)
        # this epoch's last ``agreement_batches`` training images (not saved)
        self.agreement_images: deque[Tensor] = deque(maxlen=agreement_batches)

    def build_model(self, frozen: FrozenViT) -> ViTClassifier:
        hp = self.hparams
        skipping = as_group(TokenSkipping, hp.skipping, "skipping")
        if hp.adapter_scale is None:
            hp["adapter_scale"] = default_adapter_scale(hp.lr)
        hp["skipping"] = asdict(skipping)  # a plain dict: what weights-only checkpoint loading accepts
        config = DyTConfig(hp.adapter_dim, float(hp.adapter_scale), hp.adapter_dropout, hp.num_experts, skipping)
        return ViTClassifier(config.build(frozen.vit), self.num_classes, hp.head_init)

    @property
    def skipping(self) -> TokenSkipping:
        return self.dyt.skipping

    @property
    def dyt(self) -> DyTViT:
        """The adapted ViT, typed."""
        return cast(DyTViT, self.vit)

    # -- training --------------------------------------------------------------------------------
    def training_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``w_cls * CE(dynamic)`` plus the token skipping terms
        (:func:`~petl_lightning.methods.dyt.loss.dyt_loss_terms`) whose weights are above 0; every
        term and the training masks' keep rate are logged."""
        run = self.vit.run(x)  # training mode: sampled masks
        logits = self.head(run.features)
        terms = {"loss_cls": (self.hparams.w_cls, self.criterion(logits, y))} if self.hparams.w_cls > 0 else {}
        complete = lambda: self.head(self.vit.forward_complete(x))  # noqa: E731 - run only if a term needs it
        terms.update(self.vit.training_terms(run.kept, logits, y, complete, self.criterion))
        loss = sum((w * v for w, v in terms.values()), logits.new_zeros(()))
        logged = {name: value for name, (_, value) in terms.items()}
        logged["keep_rate"] = self.vit.keep_rate(run.kept).detach()
        return loss, logits, logged

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The base groups, with the dispatchers split off at ``lr * skipping.dispatcher_lr_scale``."""
        scale = self.skipping.dispatcher_lr_scale
        if scale == 1.0:
            return super().parameter_groups()
        dispatch = {id(p) for blk in self.dyt.dyt_blocks() for p in blk.dispatchers.parameters()}
        groups = []
        for g in super().parameter_groups():
            groups.append({**g, "params": [p for p in g["params"] if id(p) not in dispatch]})
            mine = [p for p in g["params"] if id(p) in dispatch]
            if mine:
                groups.append({**g, "params": mine, "lr": self.hparams.lr * scale})
        return groups

    # -- FLOPs -----------------------------------------------------------------------------------
    def inference_flops(self) -> int:
        """Per-image FLOPs at the target keep rate (or ``skipping.fixed_keep_rate``), gathered."""
        rate = self.skipping.fixed_keep_rate if self.skipping.fixed_keep_rate is not None else self.skipping.target_rate
        kept = torch.full((1, self.vit.depth, self.vit.sites), float(round(rate * self.vit.num_patches)))
        return int(self.vit.executed_flops(kept)[0]) + self.model.head_flops()

    def export_metadata(self, keep_rate: float | None = None) -> dict[str, Any]:
        """The base metadata plus ``keep_count``: patch tokens each image keeps per block in the
        exported top-k program."""
        keep_count = self.skipping.keep_count(self.vit.num_patches, keep_rate)
        return {**super().export_metadata(keep_rate), "keep_count": keep_count}

    # -- the inference threshold -----------------------------------------------------------------
    @torch.no_grad()
    def calibrate_keep_rate(
        self, data: Iterable[Any], keep_rate: float | None = None, max_batches: int | None = 8, iters: int = 12
    ) -> dict[str, float]:
        """Set one inference threshold for all dispatchers so the keep rate on ``data`` (a loader of
        images, e.g. training images) is ``keep_rate`` (default ``skipping.target_rate``): a bisection
        on a shared logit threshold (ours, not the paper's). Returns the threshold on
        ``sigmoid(logit)`` and the keep rate it gives; the threshold is saved in checkpoints."""
        rate = self.skipping.target_rate if keep_rate is None else keep_rate
        return calibrate_keep_rate(self.dyt, image_batches(data, self.device, max_batches), rate, iters)

    @torch.no_grad()
    def calibrate_agreement(
        self, data: Iterable[Any], agreement: float | None = None, max_batches: int | None = 8, iters: int = 6
    ) -> dict[str, float]:
        """Set one inference threshold for all dispatchers: the highest, up to ``skipping.threshold``,
        at which the dynamic model predicts the complete model's class on a share ``agreement``
        (default the hparam) of the images of ``data`` (ours;
        :func:`~petl_lightning.methods.dyt.calibration.calibrate_agreement`). Counts are summed
        over the processes of a distributed run. Returns the threshold, the agreement and the keep
        rate on ``data``; the threshold is saved in checkpoints."""
        agreement = self.hparams.agreement if agreement is None else agreement
        if agreement is None:
            raise ConfigError("The agreement target must lie in (0, 1] (a share of images), got None.")
        images = image_batches(data, self.device, max_batches)
        distributed = self._trainer is not None and self.trainer.world_size > 1
        reduce = (lambda t: cast(Tensor, self.trainer.strategy.reduce(t, reduce_op="sum"))) if distributed else None
        return calibrate_agreement(self.model, images, agreement, self.skipping.threshold, iters, reduce)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Keep the epoch's last ``agreement_batches`` training images; at its last batch, set the
        inference threshold with :meth:`calibrate_agreement` (before epoch-end checkpoints and
        validation, so both see it). The last batches, not the first: a run resumed mid-epoch sees
        the same ones, so the threshold resumes exactly too."""
        if self.hparams.agreement is None or self.skipping.fixed_keep_rate is not None:
            return
        self.agreement_images.append(batch[0].detach())
        if self.trainer.is_last_batch:
            result = self.calibrate_agreement(list(self.agreement_images), max_batches=None)
            self.agreement_images.clear()
            self.log_dict({f"calibration/{k}": v for k, v in result.items()}, on_step=False, on_epoch=True)


__all__ = ["DyT"]
