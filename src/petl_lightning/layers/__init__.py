"""Small pure-PyTorch pieces (no Lightning): adapters, the token dispatcher, exit heads, and the
method blocks that wrap a frozen timm block (DyT's; RepAdapter/ARC's lives in methods/foldable.py)."""

from petl_lightning.layers.adapter import Adapter, MoEAdapter, ParallelAdapterBlock
from petl_lightning.layers.arc import ARCBasis, ARCLayer
from petl_lightning.layers.dispatcher import TokenDispatcher
from petl_lightning.layers.dyt_block import DyTBlock
from petl_lightning.layers.exits import ExitHead
from petl_lightning.layers.lora import LoRALinear
from petl_lightning.layers.repadapter import GroupedLinear, RepAdapterLayer

#: Every trainable adapter layer: each has ``.dropout`` and ``.flops(n_tokens)``.
ADAPTER_LAYERS = (Adapter, MoEAdapter, ARCLayer, LoRALinear, RepAdapterLayer)

__all__ = [
    "ADAPTER_LAYERS",
    "ARCBasis",
    "ARCLayer",
    "Adapter",
    "DyTBlock",
    "ExitHead",
    "GroupedLinear",
    "LoRALinear",
    "MoEAdapter",
    "ParallelAdapterBlock",
    "RepAdapterLayer",
    "TokenDispatcher",
]
