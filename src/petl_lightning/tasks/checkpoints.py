"""Adapter-only checkpoints: which tensors a task saves, what a checkpoint must match to load, and
the global RNG states it carries (Lightning's helpers; numpy's key array as a tensor, so that
weights-only loading accepts it).

A checkpoint holds the trainable tensors (adapters, heads, calibrated thresholds) and, under
``petl``, the method, backbone and class count that wrote it; the frozen backbone is rebuilt from
its source on load. A tensor shared by several modules (ARC's bases) is saved once, under its
first name, and given to every name on load.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from torch import nn

from petl_lightning.errors import CheckpointError


def frozen_tensor_ids(module: nn.Module) -> set[int]:
    """Identities of the tensors of ``module``'s state dict that are not trainable parameters."""
    return {
        id(t)
        for t in module.state_dict(keep_vars=True).values()
        if not (isinstance(t, nn.Parameter) and t.requires_grad)
    }


def trainable_state_keys(module: nn.Module, frozen: nn.Module) -> list[str]:
    """State-dict keys of ``module`` whose tensors are not ``frozen``'s (the backbone's), each tensor
    once (the first of its names)."""
    skip, seen, keys = frozen_tensor_ids(frozen), set(), []
    for key, value in module.state_dict(keep_vars=True).items():
        if id(value) in skip or id(value) in seen:
            continue
        seen.add(id(value))
        keys.append(key)
    return keys


def complete_state(module: nn.Module, state: dict[str, Any]) -> None:
    """In place: give every key of ``module``'s state dict that ``state`` lacks a value: a tensor
    shared under several names gets the saved one, a frozen tensor its current one (so loading is
    whole and silent)."""
    first: dict[int, str] = {}
    own = module.state_dict(keep_vars=True)
    for key, value in own.items():
        first.setdefault(id(value), key)
    for key, value in own.items():
        if key not in state:
            canonical = first[id(value)]
            state[key] = state[canonical] if canonical in state else value.detach()


def check_checkpoint(
    state: Any,
    stored: Mapping[str, Any],
    identity: Mapping[str, Any],
    own: Mapping[str, Any],
    expected: list[str],
    name: str,
) -> None:
    """Raise :class:`CheckpointError` unless a checkpoint's ``state`` and ``stored`` identity fit a
    module with ``identity``, state dict ``own`` and trainable keys ``expected`` (``name`` for messages)."""
    if not isinstance(state, dict):
        raise CheckpointError("This file holds no 'state_dict'; it is not a petl_lightning checkpoint.")
    wrong = [
        f"{k} {stored[k]!r} (checkpoint) vs {identity[k]!r} (this run)"
        for k in identity
        if k in stored and stored[k] != identity[k]
    ]
    if wrong:
        raise CheckpointError(
            f"The checkpoint does not fit this run: {'; '.join(wrong)}. Test with the recipe and data of the run "
            f"that wrote it (its config.yaml)."
        )
    missing = [k for k in expected if k not in state]
    unknown = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in expected
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unknown or shapes:
        problems = [f"shape mismatch {'; '.join(shapes[:3])}"] if shapes else []
        problems += [f"missing {missing[:3]}"] if missing else []
        problems += [f"unknown {unknown[:3]}"] if unknown else []
        raise CheckpointError(
            f"Checkpoint does not fit {name}: {'; '.join(problems)}. Was it written by another method, task or "
            f"configuration (or by petl_lightning before 0.3, whose checkpoints name tensors differently)?"
        )


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


__all__ = [
    "check_checkpoint",
    "complete_state",
    "frozen_tensor_ids",
    "restore_rng",
    "rng_to_checkpoint",
    "trainable_state_keys",
]
