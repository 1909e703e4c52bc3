"""The bottleneck adapter (Houlsby et al. 2019; AdaptFormer's parallel form, Chen et al. 2022) and its
mixture-of-experts form (DyT-dagger).

Per token ``x`` (size ``dim``)::

    Adapter(x) = scale * up(Dropout(ReLU(down(x))))

It returns the branch only (no residual): the block that owns it decides where the branch is added
(DyT and Dyn-Adapter add it in parallel to the MLP). The up-projection starts at zero, so a fresh
adapter changes nothing. The ReLU makes it non-linear, so unlike RepAdapter or LoRA it cannot be
merged into the backbone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from petl_lightning.errors import ConfigError, MergeError
from petl_lightning.layers.wrapper import AdapterLayer


def _kaiming_down(weight: Tensor) -> None:
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


class Adapter(AdapterLayer):
    """Bottleneck adapter branch ``scale * up(dropout(relu(down(x))))``.

    Args:
        dim: token width.
        adapter_dim: hidden width (8 on VTAB-1K, as DyT/AdaptFormer use there).
        scale: fixed multiplier of the branch (AdaptFormer's ``s``; 1.0 as DyT's VTAB-1K code).
        dropout: dropout on the hidden units (train mode only); ``self.dropout.p`` may be changed
            (Dyn-Adapter sets it per depth).

    Initialisation (LoRA-style, as AdaptFormer/DyT): ``down`` kaiming-uniform(a=sqrt(5)), ``up``
    and both biases zero, so the branch is exactly zero at the start.
    """

    def __init__(self, dim: int, adapter_dim: int = 8, scale: float = 1.0, dropout: float = 0.1) -> None:
        super().__init__()
        if dim < 1 or adapter_dim < 1:
            raise ConfigError(f"Adapter needs dim >= 1 and adapter_dim >= 1, got dim={dim}, adapter_dim={adapter_dim}.")
        self.dim, self.adapter_dim, self.scale = dim, adapter_dim, float(scale)
        self.down = nn.Linear(dim, adapter_dim)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(adapter_dim, dim)
        _kaiming_down(self.down.weight)
        for t in (self.down.bias, self.up.weight, self.up.bias):
            nn.init.zeros_(t)

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * self.up(self.dropout(self.act(self.down(x))))

    def flops(self, n_tokens: int) -> int:
        """Multiply-adds on ``n_tokens`` tokens (down and up projections; biases not counted)."""
        return n_tokens * 2 * self.dim * self.adapter_dim

    def merged(self) -> nn.Module:
        raise MergeError(
            "The bottleneck adapter is non-linear (ReLU) and cannot be merged into the backbone; only "
            "RepAdapter, ARC and LoRA adapters fold."
        )

    def extra_repr(self) -> str:
        return f"dim={self.dim}, adapter_dim={self.adapter_dim}, scale={self.scale:g}"


class MoEAdapter(AdapterLayer):
    """DyT-dagger's adapter: ``N`` expert adapters merged per image by a router.

    The router ``Linear(dim -> N)`` reads the adapter input averaged over all tokens of the image
    (CLS included; INFERRED: the paper does not say) and its softmax over experts (INFERRED: the
    paper does not name the normalisation) gives weights ``alpha``. The experts' weights and
    biases are averaged with ``alpha`` and one adapter runs with the merged weights, so the
    per-token cost is that of a single adapter. Because ReLU sits between the projections this is
    a weight-space merge, not a mixture of expert outputs.

    Args:
        dim, adapter_dim, scale, dropout: as :class:`Adapter`.
        num_experts: N (the paper: 4 works best on video; not used for VTAB).
    """

    def __init__(
        self, dim: int, adapter_dim: int = 8, num_experts: int = 4, scale: float = 1.0, dropout: float = 0.1
    ) -> None:
        super().__init__()
        if num_experts < 2:
            raise ConfigError(f"MoEAdapter needs at least 2 experts, got {num_experts}; use Adapter for one.")
        if adapter_dim < 1:
            raise ConfigError(f"adapter_dim must be at least 1, got {adapter_dim}.")
        self.dim, self.adapter_dim, self.num_experts, self.scale = dim, adapter_dim, num_experts, float(scale)
        self.router = nn.Linear(dim, num_experts)
        self.down_weight = nn.Parameter(torch.empty(num_experts, dim, adapter_dim))
        self.down_bias = nn.Parameter(torch.zeros(num_experts, adapter_dim))
        self.up_weight = nn.Parameter(torch.zeros(num_experts, adapter_dim, dim))
        self.up_bias = nn.Parameter(torch.zeros(num_experts, dim))
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        nn.init.trunc_normal_(self.router.weight, std=0.02)
        nn.init.zeros_(self.router.bias)
        for e in range(num_experts):  # Adapter.down's init (fan_in = dim), one draw per expert
            w = torch.empty(adapter_dim, dim)
            _kaiming_down(w)
            self.down_weight.data[e] = w.t()

    def routing(self, x: Tensor) -> Tensor:
        """Expert weights (B, N) from tokens (B, T, D)."""
        return F.softmax(self.router(x.mean(dim=1)), dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        b, e = x.shape[0], self.num_experts
        alpha = self.routing(x)
        w_down = (alpha @ self.down_weight.reshape(e, -1)).reshape(b, self.dim, self.adapter_dim)
        w_up = (alpha @ self.up_weight.reshape(e, -1)).reshape(b, self.adapter_dim, self.dim)
        h = self.dropout(self.act(torch.baddbmm((alpha @ self.down_bias).unsqueeze(1), x, w_down)))
        return self.scale * torch.baddbmm((alpha @ self.up_bias).unsqueeze(1), h, w_up)

    def flops(self, n_tokens: int) -> int:
        """Multiply-adds per image: router, weight merge, and one adapter on ``n_tokens`` tokens."""
        d, r, e = self.dim, self.adapter_dim, self.num_experts
        return d * e + e * (2 * d * r + r + d) + 2 * n_tokens * d * r


def build_adapter(
    dim: int, adapter_dim: int, num_experts: int = 1, scale: float = 1.0, dropout: float = 0.1
) -> Adapter | MoEAdapter:
    """One :class:`Adapter` for ``num_experts == 1``, else a :class:`MoEAdapter`."""
    if num_experts < 1:
        raise ConfigError(f"num_experts must be at least 1, got {num_experts}.")
    if num_experts == 1:
        return Adapter(dim, adapter_dim, scale, dropout)
    return MoEAdapter(dim, adapter_dim, num_experts, scale, dropout)


__all__ = ["Adapter", "MoEAdapter", "build_adapter"]
