"""Dyn-Adapter's options (Zhang et al., ECCV 2024, arXiv 2407.14302) and the model they build:
early exits (:class:`~petl_lightning.methods.dyn_adapter.adapted.EarlyExitViT`) over a PETL base,
which any other method's config builds (RepAdapter by default, the paper's strongest setting)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

from timm.models.vision_transformer import VisionTransformer

from petl_lightning.adapted import AdaptedViT
from petl_lightning.errors import ConfigError
from petl_lightning.layers.wrapper import adapter_layers
from petl_lightning.methods.config import MethodConfig, check_count
from petl_lightning.methods.dyn_adapter.adapted import EarlyExitViT
from petl_lightning.methods.dyn_adapter.groups import CalibrationConfig, ExitConfig, LossSchedule, SparsityConfig
from petl_lightning.methods.repadapter.config import RepAdapterConfig


@dataclass
class DynAdapterConfig(MethodConfig):
    """Dyn-Adapter.

    Attributes:
        num_classes: classes of every exit.
        base: the PETL base's config (``RepAdapterConfig``, ``ARCConfig``, ``LoRAConfig``,
            ``AdapterConfig`` or ``DyTConfig``); its adapters' dropout is set per depth by
            ``sparsity.adapter_dropout``.
        exits: the early exits (:class:`ExitConfig`).
        loss: the exits' loss weights over training (:class:`LossSchedule`; training only).
        sparsity: dropout by depth and the gradient mask (:class:`SparsityConfig`).
        calibration: the exit rule, thresholds and FLOPs budget (:class:`CalibrationConfig`).
    """

    num_classes: int = 100
    base: MethodConfig = field(default_factory=RepAdapterConfig)
    exits: ExitConfig = field(default_factory=ExitConfig)
    loss: LossSchedule = field(default_factory=LossSchedule)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def __post_init__(self) -> None:
        check_count("num_classes", self.num_classes)
        if isinstance(self.base, DynAdapterConfig):
            raise ConfigError(
                "Dyn-Adapter's base is another method's config (RepAdapterConfig, ...), not a Dyn-Adapter."
            )

    def build(self, vit: VisionTransformer, exit_model: type[EarlyExitViT] = EarlyExitViT) -> EarlyExitViT:
        """The early-exit model (``exit_model``, a subclass for another exit rule) over the base."""
        base = cast(AdaptedViT, self.base.build(vit))
        if getattr(vit, "attn_pool", None) is not None or vit.global_pool != "token":
            raise ConfigError(
                f"Dyn-Adapter reads the CLS token at every exit; this model pools with {vit.global_pool!r}. Use a "
                f"ViT with a class token (global_pool='token')."
            )
        for block, rate in zip(base.blocks, self.sparsity.dropout_per_block(len(base.blocks))):
            for layer in adapter_layers(block):
                layer.dropout.p = rate
        cal = self.calibration
        return exit_model(base, self.num_classes, self.exits, cal.confidence, cal.thresholds)


__all__ = ["DynAdapterConfig"]
