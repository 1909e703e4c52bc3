"""ARC: its config (``config.py``), its layers (``layer.py``) and its LightningModule (``model.py``)."""

from petl_lightning.methods.arc.config import ARCConfig
from petl_lightning.methods.arc.model import ARC

__all__ = ["ARC", "ARCConfig"]
