"""A bottleneck adapter (Houlsby et al. 2019; AdaptFormer's parallel form, Chen et al. 2022).

Per token ``x`` (size ``dim``)::

    Adapter(x) = scale * up(Dropout(ReLU(down(x))))

It returns the branch only (no residual): the block that owns it decides where the branch is
added (Dyn-Adapter adds it in parallel to the MLP, as AdaptFormer and DyT do). The up-projection
starts at zero, so a fresh adapter changes nothing. The ReLU makes it non-linear, so unlike
RepAdapter or LoRA it cannot be merged into the backbone.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from petl_lightning.errors import PETLError


class Adapter(nn.Module):
    """Bottleneck adapter branch ``scale * up(dropout(relu(down(x))))``.

    Args:
        dim: token width.
        bottleneck: hidden width ``d`` (8 on VTAB-1K, as DyT/AdaptFormer use there).
        scale: fixed multiplier of the branch (AdaptFormer's ``s``; 1.0 as DyT on VTAB-1K).
        dropout: dropout on the bottleneck (train mode only); ``self.dropout.p`` may be changed
            (Dyn-Adapter sets it per depth).

    Initialisation (LoRA-style, as AdaptFormer/DyT): ``down`` kaiming-uniform(a=sqrt(5)), ``up``
    and both biases zero, so the branch is exactly zero at the start.
    """

    def __init__(self, dim: int, bottleneck: int = 8, scale: float = 1.0, dropout: float = 0.1) -> None:
        super().__init__()
        if dim < 1 or bottleneck < 1:
            raise PETLError(f"Adapter needs dim >= 1 and bottleneck >= 1, got dim={dim}, bottleneck={bottleneck}.")
        self.dim, self.bottleneck = dim, bottleneck
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim)
        self.register_buffer("scale", torch.tensor(float(scale)))
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * self.up(self.dropout(self.act(self.down(x))))

    def flops(self, n_tokens: int) -> int:
        """Multiply-adds on ``n_tokens`` tokens (down and up projections; biases not counted)."""
        return n_tokens * 2 * self.dim * self.bottleneck

    def extra_repr(self) -> str:
        return f"dim={self.dim}, bottleneck={self.bottleneck}, scale={float(self.scale):g}"


__all__ = ["Adapter"]
