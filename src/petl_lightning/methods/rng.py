"""The global RNG states in a checkpoint: Lightning's helpers collect and set them (torch, CUDA,
numpy, Python); numpy's key array travels as a tensor so that weights-only loading accepts it."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states


def rng_to_checkpoint() -> dict[str, Any]:
    """This process's RNG states (Lightning's helper, CUDA included), numpy's keys as a tensor."""
    out = _collect_rng_states(include_cuda=True)
    if "numpy" in out:
        kind, keys, pos, has_gauss, cached = out["numpy"]
        out["numpy"] = [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
    return out


def restore_rng(states: dict[str, Any]) -> None:
    """Set the RNG states :func:`rng_to_checkpoint` saved (Lightning's helper); a CUDA state saved
    on another kind of machine is skipped."""
    out = dict(states)
    if "numpy" in out:
        kind, keys, pos, has_gauss, cached = out["numpy"]
        out["numpy"] = (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
    if not torch.cuda.is_available() or not out.get("torch.cuda"):
        out.pop("torch.cuda", None)
    _set_rng_states(out)


__all__ = ["restore_rng", "rng_to_checkpoint"]
