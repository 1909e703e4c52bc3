"""petl_lightning: inference-efficient parameter-efficient transfer learning for ViTs on Lightning.

``adapt(model, config)`` applies a method to a timm ViT as a plain module; the LightningModules
(``RepAdapter``, ``ARC``, ``DyT``, ``DynAdapter``, ``LinearProbe``) train classification on top of
it. Every class a recipe may name is imported here, so short ``class_path`` names work too.
Importing the package imports no plotting library (charts load :mod:`petl_lightning.plotting` when
a callback first draws).
"""

from petl_lightning.adapt import adapt
from petl_lightning.adapted import AdaptedViT, ViTClassifier
from petl_lightning.backbone import DEFAULT_MODEL, FrozenViT
from petl_lightning.callbacks import (
    ExitCurveLogger,
    ExitRateLogger,
    FlopsLogger,
    ImageThroughputMonitor,
    PETLCheckpoint,
    PredictionWriter,
)
from petl_lightning.data.vtab import VTAB_TASKS, VTAB1kDataModule
from petl_lightning.errors import CheckpointError, ConfigError, DataError, MergeError, ModelNameError, PETLError
from petl_lightning.methods.adapter import AdapterConfig
from petl_lightning.methods.arc import ARC, ARCConfig
from petl_lightning.methods.baselines import FullFinetune, LinearProbe
from petl_lightning.methods.dyn_adapter import (
    CalibrationConfig,
    DynAdapter,
    DynAdapterConfig,
    ExitConfig,
    LossSchedule,
    SparsityConfig,
)
from petl_lightning.methods.dyt import DyT, DyTConfig, TokenSkipping
from petl_lightning.methods.lora import LoRAConfig
from petl_lightning.methods.repadapter import RepAdapter, RepAdapterConfig
from petl_lightning.tasks.classification import PETLModule

__version__ = "0.3.0"

__all__ = [
    "ARC",
    "ARCConfig",
    "DEFAULT_MODEL",
    "AdaptedViT",
    "AdapterConfig",
    "CalibrationConfig",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DyT",
    "DyTConfig",
    "DynAdapter",
    "DynAdapterConfig",
    "ExitConfig",
    "ExitCurveLogger",
    "ExitRateLogger",
    "FlopsLogger",
    "FrozenViT",
    "FullFinetune",
    "ImageThroughputMonitor",
    "LinearProbe",
    "LoRAConfig",
    "LossSchedule",
    "MergeError",
    "ModelNameError",
    "PETLCheckpoint",
    "PETLError",
    "PETLModule",
    "PredictionWriter",
    "RepAdapter",
    "RepAdapterConfig",
    "SparsityConfig",
    "TokenSkipping",
    "VTAB1kDataModule",
    "VTAB_TASKS",
    "ViTClassifier",
    "adapt",
    "__version__",
]
