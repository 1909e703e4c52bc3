"""ARC's LightningModule: image classification over ``ARCConfig``'s adapted ViT.

Unlike the released VTAB script (whose freeze filter leaves every ARC tensor frozen and trains only
the head), every ARC tensor here is trained; ``tests/test_arc.py`` checks that each one receives a
gradient and changes. Export the merged model in one line::

    ARC.load_from_checkpoint("last.ckpt").export("merged.safetensors")
"""

from __future__ import annotations

from typing import Any, Literal

from petl_lightning.adapted import ViTClassifier
from petl_lightning.backbone import FrozenViT
from petl_lightning.methods.arc.config import ARCConfig
from petl_lightning.tasks.classification import PETLModule


class ARC(PETLModule):
    """ARC on a frozen ViT: shared bases, per-layer coefficients and biases, and the head are trained.

    Args:
        adapter_dim / adapter_dropout / placement / coeff_init: :class:`ARCConfig`'s.
        head_init: ``"zeros"`` (the official ``zero_head``) or ``"default"``.
        **kwargs: :class:`PETLModule` arguments.

    With a zero head and zero attention coefficients, the adapters get no gradient on the first
    step and ``U_attn`` none on the second: every tensor moves from the third step on.
    """

    STRUCTURAL_HPARAMS = (*PETLModule.STRUCTURAL_HPARAMS, "adapter_dim", "placement")

    def __init__(
        self,
        adapter_dim: int = 50,
        adapter_dropout: float = 0.1,
        placement: Literal["attn_mlp", "attn"] = "attn_mlp",
        coeff_init: Literal["official", "zeros"] = "official",
        head_init: Literal["default", "zeros"] = "zeros",
        **kwargs: Any,
    ) -> None:
        super().__init__(head_init=head_init, **kwargs)

    def build_model(self, frozen: FrozenViT) -> ViTClassifier:
        hp = self.hparams
        config = ARCConfig(hp.adapter_dim, hp.adapter_dropout, hp.placement, hp.coeff_init)
        return ViTClassifier(config.build(frozen.vit), self.num_classes, hp.head_init)


__all__ = ["ARC"]
