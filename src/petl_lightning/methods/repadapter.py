"""RepAdapter (Luo et al., "Towards Efficient Visual Adaption via Structural Re-parameterization",
arXiv 2302.08106): a linear adapter before ``attn.qkv`` and ``mlp.fc1`` of every block, trained,
then folded into those Linears so inference is the plain backbone.

Placements: ``attn_mlp`` (attention and MLP branches: the paper's RepAdapter, ``repblock`` in its
code) and ``attn`` (attention only: ``repattn``). The only per-task hyper-parameter of the official
VTAB-1K recipe is the scale ``s``; :data:`REPADAPTER_SCALES` holds the official values, which
:meth:`RepAdapter.task_overrides` gives the CLI and the VTAB runner for ``adapter_scale=None``.

Export the merged model (a plain timm ``VisionTransformer``) in one line::

    RepAdapter.load_from_checkpoint("last.ckpt").export("merged.safetensors")  # see docs/deploy.md
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, cast

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from petl_lightning.errors import ConfigError
from petl_lightning.layers.repadapter import RepAdapterLayer
from petl_lightning.methods.foldable import FoldableAdapterModule, FoldableBlock

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
PLACEMENTS = ("attn_mlp", "attn")


class RepAdapter(FoldableAdapterModule):
    """RepAdapter on a frozen ViT: adapters + head trained, everything else frozen.

    Args:
        adapter_dim: adapter bottleneck width (8).
        adapter_groups: groups of the up-projection (2).
        adapter_scale: the fixed branch scale ``s``. ``None``: the official value for the data's
            VTAB-1K task (:meth:`task_overrides`; the CLI and the VTAB runner fill it in before the
            model is built, so saved hyper-parameters show the scale that was trained; a module
            built in Python takes it from the DataModule's ``task`` when ``fit`` starts, 1.0 for a
            task outside the table). Stored in each adapter's ``scale`` buffer too.
        placement: ``"attn_mlp"`` (attention and MLP; the paper's RepAdapter) or ``"attn"``.
        adapter_dropout: dropout on the bottleneck (0.1).
        **kwargs: :class:`PETLModule` arguments (the official recipe uses ``drop_path_rate=0.1``).
    """

    STRUCTURAL_HPARAMS = (*FoldableAdapterModule.STRUCTURAL_HPARAMS, "adapter_dim", "adapter_groups", "placement")

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
        self.vit.check_blocks(type(self).__name__)
        if placement not in PLACEMENTS:
            raise ConfigError(f"Unknown RepAdapter placement {placement!r}; choose one of {', '.join(PLACEMENTS)}.")
        dim, scale = self.vit.dim, 1.0 if adapter_scale is None else float(adapter_scale)

        def adapter() -> RepAdapterLayer:
            return RepAdapterLayer(dim, adapter_dim, adapter_groups, scale, adapter_dropout)

        self.blocks = nn.ModuleList(
            FoldableBlock(blk, adapter(), adapter() if placement == "attn_mlp" else None) for blk in self.vit.blocks
        )

    @classmethod
    def task_overrides(cls, task: str, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """The official scale of a VTAB-1K task for the configured placement (``{}`` outside the table)."""
        table = REPADAPTER_SCALES.get(hparams.get("placement") or "attn_mlp", REPADAPTER_SCALES["attn_mlp"])
        return {"adapter_scale": float(table[task])} if task in table else {}

    def adapters(self) -> list[RepAdapterLayer]:
        """Every RepAdapter layer, block by block (attention first)."""
        return [cast(RepAdapterLayer, a) for blk in self.blocks for a in cast(FoldableBlock, blk).adapters()]

    @property
    def scale(self) -> float:
        """The scale ``s`` the adapters use now."""
        return float(self.adapters()[0].scale)

    def set_scale(self, scale: float) -> None:
        """Set ``s`` on every adapter (and in the hyper-parameters that checkpoints and loggers show)."""
        for a in self.adapters():
            a.scale.fill_(float(scale))
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


__all__ = ["PLACEMENTS", "REPADAPTER_SCALES", "RepAdapter"]
