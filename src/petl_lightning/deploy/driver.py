"""Early-exit inference of an exported Dyn-Adapter, without petl_lightning.

``DynAdapter.export_exits(folder)`` (``petl-lightning export --exits``) writes into one folder one
program per exit (``stage0.onnx``, ``stage1.onnx``, ... or ``.pt2``), ``deploy.json`` and a copy of
this file. Stage 0 takes images (B, C, H, W) and returns the tokens after exit 0's block, exit 0's
logits and their confidence; stage k takes the tokens of the images still running and returns the
same; the last stage returns the final logits. After each early exit, the images whose confidence
is at least the exit's threshold are done and leave the batch; an exit whose threshold is ``null``
takes no image. Edit the thresholds in ``deploy.json`` to move the operating point.

Needs numpy, and onnxruntime (``.onnx`` stages) or torch (``.pt2`` stages)::

    from driver import EarlyExitModel
    model = EarlyExitModel("exported/")        # the folder holding deploy.json
    logits, exits = model(images)              # (B, K) float32 and (B,) int64: the exit of each image

    python exported/driver.py images.npy [--save out.npz]   # prints "image class exit" per image

Images are float32, resized and normalised as ``deploy.json``'s ``metadata`` says (img_size,
interpolation, mean, std).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Stage = Callable[[np.ndarray], list[np.ndarray]]


def load_stage(path: Path, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0) -> Stage:
    """A stage program as a function of one array to its output arrays (``providers``, ``threads``:
    onnxruntime's execution providers and intra-op threads, 0 = its default)."""
    if path.suffix == ".onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=list(providers))
        name = session.get_inputs()[0].name
        return lambda x: list(session.run(None, {name: x}))
    import torch

    program = torch.export.load(str(path)).module()

    def run(x: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad():
            out = program(torch.from_numpy(x))
        return [t.numpy() for t in (out if isinstance(out, (tuple, list)) else (out,))]

    return run


class EarlyExitModel:
    """The stages of ``folder`` and the early-exit rule of its ``deploy.json`` (``providers``,
    ``threads``: onnxruntime's execution providers and intra-op threads for ONNX stages)."""

    def __init__(
        self, folder: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0
    ) -> None:
        self.folder = Path(folder)
        self.config: dict[str, Any] = json.loads((self.folder / "deploy.json").read_text())
        self.stages = [load_stage(self.folder / name, providers, threads) for name in self.config["stages"]]
        self.thresholds = [math.inf if t is None else float(t) for t in self.config["thresholds"]]

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits (B, K) and the exit index of every image (B,)."""
        x = np.ascontiguousarray(images, dtype=np.float32)
        b, last = x.shape[0], len(self.stages) - 1
        remaining = np.arange(b)
        exits = np.full(b, last, dtype=np.int64)
        logits_out: np.ndarray | None = None
        for k, stage in enumerate(self.stages):
            out = stage(x)
            logits = out[0] if k == last else out[1]
            if logits_out is None:
                logits_out = np.empty((b, logits.shape[1]), dtype=np.float32)
            if k == last:
                logits_out[remaining] = logits
                break
            x = out[0]
            if not self.thresholds[k] < math.inf:
                continue
            done = out[2] >= self.thresholds[k]
            logits_out[remaining[done]] = logits[done]
            exits[remaining[done]] = k
            remaining, x = remaining[~done], np.ascontiguousarray(x[~done])
            if remaining.size == 0:
                break
        assert logits_out is not None
        return logits_out, exits


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Early-exit inference of the stage programs beside this file.")
    p.add_argument("images", help="a .npy array of images (B, C, H, W), float32, normalised")
    p.add_argument("--folder", default=str(Path(__file__).resolve().parent), help="the folder of deploy.json")
    p.add_argument("--save", default=None, help="also write logits and exits to this .npz file")
    args = p.parse_args(argv)
    logits, exits = EarlyExitModel(args.folder)(np.load(args.images))
    for i, (c, e) in enumerate(zip(logits.argmax(axis=1), exits)):
        print(i, int(c), int(e))
    if args.save:
        np.savez(args.save, logits=logits, exits=exits)
    return 0


if __name__ == "__main__":
    sys.exit(main())
