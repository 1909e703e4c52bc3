"""DyT: Dynamic Tuning (Zhao et al., NeurIPS 2024, arXiv 2403.11808).

Each frozen block gets a token dispatcher and a parallel adapter (:class:`~petl_lightning.layers.
dyt_block.DyTBlock`). The dispatcher (``Linear(D, 1)`` on the residual stream, patch tokens only;
prefix tokens such as CLS are always kept) decides which tokens go through the skippable sub-block;
the adapter runs on every token. At inference the skipped tokens really skip the work: the kept
(image, token) rows of the whole batch are gathered, the sub-block runs on them, and the result is
scattered back (``inference_mode="gather"``); ``"mask"`` is the reference path (everything runs, the
output is multiplied by the mask: what training and the official evaluation do).

Keep rule at inference: ``sigmoid(logit) > threshold`` per token (the paper), or, with
``fixed_keep_rate=r``, the ``round(r * patches)`` tokens with the largest logits in every image and
block (ours: static shapes and no host sync, for export, ``torch.compile`` and speed measurements).

Training runs the masked path twice per step: the dynamic model (Gumbel-sigmoid masks, hard forward
and straight-through gradient) and the complete model (no masks), with the paper's loss
``CE(dynamic) + CE(complete) + KL(complete.detach() || dynamic) + 2 * (mean(mask) - r)^2``; each term
has a weight (0 switches it off; with both complete-model terms off, the second forward is skipped).

The rate loss constrains the keep rate of the *training* masks (sampled, keep probability
``sigmoid(logit)``); the inference mask keeps more wherever logits are positive but small, until
training has made the dispatchers decisive (the paper trains 100 epochs). :meth:`DyT.calibrate`
(ours) sets the inference threshold so a chosen keep rate holds on given images;
:meth:`DyT.calibrate_agreement` (ours, on by default through ``agreement``) lowers it until the
dynamic model predicts the complete model's class on a chosen share of the images: after a short
budget the threshold rule skips tokens the model still needs (docs/dyt.md, "Short budgets").

Code-vs-paper notes: the official VTAB script uses d=16 (paper: 8), hard-codes weight decay 1e-4,
warms up for 10 epochs, normalises with mean/std 0.5 and selects the best epoch on the test set
(see ``recipes/dyt.yaml``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from petl_lightning.deploy.dyt_topk import DyTTopK
from petl_lightning.errors import ConfigError
from petl_lightning.flops import non_block_flops
from petl_lightning.layers.dispatcher import TokenDispatcher
from petl_lightning.layers.dyt_block import PLACEMENT_SITES, DyTBlock, Placement, default_adapter_scale
from petl_lightning.merge import MergeError
from petl_lightning.methods.base import PETLModule
from petl_lightning.stats import InferenceOutput

LOSS_TERMS = {
    "loss_cls": "w_cls",
    "loss_complete_cls": "w_complete_cls",
    "loss_distill": "w_distill",
    "loss_rate": "w_rate",
}


def image_batches(data: Iterable[Any], device: torch.device, max_batches: int | None = None) -> list[Tensor]:
    """The image tensors of a loader of ``(images, labels)`` (or of images), on ``device``."""
    images = []
    for i, batch in enumerate(data):
        if max_batches is not None and i >= max_batches:
            break
        images.append((batch[0] if isinstance(batch, (tuple, list)) else batch).to(device))
    if not images:
        raise ConfigError("Calibration got no batches; pass a DataLoader of images (or of (images, labels)).")
    return images


class DyT(PETLModule):
    """Dynamic Tuning on a frozen ViT.

    Args:
        placement: which sub-block tokens skip: ``"mlp"`` (paper default), ``"attn"``,
            ``"attn_mlp"``, ``"layer"`` (see :mod:`petl_lightning.layers.dyt_block`).
        adapter_dim: adapter bottleneck d (paper VTAB: 8; official VTAB script: 16; elsewhere 64).
        adapter_scale: adapter output scale (official VTAB code: 1.0, which ``recipes/dyt.yaml``
            sets). None (ours): ``min(1, (1e-3 / lr) ** 1.3)``, :func:`~petl_lightning.layers.dyt_block.
            default_adapter_scale`, stored in the hparams as the value trained.
        adapter_dropout: dropout inside the adapter (official: 0.1).
        num_experts: 1 = plain adapter; N > 1 = DyT-dagger's MoE adapter (paper: N=4).
        target_rate: r, the target share of activated patch tokens.
        tau: Gumbel-sigmoid temperature (5.0).
        threshold: inference threshold on ``sigmoid(logit)`` (0.5); raise it to keep fewer tokens.
        w_cls / w_complete_cls / w_distill / w_rate: weights of CE(dynamic), CE(complete),
            KL(complete.detach() || dynamic) and ``(mean(mask) - r)^2`` (paper: 1, 1, 1, 2).
        inference_mode: ``"gather"`` (real skipping) or ``"mask"`` (reference; saves nothing).
        fixed_keep_rate: ``None`` (the threshold decides) or a rate whose top-k tokens by logit every
            image keeps at every site (ours; static shapes).
        dispatcher_lr_scale: learning-rate multiplier of the dispatchers (1.0 = the paper; ours).
        dispatcher_init_std: std of the dispatchers' weight init (official: 0.02).
        agreement: at the last batch of every training epoch, :meth:`calibrate_agreement` lowers the
            inference threshold from ``threshold`` (never raises it) to the highest value at which
            the dynamic model predicts the complete model's class on this share of the epoch's
            last ``agreement_batches`` training batches (ours; 0.99 is our choice). None: the
            threshold stays ``threshold`` (the paper; ``recipes/dyt.yaml``).
        agreement_batches: how many of each epoch's last training batches it checks.
        **kwargs: :class:`PETLModule` arguments.
    """

    STRUCTURAL_HPARAMS = (*PETLModule.STRUCTURAL_HPARAMS, "placement", "adapter_dim", "num_experts")

    def __init__(
        self,
        placement: Placement = "mlp",
        adapter_dim: int = 8,
        adapter_scale: float | None = None,
        adapter_dropout: float = 0.1,
        num_experts: int = 1,
        target_rate: float = 0.5,
        tau: float = 5.0,
        threshold: float = 0.5,
        w_cls: float = 1.0,
        w_complete_cls: float = 1.0,
        w_distill: float = 1.0,
        w_rate: float = 2.0,
        inference_mode: Literal["gather", "mask"] = "gather",
        fixed_keep_rate: float | None = None,
        dispatcher_lr_scale: float = 1.0,
        dispatcher_init_std: float = 0.02,
        agreement: float | None = 0.99,
        agreement_batches: int = 4,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.vit.check_blocks(type(self).__name__)
        for name, rate in (("target_rate", target_rate), ("fixed_keep_rate", fixed_keep_rate)):
            if rate is not None and not 0.0 <= rate <= 1.0:
                raise ConfigError(f"{name} must lie in [0, 1], got {rate}.")
        weights = {"w_cls": w_cls, "w_complete_cls": w_complete_cls, "w_distill": w_distill, "w_rate": w_rate}
        bad = [f"{k}={v}" for k, v in weights.items() if v < 0]
        if bad:
            raise ConfigError(f"Loss weights must be non-negative (0 switches a term off): {', '.join(bad)}.")
        if dispatcher_lr_scale <= 0:
            raise ConfigError(f"dispatcher_lr_scale must be positive, got {dispatcher_lr_scale}.")
        if agreement is not None and not 0.0 < agreement <= 1.0:
            raise ConfigError(f"agreement must lie in (0, 1] (a share of images) or be None, got {agreement}.")
        if agreement_batches < 1:
            raise ConfigError(f"agreement_batches must be at least 1, got {agreement_batches}.")
        if inference_mode not in ("gather", "mask"):
            raise ConfigError(f"inference_mode must be 'gather' or 'mask', got {inference_mode!r}.")
        self.loss_weights = weights
        if adapter_scale is None:
            adapter_scale = self.hparams["adapter_scale"] = default_adapter_scale(self.hparams.lr)
        self.blocks = nn.ModuleList(
            DyTBlock(
                blk,
                placement,
                self.vit.num_prefix_tokens,
                adapter_dim,
                num_experts,
                adapter_scale,
                adapter_dropout,
                tau,
                threshold,
                dispatcher_init_std,
            )
            for blk in self.vit.blocks
        )
        self.sites = PLACEMENT_SITES[placement]
        # this epoch's last ``agreement_batches`` training images (not saved)
        self.agreement_images: deque[Tensor] = deque(maxlen=agreement_batches)

    def dyt_blocks(self) -> list[DyTBlock]:
        """The wrapped blocks, typed (``nn.ModuleList`` iterates as plain modules)."""
        return [cast(DyTBlock, blk) for blk in self.blocks]

    def keep_count(self) -> int | None:
        """Patch tokens every image keeps per site under ``fixed_keep_rate`` (None: thresholded)."""
        rate = self.hparams.fixed_keep_rate
        return None if rate is None else int(round(rate * self.vit.num_patches))

    # -- the three forwards ----------------------------------------------------------------------
    def run_complete(self, x: Tensor) -> Tensor:
        """Logits of the complete model (every token through every sub-block)."""
        tokens = self.vit.embed(x)
        for blk in self.dyt_blocks():
            tokens = blk.forward_complete(tokens)
        return self.head(self.vit.pool(tokens))

    def run_masked(self, x: Tensor, sample: bool) -> tuple[Tensor, Tensor]:
        """Logits and masks (B, depth, sites, P) of the masked path (``sample``: Gumbel, training)."""
        tokens, masks = self.vit.embed(x), []
        for blk in self.dyt_blocks():
            tokens, m = blk.forward_masked(tokens, sample)
            masks.append(m)
        return self.head(self.vit.pool(tokens)), torch.stack(masks, dim=1)

    def run_gathered(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits and kept patch tokens (B, depth, sites) of the fast path."""
        tokens, kept, k = self.vit.embed(x), [], self.keep_count()
        for blk in self.dyt_blocks():
            tokens, c = blk.forward_gathered(tokens, k)
            kept.append(c)
        return self.head(self.vit.pool(tokens)), torch.stack(kept, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the dynamic model: sampled masks in training, the inference path in eval."""
        if self.training:
            return self.run_masked(x, sample=True)[0]
        return self.infer(x).logits

    def infer(self, x: Tensor) -> InferenceOutput:
        gathered = self.hparams.inference_mode == "gather"
        if gathered:
            logits, kept = self.run_gathered(x)
        else:
            logits, masks = self.run_masked(x, sample=False)
            kept = masks.sum(-1).long()
        flops = self.executed_flops(kept, gathered)
        offered = torch.full_like(kept[..., 0], self.vit.num_patches * len(self.sites))
        return InferenceOutput(logits, flops, kept=kept.sum(-1), offered=offered)

    def training_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        w = self.loss_weights
        logits, masks = self.run_masked(x, sample=True)
        terms: dict[str, Tensor] = {}
        if w["w_cls"] > 0:
            terms["loss_cls"] = self.criterion(logits, y)
        if w["w_complete_cls"] > 0 or w["w_distill"] > 0:
            complete = self.run_complete(x)
            if w["w_complete_cls"] > 0:
                terms["loss_complete_cls"] = self.criterion(complete, y)
            if w["w_distill"] > 0:
                terms["loss_distill"] = F.kl_div(
                    F.log_softmax(logits, dim=-1),
                    F.log_softmax(complete.detach(), dim=-1),
                    log_target=True,
                    reduction="batchmean",
                )
        rate = masks.mean()
        if w["w_rate"] > 0:
            terms["loss_rate"] = (rate - self.hparams.target_rate) ** 2
        loss = sum((w[LOSS_TERMS[k]] * v for k, v in terms.items()), logits.new_zeros(()))
        terms["keep_rate"] = rate.detach()
        return loss, logits, terms

    # -- FLOPs -----------------------------------------------------------------------------------
    def executed_flops(self, kept: Tensor, gathered: bool = True, norm: bool = True) -> Tensor:
        """FLOPs per image (B,) float64 of a batch whose sites kept ``kept`` (B, depth, sites) patch
        tokens (:meth:`DyTBlock.executed_flops` per block, plus embedding, final norm and head)."""
        s = self.vit.shape()
        total = torch.full(
            kept.shape[:1], float(non_block_flops(s, self.num_classes, norm)), dtype=torch.float64, device=kept.device
        )
        for i, blk in enumerate(self.dyt_blocks()):
            total += blk.executed_flops(kept[:, i], s, gathered, norm)
        return total

    def inference_flops(self) -> int:
        """Per-image FLOPs at the target keep rate (or ``fixed_keep_rate``), gathered."""
        rate = self.hparams.fixed_keep_rate if self.hparams.fixed_keep_rate is not None else self.hparams.target_rate
        k = int(round(rate * self.vit.num_patches))
        kept = torch.full((1, len(self.blocks), len(self.sites)), k, dtype=torch.long)
        return int(self.executed_flops(kept)[0])

    # -- calibration, optimisation, merging ------------------------------------------------------
    def inference_threshold(self) -> float:
        """The dispatchers' shared inference threshold on ``sigmoid(logit)`` (the first one's)."""
        return cast(TokenDispatcher, self.dyt_blocks()[0].dispatchers[self.sites[0]]).threshold

    def set_logit_threshold(self, value: float) -> None:
        """Set every dispatcher's inference threshold, in logit space (0.0 = the paper's 0.5)."""
        for blk in self.dyt_blocks():
            for d in blk.dispatchers.values():
                cast(Tensor, d.logit_threshold).fill_(value)

    @torch.no_grad()
    def calibrate(
        self, data: Iterable[Any], target: float | None = None, max_batches: int | None = 8, iters: int = 12
    ) -> dict[str, float]:
        """Set one inference threshold for all dispatchers so the keep rate on ``data`` (a loader of
        images, e.g. training images) is ``target`` (default ``target_rate``): a bisection on a
        shared logit threshold (ours, not the paper's). Returns the threshold on ``sigmoid(logit)``
        and the keep rate it gives; the threshold is saved in checkpoints."""
        target = self.hparams.target_rate if target is None else target
        if not 0.0 <= target <= 1.0:
            raise ConfigError(f"Calibration target keep rate must lie in [0, 1], got {target}.")
        images = image_batches(data, self.device, max_batches)
        offered = sum(x.shape[0] for x in images) * len(self.blocks) * len(self.sites) * self.vit.num_patches

        def keep_rate_at(logit: float) -> float:
            self.set_logit_threshold(logit)
            return sum(float(self.run_gathered(x)[1].sum()) for x in images) / offered

        was_training = self.training
        self.eval()
        lo, hi = -20.0, 20.0  # the keep rate falls as the logit threshold rises
        try:
            for _ in range(iters):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if keep_rate_at(mid) > target else (lo, mid)
            rate = keep_rate_at(0.5 * (lo + hi))
        finally:
            self.train(was_training)
        return {"threshold": float(torch.sigmoid(torch.tensor(0.5 * (lo + hi)))), "keep_rate": rate}

    @torch.no_grad()
    def calibrate_agreement(
        self, data: Iterable[Any], agreement: float | None = None, max_batches: int | None = 8, iters: int = 6
    ) -> dict[str, float]:
        """Set one inference threshold for all dispatchers: the highest, up to the ``threshold``
        hparam, at which the dynamic model predicts the complete model's class on a share
        ``agreement`` (default the hparam) of the images of ``data`` (ours). A bisection on the
        threshold in ``(0, threshold]`` (0 keeps every token: the complete model), ``iters`` steps
        (6: to within ``threshold / 64``). Counts are summed over the ranks of a distributed run,
        so every rank sets the same threshold. Returns the threshold on ``sigmoid(logit)``, the
        agreement and the keep rate on ``data``; the threshold is saved in checkpoints."""
        agreement = self.hparams.agreement if agreement is None else agreement
        if agreement is None or not 0.0 < agreement <= 1.0:
            raise ConfigError(f"The agreement target must lie in (0, 1] (a share of images), got {agreement}.")
        images = image_batches(data, self.device, max_batches)
        distributed = self._trainer is not None and self.trainer.world_size > 1

        def set_threshold(threshold: float) -> None:
            self.set_logit_threshold(float(torch.logit(torch.tensor(threshold, dtype=torch.float64))))

        def measure(threshold: float) -> tuple[float, float]:
            """Agreement share and keep rate on ``images`` at a shared threshold."""
            set_threshold(threshold)
            counts = torch.zeros(4, dtype=torch.float64, device=self.device)
            for x, target in zip(images, targets, strict=True):
                logits, kept = self.run_gathered(x)
                counts[0] += (logits.argmax(-1) == target).sum()
                counts[1] += x.shape[0]
                counts[2] += kept.sum()
                counts[3] += kept.numel() * self.vit.num_patches
            if distributed:
                counts = cast(Tensor, self.trainer.strategy.reduce(counts, reduce_op="sum"))
            return float(counts[0] / counts[1]), float(counts[2] / counts[3])

        was_training = self.training
        self.eval()
        try:
            targets = [self.run_complete(x).argmax(-1) for x in images]
            hi = self.hparams.threshold
            share, keep = measure(hi)
            if share < agreement:  # agreement rises as the threshold falls (more tokens kept)
                lo, share, keep = 0.0, 1.0, 1.0
                for _ in range(iters):
                    mid = 0.5 * (lo + hi)
                    at_mid = measure(mid)
                    if at_mid[0] >= agreement:
                        lo, (share, keep) = mid, at_mid
                    else:
                        hi = mid
                set_threshold(lo)  # the highest that met the target (its share and keep are kept above)
        finally:
            self.train(was_training)
        return {"threshold": self.inference_threshold(), "agreement": share, "keep_rate": keep}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Keep the epoch's last ``agreement_batches`` training images; at its last batch, set the
        inference threshold with :meth:`calibrate_agreement` (before epoch-end checkpoints and
        validation, so both see it). The last batches, not the first: a run resumed mid-epoch sees
        the same ones, so the threshold resumes exactly too."""
        if self.hparams.agreement is None:
            return
        self.agreement_images.append(batch[0].detach())
        if self.trainer.is_last_batch:
            result = self.calibrate_agreement(list(self.agreement_images), max_batches=None)
            self.agreement_images.clear()
            self.log_dict({f"calibration/{k}": v for k, v in result.items()}, on_step=False, on_epoch=True)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The base groups, with the dispatchers split off at ``lr * dispatcher_lr_scale``."""
        scale = self.hparams.dispatcher_lr_scale
        if scale == 1.0:
            return super().parameter_groups()
        dispatch = {id(p) for blk in self.dyt_blocks() for p in blk.dispatchers.parameters()}
        groups = []
        for g in super().parameter_groups():
            groups.append({**g, "params": [p for p in g["params"] if id(p) not in dispatch]})
            mine = [p for p in g["params"] if id(p) in dispatch]
            if mine:
                groups.append({**g, "params": mine, "lr": self.hparams.lr * scale})
        return groups

    def deploy_form(self, keep_rate: float | None = None) -> nn.Module:
        """The static top-k form :meth:`export` traces (:class:`~petl_lightning.deploy.dyt_topk.DyTTopK`):
        ``keep_rate`` (default ``fixed_keep_rate``) of the patch tokens per image and block; a copy."""
        return DyTTopK.of(self, keep_rate)

    def merge(self) -> Any:
        raise MergeError(
            "DyT decides per token at inference, so it does not fold into a static timm ViT; "
            "use DyT's own inference path (or its export, docs/deploy.md)."
        )


__all__ = ["DyT"]
