"""ARC's re-composed linear adapter (Dong et al., NeurIPS 2023, arXiv 2310.06234).

A basis ``U`` (``dim x r``) is shared by every layer; each layer learns only coefficients ``c``
(``r``) and a bias ``b`` (``dim``)::

    A(x) = x + Dropout(x @ (U * c)) @ U.T + b        # = x (I + U diag(c) U^T) + b in eval mode

The update ``U diag(c) U^T`` is symmetric with rank <= r, and ``A`` is affine, so it folds into the
following Linear exactly (:func:`petl_lightning.merge.fold_affine_into_linear`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from petl_lightning.errors import ConfigError


class ARCBasis(nn.Module):
    """The shared ``(dim, adapter_dim)`` basis ``U`` (xavier-uniform, gain 1, as the official code)."""

    def __init__(self, dim: int, adapter_dim: int = 50) -> None:
        super().__init__()
        if dim < 1 or adapter_dim < 1:
            raise ConfigError(f"ARCBasis needs dim >= 1 and adapter_dim >= 1, got {dim} and {adapter_dim}.")
        self.dim, self.r = dim, adapter_dim
        self.weight = nn.Parameter(torch.empty(dim, adapter_dim))
        nn.init.xavier_uniform_(self.weight)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, r={self.r}"


class ARCLayer(nn.Module):
    """One layer's ARC adapter over a shared basis.

    The basis is **not registered** as a sub-module of the layer: it belongs to the module that
    owns all the layers (e.g. :class:`petl_lightning.methods.arc.ARC` holds ``basis_attn`` and
    ``basis_mlp``), so it is trained, saved and moved once. Whoever builds ARC layers must register
    the :class:`ARCBasis` (or the Parameter) on a parent module themselves.

    Args:
        basis: an :class:`ARCBasis` or a ``(dim, r)`` ``nn.Parameter``, shared across layers.
        dim: token width (must match the basis).
        adapter_dim: basis rank ``r`` (must match the basis).
        dropout: dropout on the ``r``-dim bottleneck (train mode only); ``self.dropout.p`` may change.
        coeff_init: ``"zeros"`` (identity at start; the official attention adapter) or
            ``"xavier"`` (xavier-uniform on a ``(1, r)`` tensor, bound sqrt(6/(1+r)); the official
            MLP adapter, which therefore does not start as the identity).
    """

    _basis: ARCBasis | nn.Parameter

    def __init__(
        self,
        basis: ARCBasis | nn.Parameter,
        dim: int,
        adapter_dim: int = 50,
        dropout: float = 0.1,
        coeff_init: Literal["zeros", "xavier"] = "zeros",
    ) -> None:
        super().__init__()
        shape = tuple((basis.weight if isinstance(basis, ARCBasis) else basis).shape)
        r = adapter_dim
        if shape != (dim, r):
            raise ConfigError(
                f"ARCLayer(dim={dim}, adapter_dim={r}) got a basis of shape {shape}; it must be ({dim}, {r})."
            )
        if coeff_init not in ("zeros", "xavier"):
            raise ConfigError(f"coeff_init must be 'zeros' or 'xavier', got {coeff_init!r}.")
        self.dim, self.r = dim, r
        # A plain attribute hidden from nn.Module registration (see the class docstring).
        object.__setattr__(self, "_basis", basis)
        coeff = torch.zeros(1, r)
        if coeff_init == "xavier":
            nn.init.xavier_uniform_(coeff)  # on (1, r) as the official code: bound sqrt(6 / (1 + r))
        self.coeff = nn.Parameter(coeff.view(r))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.dropout = nn.Dropout(dropout)

    @property
    def basis(self) -> Tensor:
        """The shared ``(dim, r)`` basis tensor ``U``."""
        b = self._basis
        return b.weight if isinstance(b, ARCBasis) else b

    def forward(self, x: Tensor) -> Tensor:
        u = self.basis
        return x + self.dropout(x @ (u * self.coeff)) @ u.T + self.bias

    def affine(self) -> tuple[Tensor, Tensor]:
        """``(M, c)`` in fp32 with ``forward(x) == x @ M.T + c`` in eval mode: ``M = I + U diag(c) U^T``, ``c = b``."""
        u = self.basis.float()
        eye = torch.eye(self.dim, dtype=torch.float32, device=u.device)
        return eye + (u * self.coeff.float()) @ u.T, self.bias.float().clone()

    def flops(self, n_tokens: int) -> int:
        """Multiply-adds on ``n_tokens`` tokens: ``x @ (U c)`` then ``@ U^T`` (bias and skip not counted)."""
        return n_tokens * 2 * self.dim * self.r

    def extra_repr(self) -> str:
        return f"dim={self.dim}, r={self.r}, shared basis"


__all__ = ["ARCBasis", "ARCLayer"]
