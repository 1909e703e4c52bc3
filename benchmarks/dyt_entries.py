"""Benchmark entries for DyT (MLP dispatch, d=8) at keep rates r = 0.3, 0.5, 0.7, plus r = 0.5 on
the masked reference path (everything computed, output masked: it saves nothing).

Weights are random, so the dispatchers are set to keep exactly ``round(r * patches)`` tokens per
image and layer (``fixed_keep_rate=r``: the top-k tokens by dispatcher logit); the tokens they pick
are the top-k of a random projection, i.e. arbitrary positions, which is what matters for the
gather/scatter cost. GFLOPs are the executed ones at that keep rate (``DyTViT.executed_flops``).
The training step (both forwards of the paper's loss: dynamic + complete model, KL and rate terms)
is timed once, on the shared module, through its ``training_loss``.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from benchmarks.common import Entry
from torch import Tensor, nn

from petl_lightning.methods.dyt import DyT

RATES = (0.3, 0.5, 0.7)


class DyTLogits(nn.Module):
    """Images -> logits of a DyT keeping the top ``rate`` of the tokens on the gathered (real
    skipping) or masked path. Several entries share one module. The masked path computes every
    token whatever the mask (its mask comes from the dispatchers' threshold), so its rate is nominal."""

    def __init__(self, method: DyT, rate: float, mode: str = "gather") -> None:
        super().__init__()
        self.method = method
        self.keep_count = int(round(rate * method.vit.num_patches))
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        vit = self.method.dyt
        out = vit.forward_gathered(x, self.keep_count) if self.mode == "gather" else vit.forward_masked(x)
        return self.method.head(out.features)


def build_dyt(model_name: str, img_size: int, num_classes: int, **kwargs) -> DyT:
    """A random-weight DyT with non-zero adapters (so no work is a no-op)."""
    method = DyT(num_classes=num_classes, model_name=model_name, pretrained=False, img_size=img_size, **kwargs)
    with torch.no_grad():
        for blk in method.vit.blocks:
            for a in blk.adapters.values():
                for p in a.parameters():
                    p.normal_(0.0, 0.02)
    return method.eval()


def kept_tokens(method: DyT, rate: float) -> Tensor:
    """``kept`` (1, depth, sites) of one image keeping ``round(rate * patches)`` tokens at every site."""
    k = int(round(rate * method.vit.num_patches))
    return torch.full((1, method.vit.depth, method.vit.sites), float(k))


def executed_gflops(method: DyT, kept: Tensor, inference: str = "gather") -> float:
    """GFLOPs per image of ``method`` on the ``inference`` path when its blocks keep ``kept``."""
    skipping = method.dyt.skipping
    method.dyt.skipping = replace(skipping, inference=inference)
    try:
        return float(method.dyt.executed_flops(kept)[0] + method.model.head_flops()) / 1e9
    finally:
        method.dyt.skipping = skipping


def entries(model_name: str, img_size: int, num_classes: int) -> list[Entry]:
    """DyT r=0.3/0.5/0.7 (gather, real skipping) and r=0.5 (masked reference)."""
    skipping = {"sites": "mlp", "fixed_keep_rate": RATES[0]}
    method = build_dyt(model_name, img_size, num_classes, adapter_dim=8, skipping=skipping)
    trainable = method.parameter_summary()["trainable"]
    rows = []
    for rate in RATES:
        gflops = executed_gflops(method, kept_tokens(method, rate))
        rows.append(
            Entry(
                f"DyT r={rate}",
                DyTLogits(method, rate).eval(),
                trainable,
                gflops,
                f"sites mlp, d=8, gather/scatter, fixed_keep_rate {rate} (top-k)",
                train_module=method,
            )
        )
    full = executed_gflops(method, kept_tokens(method, 1.0), "mask")
    rows.append(
        Entry(
            "DyT r=0.5 (masked)",
            DyTLogits(method, 0.5, "mask").eval(),
            trainable,
            full,
            "reference path: all tokens through the MLP, output masked",
            train_module=method,
        )
    )
    return rows


__all__ = ["DyTLogits", "build_dyt", "entries", "executed_gflops", "kept_tokens"]
