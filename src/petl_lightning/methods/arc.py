"""ARC (Dong et al., "Efficient Adaptation of Large Vision Transformer via Adapter Re-Composing",
NeurIPS 2023, arXiv 2310.06234): linear adapters re-composed from a basis shared by all layers.

Two bases ``U_attn`` and ``U_mlp`` (``dim x r``, r=50) are used by every block; each block learns
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

from petl_lightning.errors import PETLError
from petl_lightning.layers.arc import ARCBasis, ARCLayer
from petl_lightning.methods.foldable import FoldableAdapterModule
from petl_lightning.methods.repadapter import RepAdapterBlock

PLACEMENTS = ("arc", "arc_att")


class ARCBlock(RepAdapterBlock):
    """A frozen timm ``Block`` with ARC adapters on the branch inputs (same forward as
    :class:`~petl_lightning.methods.repadapter.RepAdapterBlock`)::

        x = x + drop_path1(ls1(attn(attn_adapter(norm1(x)))))
        x = x + drop_path2(ls2(mlp(mlp_adapter(norm2(x)))))
    """


class ARC(FoldableAdapterModule):
    """ARC on a frozen ViT: shared bases, per-layer coefficients and biases, and the head are trained.

    Args:
        r: rank of the shared bases (50).
        adapter_dropout: dropout on the r-dim bottleneck (the official VTAB script's 0.1).
        placement: ``"arc"`` (attention and MLP, the paper's ARC) or ``"arc_att"`` (attention only).
        coeff_init: ``"official"``: attention coefficients zero (identity at start), MLP coefficients
            xavier-uniform (the MLP adapter starts as a random symmetric map, as the official code);
            ``"zeros"``: all coefficients zero, so the model starts as the frozen backbone.
        head_init: ``"zeros"`` (the official ``zero_head``) or ``"default"``.
        **kwargs: :class:`PETLModule` arguments.

    Note that with a zero head and zero attention coefficients, the adapters get no gradient on
    the first step and ``U_attn`` none on the second: every tensor moves from the third step on.
    """

    def __init__(
        self,
        r: int = 50,
        adapter_dropout: float = 0.1,
        placement: Literal["arc", "arc_att"] = "arc",
        coeff_init: Literal["official", "zeros"] = "official",
        head_init: Literal["default", "zeros"] = "zeros",
        **kwargs: Any,
    ) -> None:
        super().__init__(head_init=head_init, **kwargs)
        if placement not in PLACEMENTS:
            raise PETLError(f"Unknown ARC placement {placement!r}; choose one of {', '.join(PLACEMENTS)}.")
        if coeff_init not in ("official", "zeros"):
            raise PETLError(f"coeff_init must be 'official' or 'zeros', got {coeff_init!r}.")
        dim = self.vit.dim
        self.basis_attn = ARCBasis(dim, r)
        self.basis_mlp = ARCBasis(dim, r) if placement == "arc" else None
        mlp_init = "xavier" if coeff_init == "official" else "zeros"
        blocks = []
        for blk in self.vit.blocks:
            attn = ARCLayer(self.basis_attn, dim, r, adapter_dropout, coeff_init="zeros")
            mlp = ARCLayer(self.basis_mlp, dim, r, adapter_dropout, coeff_init=mlp_init) if self.basis_mlp is not None else None
            blocks.append(ARCBlock(blk, attn, mlp))
        self.blocks = nn.ModuleList(blocks)


__all__ = ["ARC", "ARCBlock"]
