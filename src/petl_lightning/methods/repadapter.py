"""RepAdapter (Luo et al., "Towards Efficient Visual Adaption via Structural Re-parameterization",
arXiv 2302.08106): a linear adapter before ``attn.qkv`` and ``mlp.fc1`` of every block, trained,
then folded into those Linears so inference is the plain backbone.

Placements: ``repblock`` (attention and MLP branches, the paper's RepAdapter) and ``repattn``
(attention only). The only per-task hyper-parameter of the official VTAB-1K recipe is the scale
``s``; :data:`REPADAPTER_SCALES` holds the official values, picked by ``scale_task`` (or, when neither
``scale`` nor ``scale_task`` is given, by the task of the DataModule at ``fit``).

Export the merged model (a plain timm ``VisionTransformer``) in one line::

    RepAdapter.load_from_checkpoint("last.ckpt").export("merged.safetensors")
    # timm.create_model(model_name, num_classes=C, img_size=S, checkpoint_path="merged.safetensors")
"""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from petl_lightning.errors import PETLError
from petl_lightning.layers.repadapter import RepAdapterLayer
from petl_lightning.merge import AffineAdapterBlock
from petl_lightning.methods.foldable import FoldableAdapterModule

# Official per-task scale s (configs/{repblock,repattn}/<task>.yaml of luogen1996/RepAdapter).
REPADAPTER_SCALES: dict[str, dict[str, float]] = {
    "repblock": {
        "cifar": 0.1, "caltech101": 5, "dtd": 1, "oxford_flowers102": 0.5, "oxford_iiit_pet": 0.1,
        "svhn": 10, "sun397": 0.1, "patch_camelyon": 1, "eurosat": 1, "resisc45": 5,
        "diabetic_retinopathy": 0.1, "clevr_count": 0.5, "clevr_dist": 0.1, "dmlab": 5, "kitti": 5,
        "dsprites_loc": 5, "dsprites_ori": 0.1, "smallnorb_azi": 10, "smallnorb_ele": 1,
    },
    "repattn": {
        "cifar": 0.1, "caltech101": 10, "dtd": 0.1, "oxford_flowers102": 0.5, "oxford_iiit_pet": 0.5,
        "svhn": 10, "sun397": 0.1, "patch_camelyon": 0.5, "eurosat": 5, "resisc45": 0.1,
        "diabetic_retinopathy": 0.5, "clevr_count": 1, "clevr_dist": 0.1, "dmlab": 5, "kitti": 1,
        "dsprites_loc": 10, "dsprites_ori": 5, "smallnorb_azi": 10, "smallnorb_ele": 1,
    },
}
PLACEMENTS = ("repblock", "repattn")


def task_scale(task: str, placement: str = "repblock") -> float:
    """The official scale of a VTAB-1K task; a clear error for an unknown task or placement."""
    if placement not in REPADAPTER_SCALES:
        raise PETLError(f"Unknown RepAdapter placement {placement!r}; choose one of {', '.join(PLACEMENTS)}.")
    table = REPADAPTER_SCALES[placement]
    if task not in table:
        raise PETLError(
            f"No official RepAdapter scale for task {task!r} (known: {', '.join(table)}). "
            f"Set the scale yourself, e.g. --model.scale 1.0."
        )
    return float(table[task])


class RepAdapterBlock(AffineAdapterBlock):
    """A frozen timm ``Block`` with RepAdapters on the branch inputs (``None``: no adapter there)::

        x = x + drop_path1(ls1(attn(attn_adapter(norm1(x)))))
        x = x + drop_path2(ls2(mlp(mlp_adapter(norm2(x)))))

    Any adapter with ``affine()`` works (ARC reuses this class as ``ARCBlock``);
    :meth:`fold_into` merges the adapters into a plain block's ``attn.qkv`` and ``mlp.fc1``.
    """


class RepAdapter(FoldableAdapterModule):
    """RepAdapter on a frozen ViT: adapters + head trained, everything else frozen.

    Args:
        r: adapter bottleneck width (8).
        groups: groups of the up-projection (2).
        scale: fixed branch scale ``s``. ``None``: the official value for ``scale_task``.
        scale_task: VTAB-1K task whose official scale to use when ``scale`` is ``None``. When both are
            ``None`` the scale is taken from the DataModule's ``task`` when ``fit`` starts (1.0,
            with a warning, for a task outside the table). The value in use is stored in each
            adapter's ``scale`` buffer, so checkpoints and merges always carry the trained scale.
        placement: ``"repblock"`` (attention and MLP) or ``"repattn"`` (attention only).
        adapter_dropout: dropout on the bottleneck (0.1).
        **kwargs: :class:`PETLModule` arguments (the official recipe uses ``drop_path_rate=0.1``).
    """

    def __init__(
        self,
        r: int = 8,
        groups: int = 2,
        scale: float | None = None,
        scale_task: str | None = None,
        placement: Literal["repblock", "repattn"] = "repblock",
        adapter_dropout: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if placement not in PLACEMENTS:
            raise PETLError(f"Unknown RepAdapter placement {placement!r}; choose one of {', '.join(PLACEMENTS)}.")
        if scale is not None:
            s = float(scale)
        else:
            s = task_scale(scale_task, placement) if scale_task is not None else 1.0
        dim = self.vit.dim

        def adapter() -> RepAdapterLayer:
            return RepAdapterLayer(dim, r=r, groups=groups, scale=s, dropout=adapter_dropout)

        self.blocks = nn.ModuleList(
            RepAdapterBlock(blk, adapter(), adapter() if placement == "repblock" else None)
            for blk in self.vit.blocks
        )

    # -- scale -----------------------------------------------------------------------------------
    def adapters(self) -> list[RepAdapterLayer]:
        """Every adapter, block by block (attention first)."""
        return [m for blk in self.blocks for m in (blk.attn_adapter, blk.mlp_adapter) if isinstance(m, RepAdapterLayer)]

    @property
    def scale(self) -> float:
        """The scale ``s`` the adapters use now."""
        return float(self.adapters()[0].scale)

    def set_scale(self, scale: float) -> None:
        """Set ``s`` on every adapter."""
        for a in self.adapters():
            a.scale.fill_(float(scale))

    def setup(self, stage: str) -> None:
        super().setup(stage)
        hp = self.hparams
        if stage != "fit" or hp.scale is not None or hp.scale_task is not None:
            return
        task = getattr(getattr(self.trainer, "datamodule", None), "task", None)
        if task is None:
            rank_zero_warn("RepAdapter: no scale, no task and no DataModule task given; using scale 1.0.")
            return
        table = REPADAPTER_SCALES[hp.placement]
        if task not in table:
            rank_zero_warn(f"RepAdapter: task {task!r} has no official scale; using 1.0 (set model.scale to choose).")
            return
        self.set_scale(table[task])


__all__ = ["REPADAPTER_SCALES", "RepAdapter", "RepAdapterBlock", "task_scale"]
