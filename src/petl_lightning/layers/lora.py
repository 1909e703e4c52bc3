"""LoRA (Hu et al., 2021) as a wrapper of a frozen ``nn.Linear``, as HF PEFT's LoRA layers wrap
their base layer.

For a frozen Linear ``W`` (``out x in``), LoRA learns ``A`` (``r x in``) and ``B`` (``out x r``)::

    LoRALinear(x) = base(x) + scale * B A Dropout(x)

Wrapping timm's fused ``attn.qkv`` (``attn.qkv = LoRALinear(attn.qkv)``) lets timm's own
``Attention.forward`` run unchanged, so no block copies timm's attention maths. In eval mode the
update is linear: :meth:`LoRALinear.merged` folds it into a plain ``nn.Linear``, and
:func:`merge_lora` replaces every wrapper inside a module by its merged Linear.
"""

from __future__ import annotations

import math
from typing import TypeVar

import torch
from torch import Tensor, nn

from petl_lightning.errors import ConfigError

ModuleT = TypeVar("ModuleT", bound=nn.Module)


class LoRALinear(nn.Module):
    """``base(x) + scale * lora_b(lora_a(dropout(x)))`` with ``base`` frozen.

    Args:
        base: the frozen ``nn.Linear`` (kept, not copied: its parameters stay the backbone's).
        adapter_dim: the rank ``r``.
        scale: the update's scale (LoRA's ``alpha / r``; 1.0 is ``alpha = r``).
        dropout: dropout on the update's input (train mode only), as HF PEFT; ``self.dropout.p``
            may be changed (Dyn-Adapter sets it per depth).

    Initialisation as the LoRA paper: ``A`` kaiming-uniform(a=sqrt(5)), ``B`` zero, so the wrapped
    layer starts exactly as the base layer.
    """

    def __init__(self, base: nn.Linear, adapter_dim: int = 8, scale: float = 1.0, dropout: float = 0.1) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ConfigError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}.")
        if adapter_dim < 1:
            raise ConfigError(f"LoRA rank adapter_dim must be at least 1, got {adapter_dim}.")
        self.base = base
        self.adapter_dim, self.scale = adapter_dim, float(scale)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.dropout = nn.Dropout(dropout)
        self.lora_a = nn.Parameter(torch.empty(adapter_dim, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, adapter_dim))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scale * ((self.dropout(x) @ self.lora_a.T) @ self.lora_b.T)

    def delta_weight(self) -> Tensor:
        """The dense update ``scale * B A`` (``out x in``, fp32)."""
        return self.scale * (self.lora_b.float() @ self.lora_a.float())

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A new fp32 ``nn.Linear`` computing this layer in eval mode (``W + scale * B A``, same bias)."""
        w = self.base.weight
        out = nn.Linear(
            self.in_features, self.out_features, bias=self.base.bias is not None, device=w.device, dtype=torch.float32
        )
        out.weight.copy_(w.float() + self.delta_weight().to(w.device))
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias.float())
        return out.requires_grad_(False)

    def flops(self, n_tokens: int) -> int:
        """Multiply-adds the update adds on ``n_tokens`` tokens (``A`` then ``B``)."""
        return n_tokens * self.adapter_dim * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        return f"adapter_dim={self.adapter_dim}, scale={self.scale:g}"


def merge_lora(module: ModuleT) -> ModuleT:
    """In place: replace every :class:`LoRALinear` inside ``module`` by its merged ``nn.Linear``;
    returns ``module`` (call it on a copy to keep the trainable form)."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
    return module


__all__ = ["LoRALinear", "merge_lora"]
