"""Early-exit classifier heads (Dyn-Adapter's "balanced early heads").

An exit reads the pooled token (the CLS token) after some block and classifies it. Shallow
features are less linearly separable than deep ones, so Dyn-Adapter gives shallow exits more
capacity (an MLP) and deep exits less (a linear layer). :class:`ExitHead` is either, chosen by
``hidden``.
"""

from __future__ import annotations

from torch import Tensor, nn

from petl_lightning.errors import PETLError

# Affine LayerNorm cost per element, as petl_lightning.flops counts it (fvcore convention).
_LN_FLOPS_PER_ELEMENT = 5


class ExitHead(nn.Module):
    """``LayerNorm -> Linear(dim, hidden) -> GELU -> Dropout -> Linear(hidden, K)``, or, with
    ``hidden=0``, ``LayerNorm -> Dropout -> Linear(dim, K)``.

    The LayerNorm is the head's own (trainable): intermediate tokens are not normalised by the
    backbone's final norm, and sharing that frozen norm across depths would mis-scale them.

    Args:
        dim: width of the pooled token.
        num_classes: classes.
        hidden: MLP hidden width; 0 makes a linear head.
        dropout: dropout before the last Linear (train mode only).
    """

    def __init__(self, dim: int, num_classes: int, hidden: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        if dim < 1 or num_classes < 1 or hidden < 0:
            raise PETLError(
                f"ExitHead needs dim >= 1, num_classes >= 1 and hidden >= 0, got {dim}, {num_classes}, {hidden}."
            )
        self.dim, self.num_classes, self.hidden = dim, num_classes, hidden
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        if hidden > 0:
            self.fc1: nn.Linear | None = nn.Linear(dim, hidden)
            self.act: nn.Module = nn.GELU()
        else:
            self.fc1, self.act = None, nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden if hidden > 0 else dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Pooled features (B, dim) to logits (B, num_classes)."""
        x = self.norm(x)
        if self.fc1 is not None:
            x = self.act(self.fc1(x))
        return self.fc2(self.drop(x))

    def flops(self, norm: bool = True) -> int:
        """Multiply-adds per image (one pooled token), plus the LayerNorm when ``norm``."""
        f = (self.dim * self.hidden + self.hidden * self.num_classes) if self.hidden else self.dim * self.num_classes
        return f + (_LN_FLOPS_PER_ELEMENT * self.dim if norm else 0)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, num_classes={self.num_classes}"


__all__ = ["ExitHead"]
