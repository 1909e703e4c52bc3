"""DyT's small trainable pieces: the token dispatcher and the parallel (MoE) adapters.

Pure PyTorch. The block that uses them lives in :mod:`petl_lightning.methods.dyt`.
Reference: Zhao et al., "Dynamic Tuning Towards Parameter and Inference Efficiency for ViT
Adaptation", NeurIPS 2024 (arXiv 2403.11808).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from petl_lightning.errors import PETLError


def gumbel_sigmoid_st(logits: Tensor, tau: float = 5.0) -> Tensor:
    """Hard 0/1 sample in the forward pass, soft sigmoid gradient in the backward pass.

    ``s = sigmoid((logits + g1 - g2) / tau)`` with two Gumbel(0, 1) draws (their difference is
    Logistic(0, 1) noise), ``hard = 1[s > 0.5]``, returned as ``hard - s.detach() + s``. With the
    0.5 threshold, ``tau`` does not change the sampled mask; it only scales the gradient.
    """
    u = torch.rand_like(logits).clamp_(1e-6, 1.0 - 1e-6)
    noise = torch.log(u) - torch.log1p(-u)  # Logistic(0, 1) == Gumbel - Gumbel
    soft = torch.sigmoid((logits + noise) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard - soft.detach() + soft


class TokenDispatcher(nn.Module):
    """``Linear(dim -> 1)`` deciding, per token, whether it goes through the skippable sub-block.

    Training: Gumbel-sigmoid with straight-through (:func:`gumbel_sigmoid_st`), so the forward
    mask is hard and the gradient soft. Inference: ``sigmoid(logit) > threshold``, no noise.

    ``force_keep_rate`` (``None`` normally) replaces the threshold at inference by a top-k per
    image that keeps ``round(rate * tokens)`` tokens. It exists only to measure speed at a chosen
    keep rate with untrained (random) dispatchers; it is not the paper's inference rule.

    Args:
        dim: token width.
        tau: Gumbel-sigmoid temperature (paper default 5.0; scales the gradient only).
        threshold: inference threshold on ``sigmoid(logit)`` (paper: 0.5).
        init_std: std of the normal weight init (official code: 0.02; zero bias).
    """

    def __init__(self, dim: int, tau: float = 5.0, threshold: float = 0.5, init_std: float = 0.02) -> None:
        super().__init__()
        if tau <= 0:
            raise PETLError(f"Dispatcher temperature tau must be positive, got {tau}.")
        if not 0.0 < threshold < 1.0:
            raise PETLError(f"Dispatcher threshold must lie in (0, 1), got {threshold}.")
        self.proj = nn.Linear(dim, 1)
        self.tau = tau
        # sigmoid(l) > t  <=>  l > logit(t); a buffer, so a calibrated threshold is checkpointed
        self.register_buffer("logit_threshold", torch.tensor(math.log(threshold / (1.0 - threshold))))
        self.force_keep_rate: float | None = None
        # the official trunc_normal_(std=.02) cuts at +-2, i.e. 100 std: in effect a plain normal
        nn.init.normal_(self.proj.weight, std=init_std)
        nn.init.zeros_(self.proj.bias)

    def logits(self, tokens: Tensor) -> Tensor:
        """Tokens (B, P, D) to dispatch logits (B, P)."""
        return self.proj(tokens).squeeze(-1)

    def forward(self, tokens: Tensor) -> Tensor:
        """Tokens (B, P, D) to a 0/1 keep mask (B, P) in the tokens' dtype."""
        return self.decide(self.logits(tokens))

    def decide(self, logits: Tensor) -> Tensor:
        """Dispatch logits (B, P) to the 0/1 keep mask (B, P): sampled in training, thresholded at inference."""
        if self.training:
            return gumbel_sigmoid_st(logits, self.tau)
        if self.force_keep_rate is not None:
            k = int(round(self.force_keep_rate * logits.shape[1]))
            mask = torch.zeros_like(logits)
            if k > 0:
                mask.scatter_(1, logits.topk(k, dim=1).indices, 1.0)
            return mask
        return (logits > self.logit_threshold).to(logits.dtype)

    @property
    def threshold(self) -> float:
        """The inference threshold on ``sigmoid(logit)``."""
        return float(torch.sigmoid(self.logit_threshold))

    def flops(self, n_tokens: int) -> int:
        """Multiply-adds for ``n_tokens`` tokens."""
        return n_tokens * self.proj.in_features

    def extra_repr(self) -> str:
        return f"tau={self.tau}, threshold={self.threshold}, force_keep_rate={self.force_keep_rate}"


