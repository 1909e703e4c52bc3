"""DyT's options (Dynamic Tuning, Zhao et al., NeurIPS 2024, arXiv 2403.11808) and the adapted ViT
they build: a token dispatcher and a parallel adapter at every dispatch site of every block."""

from __future__ import annotations

from dataclasses import dataclass, field

from timm.models.vision_transformer import VisionTransformer

from petl_lightning.methods.config import MethodConfig, check_count, check_rate
from petl_lightning.methods.dyt.adapted import DyTViT
from petl_lightning.methods.dyt.skipping import TokenSkipping


def default_adapter_scale(lr: float) -> float:
    """DyT's adapter scale when none is given (ours): the official 1.0 up to the paper's lr 1e-3,
    and ``(1e-3 / lr) ** 1.3`` above it (0.05 at lr 1e-2). Adam moves each weight by about ``lr``
    per step, and the adapter's output is a product of two trained matrices, so it moves faster
    than ``scale x lr`` once the down-projection has moved too: the exponent lies between 1 and 2,
    and 1.3 is fitted to our lr 1e-2 runs (docs/dyt.md, "Short budgets")."""
    return min(1.0, (1e-3 / lr) ** 1.3)


@dataclass
class DyTConfig(MethodConfig):
    """DyT: a token dispatcher and a parallel adapter at every dispatch site of every block.

    Attributes:
        adapter_dim: adapter bottleneck d (paper VTAB: 8; official VTAB script: 16; elsewhere 64).
        adapter_scale: adapter output scale (official: 1.0; DyT's LightningModule derives it from
            its learning rate when none is given: :func:`default_adapter_scale`).
        adapter_dropout: dropout inside the adapter (official: 0.1).
        num_experts: 1 = plain adapter; N > 1 = DyT-dagger's mixture-of-experts adapter (paper: N=4).
        skipping: the token skipping group (:class:`TokenSkipping`).
    """

    adapter_dim: int = 8
    adapter_scale: float = 1.0
    adapter_dropout: float = 0.1
    num_experts: int = 1
    skipping: TokenSkipping = field(default_factory=TokenSkipping)

    def __post_init__(self) -> None:
        check_count("adapter_dim", self.adapter_dim)
        check_count("num_experts", self.num_experts)
        check_rate("adapter_dropout", self.adapter_dropout)

    def build(self, vit: VisionTransformer) -> DyTViT:
        return DyTViT(vit, self.skipping, self.adapter_dim, self.adapter_scale, self.adapter_dropout, self.num_experts)


__all__ = ["DyTConfig", "default_adapter_scale"]
