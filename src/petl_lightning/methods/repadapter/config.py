"""RepAdapter's options (Luo et al., "Towards Efficient Visual Adaption via Structural Re-parameterization",
arXiv 2302.08106) and the adapted ViT they build: a linear adapter on the input of ``attn.qkv`` and
``mlp.fc1`` of every block, folded into those Linears by ``merge()`` so inference is the plain backbone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from timm.models.vision_transformer import VisionTransformer
from torch import nn

from petl_lightning.adapted import AdaptedViT, require_timm_blocks
from petl_lightning.errors import ConfigError
from petl_lightning.layers.wrapper import wrap_linears
from petl_lightning.methods.config import (
    PLACEMENT_LINEARS,
    PLACEMENTS,
    MethodConfig,
    check_choice,
    check_count,
    check_rate,
)
from petl_lightning.methods.repadapter.layer import RepAdapterLinear

# Official per-task scale s (configs/{repblock,repattn}/<task>.yaml of luogen1996/RepAdapter), by placement.
REPADAPTER_SCALES: dict[str, dict[str, float]] = {
    "attn_mlp": {
        "cifar": 0.1,
        "caltech101": 5,
        "dtd": 1,
        "oxford_flowers102": 0.5,
        "oxford_iiit_pet": 0.1,
        "svhn": 10,
        "sun397": 0.1,
        "patch_camelyon": 1,
        "eurosat": 1,
        "resisc45": 5,
        "diabetic_retinopathy": 0.1,
        "clevr_count": 0.5,
        "clevr_dist": 0.1,
        "dmlab": 5,
        "kitti": 5,
        "dsprites_loc": 5,
        "dsprites_ori": 0.1,
        "smallnorb_azi": 10,
        "smallnorb_ele": 1,
    },
    "attn": {
        "cifar": 0.1,
        "caltech101": 10,
        "dtd": 0.1,
        "oxford_flowers102": 0.5,
        "oxford_iiit_pet": 0.5,
        "svhn": 10,
        "sun397": 0.1,
        "patch_camelyon": 0.5,
        "eurosat": 5,
        "resisc45": 0.1,
        "diabetic_retinopathy": 0.5,
        "clevr_count": 1,
        "clevr_dist": 0.1,
        "dmlab": 5,
        "kitti": 1,
        "dsprites_loc": 10,
        "dsprites_ori": 5,
        "smallnorb_azi": 10,
        "smallnorb_ele": 1,
    },
}


@dataclass
class RepAdapterConfig(MethodConfig):
    """RepAdapter.

    Attributes:
        adapter_dim: bottleneck width (the paper's 8).
        adapter_groups: groups of the up-projection (the paper's 2); the width and ``adapter_dim``
            must divide by it.
        adapter_scale: the fixed scale ``s`` of the branch (a per-task hyper-parameter of the
            official recipe: :data:`REPADAPTER_SCALES`).
        placement: ``"attn_mlp"`` (before ``attn.qkv`` and ``mlp.fc1``: the paper's RepAdapter,
            ``repblock`` in its code) or ``"attn"`` (``repattn``).
        adapter_dropout: dropout on the bottleneck, in training only (0.1).
    """

    adapter_dim: int = 8
    adapter_groups: int = 2
    adapter_scale: float = 1.0
    placement: Literal["attn_mlp", "attn"] = "attn_mlp"
    adapter_dropout: float = 0.1

    def __post_init__(self) -> None:
        check_count("adapter_dim", self.adapter_dim)
        check_count("adapter_groups", self.adapter_groups)
        check_choice("RepAdapter placement", self.placement, PLACEMENTS)
        check_rate("adapter_dropout", self.adapter_dropout)
        if self.adapter_dim % self.adapter_groups:
            raise ConfigError(
                f"adapter_dim ({self.adapter_dim}) must divide by adapter_groups ({self.adapter_groups}); "
                f"pick adapter_dim and adapter_groups that divide the width."
            )

    def build(self, vit: VisionTransformer) -> AdaptedViT:
        require_timm_blocks(vit, "RepAdapter")

        def wrap(linear: nn.Linear) -> RepAdapterLinear:
            return RepAdapterLinear(
                linear, self.adapter_dim, self.adapter_groups, self.adapter_scale, self.adapter_dropout
            )

        wraps = {path: wrap for path in PLACEMENT_LINEARS[self.placement]}
        return AdaptedViT(vit, [wrap_linears(b, wraps) for b in vit.blocks])


__all__ = ["REPADAPTER_SCALES", "RepAdapterConfig"]
