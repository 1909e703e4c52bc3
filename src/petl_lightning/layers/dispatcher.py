"""DyT's token dispatcher (Zhao et al., NeurIPS 2024, arXiv 2403.11808): ``Linear(dim -> 1)`` per
token deciding whether it goes through the skippable sub-block.

Training samples a hard 0/1 mask with a soft gradient (:func:`gumbel_sigmoid_st`, or with a fixed
count per image :func:`topk_st`); inference keeps a token when ``sigmoid(logit) > threshold`` (no
noise); DyT's block can instead keep a fixed count of the largest logits per image. Optionally the
logit gets a prior from the class token's attention to each token (ours: :meth:`TokenDispatcher.patch_logits`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from petl_lightning.errors import ConfigError


def logistic_noise(logits: Tensor, scale: float) -> Tensor:
    """``scale`` x Logistic(0, 1) noise shaped like ``logits`` (Gumbel - Gumbel); zeros at scale 0."""
    if scale == 0.0:
        return torch.zeros_like(logits)
    u = torch.rand_like(logits).clamp_(1e-6, 1.0 - 1e-6)
    return scale * (torch.log(u) - torch.log1p(-u))


def gumbel_sigmoid_st(logits: Tensor, tau: float = 5.0, noise: float = 1.0) -> Tensor:
    """Hard 0/1 sample in the forward pass, soft sigmoid gradient in the backward pass.

    ``s = sigmoid((logits + g1 - g2) / tau)`` with two Gumbel(0, 1) draws (their difference is
    Logistic(0, 1) noise), ``hard = 1[s > 0.5]``, returned as ``hard - s.detach() + s``. With the
    0.5 threshold, ``tau`` does not change the sampled mask; it only scales the gradient. ``noise``
    scales the Logistic draw (1: the paper; 0: the deterministic rule ``logit > 0``).
    """
    soft = torch.sigmoid((logits + logistic_noise(logits, noise)) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard - soft.detach() + soft


def topk_st(logits: Tensor, count: int, tau: float = 5.0, noise: float = 1.0) -> Tensor:
    """Hard mask (B, P) of each row's ``count`` largest ``logits + noise`` (``noise`` x Logistic(0, 1),
    as in :func:`gumbel_sigmoid_st`; 0: the inference rule itself), with the soft gradient of
    ``sigmoid((logits + noise - cut) / tau)``, ``cut`` the midpoint between the row's ``count``-th
    and next largest value (detached): exactly ``count`` tokens kept per image in training, as at
    inference under a fixed keep rate."""
    num = logits.shape[1]
    if count >= num or count <= 0:  # nothing to choose: no gradient either
        return logits.new_full(logits.shape, 1.0 if count >= num else 0.0)
    noisy = logits + logistic_noise(logits, noise)
    top = noisy.detach().topk(count + 1, dim=1).values
    cut = 0.5 * (top[:, count - 1 : count] + top[:, count : count + 1])
    soft = torch.sigmoid((noisy - cut) / tau)
    hard = (noisy.detach() > cut).to(soft.dtype)
    return hard - soft.detach() + soft


class TokenDispatcher(nn.Module):
    """Dispatch logits and keep decisions for tokens (B, N, D).

    Args:
        dim: token width.
        tau: Gumbel-sigmoid temperature (paper: 5.0; scales the gradient only).
        noise: scale of the training masks' Logistic noise (paper: 1.0; 0: training samples the
            inference rule, with the same soft gradient).
        threshold: inference threshold on ``sigmoid(logit)`` (paper: 0.5). Stored as a logit buffer,
            so a calibrated threshold travels with checkpoints.
        init_std: std of the normal weight init (official code: 0.02; zero bias).
        prior_weight: None (the paper): the logit is ``Linear(token)``. A number (ours): the logit
            also gets ``w * log(P * a)``, ``a`` the class token's attention to the patch token (EViT's
            ranking; 0 for a token at the mean of the P patch tokens' share), ``w`` a learned scalar
            starting at ``prior_weight``: the dispatcher ranks by attention from the first step and
            learns how much to trust it.
    """

    logit_threshold: Tensor

    def __init__(
        self,
        dim: int,
        tau: float = 5.0,
        threshold: float = 0.5,
        init_std: float = 0.02,
        prior_weight: float | None = None,
        noise: float = 1.0,
    ) -> None:
        super().__init__()
        if tau <= 0:
            raise ConfigError(f"Dispatcher temperature tau must be positive, got {tau}.")
        if noise < 0:
            raise ConfigError(f"Dispatcher noise scale must be non-negative, got {noise}.")
        if not 0.0 < threshold < 1.0:
            raise ConfigError(f"Dispatcher threshold must lie in (0, 1), got {threshold}.")
        self.proj = nn.Linear(dim, 1)
        self.tau, self.noise = tau, noise
        self.register_buffer("logit_threshold", torch.tensor(math.log(threshold / (1.0 - threshold))))
        # the official trunc_normal_(std=.02) cuts at +-2, i.e. 100 std: in effect a plain normal
        nn.init.normal_(self.proj.weight, std=init_std)
        nn.init.zeros_(self.proj.bias)
        self.prior_weight = None if prior_weight is None else nn.Parameter(torch.tensor(float(prior_weight)))

    def logits(self, tokens: Tensor) -> Tensor:
        """Tokens (B, N, D) to dispatch logits (B, N), without the prior."""
        return self.proj(tokens).squeeze(-1)

    def patch_logits(self, tokens: Tensor, num_prefix_tokens: int, class_attention: Tensor | None = None) -> Tensor:
        """The patch tokens' dispatch logits (B, P) from tokens (B, N, D), with the prior from
        ``class_attention`` (B, P) when this dispatcher has one (it must then be given)."""
        logits = self.logits(tokens)[:, num_prefix_tokens:]  # all tokens: a Linear on the slice would copy it
        if self.prior_weight is None:
            return logits
        if class_attention is None:
            raise ValueError("This dispatcher has a class-attention prior; pass the class token's attention.")
        share = class_attention * class_attention.shape[1]  # 1 = the mean patch token's share
        return logits + self.prior_weight * torch.log(share.clamp_min(1e-6))

    def sample(self, logits: Tensor, count: int | None = None) -> Tensor:
        """Training mask (B, P): a hard Gumbel-sigmoid sample, or with ``count`` the top ``count``
        noisy logits per image (:func:`topk_st`); straight-through gradient."""
        if count is None:
            return gumbel_sigmoid_st(logits, self.tau, self.noise)
        return topk_st(logits, count, self.tau, self.noise)

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
        """Multiply-adds for ``n_tokens`` tokens (the prior's class-token scores are counted by the
        block that computes them)."""
        return n_tokens * self.proj.in_features

    def extra_repr(self) -> str:
        prior = "" if self.prior_weight is None else ", prior=class_attention"
        return f"tau={self.tau}, threshold={self.threshold:.4g}{prior}"


__all__ = ["TokenDispatcher", "gumbel_sigmoid_st", "logistic_noise", "topk_st"]
