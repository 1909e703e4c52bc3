"""Benchmark entries for DyT (MLP dispatch, d=8) at keep rates r = 0.3, 0.5, 0.7, plus r = 0.5 on
the masked reference path (everything computed, output masked: it saves nothing).

Weights are random, so the dispatchers are set to keep exactly ``round(r * patches)`` tokens per
image and layer (``force_keep_rate``, a top-k used only for speed measurements); the tokens they
pick are the top-k of a random projection, i.e. arbitrary positions, which is what matters for the
gather/scatter cost. GFLOPs are the executed ones at that keep rate. The training step (both
forwards of the paper's loss: dynamic + complete model, KL and rate terms) is timed once, on the
r = 0.5 module, through its ``training_loss``.
"""

from __future__ import annotations

import torch
from benchmarks.common import Entry
from torch import Tensor, nn

from petl_lightning.methods.dyt import DyT

RATES = (0.3, 0.5, 0.7)


class DyTLogits(nn.Module):
    """Images -> logits of a DyT at a fixed keep rate and inference mode (no statistics meter)."""

    def __init__(self, method: DyT, rate: float, mode: str = "gather") -> None:
        super().__init__()
        self.method = method
        self.rate = rate
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        self.method.set_force_keep_rate(self.rate)
        self.method.inference_mode = self.mode
        return self.method.forward_dyt(x)[0]


def build_dyt(model_name: str, img_size: int, num_classes: int, **kwargs) -> DyT:
    """A random-weight DyT with non-zero adapters (so no work is a no-op)."""
    method = DyT(num_classes=num_classes, model_name=model_name, pretrained=False, img_size=img_size, **kwargs)
    with torch.no_grad():
        for blk in method.blocks:
            for a in blk.adapters.values():
                for p in a.parameters():
                    p.normal_(0.0, 0.02)
    return method.eval()


def entries(model_name: str, img_size: int, num_classes: int) -> list[Entry]:
    """DyT r=0.3/0.5/0.7 (gather, real skipping) and r=0.5 (masked reference)."""
    method = build_dyt(model_name, img_size, num_classes)
    trainable = method.parameter_summary()["trainable"]
    rows = []
    for rate in RATES:
        gflops = method.executed_flops(method.expected_record(rate), 1) / 1e9
        rows.append(
            Entry(
                f"DyT r={rate}",
                DyTLogits(method, rate).eval(),
                trainable,
                gflops,
                f"mlp dispatch d=8, gather/scatter, keep {rate} (top-k)",
                train_module=method,
            )
        )
    full = method.executed_flops(method.expected_record(1.0), 1) / 1e9
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


__all__ = ["DyTLogits", "build_dyt", "entries"]
