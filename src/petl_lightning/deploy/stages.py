"""An early-exit model as a sequence of stage programs, one per exit, plus a standalone driver.

Stage ``k`` runs the blocks after exit ``k - 1`` up to exit ``k`` (stage 0 starts with the patch
embedding) and exit ``k``'s readout: early stages map tokens (images for stage 0) to ``(tokens,
logits, confidence)``, the last stage maps tokens to the final logits. The model's confidence rule
is part of each early stage's program, so the driver only compares it with the exit's threshold.

The method builds the stage modules (:class:`ExitStage` of its own blocks and heads);
:func:`export_exit_stages` writes them, ``deploy.json`` (stage files, exit depths, thresholds,
metadata) and a copy of :mod:`petl_lightning.deploy.driver`, which runs them without petl_lightning.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from petl_lightning.adapted import AdaptedViT
from petl_lightning.deploy.programs import SUFFIXES, check_exporter, export_program
from petl_lightning.errors import ConfigError
from petl_lightning.layers.exits import pool_exit_tokens

DRIVER = Path(__file__).with_name("driver.py")
CONFIG_NAME = "deploy.json"


class EarlyReadout(nn.Module):
    """An early exit: pooled tokens through its head, and the model's confidence of the logits."""

    def __init__(self, head: nn.Module, pool: str, num_prefix_tokens: int, confidence: Callable[[Tensor], Tensor]):
        super().__init__()
        self.head, self.pool, self.num_prefix_tokens = head, pool, num_prefix_tokens
        self.confidence = confidence

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.head(pool_exit_tokens(tokens, self.pool, self.num_prefix_tokens))
        return logits, self.confidence(logits)


class FinalReadout(nn.Module):
    """The last exit, as timm's ``forward_head`` with ``global_pool="token"``: final norm, CLS, head."""

    def __init__(self, norm: nn.Module, fc_norm: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.norm, self.fc_norm, self.head = norm, fc_norm, head

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.fc_norm(self.norm(tokens)[:, 0]))


class TokenEmbed(nn.Module):
    """Images to tokens (patch embedding, prefix tokens, position embedding, ``norm_pre``) on a
    block-less copy of the timm model ``vit``."""

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.vit = AdaptedViT(copy.deepcopy(vit, memo={id(vit.blocks): nn.Sequential()}), [])

    def forward(self, images: Tensor) -> Tensor:
        return self.vit.embed(images)


class ExitStage(nn.Module):
    """One stage: ``embed`` (stage 0's :class:`TokenEmbed`, else identity), ``blocks``, then ``readout``."""

    def __init__(self, embed: nn.Module, blocks: nn.Sequential, readout: nn.Module) -> None:
        super().__init__()
        self.embed, self.blocks, self.readout = embed, blocks, readout

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        tokens = self.blocks(self.embed(x))
        out = self.readout(tokens)
        return (out,) if isinstance(out, Tensor) else (tokens, *out)


def export_exit_stages(
    stages: Sequence[nn.Module],
    exit_depths: Sequence[int],
    thresholds: Sequence[float],
    confidence: str,
    metadata: dict[str, Any],
    example: Tensor,
    folder: str | Path,
    fmt: str = "onnx",
    opset: int | None = None,
) -> Path:
    """Write ``stage{k}.onnx`` (or ``.pt2``) for every stage, ``deploy.json`` and ``driver.py`` into
    ``folder``; returns the folder. ``thresholds``: the early exits' (``+inf``: the exit takes no
    image, written as ``null``); edit ``deploy.json`` to move the operating point without exporting
    again. ``example``: images the first stage is traced with."""
    if fmt not in ("onnx", "torch_export"):
        raise ConfigError(f"Early-exit stages export as onnx or torch_export programs, not {fmt!r}.")
    check_exporter(fmt, opset)
    out = Path(folder).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    x, names = example, []
    with torch.no_grad():
        for k, stage in enumerate(stages):
            early = k < len(stages) - 1
            name = f"stage{k}{SUFFIXES[fmt]}"
            outputs = ("tokens_out", "logits", "confidence") if early else ("logits",)
            inputs = ("images",) if k == 0 else ("tokens",)
            export_program(stage, (x,), out / name, fmt, opset, inputs, outputs, {**metadata, "stage": k})
            names.append(name)
            if early:
                x = stage(x)[0]
    config = {
        "format": fmt,
        "stages": names,
        "exit_depths": list(exit_depths),
        "thresholds": [float(t) if t < math.inf else None for t in thresholds],
        "confidence": confidence,
        "metadata": metadata,
    }
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=1) + "\n")
    shutil.copyfile(DRIVER, out / DRIVER.name)
    return out


__all__ = ["CONFIG_NAME", "EarlyReadout", "ExitStage", "FinalReadout", "TokenEmbed", "export_exit_stages"]
