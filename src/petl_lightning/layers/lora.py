"""LoRA (Hu et al., 2021): a low-rank update of a frozen Linear.

For a frozen ``nn.Linear`` ``W`` (``out x in``), LoRA learns ``A`` (``r x in``) and ``B``
(``out x r``) and the layer computes::

    y = W x + b + (alpha / r) * B A Dropout(x)

:class:`LoRA` holds only ``A`` and ``B`` and returns the update term; the caller adds it to the
frozen Linear's output (``linear(x) + lora(x)``), so the frozen module is never wrapped or
replaced. In eval mode the update is linear, so :meth:`LoRA.delta_weight` folds it into ``W``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from petl_lightning.errors import PETLError


class LoRA(nn.Module):
    """The low-rank update ``(alpha / r) * B(A(dropout(x)))`` of a frozen ``in -> out`` Linear.

    Args:
        in_features / out_features: the frozen Linear's sizes.
        r: rank.
        alpha: LoRA's scaling numerator; the update is scaled by ``alpha / r``.
        dropout: dropout on the input of the update (train mode only), as HF PEFT;
            ``self.dropout.p`` may be changed (Dyn-Adapter sets it per depth).

    Initialisation as the LoRA paper: ``A`` kaiming-uniform(a=sqrt(5)), ``B`` zero, so the update
    is exactly zero at the start.
    """

    def __init__(
        self, in_features: int, out_features: int, r: int = 8, alpha: float = 8.0, dropout: float = 0.1
    ) -> None:
        super().__init__()
        if r < 1 or in_features < 1 or out_features < 1:
            raise PETLError(
                f"LoRA needs r, in_features, out_features >= 1, got r={r}, in={in_features}, out={out_features}."
            )
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.dropout = nn.Dropout(dropout)
        self.lora_a = nn.Parameter(torch.empty(r, in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, r))
        self.register_buffer("scaling", torch.tensor(float(alpha) / r))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    @classmethod
    def for_linear(cls, linear: nn.Linear, r: int = 8, alpha: float = 8.0, dropout: float = 0.1) -> LoRA:
        """A LoRA sized for ``linear`` (the Linear itself is not stored)."""
        return cls(linear.in_features, linear.out_features, r, alpha, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.scaling * ((self.dropout(x) @ self.lora_a.T) @ self.lora_b.T)

    def delta_weight(self) -> Tensor:
        """The dense update ``(alpha / r) B A`` (``out x in``, fp32): add it to the frozen weight to merge."""
        return self.scaling.float() * (self.lora_b.float() @ self.lora_a.float())

    def flops(self, n_tokens: int) -> int:
        """Multiply-adds on ``n_tokens`` tokens (``A`` then ``B``)."""
        return n_tokens * self.r * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scaling={float(self.scaling):g}")


__all__ = ["LoRA"]
