"""Dyn-Adapter's stage programs: one per exit, built from the base's deployable blocks (folded where
the base folds, as trained otherwise, top-k for a token-skipping base) and the exits' heads."""

from __future__ import annotations

import copy

import torch
from torch import nn

from petl_lightning.deploy.stages import EarlyReadout, ExitStage, FinalReadout, TokenEmbed
from petl_lightning.methods.dyn_adapter.adapted import EarlyExitViT


def exit_stages(model: EarlyExitViT, keep_rate: float | None = None) -> list[ExitStage]:
    """The stage modules of ``model`` (fp32, CPU, eval mode; copies: ``model`` is not modified).
    ``keep_rate``: a token-skipping base's fixed top-k keep rate (default: its own)."""
    blocks = model.vit.deploy_blocks(keep_rate)
    timm_vit = model.vit.vit
    stages, start, last = [], 0, model.num_exits - 1
    for k, end in enumerate(model.exit_depths):
        readout: nn.Module
        if k < last:
            head = copy.deepcopy(model.exit_heads[k])
            readout = EarlyReadout(head, model.pool, model.vit.num_prefix_tokens, model.confidence)
        else:
            norm, fc_norm = copy.deepcopy(timm_vit.norm), copy.deepcopy(timm_vit.fc_norm)
            readout = FinalReadout(norm, fc_norm, copy.deepcopy(model.head))
        embed = TokenEmbed(timm_vit) if k == 0 else nn.Identity()
        stages.append(ExitStage(embed, nn.Sequential(*blocks[start:end]), readout))
        start = end
    return [s.to("cpu", torch.float32).eval() for s in stages]


__all__ = ["exit_stages"]
