"""RepAdapter's LightningModule: image classification over ``RepAdapterConfig``'s adapted ViT.

The only per-task hyper-parameter of the official VTAB-1K recipe is the scale ``s``;
:data:`~petl_lightning.methods.repadapter.config.REPADAPTER_SCALES` holds the official values, which
:meth:`RepAdapter.task_overrides` gives the CLI and the VTAB runner for ``adapter_scale=None``.
Export the merged model (a plain timm ``VisionTransformer``) in one line::

    RepAdapter.load_from_checkpoint("last.ckpt").export("merged.safetensors")  # see docs/deploy.md
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from lightning.pytorch.utilities import rank_zero_warn

from petl_lightning.adapted import ViTClassifier
from petl_lightning.backbone import FrozenViT
from petl_lightning.methods.repadapter.config import REPADAPTER_SCALES, RepAdapterConfig
from petl_lightning.methods.repadapter.layer import RepAdapterLinear, set_adapter_scale
from petl_lightning.tasks.classification import PETLModule


class RepAdapter(PETLModule):
    """RepAdapter on a frozen ViT: adapters + head trained, everything else frozen.

    Args:
        adapter_dim / adapter_groups / placement / adapter_dropout: :class:`RepAdapterConfig`'s.
        adapter_scale: the fixed branch scale ``s``. ``None``: the official value for the data's
            VTAB-1K task (:meth:`task_overrides`; the CLI and the VTAB runner fill it in before the
            model is built, so saved hyper-parameters show the scale that was trained; a module
            built in Python takes it from the DataModule's ``task`` when ``fit`` starts, 1.0 for a
            task outside the table).
        **kwargs: :class:`PETLModule` arguments (the official recipe uses ``drop_path_rate=0.1``).
    """

    STRUCTURAL_HPARAMS = (*PETLModule.STRUCTURAL_HPARAMS, "adapter_dim", "adapter_groups", "placement")

    def __init__(
        self,
        adapter_dim: int = 8,
        adapter_groups: int = 2,
        adapter_scale: float | None = None,
        placement: Literal["attn_mlp", "attn"] = "attn_mlp",
        adapter_dropout: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)

    def build_model(self, frozen: FrozenViT) -> ViTClassifier:
        hp = self.hparams
        scale = 1.0 if hp.adapter_scale is None else float(hp.adapter_scale)
        config = RepAdapterConfig(hp.adapter_dim, hp.adapter_groups, scale, hp.placement, hp.adapter_dropout)
        return ViTClassifier(config.build(frozen.vit), self.num_classes, hp.head_init)

    @classmethod
    def task_overrides(cls, task: str, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """The official scale of a VTAB-1K task for the configured placement (``{}`` outside the table)."""
        table = REPADAPTER_SCALES.get(hparams.get("placement") or "attn_mlp", REPADAPTER_SCALES["attn_mlp"])
        return {"adapter_scale": float(table[task])} if task in table else {}

    def adapters(self) -> list[RepAdapterLinear]:
        """Every RepAdapter layer, block by block (attention first)."""
        return [m for m in self.vit.blocks.modules() if isinstance(m, RepAdapterLinear)]

    @property
    def scale(self) -> float:
        """The scale ``s`` the adapters use now."""
        return float(self.adapters()[0].scale)

    def set_scale(self, scale: float) -> None:
        """Set ``s`` on every adapter (and in the hyper-parameters that checkpoints and loggers show)."""
        set_adapter_scale(self.vit, scale)
        self.hparams["adapter_scale"] = float(scale)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage != "fit" or self.hparams.adapter_scale is not None:
            return
        task = getattr(getattr(self.trainer, "datamodule", None), "task", None)
        scale = self.task_overrides(task, self.hparams).get("adapter_scale") if task else None
        if scale is None:
            rank_zero_warn(
                f"RepAdapter: no official scale for task {task!r}; using adapter_scale 1.0 "
                f"(set --model.init_args.adapter_scale to choose)."
            )
        self.set_scale(1.0 if scale is None else scale)


__all__ = ["RepAdapter"]
