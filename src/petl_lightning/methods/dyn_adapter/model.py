"""Dyn-Adapter (Zhang et al., ECCV 2024, arXiv 2407.14302): early-exit heads over a PETL base on a
frozen ViT, trained with a scheduled multi-exit loss and bidirectional sparsity, run with per-image
early exit. No official code exists: every number and shape is our choice and an option (``config.py``;
``docs/dyn_adapter.md``). Inference removes finished images from the batch after each exit and skips
the heads of exits that take no image, tested equal to a per-image loop; :meth:`DynAdapter.calibrate`
picks the thresholds for a FLOPs budget on held-out data (``ExitCalibration`` does it during fit and
before test); :meth:`DynAdapter.merge` folds a RepAdapter, ARC or LoRA base into a plain timm ViT.

With ``base="dyt"`` (ours; no published code combines the two) every block is DyT's, so both savings
compose: finished images leave the batch after each exit, and inside every block an image still runs,
only its kept tokens go through the skippable sub-block. Each image then pays its own block FLOPs
(its kept tokens), which the exit tables carry so calibration meets the budget on held-out data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from petl_lightning.deploy.stages import export_exit_stages
from petl_lightning.errors import ConfigError
from petl_lightning.flops import block_flops, embed_flops, head_flops
from petl_lightning.layers.dyt_block import PLACEMENT_SITES, DyTBlock, default_adapter_scale
from petl_lightning.layers.dyt_loss import dyt_loss_terms
from petl_lightning.layers.exits import ExitHead, pool_exit_tokens
from petl_lightning.methods.dyn_adapter import thresholds as th
from petl_lightning.methods.dyn_adapter.bases import DEFAULT_ADAPTER_DIM, Base, adapter_layers, build_blocks, fold_block
from petl_lightning.methods.dyn_adapter.config import (
    CalibrationConfig,
    ExitConfig,
    LossSchedule,
    SparsityConfig,
    TokenSkipping,
    as_config,
)
from petl_lightning.methods.dyn_adapter.early_exit import EarlyExitModule
from petl_lightning.methods.repadapter import RepAdapter
from petl_lightning.stats import InferenceOutput, InferenceStats


class DynAdapter(EarlyExitModule):
    """Dyn-Adapter: early exits over a PETL base on a frozen ViT, with budgeted dynamic inference.

    Exit ``k`` reads pooled tokens after block ``exits.blocks[k]`` through an
    :class:`~petl_lightning.layers.exits.ExitHead`; the final exit is the backbone's final norm and
    ``self.head``. ``forward`` returns the early-exit prediction ``(B, K)`` in every mode;
    :meth:`forward_exits` returns every exit's logits (the training path).

    Args:
        base: ``"repadapter"`` (default), ``"arc"``, ``"lora"``, ``"adapter"`` or ``"dyt"``
            (:mod:`~petl_lightning.methods.dyn_adapter.bases`).
        adapter_dim: the base's width or rank (None: 8; 50 for ARC).
        adapter_groups: RepAdapter's up-projection groups (2).
        adapter_scale: the base's branch scale (LoRA: ``alpha / r``). None: 1.0, except for the
            repadapter base, which takes RepAdapter's official per-task scale (:meth:`task_overrides`),
            and the dyt base, which takes DyT's lr-dependent default (:func:`~petl_lightning.layers.
            dyt_block.default_adapter_scale`).
        exits / loss / sparsity / skipping / calibration: the option groups of
            :mod:`~petl_lightning.methods.dyn_adapter.config` (dataclasses or dicts); ``skipping``
            (DyT's token skipping) applies to ``base="dyt"`` only.
        eval_all_exits: in test, also run every exit on every image (a second, full pass) to log
            ``test/acc_exit{b}`` per exit (validation always does: calibration needs it).
        **kwargs: :class:`PETLModule` arguments.
    """

    STRUCTURAL_HPARAMS = (
        *EarlyExitModule.STRUCTURAL_HPARAMS,
        "base",
        "adapter_dim",
        "adapter_groups",
        "exits",
        "skipping",
    )

    def __init__(
        self,
        base: Base = "repadapter",
        adapter_dim: int | None = None,
        adapter_groups: int = 2,
        adapter_scale: float | None = None,
        exits: ExitConfig = ExitConfig(),  # noqa: B008 - a frozen-by-convention default LightningCLI shows
        loss: LossSchedule = LossSchedule(),  # noqa: B008
        sparsity: SparsityConfig = SparsityConfig(),  # noqa: B008
        skipping: TokenSkipping = TokenSkipping(),  # noqa: B008
        calibration: CalibrationConfig = CalibrationConfig(),  # noqa: B008
        eval_all_exits: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.vit.check_blocks(type(self).__name__)
        self.exit_config, self.loss_schedule = as_config(ExitConfig, exits), as_config(LossSchedule, loss)
        self.sparsity = as_config(SparsityConfig, sparsity)
        self.skipping = as_config(TokenSkipping, skipping)
        self.calibration_config = as_config(CalibrationConfig, calibration)
        self.hparams.update(  # plain dicts: what weights-only checkpoint loading accepts
            exits=asdict(self.exit_config),
            loss=asdict(self.loss_schedule),
            sparsity=asdict(self.sparsity),
            skipping=asdict(self.skipping),
            calibration=asdict(self.calibration_config),
        )
        for group in (self.loss_schedule, self.sparsity, self.calibration_config, self.skipping):
            group.check()
        if base != "dyt" and self.skipping != TokenSkipping():
            raise ConfigError(
                f"skipping options apply to base='dyt' only (token skipping inside the blocks); this model's base "
                f"is {base!r}. Set --model.init_args.base dyt, or drop the skipping options."
            )
        depth, dim = self.vit.depth, self.vit.dim
        if getattr(self.vit.vit, "attn_pool", None) is not None or self.vit.vit.global_pool != "token":
            raise ConfigError(
                f"DynAdapter reads the CLS token at every exit; {self.vit.model_name!r} pools with "
                f"{self.vit.vit.global_pool!r}. Use a ViT with a class token (global_pool='token')."
            )
        self.exit_config.check(depth)
        self.exit_depths = [*self.exit_config.resolved_blocks(depth), depth]
        hidden = self.exit_config.resolved_hidden(self.num_exits - 1)
        n_pool = 2 if self.exit_config.pool == "cls_avg" else 1
        cfg = self.exit_config
        self.exit_heads = nn.ModuleList(
            ExitHead(dim, self.num_classes, h, cfg.dropout, n_pool, cfg.grad_scale) for h in hidden
        )
        if adapter_scale is None and base == "dyt":
            adapter_scale = self.hparams["adapter_scale"] = default_adapter_scale(self.hparams.lr)
        scale = 1.0 if adapter_scale is None else float(adapter_scale)
        width = DEFAULT_ADAPTER_DIM.get(base, 8) if adapter_dim is None else adapter_dim
        dropout, prefix = self.sparsity.dropout_per_block(depth), self.vit.num_prefix_tokens
        self.blocks = build_blocks(
            base, self.vit.blocks, self, width, adapter_groups, scale, dropout, self.skipping, prefix
        )
        #: Patch tokens each block offers its skippable sub-blocks (0 unless the base is ``dyt``).
        self.skippable_tokens = (
            self.vit.num_patches * len(PLACEMENT_SITES[self.skipping.placement]) if base == "dyt" else 0
        )
        fixed = self.calibration_config.thresholds
        self.register_buffer(
            "thresholds",
            self.calibration_config.threshold_vector(math.inf if fixed is None else fixed, self.num_exits - 1),
        )
        #: The last calibration (budget, policy, held-out accuracy and FLOPs); saved in checkpoints.
        self.calibration_result: dict[str, Any] | None = (
            None if fixed is None else {"budget": None, "thresholds": list(fixed)}
        )
        self.inference_meter = InferenceStats(depth, num_exits=self.num_exits)
        self.exit_accuracy = nn.ModuleList(
            MulticlassAccuracy(self.num_classes, average="micro") for _ in self.exit_depths
        )
        self._held_out: list[th.ExitOutputs] = []
        self._total_steps: int | None = None

    @classmethod
    def task_overrides(cls, task: str, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """The repadapter base takes RepAdapter's official scale of the task."""
        return RepAdapter.task_overrides(task, {}) if hparams.get("base", "repadapter") == "repadapter" else {}

    @property
    def num_exits(self) -> int:
        return len(self.exit_depths)

    # -- forward ---------------------------------------------------------------------------------
    def forward_tokens(self, tokens: Tensor) -> Tensor:
        return self.forward_blocks(tokens, 0, len(self.blocks))

    def confidence(self, logits: Tensor) -> Tensor:
        """Per-image confidence (B,) of one exit's logits (B, K): the one exit rule (override it)."""
        return th.confidence(logits, self.calibration_config.confidence)

    def exit_logits(self, k: int, tokens: Tensor) -> Tensor:
        """Exit ``k``'s logits from the tokens after block ``exit_depths[k]``."""
        if k == self.num_exits - 1:
            return self.head(self.vit.pool(tokens))
        return self.exit_heads[k](pool_exit_tokens(tokens, self.exit_config.pool, self.vit.num_prefix_tokens))

    def forward_exits(self, x: Tensor) -> Tensor:
        """Every exit on every image: logits (E, B, K)."""
        return self.run_exits(x)[0]

    def run_exits(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Every exit on every image: logits (E, B, K) and, for the ``dyt`` base, each image's block
        FLOPs up to each exit (B, E) and patch tokens kept per block (B, depth); else ``None``s."""
        tokens, out, kept, start = self.vit.embed(x), [], [], 0
        for k, end in enumerate(self.exit_depths):
            tokens, c = self.forward_blocks_counted(tokens, start, end)
            kept.append(c)
            start = end
            out.append(self.exit_logits(k, tokens))
        if not self.skippable_tokens:
            return torch.stack(out), None, None
        counts = torch.cat(kept, dim=1)  # (B, depth, sites)
        s = self.vit.shape()
        per_block = torch.stack(
            [cast(DyTBlock, blk).executed_flops(counts[:, i], s) for i, blk in enumerate(self.blocks)], dim=1
        )
        block_cost = per_block.cumsum(dim=1)[:, [d - 1 for d in self.exit_depths]]
        return torch.stack(out), block_cost, counts.sum(-1)

    def keep_count(self) -> int | None:
        """Patch tokens every image keeps per site under ``skipping.fixed_keep_rate`` (None: thresholded)."""
        rate = self.skipping.fixed_keep_rate
        return None if rate is None else int(round(rate * self.vit.num_patches))

    def forward_blocks_counted(
        self, tokens: Tensor, start: int, end: int, blocks: nn.ModuleList | None = None
    ) -> tuple[Tensor, Tensor]:
        """Blocks ``start:end`` on ``tokens``: the tokens, and the patch tokens each image kept per
        block and site (B, end - start, sites), long (sites = 0 unless the base is ``dyt``, whose
        blocks run their gathered inference path)."""
        counts = []
        for blk in (self.blocks if blocks is None else blocks)[start:end]:
            if isinstance(blk, DyTBlock):
                tokens, c = blk.forward_gathered(tokens, self.keep_count())
                counts.append(c)
            else:
                tokens = blk(tokens)
                counts.append(torch.zeros(tokens.shape[0], 0, dtype=torch.long, device=tokens.device))
        if not counts:
            return tokens, torch.zeros(tokens.shape[0], 0, 0, dtype=torch.long, device=tokens.device)
        return tokens, torch.stack(counts, dim=1)

    def forward_blocks(self, tokens: Tensor, start: int, end: int, blocks: nn.ModuleList | None = None) -> Tensor:
        return self.forward_blocks_counted(tokens, start, end, blocks)[0]

    def forward(self, x: Tensor) -> Tensor:
        """The early-exit prediction (B, K)."""
        return self.infer(x).logits

    def infer(self, x: Tensor, blocks: nn.ModuleList | None = None) -> InferenceOutput:
        """Early exit with batch shrinking: after each exit the images whose confidence clears its
        threshold are written out and leave the batch; exits that take no image (``+inf``) are not
        evaluated. ``blocks``: the folded blocks of ``self.merge().blocks`` instead (the adapters then
        cost nothing: the executed FLOPs count them so). With the ``dyt`` base each block also runs
        only the kept tokens of the images still in the batch, and each image pays for those. Host
        syncs on a GPU: one read of the thresholds, and one per evaluated early exit (the size of the
        smaller batch); the ``dyt`` base's thresholded keep rule adds its own per block (use
        ``skipping.fixed_keep_rate`` for none)."""
        b, last, depth = x.shape[0], self.num_exits - 1, len(self.blocks)
        thresholds = self.thresholds.tolist()
        tokens, remaining = self.vit.embed(x), torch.arange(b, device=x.device)
        exit_index = torch.full((b,), last, dtype=torch.long, device=x.device)
        block_flops = torch.zeros(b, dtype=torch.float64, device=x.device)
        kept = torch.zeros(b, depth, dtype=torch.long, device=x.device)
        s = self.vit.shape()
        out: Tensor | None = None
        start = 0
        for k, end in enumerate(self.exit_depths):
            tokens, counts = self.forward_blocks_counted(tokens, start, end, blocks)
            if self.skippable_tokens:
                for j in range(end - start):
                    blk = cast(DyTBlock, self.blocks[start + j])
                    block_flops.index_add_(0, remaining, blk.executed_flops(counts[:, j], s))
                kept[remaining, start:end] = counts.sum(-1)
            start = end
            if k < last and not thresholds[k] < math.inf:
                continue
            logits = self.exit_logits(k, tokens)
            out = logits.new_empty(b, logits.shape[1]) if out is None else out
            if k == last:
                out.index_copy_(0, remaining, logits)
                break
            done = self.confidence(logits) >= thresholds[k]
            n_stay = done.numel() - int(done.sum())
            if n_stay == done.numel():
                continue
            order = torch.sort(done.to(torch.uint8), stable=True).indices  # staying first, each part in order
            stay, leave = order[:n_stay], order[n_stay:]
            out.index_copy_(0, remaining[leave], logits[leave])
            exit_index.index_fill_(0, remaining[leave], k)
            if n_stay == 0:
                break
            tokens, remaining = tokens.index_select(0, stay), remaining.index_select(0, stay)
        assert out is not None
        costs = self.exit_costs(merged=blocks is not None).of(torch.tensor(thresholds, dtype=torch.float64))[0]
        flops = costs.to(x.device, non_blocking=True)[exit_index] + block_flops
        if not self.skippable_tokens:
            return InferenceOutput(out, flops, exit_index)
        return InferenceOutput(out, flops, exit_index, kept, self.offered(exit_index))

    def infer_reference(self, x: Tensor) -> InferenceOutput:
        """The same decisions without batch shrinking (every exit on every image; for tests)."""
        logits, block_cost, kept = self.run_exits(x)
        ex = th.assign_exits(torch.stack([self.confidence(lg) for lg in logits], dim=1), self.thresholds)
        out = logits.permute(1, 0, 2)[torch.arange(x.shape[0], device=x.device), ex]
        flops = self.exit_costs().of(self.thresholds.cpu())[0].to(x.device)[ex]
        if block_cost is None or kept is None:
            return InferenceOutput(out, flops, ex)
        flops = flops + block_cost.gather(1, ex[:, None])[:, 0]
        ran = self.offered(ex)
        return InferenceOutput(out, flops, ex, kept * (ran > 0), ran)

    # -- FLOPs -----------------------------------------------------------------------------------
    def exit_costs(self, merged: bool = False, norm: bool = True) -> th.ExitCosts:
        """FLOPs of leaving at each exit (:class:`~.thresholds.ExitCosts`, on the CPU); ``merged``: the
        adapters are folded into the blocks (free). The ``dyt`` base's blocks are not in it: each
        image pays its own (:meth:`run_exits`)."""
        s = self.vit.shape()
        n = s.num_tokens
        per_block = [
            0
            if self.skippable_tokens
            else block_flops(n, n, s, norm) + (0 if merged else sum(a.flops(n) for a in adapter_layers(blk)))
            for blk in self.blocks
        ]
        depth = [embed_flops(s, norm) + sum(per_block[:d]) for d in self.exit_depths]
        depth[-1] += head_flops(s, self.num_classes, norm=norm)
        heads = [cast(ExitHead, h).flops(norm) for h in self.exit_heads]
        return th.ExitCosts(torch.tensor(depth, dtype=torch.float64), torch.tensor(heads, dtype=torch.float64))

    def full_flops(self, merged: bool = False, norm: bool = True) -> int:
        """FLOPs per image of the base model without early exits (``dyt``: nor token skipping): the
        reference of the budget."""
        full = int(self.exit_costs(merged, norm).depth[-1])
        if self.skippable_tokens:
            s, p = self.vit.shape(), self.vit.num_patches
            for blk in self.blocks:
                every = torch.full((1, len(cast(DyTBlock, blk).sites)), p, dtype=torch.long)
                full += int(cast(DyTBlock, blk).executed_flops(every, s, norm=norm)[0])
        return full

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

    def training_exits(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The training pass: every exit's logits (E, B, K) and, for the ``dyt`` base, the sampled
        patch-token masks (B, depth, sites, P) of DyT's masked path (straight-through gradients)."""
        tokens, out, masks, start = self.vit.embed(x), [], [], 0
        for k, end in enumerate(self.exit_depths):
            for blk in self.blocks[start:end]:
                if isinstance(blk, DyTBlock):
                    tokens, m = blk.forward_masked(tokens, sample=True)
                    masks.append(m)
                else:
                    tokens = blk(tokens)
            start = end
            out.append(self.exit_logits(k, tokens))
        return torch.stack(out), torch.stack(masks, dim=1) if masks else None

    def complete_logits(self, x: Tensor) -> Tensor:
        """The ``dyt`` base's complete model (every token through every sub-block), at the final exit."""
        tokens = self.vit.embed(x)
        for blk in self.blocks:
            tokens = cast(DyTBlock, blk).forward_complete(tokens)
        return self.head(self.vit.pool(tokens))

    def training_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Weighted sum of every exit's cross-entropy (plus, for the ``dyt`` base, DyT's rate loss
        and the complete-model terms whose weights are above 0); the final exit's logits for train
        accuracy."""
        logits, masks = self.training_exits(x)
        terms: dict[str, Tensor] = {}
        loss = logits.new_zeros(())
        for d, lg, w in zip(self.exit_depths, logits, self.loss_weights(self.training_progress())):
            ce = self.criterion(lg, y)
            loss = loss + w * ce
            terms[f"ce_exit{d}"], terms[f"w_exit{d}"] = ce.detach(), torch.tensor(w)
        if masks is not None:
            sk = self.skipping
            extra = dyt_loss_terms(
                masks, sk.target_rate, sk.w_rate, logits[-1], y, lambda: self.complete_logits(x),
                sk.w_complete_cls, sk.w_distill,
            )  # fmt: skip
            for name, (w, value) in extra.items():
                loss = loss + w * value if w > 0 else loss
                terms[name] = value.detach()
            terms["keep_rate"] = masks.mean().detach()
        return loss, logits[-1], terms

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
        for blk in self.blocks:
            for a in adapter_layers(blk):
                cast(Tensor, a.scale).fill_(float(scale))
        self.hparams["adapter_scale"] = float(scale)

    def is_head_parameter(self, name: str) -> bool:
        return name.startswith(("head.", "exit_heads."))

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the PETL base (not the heads): the ones the gradient mask touches."""
        return [p for n, p in self.named_parameters() if p.requires_grad and not self.is_head_parameter(n)]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.sparsity.mask_gradients(self.adapter_parameters())

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        def step() -> None:
            super(DynAdapter, self).optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)

        self.sparsity.masked_update(self.adapter_parameters(), step)

    # -- merging and export ----------------------------------------------------------------------
    def fold_block(self, index: int, block: nn.Module) -> None:
        fold_block(self.hparams.base, self.blocks[index], block)

    def export_exits(
        self, folder: str | Path, format: str = "onnx", opset: int | None = None, keep_rate: float | None = None
    ) -> Path:
        """Write one program per exit (``onnx`` or ``torch_export``), ``deploy.json`` (the current
        thresholds) and a standalone early-exit ``driver.py`` into ``folder`` (``docs/deploy.md``);
        :meth:`export` writes the merged base without exits. The ``dyt`` base's blocks keep the top-k
        tokens at ``keep_rate`` (default ``skipping.fixed_keep_rate``). This module is not modified."""
        return export_exit_stages(self, folder, format, opset, keep_rate)


__all__ = ["DynAdapter"]
