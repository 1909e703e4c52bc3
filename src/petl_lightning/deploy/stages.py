"""Dyn-Adapter as a sequence of stage programs, one per exit, plus a standalone early-exit driver.

Stage ``k`` runs the blocks after exit ``k - 1`` up to exit ``k`` (stage 0 starts with the patch
embedding) and exit ``k``'s head: early stages map tokens (images for stage 0) to ``(tokens, logits,
confidence)``, the last stage maps tokens to the final logits. The model's confidence rule is part of
each early stage's program, so the driver only compares it with the exit's threshold. The blocks are
the merged base's (adapters folded into the frozen Linears) where the base folds, the trained blocks
otherwise (the bottleneck ``adapter`` base).

:func:`export_exit_stages` writes the stage files, ``deploy.json`` (stage files, exit depths,
thresholds, metadata) and a copy of :mod:`petl_lightning.deploy.driver`, which runs them without
petl_lightning; ``tests/test_deploy_dyn_adapter.py`` checks that its predictions and exits equal
``DynAdapter.infer``'s.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from petl_lightning.backbone import FrozenViT
from petl_lightning.deploy.programs import SUFFIXES, check_exporter, example_images, export_program
from petl_lightning.errors import ConfigError
from petl_lightning.layers.dyt_block import DyTBlock
from petl_lightning.layers.exits import pool_exit_tokens
from petl_lightning.merge import MergeError

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


class ExitStage(nn.Module):
    """One stage: ``embed`` (stage 0's patch embedding, else identity), ``blocks``, then ``readout``."""

    def __init__(self, embed: nn.Module, blocks: nn.Sequential, readout: nn.Module) -> None:
        super().__init__()
        self.embed, self.blocks, self.readout = embed, blocks, readout

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        tokens = self.blocks(self.embed(x))
        out = self.readout(tokens)
        return (out,) if isinstance(out, Tensor) else (tokens, *out)


class TokenEmbed(nn.Module):
    """Images to tokens: the backbone's patch embedding, prefix tokens, position embedding and
    ``norm_pre`` (:meth:`FrozenViT.embed`), on a block-less copy of the backbone ``vit`` (built by
    ``model_kwargs``, the method's, with ``depth=0``)."""

    def __init__(self, vit: FrozenViT, model_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        kwargs = {**(model_kwargs or {}), "depth": 0}
        kwargs.pop("drop_path_rate", None)
        img_size = vit.vit.patch_embed.img_size[0]
        self.vit = FrozenViT(vit.model_name, pretrained=False, img_size=img_size, model_kwargs=kwargs)
        source = vit.vit.state_dict()
        self.vit.vit.load_state_dict({k: source[k] for k in self.vit.vit.state_dict()}, strict=True)

    def forward(self, images: Tensor) -> Tensor:
        return self.vit.embed(images)


class TopKBlock(nn.Module):
    """A DyT block keeping each image's ``keep_count`` top-logit patch tokens (static shapes)."""

    def __init__(self, block: DyTBlock, keep_count: int) -> None:
        super().__init__()
        self.block, self.keep_count = block, keep_count

    def forward(self, tokens: Tensor) -> Tensor:
        return self.block.forward_gathered(tokens, self.keep_count)[0]


def build_stages(model: Any, keep_rate: float | None = None) -> list[ExitStage]:
    """The stage modules of a :class:`~petl_lightning.methods.dyn_adapter.DynAdapter` (fp32, CPU,
    eval mode; copies: ``model`` is not modified). The ``dyt`` base keeps the top-k tokens at
    ``keep_rate`` (default: its ``skipping.fixed_keep_rate``) in every block."""
    try:
        merged = model.merge()
        blocks, norm, fc_norm = list(merged.blocks), merged.norm, merged.fc_norm
    except MergeError:  # the adapter and dyt bases do not fold: their trained blocks run as they are
        blocks = list(copy.deepcopy(model.blocks))
        norm, fc_norm = copy.deepcopy(model.vit.vit.norm), copy.deepcopy(model.vit.vit.fc_norm)
    if any(isinstance(b, DyTBlock) for b in blocks):
        rate = model.skipping.fixed_keep_rate if keep_rate is None else keep_rate
        if rate is None or not 0.0 <= rate <= 1.0:
            raise ConfigError(
                "The dyt base's stages export with a fixed keep rate (the top-k tokens per image and block) in "
                f"[0, 1]; pass keep_rate (petl-lightning export --keep_rate), got {rate}."
            )
        k = int(round(rate * model.vit.num_patches))
        blocks = [TopKBlock(b, k) for b in blocks]
    elif keep_rate is not None:
        raise ConfigError("keep_rate applies to the dyt base's stages only (this model skips no tokens).")
    stages, start, last = [], 0, model.num_exits - 1
    pool, prefix = model.exit_config.pool, model.vit.num_prefix_tokens
    for k, end in enumerate(model.exit_depths):
        readout: nn.Module
        if k < last:
            readout = EarlyReadout(copy.deepcopy(model.exit_heads[k]), pool, prefix, model.confidence)
        else:
            readout = FinalReadout(norm, fc_norm, copy.deepcopy(model.head))
        embed = TokenEmbed(model.vit, model.hparams.model_kwargs) if k == 0 else nn.Identity()
        stages.append(ExitStage(embed, nn.Sequential(*blocks[start:end]), readout))
        start = end
    return [s.to("cpu", torch.float32).eval() for s in stages]


def export_exit_stages(
    model: Any, folder: str | Path, fmt: str = "onnx", opset: int | None = None, keep_rate: float | None = None
) -> Path:
    """Write ``stage{k}.onnx`` (or ``.pt2``) for every exit, ``deploy.json`` and ``driver.py`` into
    ``folder``; returns the folder. Thresholds: the model's current ones (``null``: the exit takes no
    image); edit ``deploy.json`` to move the operating point without exporting again."""
    if fmt not in ("onnx", "torch_export"):
        raise ConfigError(f"Dyn-Adapter's stages export as onnx or torch_export programs, not {fmt!r}.")
    check_exporter(fmt, opset)
    out = Path(folder).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    meta = model.export_metadata()
    x: Tensor = example_images(model)
    names = []
    with torch.no_grad():
        for k, stage in enumerate(build_stages(model, keep_rate)):
            early = k < model.num_exits - 1
            name = f"stage{k}{SUFFIXES[fmt]}"
            outputs = ("tokens_out", "logits", "confidence") if early else ("logits",)
            inputs = ("images",) if k == 0 else ("tokens",)
            export_program(stage, (x,), out / name, fmt, opset, inputs, outputs, {**meta, "stage": k})
            names.append(name)
            if early:
                x = stage(x)[0]
    thresholds = [float(t) if t < math.inf else None for t in model.thresholds.tolist()]
    config = {
        "format": fmt,
        "stages": names,
        "exit_depths": list(model.exit_depths),
        "thresholds": thresholds,
        "confidence": model.calibration_config.confidence,
        "metadata": meta,
    }
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=1) + "\n")
    shutil.copyfile(DRIVER, out / DRIVER.name)
    return out


__all__ = [
    "CONFIG_NAME",
    "EarlyReadout",
    "ExitStage",
    "FinalReadout",
    "TokenEmbed",
    "TopKBlock",
    "build_stages",
    "export_exit_stages",
]