class DyTAdapter(nn.Module):
    """Bottleneck adapter ``scale * up(dropout(relu(down(x))))`` used in parallel to a sub-block.

    No LayerNorm and no internal residual (the block adds it). LoRA-style init: Kaiming-uniform
    down-projection, zero up-projection and biases, so a new adapter is a no-op.

    Args:
        dim: token width.
        bottleneck: hidden width d (paper VTAB: 8; the official VTAB script: 16).
        scale: output scale (1.0 for VTAB in the official code, 0.1 elsewhere).
        dropout: dropout after the ReLU (0.1 in the official code).
    """

    def __init__(self, dim: int, bottleneck: int = 8, scale: float = 1.0, dropout: float = 0.1) -> None:
        super().__init__()
        if bottleneck < 1:
            raise PETLError(f"Adapter bottleneck must be at least 1, got {bottleneck}.")
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.scale = scale
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        y = self.up(self.dropout(self.act(self.down(x))))
        return y if self.scale == 1.0 else y * self.scale

    def flops(self, n_tokens: int) -> int:
        """Multiply-adds per image with ``n_tokens`` tokens."""
        d, r = self.down.in_features, self.down.out_features
        return 2 * n_tokens * d * r


class MoEAdapter(nn.Module):
    """The paper's DyT-dagger adapter: ``N`` experts merged per image by a router.

    The router ``Linear(dim -> N)`` reads the adapter input averaged over all tokens of the image
    (CLS included; the paper does not say, INFERRED) and its softmax over experts (INFERRED: the
    paper does not name the normalisation) gives weights ``alpha``. The experts' down and up
    weights and biases are averaged with ``alpha`` and one adapter runs with the merged weights, so
    the per-token cost is that of a single adapter. Because ReLU sits between the projections this
    is a weight-space merge, not a mixture of expert outputs (spec §1.7).

    Args:
        dim, bottleneck, scale, dropout: as :class:`DyTAdapter`.
        num_experts: N (paper: 4 works best on video; not used for VTAB).
    """

    def __init__(
        self, dim: int, bottleneck: int = 8, num_experts: int = 4, scale: float = 1.0, dropout: float = 0.1
    ) -> None:
        super().__init__()
        if num_experts < 2:
            raise PETLError(f"MoEAdapter needs at least 2 experts, got {num_experts}; use DyTAdapter for one.")
        if bottleneck < 1:
            raise PETLError(f"Adapter bottleneck must be at least 1, got {bottleneck}.")
        self.dim, self.bottleneck, self.num_experts, self.scale = dim, bottleneck, num_experts, scale
        self.router = nn.Linear(dim, num_experts)
        self.down_weight = nn.Parameter(torch.empty(num_experts, dim, bottleneck))
        self.down_bias = nn.Parameter(torch.zeros(num_experts, bottleneck))
        self.up_weight = nn.Parameter(torch.zeros(num_experts, bottleneck, dim))
        self.up_bias = nn.Parameter(torch.zeros(num_experts, dim))
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        nn.init.trunc_normal_(self.router.weight, std=0.02)
        nn.init.zeros_(self.router.bias)
        for e in range(num_experts):  # same init as DyTAdapter.down (fan_in = dim), one draw per expert
            w = torch.empty(bottleneck, dim)
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            self.down_weight.data[e] = w.t()

    def routing(self, x: Tensor) -> Tensor:
        """Expert weights (B, N) from tokens (B, T, D)."""
        return F.softmax(self.router(x.mean(dim=1)), dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        b, e = x.shape[0], self.num_experts
        alpha = self.routing(x)
        w_down = (alpha @ self.down_weight.reshape(e, -1)).reshape(b, self.dim, self.bottleneck)
        b_down = alpha @ self.down_bias
        w_up = (alpha @ self.up_weight.reshape(e, -1)).reshape(b, self.bottleneck, self.dim)
        b_up = alpha @ self.up_bias
        h = self.dropout(self.act(torch.baddbmm(b_down.unsqueeze(1), x, w_down)))
        y = torch.baddbmm(b_up.unsqueeze(1), h, w_up)
        return y if self.scale == 1.0 else y * self.scale

    def flops(self, n_tokens: int) -> int:
        """Multiply-adds per image: router, weight merge, and one adapter on ``n_tokens`` tokens."""
        d, r, e = self.dim, self.bottleneck, self.num_experts
        return d * e + e * (2 * d * r + r + d) + 2 * n_tokens * d * r


def build_adapter(
    dim: int, bottleneck: int, num_experts: int = 1, scale: float = 1.0, dropout: float = 0.1
) -> DyTAdapter | MoEAdapter:
    """One :class:`DyTAdapter` for ``num_experts == 1``, else a :class:`MoEAdapter`."""
    if num_experts < 1:
        raise PETLError(f"num_experts must be at least 1, got {num_experts}.")
    if num_experts == 1:
        return DyTAdapter(dim, bottleneck, scale, dropout)
    return MoEAdapter(dim, bottleneck, num_experts, scale, dropout)


__all__ = ["DyTAdapter", "MoEAdapter", "TokenDispatcher", "build_adapter", "gumbel_sigmoid_st"]
