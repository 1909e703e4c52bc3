"""Dyn-Adapter: its option groups (``groups.py``) and config (``config.py``), its early-exit model
(``adapted.py``), the threshold maths (``thresholds.py``), its stage programs (``deploy.py``) and its
LightningModule (``model.py``)."""

from typing import TYPE_CHECKING

from petl_lightning.lazy import lazy_exports
from petl_lightning.methods.dyn_adapter.config import DynAdapterConfig
from petl_lightning.methods.dyn_adapter.groups import CalibrationConfig, ExitConfig, LossSchedule, SparsityConfig

# the LightningModule imports Lightning: only when it is first used
__getattr__ = lazy_exports(__name__, {"DynAdapter": "petl_lightning.methods.dyn_adapter.model"})

if TYPE_CHECKING:
    from petl_lightning.methods.dyn_adapter.model import DynAdapter

__all__ = ["CalibrationConfig", "DynAdapter", "DynAdapterConfig", "ExitConfig", "LossSchedule", "SparsityConfig"]
