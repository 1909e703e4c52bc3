"""Dyn-Adapter (Zhang et al., "Dyn-Adapter: Towards Disentangled Representation for Efficient
Visual Recognition", ECCV 2024, arXiv 2407.14302): early-exit heads over a PETL base on a frozen
ViT, trained with a scheduled multi-exit loss and two regularisers, and run with per-image early
exit at inference.

No official code exists and the paper's full text was not available (see
``specs/dyt_dynadapter.md`` §2), so this is a reconstruction. What the sources state: early heads
at a fixed interval, heavier heads at shallow exits ("balanced early heads"), an adaptively
weighted multi-exit loss ("adaptive prioritisation"), higher dropout in shallow layers and a
random mask on gradient updates ("bidirectional sparsity"), and exit at the first head whose
confidence clears a threshold. **Every number and shape below is our choice** and is a
constructor argument: exit blocks, head widths, the loss-weight schedule, the dropout schedule,
the gradient-mask ratio, the confidence measure and the threshold policy.

Inference removes finished images from the batch after each exit (``index_select`` on the
remaining tokens), so later blocks really run on fewer images; :meth:`DynAdapter.dynamic_forward`
is checked against a per-image loop in ``tests/test_dyn_adapter.py``. Thresholds are picked on
held-out data for a FLOPs budget by :meth:`DynAdapter.calibrate`; :meth:`DynAdapter.sweep` gives
the accuracy-vs-GFLOPs curve. :meth:`DynAdapter.merge` folds a RepAdapter, ARC or LoRA base into
copies of the blocks for inference, so only the exit heads cost extra.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torchmetrics import Metric

from petl_lightning.errors import PETLError
from petl_lightning.flops import block_flops, embed_flops, head_flops
from petl_lightning.layers.adapter import Adapter
from petl_lightning.layers.arc import ARCBasis, ARCLayer
from petl_lightning.layers.exits import ExitHead
from petl_lightning.layers.lora import LoRA
from petl_lightning.layers.repadapter import RepAdapterLayer
from petl_lightning.merge import AffineAdapterBlock
from petl_lightning.methods.base import PETLModule
from petl_lightning.methods.repadapter import REPADAPTER_SCALES
from petl_lightning.stats import InferenceStats

BASES = ("adapter", "lora", "repadapter", "arc")
SCHEDULES = ("linear", "cosine", "step", "constant")
POLICIES = ("geometric", "shared", "grid")
EXIT_POOLS = ("cls_avg", "cls", "avg")


class DynAdapterConfigError(PETLError, ValueError):
    """A Dyn-Adapter argument that does not fit the model (exit blocks, widths, rates, budget)."""


# ------------------------------------------------------------------------------------------------
# Block
# ------------------------------------------------------------------------------------------------
class DynBlock(AffineAdapterBlock):
    """A frozen timm ``Block`` with one PETL base; any PETL module may be ``None``::

        x = x + drop_path1(ls1(attn(attn_adapter(norm1(x)))))      # qkv += lora(h) for LoRA
        h = mlp_adapter(norm2(x))
        x = x + drop_path2(ls2(mlp(h))) + mlp_parallel(h)

    ``attn_adapter`` / ``mlp_adapter``: affine adapters on the branch inputs (RepAdapter, ARC;
    foldable into ``qkv`` / ``fc1`` via :meth:`fold_into`). ``mlp_parallel``: a bottleneck
    :class:`~petl_lightning.layers.adapter.Adapter` parallel to the MLP (AdaptFormer's place),
    added outside LayerScale so a small LayerScale does not shrink the adapter's update.
    ``qkv_lora``: a :class:`~petl_lightning.layers.lora.LoRA` update of ``attn.qkv``.
    """

    def __init__(
        self,
        block: nn.Module,
        attn_adapter: nn.Module | None = None,
        mlp_adapter: nn.Module | None = None,
        mlp_parallel: Adapter | None = None,
        qkv_lora: LoRA | None = None,
    ) -> None:
        super().__init__(block, attn_adapter, mlp_adapter)
        self.mlp_parallel = mlp_parallel
        self.qkv_lora = qkv_lora

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.ls1(self.attention(self.attn_adapter(self.norm1(x)))))
        h = self.mlp_adapter(self.norm2(x))
        x = x + self.drop_path2(self.ls2(self.mlp(h)))
        if self.mlp_parallel is not None:
            x = x + self.mlp_parallel(h)
        return x

    def attention(self, h: Tensor) -> Tensor:
        """The frozen attention; with LoRA, timm's ``Attention.forward`` with ``qkv(h) + lora(h)``."""
        if self.qkv_lora is None:
            return self.attn(h)
        a = self.attn
        B, N, _ = h.shape
        gate = a.gate(h).sigmoid() if getattr(a, "gate", None) is not None else None
        qkv = (a.qkv(h) + self.qkv_lora(h)).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)
        if a.fused_attn:
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=a.attn_drop.p if self.training else 0.0)
        else:
            attn = ((q * a.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            o = a.attn_drop(attn) @ v
        o = a.norm(o.transpose(1, 2).reshape(B, N, -1))
        if gate is not None:
            o = o * gate
        return a.proj_drop(a.proj(o))

    def petl_modules(self) -> list[nn.Module]:
        """The PETL modules of this block (each has ``.dropout`` and ``.flops(n)``)."""
        mods = [self.attn_adapter, self.mlp_adapter, self.mlp_parallel, self.qkv_lora]
        return [m for m in mods if m is not None and not isinstance(m, nn.Identity)]

    def adapter_flops(self, n_tokens: int) -> int:
        """Multiply-adds of this block's PETL modules on ``n_tokens`` tokens."""
        return sum(m.flops(n_tokens) for m in self.petl_modules())

    @torch.no_grad()
    def merged_copy(self, block: nn.Module) -> nn.Module:
        """A copy of the frozen timm ``block`` with this block's PETL modules folded in (eval mode):
        affine adapters into ``qkv`` / ``fc1``, LoRA's ``(alpha/r) B A`` into ``qkv``. ``block``
        itself is not modified. The bottleneck adapter (ReLU) cannot be folded."""
        if self.mlp_parallel is not None:
            raise DynAdapterConfigError(
                "The bottleneck adapter is non-linear (ReLU) and cannot be merged into the backbone; only the "
                "repadapter, arc and lora bases merge."
            )
        merged = copy.deepcopy(block).eval()
        self.fold_into(merged)
        if self.qkv_lora is not None:
            qkv = merged.attn.qkv
            qkv.weight.copy_((qkv.weight.float() + self.qkv_lora.delta_weight().to(qkv.weight.device)).to(qkv.weight))
        return merged


# ------------------------------------------------------------------------------------------------
# Threshold search (pure tensors, no model runs)
# ------------------------------------------------------------------------------------------------
def confidence(logits: Tensor, kind: Literal["max_softmax", "entropy"] = "max_softmax") -> Tensor:
    """Per-image confidence in [0, 1] from logits (B, K).

    ``max_softmax``: the largest class probability. ``entropy``: ``1 - H(p) / log K`` (1 for a
    one-hot prediction, 0 for a uniform one), so "higher is surer" holds for both.
    """
    logp = logits.float().log_softmax(dim=-1)
    if kind == "max_softmax":
        return logp.max(dim=-1).values.exp()
    if kind == "entropy":
        k = logits.shape[-1]
        if k < 2:
            return torch.ones(logits.shape[:-1], device=logits.device)
        ent = -(logp.exp() * logp).sum(dim=-1)
        return 1.0 - ent / math.log(k)
    raise DynAdapterConfigError(f"Unknown confidence {kind!r}; use 'max_softmax' or 'entropy'.")


def assign_exits(conf: Tensor, thresholds: Tensor) -> Tensor:
    """Exit of each image for each threshold vector.

    Args:
        conf: (N, E) confidences of every exit on every image.
        thresholds: (E-1,) or (M, E-1) thresholds of the early exits.

    Returns:
        (N,) or (M, N) long: the first exit whose confidence is >= its threshold (the last exit
        when none is).
    """
    single = thresholds.ndim == 1
    thr = thresholds.reshape(-1, conf.shape[1] - 1).to(conf)
    passed = conf[None, :, :-1] >= thr[:, None, :]
    last = torch.ones(passed.shape[:2] + (1,), dtype=torch.bool, device=conf.device)
    exits = torch.cat([passed, last], dim=2).to(torch.uint8).argmax(dim=2)
    return exits[0] if single else exits


def evaluate_thresholds(
    conf: Tensor, correct: Tensor, costs: Tensor, thresholds: Tensor, chunk: int = 2048
) -> tuple[Tensor, Tensor, Tensor]:
    """Accuracy, mean cost and exit shares of each candidate threshold vector, in one pass.

    Args:
        conf / correct: (N, E) confidence and correctness of every exit on every image.
        costs: (E,) cost (FLOPs) of an image leaving at each exit.
        thresholds: (M, E-1) candidates.

    Returns:
        ``acc`` (M,), ``cost`` (M,) and ``share`` (M, E).
    """
    accs, mean_costs, shares = [], [], []
    correct_f = correct.to(torch.float64)
    costs = costs.to(torch.float64).to(conf.device)
    n_exits = conf.shape[1]
    for i in range(0, thresholds.shape[0], chunk):
        ex = assign_exits(conf, thresholds[i : i + chunk])  # (m, N)
        accs.append(correct_f.T.gather(0, ex).mean(dim=1) if ex.numel() else ex.new_zeros(0))
        mean_costs.append(costs[ex].mean(dim=1))
        shares.append(F.one_hot(ex, n_exits).to(torch.float64).mean(dim=1))
    return torch.cat(accs), torch.cat(mean_costs), torch.cat(shares)


def _threshold_levels(values: Tensor, levels: int) -> Tensor:
    """Up to ``levels`` thresholds for one confidence column: -inf (every image passes), the
    midpoints between neighbouring distinct values (never on a value, so float noise of a
    re-run cannot move an image across), and +inf (none passes); evenly spaced when thinned."""
    u = values.float().unique()  # sorted
    inf = torch.tensor([math.inf], device=values.device)
    cand = torch.cat([-inf, 0.5 * (u[:-1] + u[1:]), inf])
    if cand.numel() > levels:
        cand = cand[torch.linspace(0, cand.numel() - 1, max(levels, 2), device=values.device).round().long().unique()]
    return cand


def candidate_thresholds(
    conf: Tensor, policy: Literal["geometric", "shared", "grid"] = "geometric", resolution: int = 0
) -> Tensor:
    """Candidate (M, E-1) threshold vectors for a confidence table (N, E).

    - ``geometric`` (MSDNet's budgeted rule): the share of images leaving at exit ``k`` is
      proportional to ``q**k``; each ``q`` on a log grid gives thresholds set exit by exit on the
      images still running. A one-parameter family: little room to over-fit 200 held-out images.
    - ``shared``: one threshold for every exit.
    - ``grid``: every combination of per-exit thresholds (the most flexible, the most prone to
      over-fitting small held-out sets).

    Thresholds always lie halfway between two confidences (or at +-inf). ``resolution``: grid
    points per parameter (0: 401 for geometric/shared; for grid as many as keep the product near 100k).
    """
    n, e = conf.shape
    if e < 2:
        return conf.new_zeros(1, 0)
    early = conf[:, :-1]
    if policy == "shared":
        return _threshold_levels(early.flatten(), resolution or 401)[:, None].expand(-1, e - 1).contiguous()
    if policy == "grid":
        g = resolution or max(3, int(round(100_000 ** (1.0 / (e - 1)))))
        axes = [_threshold_levels(early[:, k], g) for k in range(e - 1)]
        return torch.cartesian_prod(*axes).reshape(-1, e - 1)
    if policy == "geometric":
        qs = torch.logspace(-3, 3, resolution or 401, dtype=torch.float64)
        powers = torch.arange(e, dtype=torch.float64)
        cands = []
        for q in qs:
            share = q**powers
            share = share / share.sum()
            remaining = torch.ones(n, dtype=torch.bool, device=conf.device)
            thr = []
            for k in range(e - 1):
                want = int(round(float(share[k]) * n))
                c = early[remaining, k].sort(descending=True).values
                if want <= 0 or c.numel() == 0:
                    t = math.inf
                else:
                    # Lowest value that should pass; ties with it pass too (they cannot be split).
                    low = c[min(want, c.numel()) - 1]
                    below = c[c < low]
                    t = 0.5 * float(low + below[0]) if below.numel() else -math.inf
                thr.append(t)
                remaining &= ~(conf[:, k] >= t)
            cands.append(thr)
        return torch.tensor(cands, dtype=torch.float32, device=conf.device).unique(dim=0)
    raise DynAdapterConfigError(f"Unknown calibration policy {policy!r}; choose one of {', '.join(POLICIES)}.")


def search_thresholds(
    conf: Tensor,
    correct: Tensor,
    costs: Tensor,
    max_cost: float,
    policy: Literal["geometric", "shared", "grid"] = "geometric",
    resolution: int = 0,
) -> tuple[Tensor, float, float, Tensor]:
    """The candidate with the best accuracy whose mean cost is at most ``max_cost`` (ties: cheapest).

    Returns ``(thresholds (E-1,), accuracy, mean cost, exit shares (E,))``.
    """
    cands = candidate_thresholds(conf, policy, resolution)
    # Always offer "everything at the first exit" and "no early exit" as candidates.
    e = conf.shape[1]
    extremes = torch.tensor([[-math.inf] + [math.inf] * (e - 2), [math.inf] * (e - 1)], device=conf.device)
    cands = torch.cat([cands.to(conf.device).float(), extremes[:, : e - 1]])
    acc, cost, share = evaluate_thresholds(conf, correct, costs, cands)
    ok = cost <= max_cost * (1 + 1e-9)
    if not bool(ok.any()):
        raise DynAdapterConfigError(
            f"No thresholds meet the budget: the cheapest choice (every image at the first exit) costs "
            f"{float(costs[0]) / 1e9:.4f} GFLOPs per image, above the {max_cost / 1e9:.4f} allowed. Raise the "
            f"budget or put the first exit earlier (exit_blocks)."
        )
    score = torch.where(ok, acc, torch.full_like(acc, -1.0))
    best_acc = score.max()
    tied = ok & (acc >= best_acc - 1e-12)
    idx = int(torch.where(tied, cost, torch.full_like(cost, math.inf)).argmin())
    return cands[idx].cpu(), float(acc[idx]), float(cost[idx]), share[idx].cpu()


# ------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------
class ExitAccuracy(Metric):
    """Top-1 accuracy of every exit on every image (DDP-summed counts)."""

    full_state_update = False

    def __init__(self, num_exits: int) -> None:
        super().__init__()
        self.add_state("correct", torch.zeros(num_exits, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("seen", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor) -> None:
        """``logits``: (E, B, K) of all exits; ``target``: (B,)."""
        self.correct += (logits.argmax(dim=-1) == target[None]).sum(dim=1).to(self.correct)
        self.seen += target.numel()

    def compute(self) -> Tensor:
        return self.correct / self.seen.clamp(min=1)


def scale_grad(x: Tensor, scale: float) -> Tensor:
    """Identity forward; the gradient flowing back through it is multiplied by ``scale``."""
    if scale == 1.0:
        return x
    if scale == 0.0:
        return x.detach()
    return x * scale + x.detach() * (1.0 - scale)


@dataclass
class DynamicOutput:
    """Result of :meth:`DynAdapter.dynamic_forward`."""

    logits: Tensor  # (B, K), from the exit each image left at
    exit_index: Tensor  # (B,) long
    flops: Tensor  # (B,) executed FLOPs per image (papers' convention)


@dataclass
class ExitOutputs:
    """Every exit's confidence and prediction on a data set (see :meth:`DynAdapter.collect_exits`)."""

    conf: Tensor  # (N, E)
    pred: Tensor  # (N, E)
    labels: Tensor  # (N,)

    @property
    def correct(self) -> Tensor:
        return self.pred == self.labels[:, None]


# ------------------------------------------------------------------------------------------------
# Module
# ------------------------------------------------------------------------------------------------
class DynAdapter(PETLModule):
    """Dyn-Adapter: early exits over a PETL base on a frozen ViT, with budgeted dynamic inference.

    Exit ``k`` reads the CLS and mean patch token after block ``exit_blocks[k]`` through an
    :class:`~petl_lightning.layers.exits.ExitHead` (own LayerNorm + MLP or linear); the final exit
    is the backbone's final norm and ``self.head``. ``forward`` returns all exits' logits stacked
    (E, B, K) in training, and the dynamic prediction (B, K) in eval.

    Our choices (the paper's values are unknown; see the module docstring):

    Args:
        base: PETL base: ``"repadapter"`` (default, the paper's strongest setting; before ``qkv``
            and ``fc1``), ``"arc"`` (same places, two shared bases; all coefficients start at zero
            so the model starts as the backbone), ``"adapter"`` (bottleneck, ReLU, parallel to
            the MLP on its normalised input) or ``"lora"`` (rank-r update of the fused ``attn.qkv``).
        exit_blocks: blocks after which an early exit sits (1-based counts of blocks run).
            Default: every quarter of the depth, i.e. ``[3, 6, 9]`` on a 12-block ViT. The final
            exit is always added.
        exit_hidden: MLP hidden width of each early exit (0 = linear). Default: ``256, 128, ...``
            halving with depth, and linear for the deepest early exit when there are 3 or more
            ("balanced": heavier heads where features are shallower).
        exit_dropout: dropout inside the early heads.
        exit_pool: what an early head reads: ``"cls_avg"`` (default: the CLS token and the mean
            patch token, each layer-normed, concatenated), ``"cls"`` or ``"avg"``. Our choice,
            measured: linear probes of the frozen ViT-S on dtd10 (84 px) reach 0.53 / 0.63 / 0.64
            (cls / avg / both) after block 3 and 0.70 / 0.78 / 0.79 after block 6; shallow CLS
            tokens have gathered little of the image yet.
        adapter_dim: bottleneck width of the adapter / RepAdapter (8); ``lora_rank`` (8),
            ``lora_alpha`` (8), ``arc_rank`` (50), ``adapter_groups`` (2; RepAdapter): the base's
            own sizes. ``adapter_scale``: the branch scale of the adapter / RepAdapter; None: 1.0,
            except for the RepAdapter base, which then takes RepAdapter's official per-task scale of
            the DataModule's ``task`` when ``fit`` starts (1.0 for a task outside that table).
        loss_schedule: shape of "adaptive prioritisation", the early exits' loss weight over
            training progress ``t`` in [0, 1]: ``"linear"`` (default) or ``"cosine"`` ramp from
            ``loss_weight_start`` to ``loss_weight_end`` over ``loss_ramp = (t0, t1)``;
            ``"step"`` (switch at ``t1``); ``"constant"`` (``loss_weight_end`` throughout). The final
            exit's weight is ``final_loss_weight`` throughout. Default: 0.1 → 1.0 over the first
            half, so the deepest exit is learned first and the shallow exits are raised after.
            A start above the end gives the reverse order. Loss = sum of weight × cross-entropy.
        exit_grad_scale: scale of an early exit's gradient reaching the blocks below it (1.0:
            full; 0.0: stopped, the early heads train on the features only the later exits shape).
        petl_dropout: forward sparsity: dropout rate inside the PETL modules of each block, either
            ``(first, last)`` interpolated linearly over depth (default ``(0.3, 0.0)``: higher
            in shallow blocks) or one rate per block.
        grad_keep: backward sparsity: each PETL parameter entry's update survives a step with
            this probability (1.0 = off; default 0.8). Heads are never masked.
        grad_mask_mode: ``"gradient"`` (default; Child-Tuning-F style: the gradient is multiplied
            by Bernoulli(keep)/keep before the optimizer) or ``"update"`` (the optimizer step is
            undone for the masked entries).
        confidence: ``"max_softmax"`` (default) or ``"entropy"`` (1 - normalised entropy).
        exit_thresholds: thresholds of the early exits (one value, or one per exit). None
            (default): +inf, no early exit until :meth:`calibrate` sets them. Given thresholds
            count as calibrated: the automatic calibration does not replace them.
        calibrate_budget: when not None (default 0.5), thresholds are calibrated automatically for
            this FLOPs budget at the end of ``fit`` and at the start of ``test`` (unless already
            calibrated) on the DataModule's held-out split (``val200`` under ``protocol=train_val``);
            the fit-end calibration also saves and logs the accuracy-vs-GFLOPs curve.
        calibration_policy: ``"geometric"`` (default), ``"shared"`` or ``"grid"``; see
            :func:`candidate_thresholds`.
        eval_all_exits: in validation and test, also run every exit on every image (a second,
            full-cost pass) to log ``{stage}/acc_exit{b}`` per exit.
        **kwargs: :class:`PETLModule` arguments.
    """

    def __init__(
        self,
        base: Literal["adapter", "lora", "repadapter", "arc"] = "repadapter",
        exit_blocks: list[int] | None = None,
        exit_hidden: list[int] | None = None,
        exit_dropout: float = 0.1,
        exit_pool: Literal["cls_avg", "cls", "avg"] = "cls_avg",
        adapter_dim: int = 8,
        adapter_scale: float | None = None,
        adapter_groups: int = 2,
        lora_rank: int = 8,
        lora_alpha: float = 8.0,
        arc_rank: int = 50,
        loss_schedule: Literal["linear", "cosine", "step", "constant"] = "linear",
        loss_weight_start: float = 0.1,
        loss_weight_end: float = 1.0,
        loss_ramp: tuple[float, float] = (0.0, 0.5),
        final_loss_weight: float = 1.0,
        exit_grad_scale: float = 1.0,
        petl_dropout: Sequence[float] = (0.3, 0.0),
        grad_keep: float = 0.8,
        grad_mask_mode: Literal["gradient", "update"] = "gradient",
        confidence: Literal["max_softmax", "entropy"] = "max_softmax",
        exit_thresholds: float | list[float] | None = None,
        calibrate_budget: float | None = 0.5,
        calibration_policy: Literal["geometric", "shared", "grid"] = "geometric",
        eval_all_exits: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        depth, dim = self.vit.depth, self.vit.dim
        self._check_args(base, loss_schedule, loss_ramp, exit_grad_scale, grad_keep, grad_mask_mode,
                         confidence, calibration_policy, calibrate_budget)
        if getattr(self.vit.vit, "attn_pool", None) is not None or self.vit.vit.global_pool != "token":
            raise DynAdapterConfigError(
                f"DynAdapter reads the CLS token at every exit; {self.vit.model_name!r} pools with "
                f"{self.vit.vit.global_pool!r}. Use a ViT with a class token (global_pool='token')."
            )
        self.exit_blocks = self._resolve_exit_blocks(exit_blocks, depth)
        self.exit_depths = [*self.exit_blocks, depth]
        n_early = len(self.exit_blocks)
        hidden = self._resolve_exit_hidden(exit_hidden, n_early)
        if exit_pool not in EXIT_POOLS:
            raise DynAdapterConfigError(f"Unknown exit_pool {exit_pool!r}; choose one of {', '.join(EXIT_POOLS)}.")
        n_pool = 2 if exit_pool == "cls_avg" else 1
        self.exit_heads = nn.ModuleList(ExitHead(dim, self.num_classes, h, exit_dropout, n_pool) for h in hidden)
        self.dropout_rates = self._resolve_dropout(petl_dropout, depth)

        # PETL base, one set of modules per block.
        if base == "arc":
            self.basis_attn = ARCBasis(dim, arc_rank)
            self.basis_mlp = ARCBasis(dim, arc_rank)
        scale = 1.0 if adapter_scale is None else float(adapter_scale)
        blocks = []
        for blk, p in zip(self.vit.blocks, self.dropout_rates):
            if not isinstance(blk, Block):
                raise DynAdapterConfigError(
                    f"DynAdapter wraps timm vision_transformer.Block; this model has {type(blk).__name__}."
                )
            if base == "repadapter":
                mods: dict[str, nn.Module] = {
                    "attn_adapter": RepAdapterLayer(dim, adapter_dim, adapter_groups, scale, p),
                    "mlp_adapter": RepAdapterLayer(dim, adapter_dim, adapter_groups, scale, p),
                }
            elif base == "arc":
                mods = {
                    "attn_adapter": ARCLayer(self.basis_attn, dim, arc_rank, p, coeff_init="zeros"),
                    "mlp_adapter": ARCLayer(self.basis_mlp, dim, arc_rank, p, coeff_init="zeros"),
                }
            elif base == "adapter":
                mods = {"mlp_parallel": Adapter(dim, adapter_dim, scale, p)}
            else:
                mods = {"qkv_lora": LoRA.for_linear(blk.attn.qkv, lora_rank, lora_alpha, p)}
            blocks.append(DynBlock(blk, **mods))
        self.blocks = nn.ModuleList(blocks)

        init = math.inf if exit_thresholds is None else exit_thresholds
        thr = torch.as_tensor(init, dtype=torch.float32).flatten()
        if thr.numel() == 1:
            thr = thr.expand(n_early).clone()
        if thr.numel() != n_early:
            raise DynAdapterConfigError(
                f"exit_thresholds has {thr.numel()} values for {n_early} early exits; give one value or one per exit."
            )
        self.register_buffer("thresholds", thr)
        self.register_buffer("calibrated", torch.tensor(exit_thresholds is not None))
        self.merged_blocks: nn.ModuleList | None = None
        self.inference_meter = InferenceStats(depth, num_exits=len(self.exit_depths))
        self.exit_accuracy = ExitAccuracy(len(self.exit_depths))
        self._total_steps: int | None = None
        self.last_calibration: dict[str, Any] | None = None
        self.last_sweep: list[dict[str, Any]] | None = None

    # -- argument checks -------------------------------------------------------------------------
    @staticmethod
    def _check_args(base: str, schedule: str, ramp: Sequence[float], grad_scale: float, keep: float, mode: str,
                    conf: str, policy: str, budget: float | None) -> None:
        if base not in BASES:
            raise DynAdapterConfigError(f"Unknown base {base!r}; choose one of {', '.join(BASES)}.")
        if schedule not in SCHEDULES:
            raise DynAdapterConfigError(f"Unknown loss_schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}.")
        if len(ramp) != 2 or not 0.0 <= ramp[0] <= ramp[1] <= 1.0:
            raise DynAdapterConfigError(f"loss_ramp must be (t0, t1) with 0 <= t0 <= t1 <= 1, got {tuple(ramp)}.")
        if not 0.0 <= grad_scale <= 1.0:
            raise DynAdapterConfigError(f"exit_grad_scale must lie in [0, 1], got {grad_scale}.")
        if not 0.0 < keep <= 1.0:
            raise DynAdapterConfigError(f"grad_keep must lie in (0, 1] (1.0 switches the mask off), got {keep}.")
        if mode not in ("gradient", "update"):
            raise DynAdapterConfigError(f"grad_mask_mode must be 'gradient' or 'update', got {mode!r}.")
        if conf not in ("max_softmax", "entropy"):
            raise DynAdapterConfigError(f"confidence must be 'max_softmax' or 'entropy', got {conf!r}.")
        if policy not in POLICIES:
            raise DynAdapterConfigError(f"Unknown calibration_policy {policy!r}; choose one of {', '.join(POLICIES)}.")
        if budget is not None and not 0.0 < budget <= 1.0:
            raise DynAdapterConfigError(
                f"calibrate_budget must lie in (0, 1] (a share of the full FLOPs), got {budget}."
            )

    @staticmethod
    def _resolve_exit_blocks(exit_blocks: Sequence[int] | None, depth: int) -> list[int]:
        if exit_blocks is None:
            blocks = sorted({round(depth * i / 4) for i in (1, 2, 3)} - {0, depth})
            if not blocks:
                raise DynAdapterConfigError(f"A {depth}-block ViT has no room for early exits.")
            return blocks
        blocks = [int(b) for b in exit_blocks]
        if not blocks or blocks != sorted(set(blocks)) or blocks[0] < 1 or blocks[-1] >= depth:
            raise DynAdapterConfigError(
                f"exit_blocks must be increasing, distinct block counts in [1, {depth - 1}] (the final exit after "
                f"block {depth} is always added), got {list(exit_blocks)}."
            )
        return blocks

    @staticmethod
    def _resolve_exit_hidden(exit_hidden: Sequence[int] | None, n_early: int) -> list[int]:
        if exit_hidden is None:
            hidden = [max(256 >> i, 16) for i in range(n_early)]
            if n_early >= 3:
                hidden[-1] = 0
            return hidden
        hidden = [int(h) for h in exit_hidden]
        if len(hidden) != n_early or any(h < 0 for h in hidden):
            raise DynAdapterConfigError(
                f"exit_hidden needs {n_early} non-negative widths (one per early exit, 0 = linear), "
                f"got {list(exit_hidden)}."
            )
        return hidden

    @staticmethod
    def _resolve_dropout(rates: Sequence[float], depth: int) -> list[float]:
        rates = [float(r) for r in rates]
        if len(rates) == 2 and depth != 2:
            first, last = rates
            rates = [first + (last - first) * i / max(depth - 1, 1) for i in range(depth)]
        if len(rates) != depth or any(not 0.0 <= r < 1.0 for r in rates):
            raise DynAdapterConfigError(
                f"petl_dropout must be (first, last) or {depth} rates, each in [0, 1); got {list(rates)}."
            )
        return rates

    # -- forward pieces --------------------------------------------------------------------------
    @property
    def num_exits(self) -> int:
        return len(self.exit_depths)

    def run_blocks(self, tokens: Tensor, start: int, end: int) -> Tensor:
        """Blocks ``start .. end-1`` (0-based) on tokens (B, N, D); the merged copies in eval mode
        after :meth:`merge`."""
        blocks = self.merged_blocks if self.merged_blocks is not None and not self.training else self.blocks
        for blk in blocks[start:end]:
            tokens = blk(tokens)
        return tokens

    # -- merging (inference) ---------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> DynAdapter:
        """Fold the PETL modules into copies of the frozen blocks, used by every eval-mode forward
        from now on: a RepAdapter, ARC or LoRA base then costs nothing at inference (the paper's
        point: only the exit heads remain). The trainable modules are kept unchanged; switching to
        train mode drops the copies (they would go stale). Checkpoints never store the copies.
        Returns ``self``."""
        merged = [w.merged_copy(b) for w, b in zip(self.blocks, self.vit.blocks)]
        for b, orig in zip(merged, self.vit.blocks):
            b.attn.fused_attn = orig.attn.fused_attn
        self.merged_blocks = nn.ModuleList(merged).requires_grad_(False)
        return self.eval()

    @property
    def is_merged(self) -> bool:
        return self.merged_blocks is not None

    def unmerge(self) -> None:
        """Drop the merged copies (eval then runs the PETL modules again)."""
        self.merged_blocks = None

    def train(self, mode: bool = True) -> DynAdapter:
        if mode and self.merged_blocks is not None:
            self.unmerge()
        return super().train(mode)

    def trainable_state_keys(self) -> list[str]:
        return [k for k in super().trainable_state_keys() if not k.startswith("merged_blocks.")]

    def _petl_flops(self, blk: DynBlock, n_tokens: int) -> int:
        return 0 if self.merged_blocks is not None else blk.adapter_flops(n_tokens)

    def forward_tokens(self, tokens: Tensor) -> Tensor:
        return self.run_blocks(tokens, 0, len(self.blocks))

    def pool_exit_tokens(self, tokens: Tensor) -> Tensor:
        """Pooled tokens (B, P, D) an early head reads (``hparams.exit_pool``)."""
        npt = self.vit.num_prefix_tokens
        cls, avg = tokens[:, :1], tokens[:, npt:].mean(dim=1, keepdim=True)
        kind = self.hparams.exit_pool
        return cls if kind == "cls" else avg if kind == "avg" else torch.cat([cls, avg], dim=1)

    def exit_logits(self, k: int, tokens: Tensor) -> Tensor:
        """Logits of exit ``k`` from the tokens after block ``exit_depths[k]``: an early exit's head
        on the pooled tokens; the final exit is the backbone's final norm, pooling and ``head``."""
        if k == self.num_exits - 1:
            return self.head(self.vit.pool(tokens))
        pooled = scale_grad(self.pool_exit_tokens(tokens), self.hparams.exit_grad_scale)
        return self.exit_heads[k](pooled)

    def forward_exits(self, x: Tensor) -> Tensor:
        """Every exit on every image: logits (E, B, K). The training forward."""
        tokens = self.vit.embed(x)
        out, start = [], 0
        for k, end in enumerate(self.exit_depths):
            tokens = self.run_blocks(tokens, start, end)
            start = end
            out.append(self.exit_logits(k, tokens))
        return torch.stack(out)

    def confidence(self, logits: Tensor) -> Tensor:
        """Confidence (B,) of logits (B, K), by ``hparams.confidence``."""
        return confidence(logits, self.hparams.confidence)

    def dynamic_forward(self, x: Tensor) -> DynamicOutput:
        """Early-exit inference with batch shrinking.

        After each exit the images whose confidence clears that exit's threshold are written to
        the output and removed from the batch (``index_select``), so the following blocks run on
        the rest only. The last exit takes every image still running.
        """
        B = x.shape[0]
        tokens = self.vit.embed(x)
        remaining = torch.arange(B, device=x.device)
        exit_index = torch.full((B,), self.num_exits - 1, dtype=torch.long, device=x.device)
        out: Tensor | None = None
        start = 0
        for k, end in enumerate(self.exit_depths):
            tokens = self.run_blocks(tokens, start, end)
            start = end
            logits = self.exit_logits(k, tokens)
            if out is None:
                out = logits.new_empty(B, logits.shape[1])
            if k == self.num_exits - 1:
                out.index_copy_(0, remaining, logits)
                break
            done = self.confidence(logits) >= self.thresholds[k]
            leave = done.nonzero().squeeze(1)
            if leave.numel():
                out.index_copy_(0, remaining[leave], logits[leave])
                exit_index[remaining[leave]] = k
                if leave.numel() == remaining.numel():
                    break
                stay = (~done).nonzero().squeeze(1)
                tokens, remaining = tokens.index_select(0, stay), remaining.index_select(0, stay)
        assert out is not None
        costs = torch.tensor(self.exit_flops(), dtype=torch.float64, device=x.device)
        return DynamicOutput(out, exit_index, costs[exit_index])

    def forward_masked_reference(self, x: Tensor) -> DynamicOutput:
        """The same decisions without batch shrinking: every exit runs on every image, then each
        image takes the logits of its first confident exit (a reference for tests)."""
        logits = self.forward_exits(x)
        conf = torch.stack([self.confidence(lg) for lg in logits], dim=1)
        ex = assign_exits(conf, self.thresholds)
        out = logits.permute(1, 0, 2)[torch.arange(x.shape[0], device=x.device), ex]
        costs = torch.tensor(self.exit_flops(), dtype=torch.float64, device=x.device)
        return DynamicOutput(out, ex, costs[ex])

    def forward(self, x: Tensor) -> Tensor:
        """Training: all exits' logits (E, B, K). Eval: the dynamic prediction (B, K), recorded in
        the inference statistics."""
        if self.training:
            return self.forward_exits(x)
        res = self.dynamic_forward(x)
        self._record(res)
        return res.logits

    def _record(self, res: DynamicOutput, y: Tensor | None = None) -> None:
        correct = None if y is None else res.logits.argmax(dim=-1) == y
        self.inference_meter.update(images=res.logits.shape[0], flops=res.flops.sum(),
                                    exit_index=res.exit_index, correct=correct)

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

    def loss_weights(self, progress: float) -> Tensor:
        """Weights (E,) of the exits' cross-entropies at training progress ``progress`` in [0, 1]."""
        hp = self.hparams
        t0, t1 = hp.loss_ramp
        if hp.loss_schedule == "constant":
            r = 1.0
        elif hp.loss_schedule == "step":
            r = 1.0 if progress >= t1 else 0.0
        else:
            r = 1.0 if progress >= t1 else 0.0 if progress <= t0 else (progress - t0) / (t1 - t0)
            if hp.loss_schedule == "cosine":
                r = 0.5 * (1.0 - math.cos(math.pi * r))
        early = hp.loss_weight_start + (hp.loss_weight_end - hp.loss_weight_start) * r
        return torch.tensor([early] * (self.num_exits - 1) + [hp.final_loss_weight])

    def on_train_start(self) -> None:
        self._total_steps = None

    def setup(self, stage: str) -> None:
        """RepAdapter base with ``adapter_scale=None``: use RepAdapter's official scale of the task."""
        hp = self.hparams
        if stage != "fit" or hp.base != "repadapter" or hp.adapter_scale is not None:
            return
        task = getattr(getattr(self._trainer, "datamodule", None), "task", None)
        s = REPADAPTER_SCALES["repblock"].get(task) if task is not None else None
        if s is None:
            if task is not None:
                rank_zero_warn(f"DynAdapter: task {task!r} has no official RepAdapter scale; using 1.0.")
            return
        for blk in self.blocks:
            for m in blk.petl_modules():
                m.scale.fill_(float(s))

    def training_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Weighted sum of every exit's cross-entropy; the final exit's logits for train accuracy."""
        logits = self.forward_exits(x)
        weights = self.loss_weights(self.training_progress())
        terms: dict[str, Tensor] = {}
        loss = logits.new_zeros(())
        for k, (lg, w) in enumerate(zip(logits, weights.tolist())):
            ce = self.criterion(lg, y)
            loss = loss + w * ce
            terms[f"ce_exit{self.exit_depths[k]}"] = ce.detach()
            terms[f"w_exit{self.exit_depths[k]}"] = torch.tensor(w)
        return loss, logits[-1], terms

    def petl_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the PETL base (not the heads): the ones the gradient mask touches."""
        return [p for n, p in self.named_parameters() if p.requires_grad and not self.is_head_parameter(n)]

    def is_head_parameter(self, name: str) -> bool:
        return name.startswith(("head.", "exit_heads."))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        hp = self.hparams
        if hp.grad_keep >= 1.0 or hp.grad_mask_mode != "gradient":
            return
        for p in self.petl_parameters():
            if p.grad is not None:
                mask = torch.rand_like(p.grad) < hp.grad_keep
                p.grad.mul_(mask / hp.grad_keep)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        hp = self.hparams
        if hp.grad_keep >= 1.0 or hp.grad_mask_mode != "update":
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        params = self.petl_parameters()
        before = [p.detach().clone() for p in params]
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        with torch.no_grad():
            for p, old in zip(params, before):
                p.copy_(torch.where(torch.rand_like(p) < hp.grad_keep, p, old))
        return None

    # -- evaluation ------------------------------------------------------------------------------
    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        self._check_labels(y)
        res = self.dynamic_forward(x)
        self._record(res, y)
        logits, bs = res.logits, x.shape[0]
        metric = self.val_acc if stage == "val" else self.test_acc
        metric(logits, y)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), prog_bar=stage == "val", sync_dist=True, batch_size=bs)
        self.log(f"{stage}/acc", metric, prog_bar=True, batch_size=bs)
        self.log(f"{stage}/gflops", res.flops.mean() / 1e9, sync_dist=True, batch_size=bs)
        if self.hparams.eval_all_exits:
            all_logits = self.forward_exits(x)
            self.exit_accuracy.update(all_logits, y)
            accs = (all_logits.argmax(dim=-1) == y[None]).float().mean(dim=1)
            for d, acc in zip(self.exit_depths, accs):
                self.log(f"{stage}/acc_exit{d}", acc, sync_dist=True, batch_size=bs)
        return logits

    # -- FLOPs and statistics --------------------------------------------------------------------
    def exit_flops(self, norm: bool = True) -> list[int]:
        """FLOPs per image of leaving at each exit: patch embedding, the blocks run (with their PETL
        modules) and every head evaluated on the way, the one it left at included."""
        s = self.vit.shape()
        n = s.num_tokens
        per_block = [block_flops(n, n, s, norm) + self._petl_flops(blk, n) for blk in self.blocks]
        out, heads = [], 0
        for k, d in enumerate(self.exit_depths):
            last = k == self.num_exits - 1
            heads += head_flops(s, self.num_classes, norm=norm) if last else self.exit_heads[k].flops(norm)
            out.append(embed_flops(s) + sum(per_block[:d]) + heads)
        return out

    def full_flops(self, norm: bool = True) -> int:
        """FLOPs per image of the base PETL model with no early exit and no early heads: the
        reference of the budget ("the full model"). After :meth:`merge`, the PETL modules cost 0."""
        s = self.vit.shape()
        n = s.num_tokens
        blocks = sum(block_flops(n, n, s, norm) + self._petl_flops(blk, n) for blk in self.blocks)
        return embed_flops(s) + blocks + head_flops(s, self.num_classes, norm=norm)

    def inference_flops(self) -> int:
        """Without recorded statistics: the full model's FLOPs (what an image costs that never exits early)."""
        return self.full_flops()

    def inference_stats(self) -> dict[str, Tensor]:
        """The base keys (``exit_share``, ``exit_acc`` = accuracy of the images that left at each
        exit, ``gflops`` executed per image, ...) plus ``exit_acc_all`` (each exit's accuracy on
        every image, when ``eval_all_exits``), ``gflops_full`` (the base PETL model without early
        exit), ``flops_ratio`` (``gflops / gflops_full``), ``exit_depths`` and ``thresholds``."""
        stats = super().inference_stats()
        f64 = dict(dtype=torch.float64)
        if self.exit_accuracy.update_count > 0:
            stats["exit_acc_all"] = self.exit_accuracy.compute().double().cpu()
        full = self.full_flops() / 1e9
        stats["gflops_full"] = torch.tensor(full, **f64)
        stats["flops_ratio"] = stats["gflops"].double().cpu() / full
        stats["exit_depths"] = torch.tensor(self.exit_depths, **f64)
        stats["thresholds"] = self.thresholds.detach().double().cpu()
        return stats

    def reset_inference_stats(self) -> None:
        super().reset_inference_stats()
        self.exit_accuracy.reset()

    # -- calibration -----------------------------------------------------------------------------
    def _held_out_batches(self, data: Any) -> Iterable[Any]:
        """Batches of held-out ``(images, labels)`` from a DataModule, a loader or one pair."""
        if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
            return [tuple(data)]
        if isinstance(data, L.LightningDataModule):
            protocol = getattr(data, "protocol", None)
            if protocol is not None and protocol != "train_val":
                raise DynAdapterConfigError(
                    f"Threshold calibration needs held-out data, but the DataModule uses protocol={protocol!r} "
                    f"(it trains on train800val200 and has no untouched split except test, and calibrating on test "
                    f"is selection on test). Use protocol='train_val' (calibrates on val200), or pass a DataLoader."
                )
            loader = data.val_dataloader()
            if isinstance(loader, (list, tuple)) and not loader:
                raise DynAdapterConfigError(
                    f"{type(data).__name__}.val_dataloader() is empty; calibration needs a held-out split."
                )
            return loader
        return data

    @torch.no_grad()
    def collect_exits(self, data: Any) -> ExitOutputs:
        """Run every exit on every held-out image once: confidences, predictions and labels."""
        was_training = self.training
        self.eval()
        conf, pred, labels = [], [], []
        try:
            for batch in self._held_out_batches(data):
                x, y = batch[0], batch[1]
                logits = self.forward_exits(x.to(self.device))
                conf.append(torch.stack([self.confidence(lg) for lg in logits], dim=1).cpu())
                pred.append(logits.argmax(dim=-1).T.cpu())
                labels.append(torch.as_tensor(y).cpu())
        finally:
            self.train(was_training)
        if not conf:
            raise DynAdapterConfigError("Calibration got no batches; pass a loader of (images, labels).")
        return ExitOutputs(torch.cat(conf), torch.cat(pred), torch.cat(labels))

    def _summary(self, out: ExitOutputs, thresholds: Tensor) -> dict[str, Any]:
        costs = torch.tensor(self.exit_flops(), dtype=torch.float64)
        acc, cost, share = evaluate_thresholds(out.conf, out.correct, costs, thresholds[None].float())
        full = self.full_flops()
        return {"acc": float(acc[0]), "gflops": float(cost[0]) / 1e9, "flops_ratio": float(cost[0]) / full,
                "exit_share": share[0].tolist()}

    def calibrate(
        self,
        data: Any,
        budget: float = 0.5,
        policy: Literal["geometric", "shared", "grid"] | None = None,
        outputs: ExitOutputs | None = None,
    ) -> dict[str, Any]:
        """Set the early exits' thresholds so the mean executed FLOPs on held-out data is at most
        ``budget`` × the full model's (:meth:`full_flops`), with the best held-out accuracy.

        Args:
            data: a DataModule (its held-out split: ``val200`` under ``protocol="train_val"``), a
                DataLoader of ``(images, labels)``, or one ``(images, labels)`` pair.
            budget: share of the full model's FLOPs, in (0, 1].
            policy: candidate thresholds (default ``hparams.calibration_policy``); see
                :func:`candidate_thresholds`.
            outputs: reuse :meth:`collect_exits` results instead of running the model.

        The model runs once over the data; the search itself only indexes the stored confidences.
        Returns the thresholds and the held-out accuracy, GFLOPs, FLOPs ratio and exit shares.
        """
        if not 0.0 < budget <= 1.0:
            raise DynAdapterConfigError(f"budget must lie in (0, 1] (a share of the full FLOPs), got {budget}.")
        out = outputs if outputs is not None else self.collect_exits(data)
        costs = torch.tensor(self.exit_flops(), dtype=torch.float64)
        thr, _, _, _ = search_thresholds(out.conf, out.correct, costs, budget * self.full_flops(),
                                         policy or self.hparams.calibration_policy)
        self.thresholds.copy_(thr.to(self.thresholds))
        self.calibrated.fill_(True)
        result = {"budget": budget, "thresholds": thr.tolist(), **self._summary(out, thr)}
        self.last_calibration = result
        return result

    def sweep(
        self,
        data: Any,
        budgets: Sequence[float] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
        eval_data: Any = None,
        plot_path: str | Path | None = "dyn_adapter_curve.png",
        policy: Literal["geometric", "shared", "grid"] | None = None,
        log: bool = True,
    ) -> list[dict[str, Any]]:
        """Accuracy vs executed GFLOPs: for each budget, thresholds calibrated on ``data``
        (held-out) and evaluated on ``eval_data`` (default: ``data``). Either may also be the
        :class:`ExitOutputs` of an earlier :meth:`collect_exits`, so nothing is run twice.

        Leaves this module's thresholds unchanged. Returns one dict per budget (``budget``,
        ``thresholds``, ``gflops``, ``flops_ratio``, ``acc``, ``exit_share``; plus ``calib_*`` on
        the calibration data) and saves a PNG of the curve with each single exit's point
        (``plot_path``; None: no plot), logged to every attached logger when ``log``.
        """
        calib = data if isinstance(data, ExitOutputs) else self.collect_exits(data)
        ev = calib if eval_data is None else (
            eval_data if isinstance(eval_data, ExitOutputs) else self.collect_exits(eval_data))
        saved = (self.thresholds.clone(), self.calibrated.clone(), self.last_calibration)
        points = []
        try:
            for b in budgets:
                try:
                    c = self.calibrate(None, b, policy, outputs=calib)
                except DynAdapterConfigError:
                    continue  # below the cheapest exit
                s = self._summary(ev, torch.tensor(c["thresholds"]))
                points.append({"budget": b, "thresholds": c["thresholds"], **s,
                               "calib_acc": c["acc"], "calib_gflops": c["gflops"]})
        finally:
            self.thresholds.copy_(saved[0])
            self.calibrated.copy_(saved[1])
            self.last_calibration = saved[2]
        self.last_sweep = points
        if plot_path is not None:
            self.plot_curve(points, ev, plot_path, log=log)
        return points

    def single_exit_points(self, out: ExitOutputs) -> list[dict[str, float]]:
        """Each exit alone (a truncated model with only that head): GFLOPs and accuracy."""
        total, pts = self.exit_flops(), []
        for k in range(self.num_exits):
            heads_before = sum(self.exit_heads[j].flops() for j in range(k))
            pts.append({"exit": self.exit_depths[k], "gflops": (total[k] - heads_before) / 1e9,
                        "acc": float(out.correct[:, k].double().mean())})
        return pts

    def plot_curve(self, points: list[dict[str, Any]], out: ExitOutputs, path: str | Path, log: bool = True) -> Path:
        """Save the accuracy-vs-GFLOPs plot as PNG and (``log``) send it to the attached loggers."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(5.5, 4.0), dpi=120)
        if points:
            ax.plot([p["gflops"] for p in points], [100 * p["acc"] for p in points], "o-",
                    label="Dyn-Adapter (dynamic)")
            labels: dict[tuple[float, float], list[str]] = {}
            for p in points:  # budgets that chose the same thresholds share one label
                labels.setdefault((p["gflops"], 100 * p["acc"]), []).append(f"{p['budget']:g}")
            for xy, names in labels.items():
                ax.annotate(",".join(names), xy, textcoords="offset points", xytext=(3, -10), fontsize=7)
        single = self.single_exit_points(out)
        ax.plot([p["gflops"] for p in single], [100 * p["acc"] for p in single], "s--", color="gray",
                label="single exit (after block)")
        for p in single:
            ax.annotate(str(p["exit"]), (p["gflops"], 100 * p["acc"]), textcoords="offset points", xytext=(3, 3),
                        fontsize=7)
        ax.set_xlabel("executed GFLOPs per image")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(f"Dyn-Adapter ({self.hparams.base}), budgets annotated")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
        if log:
            self._log_figure(fig, path)
        plt.close(fig)
        return path

    def _log_figure(self, fig: Any, path: Path, key: str = "dyn_adapter/acc_vs_gflops") -> None:
        for logger in (self.loggers if self._trainer is not None else []):
            if hasattr(logger, "log_image"):  # W&B
                logger.log_image(key=key, images=[str(path)])
            elif hasattr(getattr(logger, "experiment", None), "add_figure"):  # TensorBoard
                logger.experiment.add_figure(key, fig, global_step=self.global_step)

    # -- automatic calibration in fit / test -----------------------------------------------------
    def _auto_calibrate(self, with_curve: bool) -> None:
        budget = self.hparams.calibrate_budget
        dm = getattr(self.trainer, "datamodule", None)
        if budget is None:
            return
        held_out = None if dm is None or getattr(dm, "protocol", "train_val") != "train_val" else dm.val_dataloader()
        if held_out is None or (isinstance(held_out, list) and not held_out):
            rank_zero_warn(
                "DynAdapter: no held-out split to calibrate the exit thresholds on (use the DataModule's "
                "protocol='train_val', or call model.calibrate(loader, budget)); thresholds stay at "
                f"{self.thresholds.tolist()}."
            )
            return
        out = self.collect_exits(held_out)
        res = self.calibrate(held_out, budget, outputs=out)
        rank_zero_info(
            f"DynAdapter: calibrated for budget {budget:g} on held-out data: thresholds {res['thresholds']}, "
            f"acc {res['acc']:.4f}, {res['gflops']:.3f} GFLOPs ({res['flops_ratio']:.3f} of full), "
            f"exit shares {[round(s, 3) for s in res['exit_share']]}"
        )
        for logger in self.loggers:
            logger.log_metrics({"calib/acc": res["acc"], "calib/gflops": res["gflops"],
                                "calib/flops_ratio": res["flops_ratio"]}, step=self.global_step)
        if with_curve:
            root = Path(self.trainer.log_dir or self.trainer.default_root_dir)
            self.sweep(out, plot_path=root / "dyn_adapter_curve.png" if self.trainer.is_global_zero else None)

    def on_validation_epoch_start(self) -> None:
        self.reset_inference_stats()  # statistics of this epoch only, also without a callback

    def on_test_epoch_start(self) -> None:
        self.reset_inference_stats()

    def on_fit_end(self) -> None:
        self._auto_calibrate(with_curve=True)

    def on_test_start(self) -> None:
        if not bool(self.calibrated):
            self._auto_calibrate(with_curve=False)


__all__ = [
    "DynAdapter", "DynAdapterConfigError", "DynBlock", "DynamicOutput", "ExitOutputs", "assign_exits",
    "candidate_thresholds", "confidence", "evaluate_thresholds", "scale_grad", "search_thresholds",
]
