"""``petl-lightning export``: a trained checkpoint to a deployable file, in a new process.

    petl-lightning export --ckpt_path runs/repadapter/checkpoints/last.ckpt --out model.onnx \\
        [--format onnx|torch_export|safetensors] [--opset 20] [--weights /new/place/ViT-B_16.npz]
    petl-lightning export --ckpt_path runs/dyt/checkpoints/last.ckpt --out dyt.pt2 --keep_rate 0.5
    petl-lightning export --ckpt_path runs/dyn_adapter/checkpoints/last.ckpt --out exported/ --exits

The checkpoint names its method; the method is rebuilt (its frozen backbone from the weights path
stored in the checkpoint, or ``--weights`` when the file moved) and :meth:`export` writes its
deployable form with its metadata (model name, image size, classes, normalisation): the merged
plain timm model (safetensors weights, or an ONNX / ``torch.export`` program with a dynamic batch),
DyT's top-k program at ``--keep_rate``, or with ``--exits`` Dyn-Adapter's stage programs and
early-exit driver (see ``docs/deploy.md``). Nothing is written unless the export completes.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from petl_lightning.deploy.programs import FORMATS, check_exporter, resolve_format
from petl_lightning.errors import ConfigError, run_user_command
from petl_lightning.paths import check_output_file, check_output_folder
from petl_lightning.tasks.checkpoints import load_trained

EXPORT_CHECKPOINT_HINT = "export --ckpt_path takes the .ckpt a fit run wrote (e.g. <run>/checkpoints/last.ckpt)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="petl-lightning export", description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--ckpt_path", required=True, help="a .ckpt written by petl-lightning fit")
    p.add_argument("--out", required=True, help="the file to write (.onnx, .pt2, .safetensors); with --exits a folder")
    p.add_argument("--format", choices=FORMATS, default=None, help="default: from the --out suffix (onnx with --exits)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset, 18-23 (default: torch.onnx's)")
    p.add_argument(
        "--keep_rate",
        type=float,
        default=None,
        help="share of patch tokens kept (top-k) per block: DyT, or a dyt-base Dyn-Adapter with --exits",
    )
    p.add_argument("--exits", action="store_true", help="Dyn-Adapter: one program per exit and an early-exit driver")
    p.add_argument("--weights", default=None, help="the backbone weights file, when it is not where training found it")
    return p


def export_checkpoint(
    ckpt_path: str | Path,
    out: str | Path,
    weights: str | None = None,
    fmt: str | None = None,
    opset: int | None = None,
    keep_rate: float | None = None,
    exits: bool = False,
) -> Path:
    """Rebuild the method of ``ckpt_path`` and export it to ``out``; returns the written path (with
    ``exits``: Dyn-Adapter's stage folder)."""
    fmt = (fmt or "onnx") if exits else resolve_format(out, fmt)
    (check_output_folder if exits else check_output_file)(out, "--out")  # before any work
    check_exporter(fmt, opset)  # before the (slow) rebuild
    model = load_trained(ckpt_path, weights, EXPORT_CHECKPOINT_HINT)
    if not exits:
        return model.export(out, fmt, opset, keep_rate)
    if not hasattr(model, "export_exits"):
        raise ConfigError(f"--exits exports early-exit stages; {type(model).__name__} has no exits (drop --exits).")
    return model.export_exits(out, fmt, opset, keep_rate)


def export_main(argv: Sequence[str]) -> int:
    """Entry of ``petl-lightning export``: 0 on success, 2 on a user error."""
    ns = build_parser().parse_args(list(argv))

    def go() -> None:
        path = export_checkpoint(ns.ckpt_path, ns.out, ns.weights, ns.format, ns.opset, ns.keep_rate, ns.exits)
        print(f"exported {path}")

    return run_user_command(go)


__all__ = ["FORMATS", "export_checkpoint", "export_main", "load_trained"]
