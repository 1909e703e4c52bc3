"""Dyn-Adapter: the model (``model.py``), its PETL bases (``bases.py``), the threshold maths
(``thresholds.py``) and the option groups (``config.py``)."""

from petl_lightning.methods.dyn_adapter.config import (
    CalibrationConfig,
    ExitConfig,
    LossSchedule,
    SparsityConfig,
    TokenSkipping,
)
from petl_lightning.methods.dyn_adapter.model import DynAdapter

__all__ = ["CalibrationConfig", "DynAdapter", "ExitConfig", "LossSchedule", "SparsityConfig", "TokenSkipping"]
