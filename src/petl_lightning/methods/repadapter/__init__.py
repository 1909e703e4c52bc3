"""RepAdapter: its config (``config.py``), its layer (``layer.py``) and its LightningModule (``model.py``)."""

from typing import TYPE_CHECKING

from petl_lightning.lazy import lazy_exports
from petl_lightning.methods.repadapter.config import REPADAPTER_SCALES, RepAdapterConfig

# the LightningModule imports Lightning: only when it is first used
__getattr__ = lazy_exports(__name__, {"RepAdapter": "petl_lightning.methods.repadapter.model"})

if TYPE_CHECKING:
    from petl_lightning.methods.repadapter.model import RepAdapter

__all__ = ["REPADAPTER_SCALES", "RepAdapter", "RepAdapterConfig"]
