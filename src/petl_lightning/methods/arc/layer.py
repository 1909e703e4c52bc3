"""ARC's re-composed linear adapter (Dong et al., NeurIPS 2023, arXiv 2310.06234) on the input of a
frozen Linear.

A basis ``U`` (``dim x r``) is shared by every layer; each layer learns only coefficients ``c``
(``r``) and a bias ``b`` (``dim``)::

    A(x) = x + Dropout(x @ (U * c)) @ U.T + b        # = x (I + U diag(c) U^T) + b in eval mode
    ARCLinear(x) = base_layer(A(x))

The update ``U diag(c) U^T`` is symmetric with rank <= r, and ``A`` is affine, so it folds into the
wrapped Linear exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from petl_lightning.errors import ConfigError
from petl_lightning.layers.wrapper import AdaptedLinear, LowRank, fold_affine_into_linear


class ARCBasis(nn.Module):
    """The shared ``(dim, adapter_dim)`` basis ``U`` (xavier-uniform, gain 1, as the official code)."""

    def __init__(self, dim: int, adapter_dim: int = 50) -> None:
        super().__init__()
        if dim < 1 or adapter_dim < 1:
            raise ConfigError(f"ARCBasis needs dim >= 1 and adapter_dim >= 1, got {dim} and {adapter_dim}.")
        self.dim, self.adapter_dim = dim, adapter_dim
        self.weight = nn.Parameter(torch.empty(dim, adapter_dim))
        nn.init.xavier_uniform_(self.weight)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, adapter_dim={self.adapter_dim}"


class ARCLinear(AdaptedLinear):
    """One layer's ARC adapter over a shared basis, on the input of a frozen Linear.

    The basis is a sub-module of every layer that uses it (as tied weights are): PyTorch trains,
    moves and counts it once, and the adapted ViT also registers it under ``shared``.

    Args:
        base_layer: the frozen ``nn.Linear`` (``attn.qkv`` or ``mlp.fc1``); kept, not copied.
        basis: the :class:`ARCBasis` shared across layers (its ``dim`` must be the Linear's input width).
        dropout: dropout on the ``r``-dim bottleneck (train mode only); ``self.dropout.p`` may change.
        xavier_coeff: initialise the coefficients xavier-uniform on a ``(1, r)`` tensor (bound
            sqrt(6/(1+r)); the official MLP adapter, which therefore does not start as the identity);
            else zeros (identity at start; the official attention adapter).
    """

    def __init__(
        self, base_layer: nn.Module, basis: ARCBasis, dropout: float = 0.1, xavier_coeff: bool = False
    ) -> None:
        super().__init__(base_layer)
        if basis.dim != self.in_features:
            raise ConfigError(f"ARCLinear on a Linear of width {self.in_features} got a basis of width {basis.dim}.")
        self.basis = basis
        r = basis.adapter_dim
        coeff = torch.zeros(1, r)
        if xavier_coeff:
            nn.init.xavier_uniform_(coeff)
        self.coeff = nn.Parameter(coeff.view(r))
        self.bias = nn.Parameter(torch.zeros(self.in_features))
        self.dropout = nn.Dropout(dropout)

    def adapt_input(self, x: Tensor) -> Tensor:
        """The adapter's map ``A(x)`` of the Linear's input."""
        u = self.basis.weight
        return x + self.dropout(x @ (u * self.coeff)) @ u.T + self.bias

    def affine(self) -> tuple[Tensor, Tensor]:
        """``(M, c)`` in fp32 with ``adapt_input(x) == x @ M.T + c`` in eval mode:
        ``M = I + U diag(c) U^T``, ``c = b``."""
        u = self.basis.weight.float()
        eye = torch.eye(self.in_features, dtype=torch.float32, device=u.device)
        return eye + (u * self.coeff.float()) @ u.T, self.bias.float().clone()

    def fold_into(self, linear: nn.Linear) -> None:
        fold_affine_into_linear(linear, *self.affine())

    def factors(self) -> LowRank:
        """``P = U diag(c)``, ``p = 0``, ``Q = U^T``, ``q = b``."""
        u = self.basis.weight
        return LowRank(u * self.coeff, u.new_zeros(u.shape[1]), u.T, self.bias)

    def flops(self, n_tokens: int) -> int:
        """Multiply-adds on ``n_tokens`` tokens: ``x @ (U c)`` then ``@ U^T`` (bias and skip not counted)."""
        return n_tokens * 2 * self.in_features * self.basis.adapter_dim

    def extra_repr(self) -> str:
        return f"adapter_dim={self.basis.adapter_dim}, shared basis"


__all__ = ["ARCBasis", "ARCLinear"]
