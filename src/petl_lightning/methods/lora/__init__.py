"""LoRA: its config (``config.py``) and layer (``layer.py``)."""

from petl_lightning.methods.lora.config import LoRAConfig

__all__ = ["LoRAConfig"]
