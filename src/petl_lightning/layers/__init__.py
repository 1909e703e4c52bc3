"""Small pure-PyTorch adapter layers (one module per method family)."""
from petl_lightning.layers.arc import ARCBasis, ARCLayer  # noqa: F401
from petl_lightning.layers.repadapter import GroupedLinear, RepAdapterLayer  # noqa: F401
from petl_lightning.layers.dyt import DyTAdapter, MoEAdapter, TokenDispatcher  # noqa: F401
from petl_lightning.layers.adapter import Adapter  # noqa: F401
from petl_lightning.layers.lora import LoRA  # noqa: F401
from petl_lightning.layers.exits import ExitHead  # noqa: F401
