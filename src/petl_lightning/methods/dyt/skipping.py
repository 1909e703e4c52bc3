"""DyT's token skipping options (Dynamic Tuning, Zhao et al., NeurIPS 2024, arXiv 2403.11808), one
group shared by DyT and Dyn-Adapter's ``dyt`` base."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

from petl_lightning.errors import ConfigError
from petl_lightning.methods.config import check_choice, check_rate

#: The dispatch sites of each ``sites`` value: which sub-blocks unimportant tokens skip.
SITES: dict[str, tuple[str, ...]] = {
    "mlp": ("mlp",),
    "attn": ("attn",),
    "attn_mlp": ("attn", "mlp"),
    "layer": ("layer",),
}


@dataclass
class TokenSkipping:
    """Token skipping: which sub-blocks unimportant tokens skip, how the dispatchers decide, and the
    training terms that shape them (DyT's, also Dyn-Adapter's ``dyt`` base).

    Attributes:
        sites: which sub-blocks patch tokens may skip: ``"mlp"`` (the paper's default; attention on
            all tokens), ``"attn"``, ``"attn_mlp"`` (one dispatcher and adapter each) or ``"layer"``
            (skipped tokens bypass the whole block). Only ``mlp`` is in the official code.
        target_rate: r, the share of patch tokens the training masks should keep (the rate loss).
        tau: Gumbel-sigmoid temperature of the training masks (5.0; scales the gradient only).
        threshold: inference keep rule ``sigmoid(logit) > threshold`` (the paper's 0.5).
        fixed_keep_rate: instead, every image keeps its ``round(r * patches)`` top-logit patch
            tokens at every site (ours: static shapes, no host sync; what export runs).
        inference: ``"gather"`` (the kept rows of the whole batch run the sub-block, the rest skip
            it: real saving) or ``"mask"`` (everything runs, outputs are masked: the reference).
        w_rate: weight of ``(mean(mask) - target_rate)^2`` (the paper's 2.0).
        w_complete_cls: weight of the cross-entropy of the complete model (no skipping).
        w_distill: weight of ``KL(complete.detach() || dynamic)``. Each of the two complete-model
            terms needs a second forward; with both at 0 it is not run.
        dispatcher_init_std: std of the dispatchers' normal weight init (official: 0.02).
        dispatcher_lr_scale: learning-rate multiplier of the dispatchers (1.0: the paper; ours).
        class_attention_prior: None (the paper): a dispatcher's logit is a linear function of the
            token. A number (ours, ``sites="mlp"`` only): it also gets ``w * log(P * a)``, ``a`` the
            class token's attention to the token in the same block (EViT's ranking, free: the
            attention is computed anyway), ``w`` learned from this initial value
            (:class:`~petl_lightning.layers.dispatcher.TokenDispatcher`).
        training_masks: ``"gumbel"`` (the paper): each token sampled independently, the rate loss
            pulls the share kept towards ``target_rate``. ``"topk"`` (ours): each image keeps exactly
            its ``round(target_rate * P)`` top noisy logits (straight-through gradient), the rule a
            fixed keep rate and export run at inference.
        training_noise: scale of the Logistic noise in the training masks (1.0: the paper; 0: the
            training masks are the inference rule's, ours).
    """

    sites: Literal["mlp", "attn", "attn_mlp", "layer"] = "mlp"
    target_rate: float = 0.5
    tau: float = 5.0
    threshold: float = 0.5
    fixed_keep_rate: float | None = None
    inference: Literal["gather", "mask"] = "gather"
    w_rate: float = 2.0
    w_complete_cls: float = 1.0
    w_distill: float = 1.0
    dispatcher_init_std: float = 0.02
    dispatcher_lr_scale: float = 1.0
    class_attention_prior: float | None = None
    training_masks: Literal["gumbel", "topk"] = "gumbel"
    training_noise: float = 1.0

    def __post_init__(self) -> None:
        check_choice("skipping.sites", self.sites, tuple(SITES))
        check_choice("skipping.training_masks", self.training_masks, ("gumbel", "topk"))
        if self.training_masks == "topk" and self.fixed_keep_rate is None:
            warnings.warn(
                "skipping.training_masks='topk' trains for a fixed keep rate, but inference thresholds the "
                f"logits; set skipping.fixed_keep_rate: {self.target_rate} (the target_rate) to infer as trained.",
                stacklevel=2,
            )
        if self.class_attention_prior is not None and self.sites != "mlp":
            raise ConfigError(
                f"skipping.class_attention_prior needs the block's attention before the dispatch, i.e. "
                f"skipping.sites='mlp', got sites={self.sites!r}; set class_attention_prior: null or sites: mlp."
            )
        check_choice("skipping.inference", self.inference, ("gather", "mask"))
        check_rate("skipping.target_rate", self.target_rate, upper_open=False)
        if self.fixed_keep_rate is not None:
            check_rate("skipping.fixed_keep_rate", self.fixed_keep_rate, upper_open=False)
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"skipping.threshold must lie in (0, 1), got {self.threshold}.")
        for name in ("w_rate", "w_complete_cls", "w_distill", "training_noise"):
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"skipping.{name} must be non-negative (0 switches the term off), got {getattr(self, name)}."
                )
        for name in ("tau", "dispatcher_lr_scale"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"skipping.{name} must be positive, got {getattr(self, name)}.")

    def keep_count(self, num_patches: int, keep_rate: float | None = None) -> int | None:
        """Patch tokens every image keeps per site under a fixed keep rate (``keep_rate``, default
        ``fixed_keep_rate``); None: the threshold decides."""
        rate = self.fixed_keep_rate if keep_rate is None else keep_rate
        return None if rate is None else int(round(rate * num_patches))


__all__ = ["SITES", "TokenSkipping"]
