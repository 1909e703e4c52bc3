"""DyT: its options (``skipping.py``, ``config.py``), block (``block.py``), adapted ViT (``adapted.py``),
training terms (``loss.py``), threshold calibration (``calibration.py``) and LightningModule (``model.py``)."""

from petl_lightning.methods.dyt.config import DyTConfig
from petl_lightning.methods.dyt.model import DyT
from petl_lightning.methods.dyt.skipping import TokenSkipping

__all__ = ["DyT", "DyTConfig", "TokenSkipping"]
