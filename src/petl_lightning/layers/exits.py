"""Early-exit classifier heads (Dyn-Adapter's "balanced early heads").

An exit reads one or more pooled tokens after some block (the CLS token, the mean patch token, or
both) and classifies them. Shallow features are less linearly separable than deep ones, so
Dyn-Adapter gives shallow exits more capacity (an MLP) and deep exits less (a linear layer).
:class:`ExitHead` is either, chosen by ``hidden``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from petl_lightning.errors import ConfigError
from petl_lightning.flops import layernorm_flops


def pool_exit_tokens(tokens: Tensor, pool: str, num_prefix_tokens: int) -> Tensor:
    """What an early exit reads from tokens (B, N, D): ``"cls"`` the first token, ``"avg"`` the mean
    patch token, ``"cls_avg"`` both; (B, 1 or 2, D)."""
    cls, avg = tokens[:, :1], tokens[:, num_prefix_tokens:].mean(dim=1, keepdim=True)
    if pool not in ("cls", "avg", "cls_avg"):
        raise ConfigError(f"Unknown exit pooling {pool!r}; use 'cls', 'avg' or 'cls_avg'.")
    return cls if pool == "cls" else avg if pool == "avg" else torch.cat([cls, avg], dim=1)


class ExitHead(nn.Module):
    """``LayerNorm -> flatten -> Linear(n*dim, hidden) -> GELU -> Dropout -> Linear(hidden, K)``, or,
    with ``hidden=0``, ``LayerNorm -> flatten -> Dropout -> Linear(n*dim, K)``.

    The LayerNorm is the head's own (trainable) and normalises each of the ``n`` pooled tokens
    separately: intermediate tokens are not normalised by the backbone's final norm, and sharing
    that frozen norm across depths would mis-scale them.

    Args:
        dim: width of a pooled token.
        num_classes: classes.
        hidden: MLP hidden width; 0 makes a linear head.
        dropout: dropout before the last Linear (train mode only).
        num_tokens: pooled tokens per image the head reads (1: CLS; 2: CLS and mean patch token).
        grad_scale: scale of the gradient the head sends back into the blocks below it (1: all;
            0: stopped, the head trains on features only later exits shape). Identity forward.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        hidden: int = 0,
        dropout: float = 0.0,
        num_tokens: int = 1,
        grad_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if dim < 1 or num_classes < 1 or hidden < 0 or num_tokens < 1:
            raise ConfigError(
                f"ExitHead needs dim, num_classes, num_tokens >= 1 and hidden >= 0, got dim={dim}, "
                f"num_classes={num_classes}, num_tokens={num_tokens}, hidden={hidden}."
            )
        self.dim, self.num_classes, self.hidden, self.num_tokens = dim, num_classes, hidden, num_tokens
        self.grad_scale = grad_scale
        width = dim * num_tokens
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        if hidden > 0:
            self.fc1: nn.Linear | None = nn.Linear(width, hidden)
            self.act: nn.Module = nn.GELU()
        else:
            self.fc1, self.act = None, nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden if hidden > 0 else width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Pooled tokens (B, num_tokens, dim), or (B, dim) for one, to logits (B, num_classes)."""
        if self.grad_scale != 1.0:  # x * s + x.detach() * (1 - s): the value of x, s times its gradient
            x = x.detach() if self.grad_scale == 0.0 else x * self.grad_scale + x.detach() * (1.0 - self.grad_scale)
        x = self.norm(x).flatten(1)
        if self.fc1 is not None:
            x = self.act(self.fc1(x))
        return self.fc2(self.drop(x))

    def flops(self, norm: bool = True) -> int:
        """Multiply-adds per image, plus the LayerNorm when ``norm`` (pooling itself is additions)."""
        width = self.dim * self.num_tokens
        f = (width * self.hidden + self.hidden * self.num_classes) if self.hidden else width * self.num_classes
        return f + (layernorm_flops(self.num_tokens, self.dim) if norm else 0)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_tokens={self.num_tokens}, hidden={self.hidden}, num_classes={self.num_classes}"


__all__ = ["ExitHead", "pool_exit_tokens"]
