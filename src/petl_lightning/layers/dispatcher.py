"""DyT's token dispatcher (Zhao et al., NeurIPS 2024, arXiv 2403.11808): ``Linear(dim -> 1)`` per
token deciding whether it goes through the skippable sub-block.

Training samples a hard 0/1 mask with a soft gradient (:func:`gumbel_sigmoid_st`); inference keeps
a token when ``sigmoid(logit) > threshold`` (no noise); DyT's block can instead keep a fixed count of
the largest logits per image.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from petl_lightning.errors import ConfigError


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
    """Dispatch logits and keep decisions for tokens (B, N, D).

    Args:
        dim: token width.
        tau: Gumbel-sigmoid temperature (paper: 5.0; scales the gradient only).
        threshold: inference threshold on ``sigmoid(logit)`` (paper: 0.5). Stored as a logit buffer,
            so a calibrated threshold travels with checkpoints.
        init_std: std of the normal weight init (official code: 0.02; zero bias).
    """

    logit_threshold: Tensor

    def __init__(self, dim: int, tau: float = 5.0, threshold: float = 0.5, init_std: float = 0.02) -> None:
        super().__init__()
        if tau <= 0:
            raise ConfigError(f"Dispatcher temperature tau must be positive, got {tau}.")
        if not 0.0 < threshold < 1.0:
            raise ConfigError(f"Dispatcher threshold must lie in (0, 1), got {threshold}.")
        self.proj = nn.Linear(dim, 1)
        self.tau = tau
        self.register_buffer("logit_threshold", torch.tensor(math.log(threshold / (1.0 - threshold))))
        # the official trunc_normal_(std=.02) cuts at +-2, i.e. 100 std: in effect a plain normal
        nn.init.normal_(self.proj.weight, std=init_std)
        nn.init.zeros_(self.proj.bias)

    def logits(self, tokens: Tensor) -> Tensor:
        """Tokens (B, N, D) to dispatch logits (B, N)."""
        return self.proj(tokens).squeeze(-1)

    def sample(self, logits: Tensor) -> Tensor:
        """Training mask (B, N): hard Gumbel-sigmoid sample, straight-through gradient."""
        return gumbel_sigmoid_st(logits, self.tau)

    def keep(self, logits: Tensor) -> Tensor:
        """Inference decision (B, N) bool: ``sigmoid(logit) > threshold``."""
        return logits > self.logit_threshold

    @property
    def threshold(self) -> float:
        """The inference threshold on ``sigmoid(logit)``."""
        return float(torch.sigmoid(self.logit_threshold))

    def set_threshold(self, threshold: float) -> None:
        """Set the inference threshold on ``sigmoid(logit)`` (0 keeps every token, 1 none)."""
        self.logit_threshold.fill_(float(torch.logit(torch.tensor(threshold, dtype=torch.float64))))

    def flops(self, n_tokens: int) -> int:
        """Multiply-adds for ``n_tokens`` tokens."""
        return n_tokens * self.proj.in_features

    def extra_repr(self) -> str:
        return f"tau={self.tau}, threshold={self.threshold:.4g}"


__all__ = ["TokenDispatcher", "gumbel_sigmoid_st"]
