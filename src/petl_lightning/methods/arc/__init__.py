"""ARC: its config (``config.py``), its layers (``layer.py``) and its LightningModule (``model.py``)."""

from typing import TYPE_CHECKING

from petl_lightning.lazy import lazy_exports
from petl_lightning.methods.arc.config import ARCConfig

# the LightningModule imports Lightning: only when it is first used
__getattr__ = lazy_exports(__name__, {"ARC": "petl_lightning.methods.arc.model"})

if TYPE_CHECKING:
    from petl_lightning.methods.arc.model import ARC

__all__ = ["ARC", "ARCConfig"]
