"""Benchmark entries for Dyn-Adapter at FLOPs budgets 0.3, 0.5 and 0.7 of the full model, and for
Dyn-Adapter over a DyT base (both savings composed) at budget 0.35.

Each entry runs :meth:`DynAdapter.infer` (early exit with batch shrinking: finished images leave
the batch after each exit; exits that take no image are not evaluated) on the merged base: the
blocks of ``DynAdapter.merge()`` (the plain timm ViT with the RepAdapters folded in), built once and
passed as ``infer(x, vit=AdaptedViT(merged, merged.blocks))``, so only the exit heads add cost. The
training step is timed on the unmerged model with its multi-exit loss. The weights are random, so
the thresholds are set on random images of the benchmark's size to give a geometric exit mix that
spends the budget (see :func:`build`). The entry's GFLOPs and the exit mix in its notes are those of
that calibration set (costs of the merged form: its blocks cost the backbone's); the timed batch is
another random batch of the same distribution, so its mix is close to, not exactly, it.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from benchmarks.common import Entry
from torch import Tensor, nn

from petl_lightning.adapted import AdaptedViT
from petl_lightning.methods.dyn_adapter import DynAdapter
from petl_lightning.methods.dyn_adapter.thresholds import (
    candidate_thresholds,
    evaluate_thresholds,
    single_exit_thresholds,
)

BUDGETS = (0.3, 0.5, 0.7)
COMPOSED_BUDGET = 0.35


class DynamicLogits(nn.Module):
    """Images -> logits through the batch-shrinking dynamic path on the merged base, with this
    entry's own thresholds (several entries share one model and one merged base)."""

    def __init__(self, method: DynAdapter, merged_vit: AdaptedViT | None, thresholds: list[float]) -> None:
        super().__init__()
        self.method = method
        self.merged_vit = merged_vit  # a submodule, so .to(device) and fused-attention switches reach it
        self.register_buffer("thr", torch.tensor(thresholds, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        self.method.thresholds.copy_(self.thr)
        return self.method.infer(x, vit=self.merged_vit).logits


def geometric_candidates(conf: Tensor, resolution: int = 2001) -> Tensor:
    """MSDNet's geometric threshold vectors, without the single-exit vectors that
    :func:`candidate_thresholds` adds for the middle exits (every image at one middle exit would
    shrink no batch: not what these entries measure)."""
    cands = candidate_thresholds(conf, "geometric", resolution=resolution)
    middle = single_exit_thresholds(conf.shape[1])[1:-1]
    if middle.numel() == 0:
        return cands
    is_middle = (cands[:, None, :] == middle[None, :, :]).all(dim=2).any(dim=1)
    return cands[~is_middle]


def build(
    model_name: str,
    img_size: int,
    num_classes: int,
    calib_images: int = 128,
    batch: int = 32,
    seed: int = 0,
    base: str = "repadapter",
    budgets: tuple[float, ...] = BUDGETS,
) -> tuple[DynAdapter, AdaptedViT | None, dict[float, dict]]:
    """A random-weight DynAdapter, its merged base (adapters folded, as RepAdapter does at inference;
    None for the ``dyt`` base, which does not fold) and thresholds per budget.

    Random heads have no accuracy to trade, so the thresholds are not searched for accuracy: among
    MSDNet's geometric exit mixes (share at exit k proportional to q**k, realised exit by exit as
    confidence quantiles of the images still running), the most expensive one within the budget.
    The ``dyt`` base keeps the top half of the patch tokens in every block (``fixed_keep_rate`` 0.5:
    random dispatchers would keep an arbitrary share under the threshold rule).
    """
    torch.manual_seed(seed)
    composed = base == "dyt"
    m = DynAdapter(
        base=base,  # type: ignore[arg-type]
        adapter_dim=8,
        adapter_groups=2,
        adapter_scale=1.0,
        skipping={"fixed_keep_rate": 0.5} if composed else {},
        calibration={"budget": None},
        eval_all_exits=False,
        num_classes=num_classes,
        model_name=model_name,
        pretrained=False,
        img_size=img_size,
    )
    with torch.no_grad():  # non-zero adapters; heads with spread-out confidences
        for name, p in m.named_parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.05 if "head" in name else 0.02)
    m.eval()
    merged = None if composed else m.merge().requires_grad_(False)
    merged_vit = None if merged is None else AdaptedViT(merged, merged.blocks)
    g = torch.Generator().manual_seed(seed + 1)
    xs = [torch.randn(batch, 3, img_size, img_size, generator=g) for _ in range(max(1, calib_images // batch))]
    out = m.collect_exits([(x, torch.zeros(x.shape[0], dtype=torch.long)) for x in xs])
    if merged_vit is not None:  # the folded blocks cost the backbone's, whatever the image
        per_block = merged_vit.block_flops(torch.zeros(1, merged_vit.depth, 0))[0].cumsum(0)
        out = replace(out, block_cost=per_block[[d - 1 for d in m.exit_depths]].expand_as(out.block_cost).clone())
    costs = m.exit_costs()
    cands = geometric_candidates(out.conf)
    _, cost, share = evaluate_thresholds(out, costs, cands)
    full = m.full_flops(merged=not composed)
    calib = {}
    for b in budgets:
        i = int(torch.where(cost <= b * full, cost, torch.full_like(cost, -1.0)).argmax())
        calib[b] = {
            "thresholds": cands[i].tolist(),
            "gflops": float(cost[i]) / 1e9,
            "flops_ratio": float(cost[i]) / full,
            "exit_share": share[i].tolist(),
        }
    return m, merged_vit, calib


def entries(model_name: str, img_size: int, num_classes: int) -> list[Entry]:
    """Dyn-Adapter (RepAdapter base, exits after 1/4, 1/2, 3/4 of the depth) at three budgets."""
    m, merged_vit, calib = build(model_name, img_size, num_classes)
    trainable = m.parameter_summary()["trainable"]
    rows = []
    for b, c in calib.items():
        mix = "/".join(f"{s:.2f}" for s in c["exit_share"])
        rows.append(
            Entry(
                f"Dyn-Adapter (budget {b:g})",
                DynamicLogits(m, merged_vit, c["thresholds"]).eval(),
                trainable,
                c["gflops"],
                f"RepAdapter base (merged); exit mix {mix} after blocks {m.exit_depths}; "
                f"{c['flops_ratio']:.2f} of full",
                train_module=m,  # one shared training form (all exits' weighted loss), timed once
                extra={"budget": b, "exit_share": c["exit_share"], "thresholds": c["thresholds"]},
            )
        )
    dyt, _, composed = build(model_name, img_size, num_classes, base="dyt", budgets=(COMPOSED_BUDGET,))
    c = composed[COMPOSED_BUDGET]
    mix = "/".join(f"{s:.2f}" for s in c["exit_share"])
    rows.append(
        Entry(
            f"Dyn-Adapter + DyT (budget {COMPOSED_BUDGET:g})",
            DynamicLogits(dyt, None, c["thresholds"]).eval(),
            dyt.parameter_summary()["trainable"],
            c["gflops"],
            f"DyT base, top half of the patch tokens through each MLP; exit mix {mix} after blocks "
            f"{dyt.exit_depths}; {c['flops_ratio']:.2f} of full (no exit, no skipping)",
            train_module=dyt,
            extra={"budget": COMPOSED_BUDGET, "exit_share": c["exit_share"], "thresholds": c["thresholds"]},
        )
    )
    return rows


__all__ = ["BUDGETS", "COMPOSED_BUDGET", "DynamicLogits", "build", "entries", "geometric_candidates"]
