"""LoRA's options (Hu et al., 2021) and the adapted ViT they build: a low-rank update of the frozen
``attn.qkv`` (and ``mlp.fc1``) Linears, as HF PEFT's LoRA layers; ``merge()`` folds it into them."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

from timm.models.vision_transformer import VisionTransformer

from petl_lightning.adapted import AdaptedViT, require_timm_blocks
from petl_lightning.layers.wrapper import wrap_linears
from petl_lightning.methods.config import (
    PLACEMENT_LINEARS,
    PLACEMENTS,
    MethodConfig,
    check_choice,
    check_count,
    check_rate,
)
from petl_lightning.methods.lora.layer import LoRALinear


@dataclass
class LoRAConfig(MethodConfig):
    """LoRA.

    Attributes:
        adapter_dim: the rank ``r`` (8).
        adapter_scale: the update's scale (LoRA's ``alpha / r``; 1.0 is ``alpha = r``).
        adapter_dropout: dropout on the update's input, in training only (as HF PEFT).
        placement: ``"attn"`` (``attn.qkv``: the fused query, key and value projection) or
            ``"attn_mlp"`` (also ``mlp.fc1``).
    """

    adapter_dim: int = 8
    adapter_scale: float = 1.0
    adapter_dropout: float = 0.1
    placement: Literal["attn_mlp", "attn"] = "attn"

    def __post_init__(self) -> None:
        check_count("adapter_dim", self.adapter_dim)
        check_rate("adapter_dropout", self.adapter_dropout)
        check_choice("LoRA placement", self.placement, PLACEMENTS)

    def build(self, vit: VisionTransformer) -> AdaptedViT:
        require_timm_blocks(vit, "LoRA")
        wrap = partial(LoRALinear, adapter_dim=self.adapter_dim, scale=self.adapter_scale, dropout=self.adapter_dropout)
        wraps = {path: wrap for path in PLACEMENT_LINEARS[self.placement]}
        return AdaptedViT(vit, [wrap_linears(b, wraps) for b in vit.blocks])


__all__ = ["LoRAConfig"]
