"""petl_lightning: inference-efficient parameter-efficient transfer learning for ViTs on Lightning.

Every class a recipe may name is imported here, so short ``class_path`` names work too.
"""

from petl_lightning.backbone import DEFAULT_MODEL, FrozenViT
from petl_lightning.callbacks import ExitRateLogger, FlopsLogger, ImageThroughputMonitor
from petl_lightning.data.vtab import VTAB_TASKS, VTAB1kDataModule
from petl_lightning.errors import CheckpointError, DataError, ModelNameError, PETLError
from petl_lightning.methods.base import PETLModule
from petl_lightning.methods.arc import ARC
from petl_lightning.methods.baselines import FullFinetune, LinearProbe
from petl_lightning.methods.dyn_adapter import DynAdapter
from petl_lightning.methods.dyt import DyT
from petl_lightning.methods.repadapter import RepAdapter

__version__ = "0.1.0"

__all__ = [
    "ARC", "DEFAULT_MODEL", "CheckpointError", "DataError", "DyT", "DynAdapter", "ExitRateLogger",
    "FlopsLogger", "FrozenViT", "FullFinetune", "ImageThroughputMonitor", "LinearProbe", "ModelNameError",
    "PETLError", "PETLModule", "RepAdapter", "VTAB1kDataModule", "VTAB_TASKS",
]
