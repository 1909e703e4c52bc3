"""Shared pure-PyTorch pieces (no Lightning): the adapter-layer base and Linear wrappers, the
bottleneck adapter, the token dispatcher and the exit heads. Each method's own layers live in its
folder under ``methods/``."""

from petl_lightning.layers.adapter import Adapter, MoEAdapter
from petl_lightning.layers.dispatcher import TokenDispatcher
from petl_lightning.layers.exits import ExitHead
from petl_lightning.layers.wrapper import AdaptedLinear, AdapterLayer, adapter_layers, merge_adapter_layers

__all__ = [
    "AdaptedLinear",
    "Adapter",
    "AdapterLayer",
    "ExitHead",
    "MoEAdapter",
    "TokenDispatcher",
    "adapter_layers",
    "merge_adapter_layers",
]
