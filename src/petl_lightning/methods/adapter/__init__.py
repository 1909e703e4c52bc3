"""The bottleneck adapter parallel to the MLP: its config (``config.py``) and block (``block.py``)."""

from petl_lightning.methods.adapter.config import AdapterConfig

__all__ = ["AdapterConfig"]
