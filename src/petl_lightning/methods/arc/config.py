"""ARC's options (Dong et al., "Efficient Adaptation of Large Vision Transformer via Adapter
Re-Composing", NeurIPS 2023, arXiv 2310.06234) and the adapted ViT they build: two bases ``U_attn``
and ``U_mlp`` (``dim x r``) shared by every block, per-block coefficients and biases on the input of
``attn.qkv`` and ``mlp.fc1``, folded into those Linears by ``merge()``."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

from timm.models.vision_transformer import VisionTransformer

from petl_lightning.adapted import AdaptedViT, require_timm_blocks
from petl_lightning.layers.wrapper import wrap_linears
from petl_lightning.methods.arc.layer import ARCBasis, ARCLinear
from petl_lightning.methods.config import (
    PLACEMENT_LINEARS,
    PLACEMENTS,
    MethodConfig,
    check_choice,
    check_count,
    check_rate,
)


@dataclass
class ARCConfig(MethodConfig):
    """ARC.

    Attributes:
        adapter_dim: rank ``r`` of the shared bases (50).
        adapter_dropout: dropout on the r-dim bottleneck, in training only (the official VTAB script's 0.1).
        placement: ``"attn_mlp"`` (attention and MLP: the paper's ARC, ``arc`` in its code) or
            ``"attn"`` (attention only: ``arc_att``).
        coeff_init: ``"official"``: attention coefficients zero (identity at start), MLP coefficients
            xavier-uniform (the MLP adapter starts as a random symmetric map, as the official code);
            ``"zeros"``: all coefficients zero, so the model starts as the frozen backbone.
    """

    adapter_dim: int = 50
    adapter_dropout: float = 0.1
    placement: Literal["attn_mlp", "attn"] = "attn_mlp"
    coeff_init: Literal["official", "zeros"] = "official"

    def __post_init__(self) -> None:
        check_count("adapter_dim", self.adapter_dim)
        check_rate("adapter_dropout", self.adapter_dropout)
        check_choice("ARC placement", self.placement, PLACEMENTS)
        check_choice("coeff_init", self.coeff_init, ("official", "zeros"))

    def build(self, vit: VisionTransformer) -> AdaptedViT:
        require_timm_blocks(vit, "ARC")
        dim = int(vit.embed_dim)
        paths = PLACEMENT_LINEARS[self.placement]
        bases = {f"basis_{path.split('.')[0]}": ARCBasis(dim, self.adapter_dim) for path in paths}
        xavier = self.coeff_init == "official"
        wraps = {
            path: partial(
                ARCLinear,
                basis=bases[f"basis_{path.split('.')[0]}"],
                dropout=self.adapter_dropout,
                xavier_coeff=xavier and path == "mlp.fc1",
            )
            for path in paths
        }
        return AdaptedViT(vit, [wrap_linears(b, wraps) for b in vit.blocks], shared=bases)


__all__ = ["ARCConfig"]
