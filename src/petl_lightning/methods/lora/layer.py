"""LoRA (Hu et al., 2021) as a wrapper of a frozen ``nn.Linear``, as HF PEFT's LoRA layers wrap
their base layer.

For a frozen Linear ``W`` (``out x in``), LoRA learns ``A`` (``r x in``) and ``B`` (``out x r``)::

    LoRALinear(x) = base_layer(x) + scale * B A Dropout(x)

Wrapping timm's fused ``attn.qkv`` lets timm's own ``Attention.forward`` run unchanged. The update
is linear: :meth:`~petl_lightning.layers.wrapper.AdaptedLinear.merged` folds it into a plain Linear.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from petl_lightning.errors import ConfigError
from petl_lightning.layers.wrapper import AdaptedLinear, LowRank


class LoRALinear(AdaptedLinear):
    """``base_layer(x) + scale * lora_b(lora_a(dropout(x)))`` with ``base_layer`` frozen.

    Args:
        base_layer: the frozen ``nn.Linear`` (kept, not copied: its parameters stay the backbone's).
        adapter_dim: the rank ``r``.
        scale: the update's scale (LoRA's ``alpha / r``; 1.0 is ``alpha = r``).
        dropout: dropout on the update's input (train mode only), as HF PEFT; ``self.dropout.p``
            may be changed (Dyn-Adapter sets it per depth).

    Initialisation as the LoRA paper: ``A`` kaiming-uniform(a=sqrt(5)), ``B`` zero, so the wrapped
    layer starts exactly as the base layer.
    """

    def __init__(self, base_layer: nn.Module, adapter_dim: int = 8, scale: float = 1.0, dropout: float = 0.1) -> None:
        super().__init__(base_layer)
        if adapter_dim < 1:
            raise ConfigError(f"LoRA rank adapter_dim must be at least 1, got {adapter_dim}.")
        self.adapter_dim, self.scale = adapter_dim, float(scale)
        self.dropout = nn.Dropout(dropout)
        self.lora_a = nn.Parameter(torch.empty(adapter_dim, self.in_features))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, adapter_dim))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def output_update(self, x: Tensor) -> Tensor:
        """``scale * B A dropout(x)``, added to the frozen Linear's output."""
        return self.scale * ((self.dropout(x) @ self.lora_a.T) @ self.lora_b.T)

    def factors(self) -> LowRank:
        """``P = A^T``, ``p = 0``, ``Q = scale B^T``, ``q = 0`` (the update of the output)."""
        return LowRank(
            self.lora_a.T,
            self.lora_a.new_zeros(self.adapter_dim),
            self.scale * self.lora_b.T,
            self.lora_b.new_zeros(self.out_features),
        )

    def delta_weight(self) -> Tensor:
        """The dense update ``scale * B A`` (``out x in``, fp32)."""
        return self.scale * (self.lora_b.float() @ self.lora_a.float())

    def fold_into(self, linear: nn.Linear) -> None:
        linear.weight.add_(self.delta_weight().to(linear.weight.device))

    def flops(self, n_tokens: int) -> int:
        """Multiply-adds the update adds on ``n_tokens`` tokens (``A`` then ``B``)."""
        return n_tokens * self.adapter_dim * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        return f"adapter_dim={self.adapter_dim}, scale={self.scale:g}"


__all__ = ["LoRALinear"]
