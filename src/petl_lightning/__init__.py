"""petl_lightning: inference-efficient parameter-efficient transfer learning for ViTs on Lightning.

Every class a recipe may name is imported here, so short ``class_path`` names work too. Importing
the package imports no plotting library (charts are drawn by :mod:`petl_lightning.plotting`, loaded
when a callback first draws).
"""

from petl_lightning.backbone import DEFAULT_MODEL, FrozenViT
from petl_lightning.callbacks import (
    ExitCalibration,
    ExitRateLogger,
    FlopsLogger,
    ImageThroughputMonitor,
    PETLCheckpoint,
    PredictionWriter,
)
from petl_lightning.data.vtab import VTAB_TASKS, VTAB1kDataModule
from petl_lightning.errors import CheckpointError, ConfigError, DataError, ModelNameError, PETLError
from petl_lightning.methods.arc import ARC
from petl_lightning.methods.base import PETLModule
from petl_lightning.methods.baselines import FullFinetune, LinearProbe
from petl_lightning.methods.dyn_adapter import CalibrationConfig, DynAdapter, ExitConfig, LossSchedule, SparsityConfig
from petl_lightning.methods.dyt import DyT
from petl_lightning.methods.repadapter import RepAdapter

__version__ = "0.2.0"

__all__ = [
    "ARC",
    "DEFAULT_MODEL",
    "CalibrationConfig",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DyT",
    "DynAdapter",
    "ExitCalibration",
    "ExitConfig",
    "ExitRateLogger",
    "FlopsLogger",
    "FrozenViT",
    "FullFinetune",
    "ImageThroughputMonitor",
    "LinearProbe",
    "LossSchedule",
    "ModelNameError",
    "PETLCheckpoint",
    "PETLError",
    "PETLModule",
    "PredictionWriter",
    "RepAdapter",
    "SparsityConfig",
    "VTAB1kDataModule",
    "VTAB_TASKS",
]
