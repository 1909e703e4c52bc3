"""RepAdapter's linear adapter (Luo et al., arXiv 2302.08106) on the input of a frozen Linear.

Per token ``x`` (size ``dim``)::

    A(x) = x + s * (W_B @ Dropout(W_A @ x + b_A) + b_B)        RepAdapterLinear(x) = base_layer(A(x))

``W_A`` is a dense down-projection to ``adapter_dim`` channels, ``W_B`` a group-wise up-projection
(``groups`` diagonal blocks), ``s`` a fixed scale on the whole branch (both biases included). There
is no activation, so in eval mode ``A`` is affine (:meth:`RepAdapterLinear.affine`) and folds into
the wrapped Linear exactly (:meth:`~petl_lightning.layers.wrapper.AdaptedLinear.merged`).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from petl_lightning.errors import ConfigError
from petl_lightning.layers.wrapper import AdaptedLinear, LowRank, fold_affine_into_linear


class GroupedLinear(nn.Module):
    """A Linear whose weight is block-diagonal: input group ``j`` feeds only output group ``j``.

    Same as ``nn.Conv1d(in, out, 1, groups=groups)`` on (B, C, N) tensors, applied to (..., C).
    ``weight`` has shape ``(out_features, in_features // groups)`` (the conv's weight, squeezed).
    """

    def __init__(self, in_features: int, out_features: int, groups: int, bias: bool = True) -> None:
        super().__init__()
        if groups < 1 or in_features % groups or out_features % groups:
            raise ConfigError(
                f"GroupedLinear needs in_features ({in_features}) and out_features ({out_features}) "
                f"divisible by groups ({groups}); pick adapter_dim and adapter_groups that divide the width."
            )
        self.in_features, self.out_features, self.groups = in_features, out_features, groups
        self.weight = nn.Parameter(torch.empty(out_features, in_features // groups))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        g = self.groups
        w = self.weight.view(g, self.out_features // g, self.in_features // g)
        y = torch.einsum("...gi,goi->...go", x.unflatten(-1, (g, -1)), w).flatten(-2)
        return y if self.bias is None else y + self.bias

    def dense_weight(self) -> Tensor:
        """The equivalent dense ``(out_features, in_features)`` weight (block-diagonal)."""
        g = self.groups
        return torch.block_diag(*self.weight.view(g, self.out_features // g, self.in_features // g))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, groups={self.groups}"


class RepAdapterLinear(AdaptedLinear):
    """``base_layer(x + scale * up(dropout(down(x))))``, exactly ``base_layer`` at initialisation.

    Args:
        base_layer: the frozen ``nn.Linear`` (``attn.qkv`` or ``mlp.fc1``); kept, not copied.
        adapter_dim: bottleneck width (the paper's 8).
        groups: groups of the up-projection (the paper's 2); ``adapter_dim`` and the width must divide by it.
        scale: the fixed scale ``s`` on the whole branch (a per-task hyper-parameter). A buffer, so
            checkpoints carry it and a merge always uses the value that was trained.
        dropout: dropout on the bottleneck (train mode only); ``self.dropout.p`` may be changed.

    Initialisation as the official code: ``down.weight`` xavier-uniform, every other tensor zero.
    """

    scale: Tensor

    def __init__(
        self, base_layer: nn.Module, adapter_dim: int = 8, groups: int = 2, scale: float = 1.0, dropout: float = 0.1
    ) -> None:
        super().__init__(base_layer)
        dim = self.in_features
        if adapter_dim < 1:
            raise ConfigError(f"RepAdapter needs adapter_dim >= 1, got {adapter_dim}.")
        self.dim, self.adapter_dim, self.groups = dim, adapter_dim, groups
        self.down = nn.Linear(dim, adapter_dim)
        self.dropout = nn.Dropout(dropout)
        self.up = GroupedLinear(adapter_dim, dim, groups)
        self.register_buffer("scale", torch.tensor(float(scale)))
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def adapt_input(self, x: Tensor) -> Tensor:
        """The adapter's map ``A(x)`` of the Linear's input."""
        return x + self.scale * self.up(self.dropout(self.down(x)))

    def affine(self) -> tuple[Tensor, Tensor]:
        """``(M, c)`` in fp32 with ``adapt_input(x) == x @ M.T + c`` in eval mode:
        ``M = I + s * W_B W_A`` and ``c = s * (W_B b_A + b_B)`` (``W_B`` densified)."""
        s = self.scale.float()
        w_a, b_a = self.down.weight.float(), self.down.bias.float()
        w_b, b_b = self.up.dense_weight().float(), cast(Tensor, self.up.bias).float()  # built with a bias
        eye = torch.eye(self.dim, dtype=torch.float32, device=w_a.device)
        return eye + s * (w_b @ w_a), s * (w_b @ b_a + b_b)

    def fold_into(self, linear: nn.Linear) -> None:
        fold_affine_into_linear(linear, *self.affine())

    def factors(self) -> LowRank:
        """``P = W_A^T``, ``p = b_A``, ``Q = s W_B^T``, ``q = s b_B`` (``W_B`` densified)."""
        s = self.scale
        return LowRank(self.down.weight.T, self.down.bias, s * self.up.dense_weight().T, s * cast(Tensor, self.up.bias))

    def flops(self, n_tokens: int) -> int:
        """Multiply-adds on ``n_tokens`` tokens: dense down plus group-wise up (biases, scale, skip not counted)."""
        return n_tokens * (self.dim * self.adapter_dim + self.dim * self.adapter_dim // self.groups)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, adapter_dim={self.adapter_dim}, groups={self.groups}, scale={float(self.scale):g}"


def set_adapter_scale(module: nn.Module, scale: float) -> None:
    """Set the scale ``s`` of every :class:`RepAdapterLinear` inside ``module``."""
    for layer in module.modules():
        if isinstance(layer, RepAdapterLinear):
            layer.scale.fill_(float(scale))


__all__ = ["GroupedLinear", "RepAdapterLinear", "set_adapter_scale"]
