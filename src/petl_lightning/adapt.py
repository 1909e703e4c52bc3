"""``adapt(model, config)``: a PETL method applied to a timm ViT, as HF PEFT's ``get_peft_model``.

    import timm
    from petl_lightning import RepAdapterConfig, adapt

    vit = timm.create_model("vit_base_patch16_224.augreg_in21k", pretrained=True, num_classes=0)
    adapted = adapt(vit, RepAdapterConfig(adapter_dim=8))   # vit's weights are shared and frozen
    features = adapted(images)                               # (B, 768); adapted.forward_features: tokens
    plain = adapted.merge()                                  # a timm ViT with the adapters folded in

The config's type picks the method. The result is a plain ``nn.Module`` (no Lightning): an
:class:`~petl_lightning.adapted.AdaptedViT`, or for ``DynAdapterConfig`` a classifier with early exits.
"""

from __future__ import annotations

from torch import nn

from petl_lightning.backbone import frozen_timm_vit
from petl_lightning.errors import ConfigError
from petl_lightning.methods.config import MethodConfig


def adapt(model: nn.Module, config: MethodConfig) -> nn.Module:
    """``model`` (a timm ``VisionTransformer`` or a :class:`~petl_lightning.backbone.FrozenViT`) adapted
    by ``config`` (``RepAdapterConfig``, ``ARCConfig``, ``LoRAConfig``, ``AdapterConfig``,
    ``DyTConfig`` or ``DynAdapterConfig``). ``model``'s parameters are frozen and shared, and its
    modules are not changed; the new layers are on its device."""
    if not isinstance(config, MethodConfig):
        raise ConfigError(
            f"adapt() takes a method's config (RepAdapterConfig, ARCConfig, LoRAConfig, AdapterConfig, DyTConfig or "
            f"DynAdapterConfig), got {type(config).__name__}."
        )
    vit = frozen_timm_vit(model)
    device = next(vit.parameters()).device
    return config.build(vit).to(device)


__all__ = ["adapt"]
