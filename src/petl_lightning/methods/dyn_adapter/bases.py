"""Dyn-Adapter's PETL bases: the block each frozen timm block becomes, and how it folds.

- ``repadapter`` (default, the paper's strongest setting) and ``arc``: affine adapters before
  ``attn.qkv`` and ``mlp.fc1`` (:class:`~petl_lightning.methods.foldable.FoldableBlock`); fold.
- ``lora``: ``attn.qkv`` wrapped by :class:`~petl_lightning.layers.lora.LoRALinear`, so the block is
  timm's own; folds.
- ``adapter``: a bottleneck adapter parallel to the MLP
  (:class:`~petl_lightning.layers.adapter.ParallelAdapterBlock`); non-linear, does not fold.
- ``dyt``: DyT's block (:class:`~petl_lightning.layers.dyt_block.DyTBlock`: a token dispatcher and
  a parallel adapter per skippable sub-block), so unimportant tokens also skip work inside the
  blocks an image runs; decides per token, does not fold.
"""

from __future__ import annotations

from typing import Any, Literal, cast

from timm.models.vision_transformer import Block
from torch import nn

from petl_lightning.errors import ConfigError
from petl_lightning.layers.adapter import Adapter, ParallelAdapterBlock
from petl_lightning.layers.arc import ARCBasis, ARCLayer
from petl_lightning.layers.dyt_block import DyTBlock
from petl_lightning.layers.lora import LoRALinear
from petl_lightning.layers.repadapter import RepAdapterLayer
from petl_lightning.merge import MergeError
from petl_lightning.methods.dyn_adapter.config import TokenSkipping
from petl_lightning.methods.foldable import FoldableBlock

Base = Literal["repadapter", "arc", "lora", "adapter", "dyt"]
BASES = ("repadapter", "arc", "lora", "adapter", "dyt")
DEFAULT_ADAPTER_DIM = {"repadapter": 8, "arc": 50, "lora": 8, "adapter": 8, "dyt": 8}


def build_blocks(
    base: str,
    timm_blocks: nn.Sequential,
    owner: nn.Module,
    adapter_dim: int,
    adapter_groups: int,
    adapter_scale: float,
    dropout: list[float],
    skipping: TokenSkipping | None = None,
    num_prefix_tokens: int = 1,
) -> nn.ModuleList:
    """One method block per frozen timm block, with ``dropout[i]`` inside block ``i``'s adapters.
    ARC's shared bases are registered on ``owner`` (the module that holds every block); ``skipping``
    and ``num_prefix_tokens`` (never dispatched) configure the ``dyt`` base."""
    if base not in BASES:
        raise ConfigError(f"Unknown base {base!r}; choose one of {', '.join(BASES)}.")
    blocks: list[nn.Module] = []
    for module, p in zip(timm_blocks, dropout):
        blk = cast(Block, module)  # a timm Block (or a module with its sub-modules)
        dim = int(cast(nn.LayerNorm, blk.norm1).normalized_shape[0])
        if base == "repadapter":
            blocks.append(
                FoldableBlock(
                    blk,
                    RepAdapterLayer(dim, adapter_dim, adapter_groups, adapter_scale, p),
                    RepAdapterLayer(dim, adapter_dim, adapter_groups, adapter_scale, p),
                )
            )
        elif base == "arc":
            if not hasattr(owner, "basis_attn"):
                owner.basis_attn, owner.basis_mlp = ARCBasis(dim, adapter_dim), ARCBasis(dim, adapter_dim)
            bases = cast(ARCBasis, owner.basis_attn), cast(ARCBasis, owner.basis_mlp)
            blocks.append(
                FoldableBlock(
                    blk,
                    ARCLayer(bases[0], dim, adapter_dim, p, coeff_init="zeros"),
                    ARCLayer(bases[1], dim, adapter_dim, p, coeff_init="zeros"),
                )
            )
        elif base == "lora":
            if not isinstance(getattr(blk.attn, "qkv", None), nn.Linear):
                raise ConfigError(
                    f"The lora base wraps attn.qkv, an nn.Linear; this model's is "
                    f"{type(getattr(blk.attn, 'qkv', None)).__name__}."
                )
            blk.attn.qkv = LoRALinear(cast(nn.Linear, blk.attn.qkv), adapter_dim, adapter_scale, p)
            blocks.append(blk)
        elif base == "dyt":
            sk = skipping or TokenSkipping()
            blocks.append(
                DyTBlock(
                    blk,
                    sk.placement,
                    num_prefix_tokens,
                    adapter_dim,
                    1,
                    adapter_scale,
                    p,
                    sk.tau,
                    sk.threshold,
                    sk.dispatcher_init_std,
                )
            )
        else:
            blocks.append(ParallelAdapterBlock(blk, Adapter(dim, adapter_dim, adapter_scale, p)))
    return nn.ModuleList(blocks)


def fold_block(base: str, block: nn.Module, target: nn.Module) -> None:
    """Fold ``block``'s affine adapters into ``target``, a plain timm block (LoRA is folded with the
    backbone by :func:`~petl_lightning.merge.merge_into_vit`)."""
    if base in ("adapter", "dyt"):
        why = "is non-linear (ReLU)" if base == "adapter" else "decides per token at inference"
        raise MergeError(
            f"The {base} base {why} and cannot be merged into the backbone; only the repadapter, arc "
            f"and lora bases merge."
        )
    if isinstance(block, FoldableBlock):
        block.fold_into(target)


def adapter_layers(block: nn.Module) -> list[Any]:
    """The trainable adapter layers of a method block (each has ``.dropout`` and ``.flops(n)``)."""
    return [m for m in block.modules() if isinstance(m, (RepAdapterLayer, ARCLayer, LoRALinear, Adapter))]


__all__ = ["BASES", "DEFAULT_ADAPTER_DIM", "adapter_layers", "build_blocks", "fold_block"]
