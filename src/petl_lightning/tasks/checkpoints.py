"""Adapter-only checkpoints: which tensors a task saves, what a checkpoint must match to load, and
the global RNG states it carries (Lightning's helpers; numpy's key array as a tensor, so that
weights-only loading accepts it).

A checkpoint holds the trainable tensors (adapters, heads, calibrated thresholds) and, under
``petl``, the method, backbone and class count that wrote it; the frozen backbone is rebuilt from
its source on load. A tensor shared by several modules (ARC's bases) is saved once, under its
first name, and given to every name on load. :func:`read_checkpoint` reads a ``.ckpt`` (one-line
errors for damaged or foreign files) and :func:`load_trained` rebuilds the method it names (what
``export``, ``serve`` and :class:`~petl_lightning.tasks.multitask.MultiTaskModel` load).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
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


#: What ``--ckpt_path`` takes, said when a file is not a Lightning checkpoint (``fit`` and friends).
FIT_CHECKPOINT_HINT = (
    "--ckpt_path takes a .ckpt written by a fit run; backbone weights go to --model.init_args.checkpoint_path"
)


def read_checkpoint(path: str | Path, hint: str = FIT_CHECKPOINT_HINT) -> dict[str, Any]:
    """A Lightning ``.ckpt`` loaded on the CPU (weights only), or a one-line :class:`CheckpointError`
    that tells a damaged checkpoint (empty, truncated, corrupt) from a file that is not one (``hint``:
    what the command takes instead)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"Checkpoint not found: {str(p)!r}. Pass the .ckpt written by a fit run.")
    with p.open("rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"Checkpoint {str(p)!r} is empty (0 bytes): the run that wrote it was cut off; {hint}.")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure: damaged, or not a checkpoint
        if head == b"PK\x03\x04":  # torch's zip container that does not read: truncated or corrupt
            raise CheckpointError(
                f"Checkpoint {str(p)!r} is damaged (truncated or corrupt: {type(err).__name__}); use another "
                f"copy, or an earlier checkpoint of the run."
            ) from None
        raise CheckpointError(f"{str(p)!r} is not a Lightning checkpoint ({type(err).__name__}); {hint}.") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{str(p)!r} holds no 'state_dict', so it is not a Lightning checkpoint; {hint}.")
    return ckpt


def method_class(method: str) -> type | None:
    """The class a checkpoint's ``petl.method`` names (``module.ClassName``), or None."""
    module, _, name = method.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError):
        return None


#: What a command that loads a trained model takes (``export``, ``serve``).
TRAINED_CHECKPOINT_HINT = "pass the .ckpt a fit run wrote (e.g. <run>/checkpoints/last.ckpt)"


def load_trained(ckpt_path: str | Path, weights: str | None = None, hint: str = TRAINED_CHECKPOINT_HINT) -> Any:
    """The method a checkpoint names, rebuilt from its hyper-parameters (``weights``: the backbone
    file's new place) with its trained tensors, in eval mode on the CPU. Like Lightning's
    ``load_from_checkpoint``, whose own ``checkpoint_path`` argument hides the backbone's."""
    ckpt = read_checkpoint(ckpt_path, hint)
    method = ckpt.get("petl", {}).get("method", "")
    cls = method_class(method)
    if cls is None:
        raise CheckpointError(f"{ckpt_path} was not written by a petl_lightning method (method {method!r} unknown).")
    hparams = {k: v for k, v in ckpt.get("hyper_parameters", {}).items() if not k.startswith("_")}
    if weights:
        hparams["checkpoint_path"] = weights
    model = cls(**hparams)
    model.on_load_checkpoint(ckpt)
    model.load_state_dict(ckpt["state_dict"], strict=False)
    return model.eval()


__all__ = [
    "FIT_CHECKPOINT_HINT",
    "TRAINED_CHECKPOINT_HINT",
    "check_checkpoint",
    "complete_state",
    "frozen_tensor_ids",
    "load_trained",
    "read_checkpoint",
    "restore_rng",
    "rng_to_checkpoint",
    "trainable_state_keys",
]
