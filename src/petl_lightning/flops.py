"""Analytic FLOPs of a ViT forward, in the PETL papers' convention.

One multiply-add counts as one FLOP (fvcore's convention), with unfused attention and LayerNorm
counted as 5 FLOPs per element (affine); softmax, GELU, additions and the position embedding are
not counted. Under it ViT-B/16 at 224 px with 100 classes is 17.58 G, of which 0.116439 G lies
outside the blocks. ``torch.utils.flop_counter.FlopCounterMode`` counts 2 per multiply-add and no
LayerNorm, so ``2 * (total - norms)`` equals it exactly (tested on real forwards).

Every function takes the token counts that actually executed, so a method with token skipping or
early exit reports what it ran, not what it would have run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from torch import Tensor

LN_FLOPS_PER_ELEMENT = 5
Count = TypeVar("Count", int, Tensor)  # token counts: Python ints, or per-image tensors (no host sync)


@dataclass(frozen=True)
class ViTShape:
    """The sizes the counter needs (``FrozenViT.shape()``)."""

    dim: int
    depth: int
    num_heads: int
    mlp_hidden: int
    num_patches: int
    num_prefix_tokens: int
    patch_size: int
    in_chans: int = 3
    #: fc1 emits ``2 * mlp_hidden`` (a SwiGLU/GLU MLP: value and gate), fc2 reads ``mlp_hidden``.
    gated_mlp: bool = False
    #: a LayerNorm on all tokens before the blocks (CLIP's ``norm_pre``).
    norm_pre: bool = False
    #: the final norm runs on the pooled vector (``fc_norm``, average-pool models), not on all tokens.
    fc_norm: bool = False
    #: hidden width of an attention-pool (MAP) head's MLP; 0 when the model has none.
    attn_pool_hidden: int = 0

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens


def layernorm_flops(n_tokens: Count, dim: int) -> Count:
    """FLOPs of an affine LayerNorm over ``n_tokens`` vectors of size ``dim``."""
    return LN_FLOPS_PER_ELEMENT * n_tokens * dim


def linear_flops(n_tokens: Count, d_in: int, d_out: int) -> Count:
    """Multiply-adds of a Linear layer applied to ``n_tokens`` vectors (bias not counted)."""
    return n_tokens * d_in * d_out


def embed_flops(s: ViTShape, norm: bool = True) -> int:
    """Patch embedding convolution (and ``norm_pre`` on all tokens, when the model has one)."""
    f = s.num_patches * s.in_chans * s.patch_size * s.patch_size * s.dim
    return f + (layernorm_flops(s.num_tokens, s.dim) if norm and s.norm_pre else 0)


def attn_flops(n: int, s: ViTShape, norm: bool = True) -> int:
    """Attention sub-block on ``n`` tokens: norm1, qkv, q@k^T, attn@v, proj."""
    f = linear_flops(n, s.dim, 3 * s.dim) + 2 * n * n * s.dim + linear_flops(n, s.dim, s.dim)
    return f + (layernorm_flops(n, s.dim) if norm else 0)


def mlp_flops(n: Count, s: ViTShape, norm: bool = True) -> Count:
    """MLP sub-block on ``n`` tokens: norm2, fc1 (value and gate for a gated MLP), fc2."""
    fc1_out = 2 * s.mlp_hidden if s.gated_mlp else s.mlp_hidden
    f = linear_flops(n, s.dim, fc1_out) + linear_flops(n, s.mlp_hidden, s.dim)
    return f + (layernorm_flops(n, s.dim) if norm else 0)


def block_flops(n_attn: int, n_mlp: int, s: ViTShape, norm: bool = True) -> int:
    """One transformer block whose attention sees ``n_attn`` tokens and MLP ``n_mlp`` tokens."""
    return attn_flops(n_attn, s, norm) + mlp_flops(n_mlp, s, norm)


def attn_kept_query_flops(n: int, q_rows: Count, q_pad: Count, s: ViTShape, norm: bool = True) -> Count:
    """Attention of one image whose ``n`` tokens are all keys/values but only ``q_rows`` are queries,
    padded to ``q_pad`` query rows for the attention products (DyT's attention skipping).

    norm1 and the K/V projection on all ``n`` tokens, Q and the output projection on the ``q_rows``
    kept rows, ``q @ k^T`` and ``attn @ v`` on ``q_pad`` rows. With every token a query it equals
    :func:`attn_flops`.
    """
    f = linear_flops(n, s.dim, 2 * s.dim) + 2 * linear_flops(q_rows, s.dim, s.dim) + 2 * q_pad * n * s.dim
    return f + (layernorm_flops(n, s.dim) if norm else 0)


def attn_pool_flops(s: ViTShape, n_tokens: int, norm: bool = True) -> int:
    """An attention-pool (MAP) head: one latent query attends over ``n_tokens`` keys/values, then
    its norm and MLP (timm's ``AttentionPoolLatent``); 0 when the model pools otherwise."""
    if not s.attn_pool_hidden:
        return 0
    n, d, h = n_tokens, s.dim, s.attn_pool_hidden
    f = linear_flops(1, d, d) + linear_flops(n, d, 2 * d) + 2 * n * d + linear_flops(1, d, d)
    f += linear_flops(1, d, h) + linear_flops(1, h, d)
    return f + (layernorm_flops(1, d) if norm else 0)


def head_flops(s: ViTShape, num_classes: int, n_tokens: int | None = None, norm: bool = True) -> int:
    """Final LayerNorm (over all tokens, or over the pooled vector for ``fc_norm`` models), the
    attention pool when the model has one, and the linear classifier on the pooled features."""
    n = s.num_tokens if n_tokens is None else n_tokens
    f = (layernorm_flops(1 if s.fc_norm else n, s.dim) if norm else 0) + attn_pool_flops(s, n, norm)
    return f + linear_flops(1, s.dim, num_classes)


def non_block_flops(s: ViTShape, num_classes: int, norm: bool = True) -> int:
    """Everything outside the blocks: patch embedding (and ``norm_pre``), final norm, pool, classifier."""
    return embed_flops(s, norm) + head_flops(s, num_classes, norm=norm)


def vit_flops(
    s: ViTShape,
    num_classes: int,
    attn_tokens: Sequence[int] | None = None,
    mlp_tokens: Sequence[int] | None = None,
    depth: int | None = None,
    extra: int = 0,
    norm: bool = True,
) -> int:
    """FLOPs of one image's forward.

    Args:
        s: the model's sizes (``FrozenViT.shape()``).
        num_classes: classifier width (0 for none).
        attn_tokens / mlp_tokens: tokens each executed block's attention / MLP processed
            (default: all tokens in every block).
        depth: blocks executed (early exit); default all. The final norm and head are counted
            once; an early-exit method adds its exit heads through ``extra``.
        extra: FLOPs of added modules (adapters, dispatchers, exit heads) to include.
        norm: count LayerNorms (fvcore does; FlopCounterMode does not).
    """
    d = s.depth if depth is None else depth
    at = list(attn_tokens) if attn_tokens is not None else [s.num_tokens] * d
    mt = list(mlp_tokens) if mlp_tokens is not None else [s.num_tokens] * d
    if len(at) < d or len(mt) < d:
        raise ValueError(f"need token counts for {d} blocks, got {len(at)} (attn) and {len(mt)} (mlp)")
    blocks = sum(block_flops(at[i], mt[i], s, norm) for i in range(d))
    return non_block_flops(s, num_classes, norm) + blocks + extra


def gflops(flops: float) -> float:
    """FLOPs to GFLOPs."""
    return flops / 1e9


__all__ = [
    "ViTShape",
    "attn_flops",
    "attn_pool_flops",
    "attn_kept_query_flops",
    "block_flops",
    "embed_flops",
    "gflops",
    "head_flops",
    "layernorm_flops",
    "linear_flops",
    "mlp_flops",
    "non_block_flops",
    "vit_flops",
]
