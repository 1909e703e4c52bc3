"""RepAdapter: its config (``config.py``), its layer (``layer.py``) and its LightningModule (``model.py``)."""

from petl_lightning.methods.repadapter.config import REPADAPTER_SCALES, RepAdapterConfig
from petl_lightning.methods.repadapter.model import RepAdapter

__all__ = ["REPADAPTER_SCALES", "RepAdapter", "RepAdapterConfig"]
