"""DyT's block: a frozen timm ``Block`` with a token dispatcher and a parallel adapter per dispatch site.

At each dispatch site the block computes ``x + adapter(x) + keep * subblock(x)``: the adapter on
every token, the skippable sub-block on the kept tokens only. Three paths, plainly written siblings:

- :meth:`DyTBlock.forward`: the gathered path. Only the kept (image, token) rows of the whole batch
  (:func:`kept_rows`) go through the sub-block; the result is added back at their places.
- :meth:`DyTBlock.forward_masked`: everything runs and the sub-block's output is multiplied by the
  0/1 mask (training, with sampled masks; and the reference the gathered path is tested against).
- :meth:`DyTBlock.forward_complete`: no dispatch, every token through every sub-block.

Attention skipping (our choice, the paper does not say): a skipped token is not a *query* (its q
row, attention row and output projection are not computed) but still serves as key and value, so
the masked and gathered paths compute the same function. Kept queries are padded per image to the
batch's largest count for the attention products.

With ``skipping.class_attention_prior`` (``sites="mlp"``) the block writes its attention out
(:meth:`DyTBlock.attn_branch_and_class_attention`) to read the class token's attention to each patch
token, which the MLP dispatcher adds to its logits; with ``skipping.training_masks="topk"`` the
training masks keep each image's top ``round(target_rate * P)`` tokens.
"""

from __future__ import annotations

from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import Tensor, nn

from petl_lightning.errors import ConfigError
from petl_lightning.flops import ViTShape, attn_flops, attn_kept_query_flops, mlp_flops
from petl_lightning.layers.adapter import Adapter, MoEAdapter, build_adapter
from petl_lightning.layers.block_parts import BlockParts
from petl_lightning.layers.dispatcher import TokenDispatcher
from petl_lightning.methods.dyt.skipping import SITES, TokenSkipping


class KeptRows(NamedTuple):
    """The rows of a flattened (B * N, D) batch that run a dispatched sub-block."""

    flat_index: Tensor  # (K,) long: image * N + token
    kept: Tensor  # (B,) float32: patch tokens each image kept
    slot: Tensor  # (K,) long: each row's place among its image's kept rows (attention query slots)
    q_pad: int  # query rows per image after padding (0 where no attention product needs them)


def kept_rows(
    patch_logits: Tensor, num_prefix_tokens: int, logit_threshold: Tensor, keep_count: int | None, queries: bool
) -> KeptRows:
    """Which rows of a (B, N, D) batch run a dispatched sub-block: every prefix token (CLS, registers),
    and each image's patch tokens whose dispatch logit (``patch_logits``, (B, P)) is above
    ``logit_threshold``, or, with ``keep_count``, its ``keep_count`` largest (static shapes, no host
    sync). ``queries``: the site has an attention product, which needs each row's query slot and the
    padded count (one host sync under the threshold rule)."""
    b, num_patches = patch_logits.shape
    p, device = num_prefix_tokens, patch_logits.device
    if keep_count is None:
        keep = torch.cat([patch_logits.new_ones(b, p, dtype=torch.bool), patch_logits > logit_threshold], dim=1)
        index = keep.reshape(-1).nonzero().squeeze(1)
        per_image = keep.sum(1)
        kept = (per_image - p).float()
        if not queries:
            return KeptRows(index, kept, index, 0)
        slot = (keep.cumsum(1) - 1).reshape(-1).index_select(0, index)
        return KeptRows(index, kept, slot, int(per_image.max()))
    top = patch_logits.topk(keep_count, dim=1).indices.sort(dim=1).values + p  # in token order
    prefix = torch.arange(p, device=device).expand(b, p)
    offsets = torch.arange(b, device=device).unsqueeze(1) * (p + num_patches)
    index = (torch.cat([prefix, top], dim=1) + offsets).reshape(-1)
    kept = torch.full((b,), float(keep_count), device=device)
    return KeptRows(index, kept, torch.arange(p + keep_count, device=device).repeat(b), p + keep_count)


