"""petl_lightning: inference-efficient parameter-efficient transfer learning for ViTs on Lightning.

``adapt(model, config)`` applies a method to a timm ViT as a plain module; the LightningModules
(``RepAdapter``, ``ARC``, ``DyT``, ``DynAdapter``, ``LinearProbe``) train classification on top of
it. Names are imported when first used, so ``adapt()`` and the configs work without importing
Lightning, and importing the package imports no plotting library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from petl_lightning.adapt import adapt  # eager: the submodule ``adapt`` would shadow a lazy name
from petl_lightning.lazy import lazy_exports

__version__ = "0.3.0"

#: Public name -> the module that defines it (imported on first use).
_EXPORTS = {
    "AdaptedViT": "petl_lightning.adapted",
    "ViTClassifier": "petl_lightning.adapted",
    "DEFAULT_MODEL": "petl_lightning.backbone",
    "FrozenViT": "petl_lightning.backbone",
    "CheckpointError": "petl_lightning.errors",
    "ConfigError": "petl_lightning.errors",
    "DataError": "petl_lightning.errors",
    "MergeError": "petl_lightning.errors",
    "ModelNameError": "petl_lightning.errors",
    "PETLError": "petl_lightning.errors",
    "AdapterConfig": "petl_lightning.methods.adapter.config",
    "ARCConfig": "petl_lightning.methods.arc.config",
    "LoRAConfig": "petl_lightning.methods.lora.config",
    "RepAdapterConfig": "petl_lightning.methods.repadapter.config",
    "DyTConfig": "petl_lightning.methods.dyt.config",
    "TokenSkipping": "petl_lightning.methods.dyt.skipping",
    "DynAdapterConfig": "petl_lightning.methods.dyn_adapter.config",
    "CalibrationConfig": "petl_lightning.methods.dyn_adapter.groups",
    "ExitConfig": "petl_lightning.methods.dyn_adapter.groups",
    "LossSchedule": "petl_lightning.methods.dyn_adapter.groups",
    "SparsityConfig": "petl_lightning.methods.dyn_adapter.groups",
    "PETLModule": "petl_lightning.tasks.classification",
    "MultiTaskModel": "petl_lightning.tasks.multitask",
    "Segmenter": "petl_lightning.tasks.segmentation.module",
    "SegmentationModel": "petl_lightning.tasks.segmentation.model",
    "ARC": "petl_lightning.methods.arc.model",
    "DyT": "petl_lightning.methods.dyt.model",
    "DynAdapter": "petl_lightning.methods.dyn_adapter.model",
    "FullFinetune": "petl_lightning.methods.baselines",
    "LinearProbe": "petl_lightning.methods.baselines",
    "RepAdapter": "petl_lightning.methods.repadapter.model",
    "ExitCurveLogger": "petl_lightning.callbacks.curve",
    "ExitRateLogger": "petl_lightning.callbacks.stats",
    "FlopsLogger": "petl_lightning.callbacks.stats",
    "ImageThroughputMonitor": "petl_lightning.callbacks.throughput",
    "PETLCheckpoint": "petl_lightning.callbacks.checkpoint",
    "PredictionWriter": "petl_lightning.callbacks.predictions",
    "SegmentationPanel": "petl_lightning.callbacks.panel",
    "VTAB1kDataModule": "petl_lightning.data.vtab",
    "VTAB_TASKS": "petl_lightning.data.vtab",
    "Augmentation": "petl_lightning.data.transforms",
    "ImageClassificationDataModule": "petl_lightning.data.base",
    "ImageFolderDataModule": "petl_lightning.data.folder",
    "HFImageDataModule": "petl_lightning.data.hf",
    "FGVCDataModule": "petl_lightning.data.fgvc",
    "FGVC_TASKS": "petl_lightning.data.fgvc",
    "SegmentationDataModule": "petl_lightning.data.segmentation",
    "SegmentationFolderDataModule": "petl_lightning.data.segmentation",
    "ADE20KDataModule": "petl_lightning.data.ade20k",
    "build_texture_mosaics": "petl_lightning.data.mosaics",
}

__all__ = [
    "adapt",
    "ADE20KDataModule",
    "ARC",
    "Augmentation",
    "ARCConfig",
    "AdaptedViT",
    "AdapterConfig",
    "CalibrationConfig",
    "CheckpointError",
    "ConfigError",
    "DEFAULT_MODEL",
    "DataError",
    "DyT",
    "DyTConfig",
    "DynAdapter",
    "DynAdapterConfig",
    "ExitConfig",
    "ExitCurveLogger",
    "ExitRateLogger",
    "FGVCDataModule",
    "FGVC_TASKS",
    "FlopsLogger",
    "FrozenViT",
    "FullFinetune",
    "HFImageDataModule",
    "ImageClassificationDataModule",
    "ImageFolderDataModule",
    "ImageThroughputMonitor",
    "LinearProbe",
    "LoRAConfig",
    "LossSchedule",
    "MergeError",
    "ModelNameError",
    "MultiTaskModel",
    "PETLCheckpoint",
    "PETLError",
    "PETLModule",
    "PredictionWriter",
    "RepAdapter",
    "RepAdapterConfig",
    "SegmentationDataModule",
    "SegmentationFolderDataModule",
    "SegmentationModel",
    "SegmentationPanel",
    "Segmenter",
    "SparsityConfig",
    "TokenSkipping",
    "VTAB1kDataModule",
    "VTAB_TASKS",
    "ViTClassifier",
    "__version__",
    "adapt",
    "build_texture_mosaics",
    "import_all",
]


__getattr__ = lazy_exports(__name__, _EXPORTS)


def import_all() -> None:
    """Import every public class (what LightningCLI needs to resolve short ``class_path`` names)."""
    for name in _EXPORTS:
        __getattr__(name)


if TYPE_CHECKING:
    from petl_lightning.adapted import AdaptedViT, ViTClassifier
    from petl_lightning.backbone import DEFAULT_MODEL, FrozenViT
    from petl_lightning.callbacks.checkpoint import PETLCheckpoint
    from petl_lightning.callbacks.curve import ExitCurveLogger
    from petl_lightning.callbacks.panel import SegmentationPanel
    from petl_lightning.callbacks.predictions import PredictionWriter
    from petl_lightning.callbacks.stats import ExitRateLogger, FlopsLogger
    from petl_lightning.callbacks.throughput import ImageThroughputMonitor
    from petl_lightning.data.ade20k import ADE20KDataModule
    from petl_lightning.data.base import ImageClassificationDataModule
    from petl_lightning.data.fgvc import FGVC_TASKS, FGVCDataModule
    from petl_lightning.data.folder import ImageFolderDataModule
    from petl_lightning.data.hf import HFImageDataModule
    from petl_lightning.data.mosaics import build_texture_mosaics
    from petl_lightning.data.segmentation import SegmentationDataModule, SegmentationFolderDataModule
    from petl_lightning.data.transforms import Augmentation
    from petl_lightning.data.vtab import VTAB_TASKS, VTAB1kDataModule
    from petl_lightning.errors import CheckpointError, ConfigError, DataError, MergeError, ModelNameError, PETLError
    from petl_lightning.methods.adapter.config import AdapterConfig
    from petl_lightning.methods.arc.config import ARCConfig
    from petl_lightning.methods.arc.model import ARC
    from petl_lightning.methods.baselines import FullFinetune, LinearProbe
    from petl_lightning.methods.dyn_adapter.config import DynAdapterConfig
    from petl_lightning.methods.dyn_adapter.groups import CalibrationConfig, ExitConfig, LossSchedule, SparsityConfig
    from petl_lightning.methods.dyn_adapter.model import DynAdapter
    from petl_lightning.methods.dyt.config import DyTConfig
    from petl_lightning.methods.dyt.model import DyT
    from petl_lightning.methods.dyt.skipping import TokenSkipping
    from petl_lightning.methods.lora.config import LoRAConfig
    from petl_lightning.methods.repadapter.config import RepAdapterConfig
    from petl_lightning.methods.repadapter.model import RepAdapter
    from petl_lightning.tasks.classification import PETLModule
    from petl_lightning.tasks.segmentation.model import SegmentationModel
    from petl_lightning.tasks.segmentation.module import Segmenter
