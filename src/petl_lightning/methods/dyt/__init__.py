"""DyT: its options (``skipping.py``, ``config.py``), block (``block.py``), adapted ViT (``adapted.py``),
training terms (``loss.py``), threshold calibration (``calibration.py``) and LightningModule (``model.py``)."""

from typing import TYPE_CHECKING

from petl_lightning.lazy import lazy_exports
from petl_lightning.methods.dyt.config import DyTConfig
from petl_lightning.methods.dyt.skipping import TokenSkipping

# the LightningModule imports Lightning: only when it is first used
__getattr__ = lazy_exports(__name__, {"DyT": "petl_lightning.methods.dyt.model"})

if TYPE_CHECKING:
    from petl_lightning.methods.dyt.model import DyT

__all__ = ["DyT", "DyTConfig", "TokenSkipping"]
