"""Benchmark entries for DyT (MLP dispatch, d=8) at keep rates r = 0.3, 0.5, 0.7, plus r = 0.5 on
the masked reference path (everything computed, output masked: it saves nothing).

Weights are random, so the dispatchers are set to keep exactly ``round(r * patches)`` tokens per
image and layer (``fixed_keep_rate=r``: the top-k tokens by dispatcher logit); the tokens they pick
are the top-k of a random projection, i.e. arbitrary positions, which is what matters for the
gather/scatter cost. GFLOPs are the executed ones at that keep rate (:meth:`DyT.executed_flops`).
The training step (both forwards of the paper's loss: dynamic + complete model, KL and rate terms)
is timed once, on the shared module, through its ``training_loss``.
"""

from __future__ import annotations

import torch
from benchmarks.common import Entry
from torch import Tensor, nn

from petl_lightning.methods.dyt import DyT

RATES = (0.3, 0.5, 0.7)


class DyTLogits(nn.Module):
    """Images -> logits of a DyT at a fixed keep rate on the gathered (real skipping) or masked
    path. Several entries share one module, so each sets its own ``fixed_keep_rate`` before it runs
    (``keep_count()`` reads the hyper-parameter at every call). The masked path computes every token
    whatever the mask (its mask comes from the dispatchers' threshold), so its rate is nominal."""

    def __init__(self, method: DyT, rate: float, mode: str = "gather") -> None:
        super().__init__()
        self.method = method
        self.rate = rate
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        self.method.hparams.fixed_keep_rate = self.rate
        if self.mode == "gather":
            return self.method.run_gathered(x)[0]
        return self.method.run_masked(x, sample=False)[0]


def build_dyt(model_name: str, img_size: int, num_classes: int, **kwargs) -> DyT:
    """A random-weight DyT with non-zero adapters (so no work is a no-op)."""
    method = DyT(num_classes=num_classes, model_name=model_name, pretrained=False, img_size=img_size, **kwargs)
    with torch.no_grad():
        for blk in method.blocks:
            for a in blk.adapters.values():
                for p in a.parameters():
                    p.normal_(0.0, 0.02)
    return method.eval()


def kept_tokens(method: DyT, rate: float) -> Tensor:
    """``kept`` (1, depth, sites) of one image keeping ``round(rate * patches)`` tokens at every site."""
    k = int(round(rate * method.vit.num_patches))
    return torch.full((1, len(method.blocks), len(method.sites)), k, dtype=torch.long)


def entries(model_name: str, img_size: int, num_classes: int) -> list[Entry]:
    """DyT r=0.3/0.5/0.7 (gather, real skipping) and r=0.5 (masked reference)."""
    method = build_dyt(model_name, img_size, num_classes, placement="mlp", adapter_dim=8, fixed_keep_rate=RATES[0])
    trainable = method.parameter_summary()["trainable"]
    rows = []
    for rate in RATES:
        gflops = float(method.executed_flops(kept_tokens(method, rate))[0]) / 1e9
        rows.append(
            Entry(
                f"DyT r={rate}",
                DyTLogits(method, rate).eval(),
                trainable,
                gflops,
                f"placement mlp, d=8, gather/scatter, fixed_keep_rate {rate} (top-k)",
                train_module=method,
            )
        )
    full = float(method.executed_flops(kept_tokens(method, 1.0), gathered=False)[0]) / 1e9
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


__all__ = ["DyTLogits", "build_dyt", "entries", "kept_tokens"]
