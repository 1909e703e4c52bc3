"""DyT's block: a frozen timm ``Block`` with token dispatcher(s) and parallel adapter(s).

At each dispatch site the block computes ``x + adapter(x) + keep * subblock(x)``, the adapter on
every token and the skippable sub-block on the kept tokens. Three explicit paths, one method each:

- :meth:`DyTBlock.forward_complete`: no dispatch, every token through every sub-block.
- :meth:`DyTBlock.forward_masked`: everything runs and the sub-block's output is multiplied by the
  0/1 mask (training, with sampled masks; and the reference the fast path is tested against).
- :meth:`DyTBlock.forward_gathered`: only the kept (image, token) rows of the whole batch are
  gathered into one matrix, the sub-block runs on them, and the result is scattered back.

Placements (which sub-block tokens skip): ``mlp`` (paper default; attention on all tokens),
``attn``, ``attn_mlp`` (one dispatcher and adapter each) and ``layer`` (skipped tokens bypass the
whole block; one adapter parallel to it). Only ``mlp`` exists in the official code.

Attention skipping (our choice, the paper does not say): a skipped token is not a *query* (its q
row, attention row and output projection are not computed) but still serves as key and value, so
the masked and gathered paths compute the same function. Kept queries are padded per image to the
batch's largest count for the attention products.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, cast

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import Tensor, nn

from petl_lightning.errors import ConfigError
from petl_lightning.flops import ViTShape, attn_flops, attn_kept_query_flops, mlp_flops
from petl_lightning.layers.adapter import Adapter, MoEAdapter, build_adapter
from petl_lightning.layers.dispatcher import TokenDispatcher

if TYPE_CHECKING:
    from timm.models.vision_transformer import Block

Placement = Literal["mlp", "attn", "attn_mlp", "layer"]


def default_adapter_scale(lr: float) -> float:
    """DyT's adapter scale when none is given (ours): the official 1.0 up to the paper's lr 1e-3,
    and ``(1e-3 / lr) ** 1.3`` above it (0.05 at lr 1e-2). Adam moves each weight by about ``lr``
    per step, and the adapter's output is a product of two trained matrices, so it moves faster
    than ``scale x lr`` once the down-projection has moved too: the exponent lies between 1 and 2,
    and 1.3 is fitted to our lr 1e-2 runs (1.0 and 0.32 diverge, 0.1 trains but falls under the
    linear probe on one cifar10 seed, 0.05 is the best tried; docs/dyt.md, "Short budgets")."""
    return min(1.0, (1e-3 / lr) ** 1.3)


PLACEMENT_SITES: dict[str, tuple[str, ...]] = {
    "mlp": ("mlp",),
    "attn": ("attn",),
    "attn_mlp": ("attn", "mlp"),
    "layer": ("layer",),
}


class DyTBlock(nn.Module):
    """DyT's wrapper of one frozen timm block (see the module docstring).

    Args:
        block: the frozen timm block; its sub-modules are reused, so LayerScale, drop-path and
            fused attention behave as in timm.
        placement: ``"mlp"`` | ``"attn"`` | ``"attn_mlp"`` | ``"layer"``.
        num_prefix_tokens: leading tokens that are always kept (CLS, registers).
        adapter_dim / num_experts / adapter_scale / adapter_dropout: the parallel adapter
            (``num_experts > 1``: DyT-dagger's MoE adapter).
        tau / threshold / dispatcher_init_std: the dispatchers' temperature, inference threshold
            and weight-init std.
    """

    norm1: nn.Module
    attn: nn.Module
    ls1: nn.Module
    drop_path1: nn.Module
    norm2: nn.Module
    mlp: nn.Module
    ls2: nn.Module
    drop_path2: nn.Module

    def __init__(
        self,
        block: nn.Module,
        placement: Placement = "mlp",
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
        if placement not in PLACEMENT_SITES:
            raise ConfigError(f"Unknown DyT placement {placement!r}; choose one of {', '.join(PLACEMENT_SITES)}.")
        blk = cast("Block", block)  # any module with a timm Block's sub-modules
        self.norm1, self.attn, self.ls1, self.drop_path1 = blk.norm1, blk.attn, blk.ls1, blk.drop_path1
        self.norm2, self.mlp, self.ls2, self.drop_path2 = blk.norm2, blk.mlp, blk.ls2, blk.drop_path2
        if placement != "mlp" and (type(self.attn) is not Attention or getattr(self.attn, "gate", None) is not None):
            raise ConfigError(
                f"DyT placement {placement!r} skips attention queries and supports timm's plain Attention only, "
                f"not {type(self.attn).__name__}; use placement='mlp' for this model."
            )
        self.placement = placement
        self.sites = PLACEMENT_SITES[placement]
        self.num_prefix_tokens = num_prefix_tokens
        dim = cast(Tensor, self.norm1.weight).shape[0]
        self.dispatchers = nn.ModuleDict(
            {s: TokenDispatcher(dim, tau, threshold, dispatcher_init_std) for s in self.sites}
        )
        self.adapters = nn.ModuleDict(
            {s: build_adapter(dim, adapter_dim, num_experts, adapter_scale, adapter_dropout) for s in self.sites}
        )

    # -- the three paths -------------------------------------------------------------------------
    def forward_complete(self, x: Tensor) -> Tensor:
        """Tokens (B, N, D) through every sub-block (the complete model)."""
        return self._blocks(x, lambda site, t: t + self.adapters[site](t) + self.branch(site, t))

    def forward_masked(self, x: Tensor, sample: bool) -> tuple[Tensor, Tensor]:
        """Tokens and the patch-token masks (B, sites, P), 1 = kept. ``sample``: Gumbel-sigmoid
        masks with a straight-through gradient (training); else the inference threshold."""
        p, masks = self.num_prefix_tokens, []

        def site_fn(site: str, t: Tensor) -> Tensor:
            d = cast(TokenDispatcher, self.dispatchers[site])
            logits = d.logits(t)[:, p:]  # logits of all tokens: a Linear on the t[:, p:] slice would copy it
            patch = d.sample(logits) if sample else d.keep(logits).to(t.dtype)
            masks.append(patch)
            keep = torch.cat([patch.new_ones(t.shape[0], p), patch], dim=1)
            return t + self.adapters[site](t) + keep.unsqueeze(-1) * self.branch(site, t)

        x = self._blocks(x, site_fn)
        return x, torch.stack(masks, dim=1)

    def forward_gathered(self, x: Tensor, keep_count: int | None = None) -> tuple[Tensor, Tensor]:
        """Tokens and the kept patch tokens per image and site (B, sites), long.

        ``keep_count``: keep the ``keep_count`` patch tokens with the largest logits in every image
        (static shapes, no host sync) instead of thresholding.
        """
        p, kept = self.num_prefix_tokens, []

        def site_fn(site: str, t: Tensor) -> Tensor:
            b, n, dim = t.shape
            d = cast(TokenDispatcher, self.dispatchers[site])
            logits = d.logits(t)[:, p:]
            if keep_count is None:
                keep = torch.cat([logits.new_ones(b, p, dtype=torch.bool), d.keep(logits)], 1)
                idx = keep.reshape(-1).nonzero().squeeze(1)
                per_image = keep.sum(1)
                if site == "mlp":  # no attention product: no padding, no slots (and no second host sync)
                    q_pad, slot = 0, idx
                else:
                    q_pad = int(per_image.max())
                    slot = (keep.cumsum(1) - 1).reshape(-1).index_select(0, idx)
            else:
                top = TokenDispatcher.top_k(logits, keep_count) + p
                prefix = torch.arange(p, device=t.device).expand(b, p)
                offsets = torch.arange(b, device=t.device).unsqueeze(1) * n
                idx = (torch.cat([prefix, top], dim=1) + offsets).reshape(-1)
                q_pad = p + keep_count
                per_image = torch.full((b,), q_pad, device=t.device, dtype=torch.long)
                slot = torch.arange(q_pad, device=t.device).repeat(b)
            kept.append(per_image - p)
            out = t + self.adapters[site](t)
            out.reshape(b * n, dim).index_add_(0, idx, self.branch_rows(site, t, idx, slot, q_pad))
            return out  # out is fresh, so the in-place scatter is safe (index_add_: the fast one on CPU)

        x = self._blocks(x, site_fn)
        return x, torch.stack(kept, dim=1)

    def executed_flops(self, kept: Tensor, s: ViTShape, gathered: bool = True, norm: bool = True) -> Tensor:
        """FLOPs per image (B,) float64 of this block on a batch whose sites kept ``kept`` (B, sites)
        patch tokens (papers' convention; ``norm=False`` and x2 is FlopCounterMode's count).

        Gathered: the sub-blocks ran on the kept rows (attention queries padded to the batch's
        largest count); masked: everything ran. Dispatchers and adapters run on every token (the
        dispatcher's prefix-token logits are computed and ignored: cheaper than slicing).
        """
        if kept.shape[0] == 0:
            return torch.zeros(0, dtype=torch.float64, device=kept.device)
        n, p = s.num_tokens, s.num_prefix_tokens
        rows = (kept.double() + p) if gathered else torch.full_like(kept, n, dtype=torch.float64)
        q_pad = rows.amax(dim=0)  # (sites,): the padded query rows of the whole batch
        col = {site: j for j, site in enumerate(self.sites)}
        extra = sum(
            cast(TokenDispatcher, self.dispatchers[t]).flops(n) + cast(Adapter | MoEAdapter, self.adapters[t]).flops(n)
            for t in self.sites
        )
        total = torch.full(kept.shape[:1], float(extra), dtype=torch.float64, device=kept.device)
        attn_site = "attn" if "attn" in col else "layer" if "layer" in col else None
        if attn_site is None:
            total += attn_flops(n, s, norm)
        else:
            total += attn_kept_query_flops(n, rows[:, col[attn_site]], q_pad[col[attn_site]], s, norm)
        mlp_site = "mlp" if "mlp" in col else "layer" if "layer" in col else None
        total += mlp_flops(rows[:, col[mlp_site]], s, norm) if mlp_site else mlp_flops(n, s, norm)
        return total

    def _blocks(self, x: Tensor, site_fn: Callable[[str, Tensor], Tensor]) -> Tensor:
        """timm's two residual lines, with each dispatched sub-block's line replaced by ``site_fn``."""
        if self.placement == "layer":
            return site_fn("layer", x)
        x = site_fn("attn", x) if "attn" in self.sites else x + self.attn_branch(x)
        return site_fn("mlp", x) if "mlp" in self.sites else x + self.mlp_branch(x)

    # -- sub-blocks, as in timm's Block.forward ------------------------------------------------------
    def attn_branch(self, x: Tensor) -> Tensor:
        return self.drop_path1(self.ls1(self.attn(self.norm1(x))))

    def mlp_branch(self, x: Tensor) -> Tensor:
        return self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def branch(self, site: str, x: Tensor) -> Tensor:
        """The residual update a site dispatches, on all tokens."""
        if site == "attn":
            return self.attn_branch(x)
        if site == "mlp":
            return self.mlp_branch(x)
        a = self.attn_branch(x)  # layer: attention then MLP
        return a + self.mlp_branch(x + a)

    def branch_rows(self, site: str, x: Tensor, idx: Tensor, slot: Tensor, q_pad: int) -> Tensor:
        """The same update for the kept rows ``idx`` of the flattened batch only (K, D)."""
        rows = x.reshape(-1, x.shape[-1]).index_select(0, idx)
        if site == "mlp":
            return self.mlp_branch(rows)
        a = self.attn_kept_queries(x, idx, slot, q_pad)
        return a if site == "attn" else a + self.mlp_branch(rows + a)

    def attn_kept_queries(self, x: Tensor, idx: Tensor, slot: Tensor, q_pad: int) -> Tensor:
        """``ls1(attn(norm1(x)))`` for the kept rows only: every token is key and value, the kept
        ones are queries, padded per image to ``q_pad`` rows (``slot``: each row's place)."""
        attn = cast(Attention, self.attn)  # placement != "mlp": a plain timm Attention (checked at init)
        b, n, _ = x.shape
        h, hd, adim = attn.num_heads, attn.head_dim, attn.attn_dim
        xn = self.norm1(x)
        w, bias = attn.qkv.weight, attn.qkv.bias
        q = F.linear(xn.reshape(b * n, -1).index_select(0, idx), w[:adim], None if bias is None else bias[:adim])
        kv = F.linear(xn, w[adim:], None if bias is None else bias[adim:])
        k, v = kv.reshape(b, n, 2, h, hd).permute(2, 0, 3, 1, 4).unbind(0)
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
        return self.drop_path1(self.ls1(attn.proj_drop(attn.proj(attn.norm(o)))))


__all__ = ["PLACEMENT_SITES", "DyTBlock", "Placement"]
