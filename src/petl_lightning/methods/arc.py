"""ARC (Dong et al., "Efficient Adaptation of Large Vision Transformer via Adapter Re-Composing",
NeurIPS 2023, arXiv 2310.06234): linear adapters re-composed from a basis shared by all layers.

Two bases ``U_attn`` and ``U_mlp`` (``dim x r``, ``r = adapter_dim = 50``) are used by every block; each block learns
only coefficients ``c`` (r) and a bias ``b`` (dim) per branch::

    A(x) = x + Dropout(x @ (U * c)) @ U.T + b

placed after ``norm1`` (before ``attn.qkv``) and after ``norm2`` (before ``mlp.fc1``), so like
RepAdapter it folds into those Linears (:meth:`ARC.merge`). Unlike the released VTAB script (whose
freeze filter leaves every ARC tensor frozen and trains only the head), every ARC tensor here is
trained; ``tests/test_arc.py`` checks that each one receives a gradient and changes.

Export the merged model in one line::

    ARC.load_from_checkpoint("last.ckpt").export("merged.safetensors")
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from petl_lightning.errors import ConfigError
from petl_lightning.layers.arc import ARCBasis, ARCLayer
from petl_lightning.methods.foldable import FoldableAdapterModule, FoldableBlock

PLACEMENTS = ("attn_mlp", "attn")


class ARC(FoldableAdapterModule):
    """ARC on a frozen ViT: shared bases, per-layer coefficients and biases, and the head are trained.

    Args:
        adapter_dim: rank ``r`` of the shared bases (50).
        adapter_dropout: dropout on the r-dim bottleneck (the official VTAB script's 0.1).
        placement: ``"attn_mlp"`` (attention and MLP: the paper's ARC, ``arc`` in its code) or
            ``"attn"`` (attention only: ``arc_att``).
        coeff_init: ``"official"``: attention coefficients zero (identity at start), MLP coefficients
            xavier-uniform (the MLP adapter starts as a random symmetric map, as the official code);
            ``"zeros"``: all coefficients zero, so the model starts as the frozen backbone.
        head_init: ``"zeros"`` (the official ``zero_head``) or ``"default"``.
        **kwargs: :class:`PETLModule` arguments.

    With a zero head and zero attention coefficients, the adapters get no gradient on the first
    step and ``U_attn`` none on the second: every tensor moves from the third step on.
    """

    STRUCTURAL_HPARAMS = (*FoldableAdapterModule.STRUCTURAL_HPARAMS, "adapter_dim", "placement")

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
        self.vit.check_blocks(type(self).__name__)
        if placement not in PLACEMENTS:
            raise ConfigError(f"Unknown ARC placement {placement!r}; choose one of {', '.join(PLACEMENTS)}.")
        if coeff_init not in ("official", "zeros"):
            raise ConfigError(f"coeff_init must be 'official' or 'zeros', got {coeff_init!r}.")
        dim, r = self.vit.dim, adapter_dim
        self.basis_attn = ARCBasis(dim, r)
        self.basis_mlp = ARCBasis(dim, r) if placement == "attn_mlp" else None
        mlp_init: Literal["zeros", "xavier"] = "xavier" if coeff_init == "official" else "zeros"
        self.blocks = nn.ModuleList(
            FoldableBlock(
                blk,
                ARCLayer(self.basis_attn, dim, r, adapter_dropout, coeff_init="zeros"),
                ARCLayer(self.basis_mlp, dim, r, adapter_dropout, coeff_init=mlp_init)
                if self.basis_mlp is not None
                else None,
            )
            for blk in self.vit.blocks
        )


__all__ = ["ARC", "PLACEMENTS"]
