"""DyT: Dynamic Tuning (Zhao et al., NeurIPS 2024, arXiv 2403.11808).

Each frozen block gets a token dispatcher and a parallel adapter. The dispatcher (``Linear(D, 1)``
on the residual stream, patch tokens only; prefix tokens such as CLS are always kept) decides
which tokens go through the skippable sub-block; the adapter runs on every token. At inference the
skipped tokens really skip the work: the kept (image, token) pairs of the whole batch are gathered
into one ``(K, D)`` matrix, the sub-block runs on it, and the result is scattered back
(``inference_mode="gather"``). ``inference_mode="mask"`` is the reference: everything runs and the
output is multiplied by the mask (what training does, and what the official evaluation does).

Variants (paper §3.3; only ``mlp`` exists in the official code, the others are ours):

- ``mlp`` (default): attention on all tokens; dispatcher and adapter around the MLP.
- ``attn``: dispatcher and adapter around the attention; MLP on all tokens.
- ``attn_mlp``: one dispatcher and one adapter around each of attention and MLP.
- ``layer``: one dispatcher before the block; skipped tokens bypass the whole block; one adapter
  parallel to the block.

Attention skipping (our choice, the paper does not say): a skipped token is not a *query* (its
attention output is not computed, so its q row, its attention row and its output projection are
skipped), but it still serves as *key and value* to the kept tokens. Training (output masked, all
tokens present) and inference (kept queries only) then compute exactly the same function, which
avoids the train/test mismatch the spec points out (§1.5); the price is that the K/V projection
still runs on every token. The kept queries of each image are padded to the batch's largest count
for the attention matrix product (the projections run on exactly the kept rows); the executed
FLOPs include that padding.

Training runs the masked path twice per step: the dynamic model (Gumbel-sigmoid masks, hard forward
and straight-through gradient) and the complete model (no masks), with the paper's loss
``CE(dynamic) + CE(complete) + KL(complete.detach() || dynamic) + 2 * (mean(mask) - r)^2``;
each term has a weight (0 switches it off; with both complete-model terms off, the second forward
is skipped).

The rate loss constrains the keep rate of the *training* masks (sampled, keep probability
``sigmoid(logit)``); the inference mask ``sigmoid(logit) > threshold`` keeps more wherever logits
are positive but small. The two agree once the dispatchers are decisive, which the paper's
100 epochs achieve; after a short run the inference keep rate is higher than r (we measured
0.56-0.67 at r=0.5 after 2-5 epochs on DTD-10 with ViT-S). ``dispatcher_init_std``, ``w_rate`` and
:meth:`DyT.calibrate_threshold` are the knobs for that (ours, not the paper's).

Code-vs-paper notes: the official VTAB script uses d=16 (paper: 8), hard-codes weight decay 1e-4,
warms up for 10 epochs, normalises with mean/std 0.5 and selects the best epoch on the test set
(see ``recipes/dyt.yaml`` and the spec §1.12).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import Tensor, nn

from petl_lightning.backbone import ViTShape
from petl_lightning.errors import PETLError
from petl_lightning.flops import layernorm_flops, linear_flops, mlp_flops, non_block_flops
from petl_lightning.layers.dyt import TokenDispatcher, build_adapter
from petl_lightning.methods.base import PETLModule

Variant = Literal["mlp", "attn", "attn_mlp", "layer"]
VARIANT_SITES: dict[str, tuple[str, ...]] = {
    "mlp": ("mlp",),
    "attn": ("attn",),
    "attn_mlp": ("attn", "mlp"),
    "layer": ("layer",),
}


@dataclass
class SiteCount:
    """What one dispatch site of one block did on one batch.

    ``kept``/``offered``: patch tokens kept / offered by the dispatcher (summed over the batch).
    ``rows``: token rows the skippable sub-block executed (prefix tokens included).
    ``query_pad``: for attention-skipping sites, query rows per image in the padded attention
    product (the batch's largest kept count).
    """

    site: str
    kept: int
    offered: int
    rows: int
    query_pad: int


def attn_partial_flops(s: ViTShape, batch: int, n_tokens: int, q_rows: int, q_pad: int, norm: bool = True) -> int:
    """Attention with every token as key/value and ``q_rows`` queries (``q_pad`` per image padded).

    norm1 and the K/V projection on all ``batch * n_tokens`` tokens, Q and the output projection on
    the ``q_rows`` kept rows, ``q @ k^T`` and ``attn @ v`` on ``q_pad`` queries per image. With every
    token kept it equals ``batch * attn_flops(n_tokens)``.
    """
    all_rows = batch * n_tokens
    f = linear_flops(all_rows, s.dim, 2 * s.dim) + linear_flops(q_rows, s.dim, s.dim)
    f += 2 * batch * q_pad * n_tokens * s.dim + linear_flops(q_rows, s.dim, s.dim)
    return f + (layernorm_flops(all_rows, s.dim) if norm else 0)


def _flat_keep_index(keep: Tensor) -> Tensor:
    """Indices of the kept (image, token) pairs in the flattened ``(B * N,)`` token list."""
    return keep.reshape(-1).nonzero().squeeze(1)


class DyTBlock(nn.Module):
    """A frozen timm ``Block`` with DyT's dispatcher(s) and parallel adapter(s).

    Reuses the block's own sub-modules (norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2),
    so LayerScale, drop-path and fused attention behave as in timm.

    Args:
        block: the frozen timm block.
        variant: ``"mlp"`` | ``"attn"`` | ``"attn_mlp"`` | ``"layer"`` (module docstring).
        num_prefix_tokens: leading tokens that are always kept (CLS, registers).
        adapter_dim / num_experts / adapter_scale / adapter_dropout: the adapter (num_experts > 1:
            the MoE adapter of DyT-dagger).
        tau / threshold / dispatcher_init_std: dispatcher temperature, inference threshold and
            weight-init std.
    """

    def __init__(
        self,
        block: nn.Module,
        variant: Variant = "mlp",
        num_prefix_tokens: int = 1,
        adapter_dim: int = 8,
        num_experts: int = 1,
        adapter_scale: float = 1.0,
        adapter_dropout: float = 0.1,
        tau: float = 5.0,
        threshold: float = 0.5,
        dispatcher_init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if variant not in VARIANT_SITES:
            raise PETLError(f"Unknown DyT variant {variant!r}; choose one of {', '.join(VARIANT_SITES)}.")
        self.norm1, self.attn, self.ls1, self.drop_path1 = block.norm1, block.attn, block.ls1, block.drop_path1
        self.norm2, self.mlp, self.ls2, self.drop_path2 = block.norm2, block.mlp, block.ls2, block.drop_path2
        if variant != "mlp" and (type(self.attn) is not Attention or getattr(self.attn, "gate", None) is not None):
            raise PETLError(
                f"DyT variant {variant!r} skips attention queries and supports timm's plain Attention only, "
                f"not {type(self.attn).__name__}; use variant='mlp' for this model."
            )
        self.variant = variant
        self.num_prefix_tokens = num_prefix_tokens
        dim = self.norm1.weight.shape[0]
        sites = VARIANT_SITES[variant]
        self.dispatchers = nn.ModuleDict(
            {s: TokenDispatcher(dim, tau, threshold, dispatcher_init_std) for s in sites}
        )
        self.adapters = nn.ModuleDict(
            {s: build_adapter(dim, adapter_dim, num_experts, adapter_scale, adapter_dropout) for s in sites}
        )

    # -- the two sub-blocks, as in timm's Block.forward -----------------------------------------
    def attn_branch(self, x: Tensor) -> Tensor:
        return self.drop_path1(self.ls1(self.attn(self.norm1(x))))

    def mlp_branch(self, x: Tensor) -> Tensor:
        return self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def attn_kept_queries(self, x: Tensor, keep: Tensor, idx: Tensor) -> tuple[Tensor, int]:
        """``ls1(attn(norm1(x)))`` for the kept tokens only (rows ``idx`` of the flattened batch).

        Every token is key and value; only kept tokens are queries. Returns the ``(K, D)`` rows and
        the padded per-image query count. Uses the frozen ``qkv``/``proj`` weights of timm's
        Attention (q rows and k/v rows of the same fused Linear).
        """
        attn = self.attn
        b, n, _ = x.shape
        h, hd, adim = attn.num_heads, attn.head_dim, attn.attn_dim
        xn = self.norm1(x)
        w, bias = attn.qkv.weight, attn.qkv.bias
        q = F.linear(xn.reshape(b * n, -1).index_select(0, idx), w[:adim], None if bias is None else bias[:adim])
        kv = F.linear(xn, w[adim:], None if bias is None else bias[adim:])
        k, v = kv.reshape(b, n, 2, h, hd).permute(2, 0, 3, 1, 4).unbind(0)
        # Pad each image's kept queries to the batch's largest count: slot = rank within the image.
        q_pad = int(keep.sum(1).max())
        slot = (keep.cumsum(1) - 1).reshape(-1).index_select(0, idx)
        img = torch.div(idx, n, rounding_mode="floor")
        qp = q.new_zeros(b, q_pad, adim)
        qp[img, slot] = q
        qp = attn.q_norm(qp.reshape(b, q_pad, h, hd).transpose(1, 2))
        k = attn.k_norm(k)
        if attn.fused_attn:
            o = F.scaled_dot_product_attention(qp, k, v)
        else:
            o = ((qp * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        o = o.transpose(1, 2).reshape(b, q_pad, adim)[img, slot]
        o = attn.proj_drop(attn.proj(attn.norm(o)))
        return self.drop_path1(self.ls1(o)), q_pad

    # -- forward ---------------------------------------------------------------------------------
    def keep_mask(self, site: str, x: Tensor) -> Tensor:
        """The dispatcher's 0/1 mask over all tokens (B, N): prefix tokens always 1."""
        p = self.num_prefix_tokens
        dispatcher = self.dispatchers[site]
        # logits of all tokens, then drop the prefix: a Linear on the x[:, p:] slice would copy it
        patch_mask = dispatcher.decide(dispatcher.logits(x)[:, p:])
        return torch.cat([patch_mask.new_ones(x.shape[0], p), patch_mask], dim=1)

    def forward(
        self, x: Tensor, complete: bool = False, gather: bool = False
    ) -> tuple[Tensor, dict[str, Tensor], list[SiteCount]]:
        """Tokens (B, N, D) to tokens, the patch-token masks per site, and what executed.

        Args:
            complete: the complete model (no dispatch; every token through every sub-block).
            gather: run skippable sub-blocks on the kept tokens only (inference fast path). With
                ``False`` the masked reference path runs everything and multiplies by the mask.
        """
        masks: dict[str, Tensor] = {}
        counts: list[SiteCount] = []
        if self.variant == "mlp":
            x = x + self.attn_branch(x)
            x = self.dispatched("mlp", x, complete, gather, masks, counts)
        elif self.variant == "attn":
            x = self.dispatched("attn", x, complete, gather, masks, counts)
            x = x + self.mlp_branch(x)
        elif self.variant == "attn_mlp":
            x = self.dispatched("attn", x, complete, gather, masks, counts)
            x = self.dispatched("mlp", x, complete, gather, masks, counts)
        else:
            x = self.dispatched("layer", x, complete, gather, masks, counts)
        return x, masks, counts

    def dispatched(
        self, site: str, x: Tensor, complete: bool, gather: bool,
        masks: dict[str, Tensor], counts: list[SiteCount],
    ) -> Tensor:
        """``x + adapter(x) + mask * subblock(x)`` for one site; gathered or masked."""
        b, n, _ = x.shape
        p = self.num_prefix_tokens
        out = x + self.adapters[site](x)
        if complete:
            counts.append(SiteCount(site, b * (n - p), b * (n - p), b * n, n))
            return out + self.branch(site, x)
        keep = self.keep_mask(site, x)
        masks[site] = keep[:, p:]
        if not gather:
            kept = round(keep[:, p:].detach().sum().item())
            counts.append(SiteCount(site, kept, b * (n - p), b * n, n))
            return out + keep.unsqueeze(-1) * self.branch(site, x)
        keep_bool = keep > 0.5
        idx = _flat_keep_index(keep_bool)
        rows, q_pad = self.branch_rows(site, x, keep_bool, idx)
        counts.append(SiteCount(site, idx.numel() - b * p, b * (n - p), idx.numel(), q_pad))
        # out is fresh: scatter-add in place (measured on CPU, torch 2.15: index_add_ 20x faster
        # than index_put_(accumulate=True), which took 4% of the forward)
        out.reshape(b * n, -1).index_add_(0, idx, rows)
        return out

    def branch(self, site: str, x: Tensor) -> Tensor:
        """The skippable sub-block's residual update on all tokens (masked path)."""
        if site == "attn":
            return self.attn_branch(x)
        if site == "mlp":
            return self.mlp_branch(x)
        a = self.attn_branch(x)  # layer: attention then MLP, both residual updates
        return a + self.mlp_branch(x + a)

    def branch_rows(self, site: str, x: Tensor, keep: Tensor, idx: Tensor) -> tuple[Tensor, int]:
        """The same update for the kept rows ``idx`` only (gather path); also the query padding."""
        if site == "mlp":
            return self.mlp_branch(x.reshape(-1, x.shape[-1]).index_select(0, idx)), 0
        a, q_pad = self.attn_kept_queries(x, keep, idx)
        if site == "attn":
            return a, q_pad
        return a + self.mlp_branch(x.reshape(-1, x.shape[-1]).index_select(0, idx) + a), q_pad


class DyT(PETLModule):
    """Dynamic Tuning on a frozen ViT.

    Args:
        variant: which sub-block tokens skip: ``"mlp"`` (paper default), ``"attn"``,
            ``"attn_mlp"``, ``"layer"``.
        adapter_dim: bottleneck d (paper VTAB: 8; official VTAB script: 16; paper elsewhere: 64).
        adapter_scale: adapter output scale (official VTAB code: 1.0).
        adapter_dropout: dropout inside the adapter (official: 0.1).
        num_experts: 1 = plain adapter; N > 1 = the MoE adapter of DyT-dagger (paper: N=4).
        target_rate: r, the target share of activated patch tokens.
        tau: Gumbel-sigmoid temperature (5.0).
        threshold: inference threshold on ``sigmoid(logit)`` (0.5); raise it to keep fewer tokens.
        w_cls / w_complete_cls / w_distill / w_rate: weights of CE(dynamic), CE(complete),
            KL(complete.detach() || dynamic) and ``(mean(mask) - r)^2`` (paper: 1, 1, 1, 2).
        inference_mode: ``"gather"`` (real skipping) or ``"mask"`` (reference; saves nothing).
        force_keep_rate: speed measurements only: at inference keep the top
            ``round(rate * patches)`` tokens per image by dispatcher logit instead of thresholding.
        dispatcher_lr_scale: learning-rate multiplier of the dispatchers (1.0 = the paper, ours).
            A dispatcher reads the un-normalised residual stream, so one AdamW step moves its
            logits by about ``lr * ||x||_1``, the same for every token of a layer along the stream's
            shared mean direction; with large activations (e.g. DINOv2) or a short high-lr budget,
            whole layers then flip to keep-all or keep-none. A value like 0.1 keeps them gradual.
        dispatcher_init_std: std of the dispatchers' weight init (official: 0.02). Initial logits
            scale with the residual stream's norm; on a backbone with small activations (LayerScale,
            e.g. DINOv2) they start near 0, far below the logistic noise of the training masks, and
            a short run ends with indecisive dispatchers whose inference keep rate (logit > 0)
            exceeds the trained one. A larger std (e.g. 0.5) starts them decisive.
        **kwargs: :class:`PETLModule` arguments.
    """

    def __init__(
        self,
        variant: Variant = "mlp",
        adapter_dim: int = 8,
        adapter_scale: float = 1.0,
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
        force_keep_rate: float | None = None,
        dispatcher_lr_scale: float = 1.0,
        dispatcher_init_std: float = 0.02,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= target_rate <= 1.0:
            raise PETLError(f"target_rate must lie in [0, 1], got {target_rate}.")
        weights = {"w_cls": w_cls, "w_complete_cls": w_complete_cls, "w_distill": w_distill, "w_rate": w_rate}
        bad = [f"{k}={v}" for k, v in weights.items() if v < 0]
        if bad:
            raise PETLError(f"Loss weights must be non-negative (0 switches a term off): {', '.join(bad)}.")
        if dispatcher_lr_scale <= 0:
            raise PETLError(f"dispatcher_lr_scale must be positive, got {dispatcher_lr_scale}.")
        if inference_mode not in ("gather", "mask"):
            raise PETLError(f"inference_mode must be 'gather' or 'mask', got {inference_mode!r}.")
        self.variant = variant
        self.target_rate = target_rate
        self.loss_weights = weights
        self.inference_mode = inference_mode
        self.blocks = nn.ModuleList(
            DyTBlock(blk, variant, self.vit.num_prefix_tokens, adapter_dim, num_experts,
                     adapter_scale, adapter_dropout, tau, threshold, dispatcher_init_std)
            for blk in self.vit.blocks
        )
        self.set_force_keep_rate(force_keep_rate)
        self.last_dispatch: list[list[SiteCount]] = []

    def set_force_keep_rate(self, rate: float | None) -> None:
        """Speed measurements only: keep ``rate`` of the patch tokens (top-k) at inference."""
        if rate is not None and not 0.0 <= rate <= 1.0:
            raise PETLError(f"force_keep_rate must lie in [0, 1] or be None, got {rate}.")
        for blk in self.blocks:
            for d in blk.dispatchers.values():
                d.force_keep_rate = rate

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The base groups, with the dispatchers split off at ``lr * dispatcher_lr_scale``."""
        scale = self.hparams.dispatcher_lr_scale
        if scale == 1.0:
            return super().parameter_groups()
        dispatch = {id(p) for blk in self.blocks for p in blk.dispatchers.parameters()}
        groups = []
        for g in super().parameter_groups():
            rest = [p for p in g["params"] if id(p) not in dispatch]
            mine = [p for p in g["params"] if id(p) in dispatch]
            groups.append({**g, "params": rest})
            if mine:
                groups.append({**g, "params": mine, "lr": self.hparams.lr * scale})
        return groups

    def set_logit_threshold(self, value: float) -> None:
        """Set every dispatcher's inference threshold, in logit space (0.0 = the paper's 0.5)."""
        for blk in self.blocks:
            for d in blk.dispatchers.values():
                d.logit_threshold.fill_(value)

    @torch.no_grad()
    def calibrate_threshold(
        self, loader: Iterable[Any], rate: float | None = None, max_batches: int | None = 8, iters: int = 10
    ) -> float:
        """Set one inference threshold for all dispatchers so the keep rate on ``loader`` is ``rate``.

        Not in the paper (ours). The rate loss constrains the keep rate of the *training* masks,
        which are sampled with logistic noise (keep probability ``sigmoid(logit)``); the inference
        mask ``sigmoid(logit) > 0.5`` keeps more tokens wherever logits are small but positive,
        i.e. until training has made the dispatchers decisive (the paper trains 100 epochs; its
        learned rates still end 4-5 points above r). A short run can close that gap here, with a
        bisection on a shared logit threshold over the (image) batches of ``loader``, e.g.
        training images. Returns the threshold on ``sigmoid(logit)``; it is saved in checkpoints.
        """
        rate = self.target_rate if rate is None else rate
        if not 0.0 <= rate <= 1.0:
            raise PETLError(f"Calibration rate must lie in [0, 1], got {rate}.")
        images = []
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            images.append((batch[0] if isinstance(batch, (tuple, list)) else batch).to(self.device))
        if not images:
            raise PETLError("calibrate_threshold got an empty loader; pass a DataLoader of images.")
        was_training, mode = self.training, self.inference_mode
        self.eval()
        self.inference_mode = "gather"
        lo, hi = -20.0, 20.0  # keep rate falls as the logit threshold rises
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            self.set_logit_threshold(mid)
            kept = offered = 0
            for x in images:
                self.forward_dyt(x)
                kept += sum(c.kept for layer in self.last_dispatch for c in layer)
                offered += sum(c.offered for layer in self.last_dispatch for c in layer)
            lo, hi = (mid, hi) if kept / offered > rate else (lo, mid)
        self.set_logit_threshold(0.5 * (lo + hi))
        self.inference_mode = mode
        self.train(was_training)
        return float(torch.sigmoid(torch.tensor(0.5 * (lo + hi))))

    # -- forward ---------------------------------------------------------------------------------
    def forward_dyt(self, x: Tensor, complete: bool = False) -> tuple[Tensor, list[Tensor]]:
        """Images to logits and the patch-token masks of every site of every block (B, P) each.

        Gathers at inference when ``inference_mode == "gather"``; training always masks. What
        executed is kept in :attr:`last_dispatch` (one list of :class:`SiteCount` per block).
        """
        gather = not self.training and self.inference_mode == "gather"
        tokens = self.vit.embed(x)
        masks: list[Tensor] = []
        record: list[list[SiteCount]] = []
        for blk in self.blocks:
            tokens, site_masks, counts = blk(tokens, complete=complete, gather=gather)
            masks.extend(site_masks.values())
            record.append(counts)
        self.last_dispatch = record
        return self.head(self.vit.pool(tokens)), masks

    def forward_tokens(self, tokens: Tensor) -> Tensor:
        gather = not self.training and self.inference_mode == "gather"
        for blk in self.blocks:
            tokens = blk(tokens, gather=gather)[0]
        return tokens

    def forward(self, x: Tensor) -> Tensor:
        """Images to logits of the dynamic model; in eval mode, records keep rates and FLOPs."""
        logits, _ = self.forward_dyt(x)
        if not self.training:
            record = self.last_dispatch
            kept = torch.tensor([sum(c.kept for c in layer) for layer in record], dtype=torch.float64)
            offered = torch.tensor([sum(c.offered for c in layer) for layer in record], dtype=torch.float64)
            self.inference_meter.update(
                images=x.shape[0], flops=self.executed_flops(record, x.shape[0]), kept=kept, offered=offered
            )
        return logits

    def training_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        w = self.loss_weights
        logits, masks = self.forward_dyt(x)
        terms: dict[str, Tensor] = {}
        if w["w_cls"] > 0:
            terms["loss_cls"] = self.criterion(logits, y)
        if w["w_complete_cls"] > 0 or w["w_distill"] > 0:
            complete_logits, _ = self.forward_dyt(x, complete=True)
            if w["w_complete_cls"] > 0:
                terms["loss_complete_cls"] = self.criterion(complete_logits, y)
            if w["w_distill"] > 0:
                terms["loss_distill"] = F.kl_div(
                    F.log_softmax(logits, dim=-1), F.log_softmax(complete_logits.detach(), dim=-1),
                    log_target=True, reduction="batchmean",
                )
        rate = torch.stack([m.mean() for m in masks]).mean() if masks else logits.new_ones(())
        if w["w_rate"] > 0:
            terms["loss_rate"] = (rate - self.target_rate) ** 2
        names = {"loss_cls": "w_cls", "loss_complete_cls": "w_complete_cls",
                 "loss_distill": "w_distill", "loss_rate": "w_rate"}
        loss = sum((w[names[k]] * v for k, v in terms.items()), logits.new_zeros(()))
        terms["keep_rate"] = rate.detach()
        return loss, logits, terms

    # -- FLOPs -----------------------------------------------------------------------------------
    def executed_flops(self, record: list[list[SiteCount]], batch: int, norm: bool = True) -> int:
        """FLOPs the batch executed (papers' convention; ``norm=False`` + x2 = FlopCounterMode).

        Attention/MLP at their executed row counts, dispatchers and adapters on all tokens (the
        dispatcher's prefix-token logits are computed and ignored: cheaper than slicing), embedding,
        final norm and head.
        """
        s = self.vit.shape()
        n = s.num_tokens
        total = batch * non_block_flops(s, self.num_classes, norm)
        for blk, counts in zip(self.blocks, record):
            by_site = {c.site: c for c in counts}
            for site, c in by_site.items():
                total += batch * (blk.dispatchers[site].flops(n) + blk.adapters[site].flops(n))
            if "attn" in by_site or "layer" in by_site:
                c = by_site.get("attn") or by_site["layer"]
                total += attn_partial_flops(s, batch, n, c.rows, c.query_pad, norm)
            else:
                total += attn_partial_flops(s, batch, n, batch * n, n, norm)
            mlp_rows = by_site["mlp"].rows if "mlp" in by_site else (
                by_site["layer"].rows if "layer" in by_site else batch * n)
            total += mlp_flops(mlp_rows, s, norm)
        return total

    def expected_record(self, keep_rate: float) -> list[list[SiteCount]]:
        """The record of one image keeping ``round(keep_rate * patches)`` tokens at every site."""
        s = self.vit.shape()
        k = int(round(keep_rate * s.num_patches))
        rows = k + s.num_prefix_tokens
        return [[SiteCount(site, k, s.num_patches, rows, rows) for site in VARIANT_SITES[self.variant]]
                for _ in self.blocks]

    def inference_flops(self) -> int:
        """Per-image FLOPs at the target keep rate (used before any eval batch was recorded)."""
        return self.executed_flops(self.expected_record(self.target_rate), 1)


__all__ = ["DyT", "DyTBlock", "SiteCount", "attn_partial_flops"]
