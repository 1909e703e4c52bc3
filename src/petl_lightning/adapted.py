"""The adapted ViT: a frozen timm ViT whose blocks a PETL method adapted, as a plain ``nn.Module``.

:func:`petl_lightning.adapt` returns an :class:`AdaptedViT` (or, for Dyn-Adapter, a classifier with
exits). It shares every frozen tensor with the timm model it was made from, uses no Lightning, and
reads like timm: ``forward_features(x)`` gives the tokens after the final norm, ``forward_head(x,
pre_logits)`` pools them (and applies the timm model's own head, if it has one), ``forward(x)`` does
both. Tasks (classification, segmentation, serving) build on it.

The contract a method implements (everything Dyn-Adapter stacks its exits on):

- ``forward_blocks(tokens, start, end) -> BlockRun(tokens, kept)``: blocks ``start:end``; ``kept``
  (B, blocks, sites) counts the patch tokens each image sent through each block's skippable
  sub-blocks (``sites`` = 0 for methods where every token runs everything). In training mode a
  token-skipping method samples its masks and ``kept`` carries their straight-through gradient.
- ``block_flops(kept, start) -> (B, blocks)``: the FLOPs each image executed in those blocks.
- ``merge()``: a plain timm model with every adapter folded in (``MergeError`` where one cannot
  fold); ``deploy_form(keep_rate)`` and ``deploy_blocks(keep_rate)``: what a deployment runs.

:class:`ViTClassifier` is an adapted ViT and a linear head: the model the classification tasks train.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple, cast

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from petl_lightning.errors import ConfigError, MergeError, ModelNameError
from petl_lightning.flops import ViTShape, block_flops, embed_flops, head_flops, linear_flops
from petl_lightning.layers.wrapper import adapter_layers, merge_adapter_layers
from petl_lightning.stats import InferenceOutput

NO_KEEP_RATE = "keep_rate is DyT's export option (a fixed top-k of the tokens); this model skips no tokens."


class BlockRun(NamedTuple):
    """What a run of blocks returns."""

    tokens: Tensor  # (B, N, D)
    kept: Tensor  # (B, blocks, sites) float: patch tokens each image sent through each skippable sub-block


class Features(NamedTuple):
    """Pooled features and what the blocks executed (:meth:`AdaptedViT.run`)."""

    features: Tensor  # (B, D) pooled, before any head
    kept: Tensor  # (B, depth, sites)


def require_timm_blocks(vit: VisionTransformer, method: str, model_name: str = "") -> None:
    """Refuse in one line a model whose blocks ``method`` cannot adapt: it needs timm's pre-norm
    ``Block`` (norm1 -> Attention -> ls1, norm2 -> MLP(fc1, fc2) -> ls2)."""
    name = model_name or getattr(vit, "pretrained_cfg", {}).get("architecture") or type(vit).__name__
    for blk in vit.blocks:
        mlp = getattr(blk, "mlp", None)
        problem = None
        if not isinstance(blk, Block) or type(blk).forward is not Block.forward:
            problem = f"{type(blk).__name__} blocks (not timm's pre-norm vision_transformer.Block)"
        elif not isinstance(blk.attn, Attention):
            problem = f"a {type(blk.attn).__name__} attention (not timm's Attention)"
        elif not all(isinstance(getattr(mlp, fc, None), nn.Linear) for fc in ("fc1", "fc2")):
            problem = f"a {type(mlp).__name__} MLP without fc1/fc2 Linears"
        if problem:
            raise ModelNameError(
                f"{method} adapts each transformer block, but {name!r} has {problem}; use LinearProbe on "
                f"it, or a vit_*/deit_* model with standard blocks."
            )


class AdaptedViT(nn.Module):
    """A frozen timm ``VisionTransformer`` (``vit``, shared, never modified) run through ``blocks``.

    Args:
        vit: the frozen timm model: patch embedding, final norm, pooling and its head come from it.
        blocks: the blocks that run, in order (timm blocks, or copies of them with wrapped Linears, or
            a method's own block).
        shared: modules the blocks share (e.g. ARC's bases), registered once here as well.
    """

    vit: VisionTransformer
    blocks: nn.ModuleList
    shared: nn.ModuleDict
    #: Dispatch sites per block whose patch tokens may skip work (0: every token runs everything).
    sites: int = 0

    def __init__(
        self, vit: VisionTransformer, blocks: Iterable[nn.Module], shared: Mapping[str, nn.Module] | None = None
    ) -> None:
        super().__init__()
        self.vit = vit
        self.shared = nn.ModuleDict(dict(shared or {}))
        self.blocks = nn.ModuleList(blocks)

    # -- sizes -----------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.vit.embed_dim)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.vit.num_prefix_tokens)

    @property
    def num_patches(self) -> int:
        return int(self.vit.patch_embed.num_patches)

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens

    @property
    def img_size(self) -> int:
        return int(self.vit.patch_embed.img_size[0])

    def shape(self) -> ViTShape:
        """Sizes for :mod:`petl_lightning.flops`."""
        v = self.vit
        blk: Any = v.blocks[0]  # a timm Block (attn.num_heads, mlp.fc1, mlp.fc2)
        hidden = blk.mlp.fc2.in_features
        pool: Any = getattr(v, "attn_pool", None)
        return ViTShape(
            dim=self.dim,
            depth=self.depth,
            num_heads=blk.attn.num_heads,
            mlp_hidden=hidden,
            num_patches=self.num_patches,
            num_prefix_tokens=self.num_prefix_tokens,
            patch_size=v.patch_embed.patch_size[0],
            in_chans=v.patch_embed.proj.in_channels,
            gated_mlp=blk.mlp.fc1.out_features == 2 * hidden,
            norm_pre=isinstance(v.norm_pre, nn.LayerNorm),
            fc_norm=isinstance(v.fc_norm, nn.LayerNorm),
            attn_pool_hidden=pool.mlp.fc1.out_features if pool is not None else 0,
        )

    def example_input(self, batch: int = 2, seed: int = 0) -> Tensor:
        """Random images (batch, C, H, W) of the size this model takes (what programs are traced with)."""
        pe = self.vit.patch_embed
        return torch.randn(batch, pe.proj.in_channels, *pe.img_size, generator=torch.Generator().manual_seed(seed))

    # -- forward ---------------------------------------------------------------------------------
    def embed(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) to tokens (B, N, D): patch embed, prefix tokens, position, norm_pre."""
        v = self.vit
        x = v.patch_embed(x)
        x = v._pos_embed(x)
        x = v.patch_drop(x)
        return cast(Tensor, v.norm_pre(x))

    def forward_blocks(self, tokens: Tensor, start: int = 0, end: int | None = None) -> BlockRun:
        """Blocks ``start:end`` on ``tokens`` (every token through every sub-block)."""
        blocks = self.blocks[start:end]
        for blk in blocks:
            tokens = blk(tokens)
        return BlockRun(tokens, tokens.new_zeros(tokens.shape[0], len(blocks), self.sites))

    def forward_blocks_complete(self, tokens: Tensor, start: int = 0, end: int | None = None) -> Tensor:
        """Blocks ``start:end`` with every token through every sub-block (the complete model; here
        the same as :meth:`forward_blocks`)."""
        return self.forward_blocks(tokens, start, end).tokens

    def forward_features(self, x: Tensor) -> Tensor:
        """Images to tokens (B, N, D) after the final norm, as timm's ``forward_features``."""
        return cast(Tensor, self.vit.norm(self.forward_blocks(self.embed(x)).tokens))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Normed tokens to pooled features (``pre_logits``), or through the timm model's own head."""
        return cast(Tensor, self.vit.forward_head(x, pre_logits=pre_logits))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def run(self, x: Tensor) -> Features:
        """Images to pooled features (B, D), and the patch tokens each block kept (B, depth, sites)."""
        out = self.forward_blocks(self.embed(x))
        return Features(self.forward_head(self.vit.norm(out.tokens), pre_logits=True), out.kept)

    def forward_complete(self, x: Tensor) -> Tensor:
        """Pooled features (B, D) with every token through every sub-block (the complete model; here
        the same as :meth:`run`'s)."""
        return self.run(x).features

    def keep_rate(self, kept: Tensor) -> Tensor:
        """The share of offered patch tokens that ``kept`` (B, blocks, sites) kept (1 where nothing
        is skippable); differentiable where ``kept`` is (a training path's masks)."""
        offered = kept.numel() * self.num_patches
        return kept.sum() / offered if offered else kept.new_ones(())

    def training_terms(
        self,
        kept: Tensor,
        logits: Tensor,
        labels: Tensor,
        complete: Callable[[], Tensor],
        criterion: Callable[[Tensor, Tensor], Tensor],
    ) -> dict[str, tuple[float, Tensor]]:
        """The method's training terms besides the task loss, ``{name: (weight, value)}``, from a
        training forward's ``kept`` and ``logits``, the ``labels``, the complete model's logits
        (``complete()``, run only if a term needs them) and the task's ``criterion``. None here."""
        return {}

    def set_fused_attn(self, enabled: bool) -> None:
        """Switch timm's fused SDPA attention (off = explicit matmuls, which FLOP counters see)."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.fused_attn = enabled  # type: ignore[misc]  # timm's Final is for TorchScript

    # -- FLOPs (papers' convention: one multiply-add = one FLOP) ---------------------------------
    def block_flops(self, kept: Tensor, start: int = 0, norm: bool = True, merged: bool = False) -> Tensor:
        """FLOPs (B, n) float64 each image executed in blocks ``start:start+n``, ``kept`` (B, n, sites).
        ``merged``: adapters that fold cost nothing (what the merged model runs)."""
        s, n = self.shape(), self.num_tokens
        costs = [
            block_flops(n, n, s, norm) + sum(a.flops(n) for a in adapter_layers(b) if not (merged and a.foldable))
            for b in self.blocks[start : start + kept.shape[1]]
        ]
        return torch.tensor(costs, dtype=torch.float64, device=kept.device).expand(kept.shape[0], -1)

    def outside_flops(self, norm: bool = True) -> int:
        """FLOPs outside the blocks: patch embedding, final norm, pooling and the timm model's head."""
        s = self.shape()
        return embed_flops(s, norm) + head_flops(s, int(self.vit.num_classes), norm=norm)

    def executed_flops(self, kept: Tensor, norm: bool = True, merged: bool = False) -> Tensor:
        """FLOPs per image (B,) float64 of a forward whose blocks kept ``kept`` (B, depth, sites)."""
        return self.block_flops(kept, 0, norm, merged).sum(1) + self.outside_flops(norm)

    def kept_all(self, batch: int = 1) -> Tensor:
        """``kept`` of a forward in which every patch token runs every sub-block."""
        return torch.full((batch, self.depth, self.sites), float(self.num_patches))

    def full_flops(self, norm: bool = True, merged: bool = False) -> int:
        """FLOPs per image with every token through every sub-block."""
        return int(self.executed_flops(self.kept_all(), norm, merged)[0])

    # -- merging and deployment ------------------------------------------------------------------
    def merge(self) -> VisionTransformer:
        """A plain timm ``VisionTransformer`` (a copy, fp32, eval mode) computing :meth:`forward`: each
        adapter layer replaced by its folded base layer (HF PEFT's ``merge_and_unload`` walk). Its
        ``state_dict`` loads with ``strict=True`` into a fresh timm model built like ``vit``.
        ``MergeError`` when an adapter cannot fold."""
        with torch.no_grad():
            blocks = [merge_adapter_layers(copy.deepcopy(b)) for b in self.blocks]
            for i, (b, original) in enumerate(zip(blocks, self.vit.blocks)):
                if type(b) is not type(original) or adapter_layers(b):
                    raise MergeError(f"Block {i} ({type(b).__name__}) does not fold into a plain timm block.")
            merged = copy.deepcopy(self.vit, memo={id(self.vit.blocks): nn.Sequential()})
            merged.blocks = nn.Sequential(*blocks)
        return merged.float().eval()

    def deploy_form(self, keep_rate: float | None = None) -> nn.Module:
        """Images to what :meth:`forward` returns, as a deployment runs it (here: :meth:`merge`'s
        model). ``keep_rate`` is for token-skipping methods (a fixed top-k); others take none."""
        if keep_rate is not None:
            raise ConfigError(NO_KEEP_RATE)
        return self.merge()

    def deploy_blocks(self, keep_rate: float | None = None) -> list[nn.Module]:
        """Copies of the blocks as a deployment runs them, each tokens -> tokens: folded where every
        adapter folds, else as trained (fp32, eval mode)."""
        if keep_rate is not None:
            raise ConfigError(NO_KEEP_RATE)
        try:
            return list(self.merge().blocks)
        except MergeError:
            return [copy.deepcopy(b).float().eval() for b in self.blocks]


class ViTClassifier(nn.Module):
    """An :class:`AdaptedViT` and a linear head on its pooled features: images to logits (B, K).

    Args:
        vit: the adapted ViT (pooled features without a head: built with ``num_classes=0``).
        num_classes: classes.
        head_init: ``"default"`` (PyTorch's Linear init) or ``"zeros"``.
    """

    def __init__(self, vit: AdaptedViT, num_classes: int, head_init: str = "default") -> None:
        super().__init__()
        if head_init not in ("default", "zeros"):
            raise ConfigError(f"head_init must be 'default' or 'zeros', got {head_init!r}.")
        self.vit = vit
        self.head = nn.Linear(vit.dim, num_classes)
        if head_init == "zeros":
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, K) (in training: the training path of a token-skipping method)."""
        return cast(Tensor, self.head(self.vit.run(x).features))

    def complete_logits(self, x: Tensor) -> Tensor:
        """Logits (B, K) with every token through every sub-block (a token-skipping method's complete model)."""
        return cast(Tensor, self.head(self.vit.forward_complete(x)))

    def infer(self, x: Tensor) -> InferenceOutput:
        """Logits and what the deployed model executes per image: FLOPs (adapters that fold are free)
        and the patch tokens kept and offered in each block."""
        out = self.vit.run(x)
        kept = out.kept.sum(-1)
        flops = self.vit.executed_flops(out.kept, merged=True) + self.head_flops()
        offered = torch.full_like(kept, float(self.vit.num_patches * self.vit.sites))
        return InferenceOutput(self.head(out.features), flops, kept=kept, offered=offered)

    def head_flops(self) -> int:
        return linear_flops(1, self.vit.dim, self.num_classes)

    def full_flops(self, norm: bool = True, merged: bool = False) -> int:
        """FLOPs per image with every token through every sub-block, head included."""
        return self.vit.full_flops(norm, merged) + self.head_flops()

    def merge(self) -> VisionTransformer:
        """:meth:`AdaptedViT.merge` with this head as the timm model's classifier (a distilled DeiT's
        two heads both get it: the mean of ``head(cls)`` and ``head(dist)`` is ``head`` of their mean)."""
        merged = self.vit.merge()
        merged.reset_classifier(self.num_classes)
        state = {f"head.{k}": v.float() for k, v in self.head.state_dict().items()}
        if getattr(merged, "head_dist", None) is not None:
            state.update({f"head_dist.{k}": v.float() for k, v in self.head.state_dict().items()})
        merged.load_state_dict(state, strict=False)
        return merged.to(self.head.weight.device).eval()

    def deploy_form(self, keep_rate: float | None = None) -> nn.Module:
        """Images to logits as a deployment runs them (a copy, fp32, eval mode)."""
        head = copy.deepcopy(self.head).float()
        return nn.Sequential(OrderedDict(vit=self.vit.deploy_form(keep_rate), head=head)).eval()


__all__ = ["AdaptedViT", "BlockRun", "Features", "ViTClassifier", "require_timm_blocks"]