class DyTBlock(BlockParts):
    """DyT's wrapper of one frozen timm block (see the module docstring).

    Args:
        block: the frozen timm block; its sub-modules are reused, so LayerScale, drop-path and
            fused attention behave as in timm.
        skipping: the token skipping options (sites, dispatcher temperature, threshold and init).
        num_prefix_tokens: leading tokens that are always kept (CLS, registers).
        adapter_dim / adapter_scale / adapter_dropout / num_experts: the parallel adapter
            (``num_experts > 1``: DyT-dagger's MoE adapter).
    """

    def __init__(
        self,
        block: nn.Module,
        skipping: TokenSkipping,
        num_prefix_tokens: int = 1,
        adapter_dim: int = 8,
        adapter_scale: float = 1.0,
        adapter_dropout: float = 0.1,
        num_experts: int = 1,
    ) -> None:
        super().__init__(block)
        prior = skipping.class_attention_prior
        plain_attention = type(self.attn) is Attention and getattr(self.attn, "gate", None) is None
        if skipping.sites != "mlp" and not plain_attention:
            raise ConfigError(
                f"DyT skipping.sites {skipping.sites!r} skips attention queries and supports timm's plain "
                f"Attention only, not {type(self.attn).__name__}; use skipping.sites='mlp' for this model."
            )
        if prior is not None and (not plain_attention or num_prefix_tokens < 1):
            raise ConfigError(
                "DyT skipping.class_attention_prior reads the class token's attention: it needs timm's plain "
                f"Attention and a class token, not {type(self.attn).__name__} with {num_prefix_tokens} prefix "
                "tokens; set skipping.class_attention_prior: null for this model."
            )
        self.sites = SITES[skipping.sites]
        self.num_prefix_tokens = num_prefix_tokens
        self.has_prior = prior is not None
        self.train_keep_rate = skipping.target_rate if skipping.training_masks == "topk" else None
        dim = cast(Tensor, self.norm1.weight).shape[0]
        self.dispatchers = nn.ModuleDict(
            {
                s: TokenDispatcher(
                    dim, skipping.tau, skipping.threshold, skipping.dispatcher_init_std, prior, skipping.training_noise
                )
                for s in self.sites
            }
        )
        self.adapters = nn.ModuleDict(
            {s: build_adapter(dim, adapter_dim, num_experts, adapter_scale, adapter_dropout) for s in self.sites}
        )

    # -- the three paths -------------------------------------------------------------------------
    def forward(self, x: Tensor, keep_count: int | None = None) -> tuple[Tensor, Tensor]:
        """The gathered path: tokens (B, N, D), and the patch tokens each image kept per site (B, sites).
        ``keep_count``: keep that many top-logit patch tokens per image (static shapes) instead of
        thresholding."""
        kept = []
        if "layer" in self.sites:
            x, n = self.gathered_site("layer", x, keep_count)
            return x, n[:, None]
        prior = None
        if "attn" in self.sites:
            x, n = self.gathered_site("attn", x, keep_count)
            kept.append(n)
        else:
            x, prior = self.attn_update(x)
        if "mlp" in self.sites:
            x, n = self.gathered_site("mlp", x, keep_count, prior)
            kept.append(n)
        else:
            x = x + self.mlp_branch(x)
        return x, torch.stack(kept, dim=1)

    def forward_masked(self, x: Tensor, sample: bool) -> tuple[Tensor, Tensor]:
        """The masked path: tokens, and the patch-token masks (B, sites, P), 1 = kept. ``sample``:
        Gumbel-sigmoid masks with a straight-through gradient (training); else the threshold."""
        masks = []
        if "layer" in self.sites:
            x, m = self.masked_site("layer", x, sample)
            return x, m[:, None]
        prior = None
        if "attn" in self.sites:
            x, m = self.masked_site("attn", x, sample)
            masks.append(m)
        else:
            x, prior = self.attn_update(x)
        if "mlp" in self.sites:
            x, m = self.masked_site("mlp", x, sample, prior)
            masks.append(m)
        else:
            x = x + self.mlp_branch(x)
        return x, torch.stack(masks, dim=1)

    def forward_complete(self, x: Tensor) -> Tensor:
        """Every token through every sub-block (the complete model)."""
        if "layer" in self.sites:
            return x + self.adapters["layer"](x) + self.branch("layer", x)
        if "attn" in self.sites:
            x = x + self.adapters["attn"](x) + self.attn_branch(x)
        else:
            x = x + self.attn_branch(x)
        if "mlp" in self.sites:
            return x + self.adapters["mlp"](x) + self.mlp_branch(x)
        return x + self.mlp_branch(x)

    def attn_update(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """``x`` after the (undispatched) attention, and the class token's attention to the patch
        tokens when the dispatchers have a prior (else None)."""
        if not self.has_prior:
            return x + self.attn_branch(x), None
        update, prior = self.attn_branch_and_class_attention(x)
        return x + update, prior

    # -- one dispatch site -----------------------------------------------------------------------
    def gathered_site(
        self, site: str, x: Tensor, keep_count: int | None, prior: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``x + adapter(x) + branch(x)`` where the branch runs on the kept rows only; and their count
        (B,). ``prior``: the class token's attention (B, P) for a dispatcher with a prior."""
        d = cast(TokenDispatcher, self.dispatchers[site])
        logits = d.patch_logits(x, self.num_prefix_tokens, prior)
        rows = kept_rows(logits, self.num_prefix_tokens, d.logit_threshold, keep_count, queries=site != "mlp")
        out = x + self.adapters[site](x)  # fresh, so the in-place scatter below is safe
        out.reshape(-1, x.shape[-1]).index_add_(0, rows.flat_index, self.branch_rows(site, x, rows))
        return out, rows.kept

    def masked_site(self, site: str, x: Tensor, sample: bool, prior: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x + adapter(x) + mask * branch(x)`` and the patch-token mask (B, P)."""
        d = cast(TokenDispatcher, self.dispatchers[site])
        p = self.num_prefix_tokens
        logits = d.patch_logits(x, p, prior)
        if sample:
            rate = self.train_keep_rate
            mask = d.sample(logits, None if rate is None else int(round(rate * logits.shape[1])))
        else:
            mask = d.keep(logits).to(x.dtype)
        keep = torch.cat([mask.new_ones(x.shape[0], p), mask], dim=1)
        return x + self.adapters[site](x) + keep.unsqueeze(-1) * self.branch(site, x), mask

    # -- sub-blocks, as in timm's Block.forward --------------------------------------------------
    def attn_branch(self, x: Tensor) -> Tensor:
        return cast(Tensor, self.drop_path1(self.ls1(self.attn(self.norm1(x)))))

    def mlp_branch(self, x: Tensor) -> Tensor:
        return cast(Tensor, self.drop_path2(self.ls2(self.mlp(self.norm2(x)))))

    def attn_branch_and_class_attention(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`attn_branch` written out (timm's plain Attention, checked at init), and the class
        token's attention to each patch token, averaged over heads (B, P): one more query row's
        scores, the prior of the dispatchers."""
        attn = cast(Attention, self.attn)
        b, n, _ = x.shape
        qkv = attn.qkv(self.norm1(x)).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if attn.fused_attn:
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if self.training else 0.0)
        else:
            o = attn.attn_drop(((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)) @ v
        cls = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, 1, N)
        o = o.transpose(1, 2).reshape(b, n, -1)
        update = self.drop_path1(self.ls1(attn.proj_drop(attn.proj(attn.norm(o)))))
        return cast(Tensor, update), cls[:, :, 0, self.num_prefix_tokens :].mean(dim=1)

    def branch(self, site: str, x: Tensor) -> Tensor:
        """The residual update a site dispatches, on all tokens."""
        if site == "attn":
            return self.attn_branch(x)
        if site == "mlp":
            return self.mlp_branch(x)
        a = self.attn_branch(x)  # layer: attention then MLP
        return a + self.mlp_branch(x + a)

    def branch_rows(self, site: str, x: Tensor, rows: KeptRows) -> Tensor:
        """The same update for the kept rows only (K, D)."""
        picked = x.reshape(-1, x.shape[-1]).index_select(0, rows.flat_index)
        if site == "mlp":
            return self.mlp_branch(picked)
        a = self.attn_kept_queries(x, rows)
        return a if site == "attn" else a + self.mlp_branch(picked + a)

    def attn_kept_queries(self, x: Tensor, rows: KeptRows) -> Tensor:
        """``ls1(attn(norm1(x)))`` for the kept rows only: every token is key and value, the kept
        ones are queries, padded per image to ``rows.q_pad`` rows."""
        attn = cast(Attention, self.attn)  # sites other than "mlp": a plain timm Attention (checked at init)
        b, n, _ = x.shape
        h, hd, adim = attn.num_heads, attn.head_dim, attn.attn_dim
        xn = self.norm1(x)
        w, bias = attn.qkv.weight, attn.qkv.bias
        q = F.linear(
            xn.reshape(b * n, -1).index_select(0, rows.flat_index), w[:adim], None if bias is None else bias[:adim]
        )
        kv = F.linear(xn, w[adim:], None if bias is None else bias[adim:])
        k, v = kv.reshape(b, n, 2, h, hd).permute(2, 0, 3, 1, 4).unbind(0)
        img = torch.div(rows.flat_index, n, rounding_mode="floor")
        qp = q.new_zeros(b, rows.q_pad, adim)
        qp[img, rows.slot] = q
        qp = attn.q_norm(qp.reshape(b, rows.q_pad, h, hd).transpose(1, 2))
        k = attn.k_norm(k)
        if attn.fused_attn:
            o = F.scaled_dot_product_attention(qp, k, v)
        else:
            o = ((qp * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        o = o.transpose(1, 2).reshape(b, rows.q_pad, adim)[img, rows.slot]
        return cast(Tensor, self.drop_path1(self.ls1(attn.proj_drop(attn.proj(attn.norm(o))))))

    # -- cost ------------------------------------------------------------------------------------
    def executed_flops(self, kept: Tensor, s: ViTShape, gathered: bool = True, norm: bool = True) -> Tensor:
        """FLOPs per image (B,) float64 of this block on a batch whose sites kept ``kept`` (B, sites)
        patch tokens (papers' convention; ``norm=False`` and x2 is FlopCounterMode's count).

        Gathered: the sub-blocks ran on the kept rows (attention queries padded to the batch's
        largest count); masked: everything ran. Dispatchers and adapters run on every token (the
        dispatcher's prefix-token logits are computed and ignored: cheaper than slicing); a prior
        adds the class token's scores against every token.
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
        if self.has_prior:  # the class token's scores against every key: one more query row
            extra += n * s.dim
        total = torch.full(kept.shape[:1], float(extra), dtype=torch.float64, device=kept.device)
        attn_site = "attn" if "attn" in col else "layer" if "layer" in col else None
        if attn_site is None:
            total += attn_flops(n, s, norm)
        else:
            total += attn_kept_query_flops(n, rows[:, col[attn_site]], q_pad[col[attn_site]], s, norm)
        mlp_site = "mlp" if "mlp" in col else "layer" if "layer" in col else None
        total += mlp_flops(rows[:, col[mlp_site]], s, norm) if mlp_site else mlp_flops(n, s, norm)
        return total


class TopKBlock(nn.Module):
    """A DyT block keeping each image's ``keep_count`` top-logit patch tokens: tokens to tokens, static
    shapes (what a deployment program runs)."""

    def __init__(self, block: DyTBlock, keep_count: int) -> None:
        super().__init__()
        self.block, self.keep_count = block, keep_count

    def forward(self, tokens: Tensor) -> Tensor:
        return self.block(tokens, self.keep_count)[0]


__all__ = ["DyTBlock", "KeptRows", "TopKBlock", "kept_rows"]
