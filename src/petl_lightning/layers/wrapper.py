"""Adapter layers, and wrappers of a frozen ``nn.Linear`` that merge themselves (as HF PEFT's layers).

- :class:`AdapterLayer`: every trainable adapter (RepAdapter's, ARC's, LoRA's, the bottleneck
  adapter) has a ``dropout`` whose rate may be set per depth, the multiply-adds it adds on ``n``
  tokens, and ``merged()``: the frozen layer with the adapter folded in, or a :class:`MergeError`
  saying why it cannot fold.
- :class:`AdaptedLinear`: an adapter that wraps a frozen ``nn.Linear`` (``base_layer``), so a timm
  block whose ``attn.qkv`` or ``mlp.fc1`` is wrapped runs timm's own ``forward`` unchanged. It
  changes the Linear's input (``adapt_input``: RepAdapter, ARC) or adds to its output
  (``output_update``: LoRA), so several tasks' adapters can share one call of the frozen Linear.
- :func:`wrap_linears`: a copy of a block with some Linears wrapped; the block itself is not touched
  and every tensor stays shared. :func:`merge_adapter_layers`: PEFT's ``merge_and_unload`` walk.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import NamedTuple, TypeVar

import torch
from torch import Tensor, nn

from petl_lightning.errors import ConfigError, MergeError

ModuleT = TypeVar("ModuleT", bound=nn.Module)


class AdapterLayer(nn.Module):
    """A trainable adapter. Subclasses set ``dropout`` and implement :meth:`flops` and :meth:`merged`."""

    dropout: nn.Dropout
    #: Whether :meth:`merged` folds this adapter away (its cost after merging is then zero).
    foldable: bool = False

    def flops(self, n_tokens: int) -> int:
        """Multiply-adds the adapter adds on ``n_tokens`` tokens."""
        raise NotImplementedError

    def merged(self) -> nn.Module:
        """The frozen layer this adapter becomes after folding (fp32), or :class:`MergeError`."""
        raise MergeError(f"{type(self).__name__} cannot be merged into the backbone.")


class LowRank(NamedTuple):
    """``u(x) = (x @ P + p) @ Q + q``: an adapter's update, ``P`` (in, r), ``p`` (r,), ``Q`` (r, out), ``q`` (out,)."""

    P: Tensor
    p: Tensor
    Q: Tensor
    q: Tensor


class AdaptedLinear(AdapterLayer):
    """An adapter around a frozen ``nn.Linear`` (kept as ``base_layer``, not copied)."""

    foldable = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise ConfigError(f"{type(self).__name__} wraps an nn.Linear, got {type(base_layer).__name__}.")
        self.base_layer = base_layer

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    def adapt_input(self, x: Tensor) -> Tensor:
        """What the frozen Linear reads instead of ``x`` (here ``x`` itself)."""
        return x

    def output_update(self, x: Tensor) -> Tensor | None:
        """What is added to the frozen Linear's output on ``x`` (None: nothing)."""
        return None

    def factors(self) -> LowRank:
        """The eval-mode update as low-rank factors: ``adapt_input(x) = x + u(x)`` (or, for an adapter
        with an ``output_update``, that update is ``u(x)``) with ``u(x) = (x @ P + p) @ Q + q``."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(self.adapt_input(x))
        update = self.output_update(x)
        return y if update is None else y + update

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def fold_into(self, linear: nn.Linear) -> None:
        """Fold the adapter into ``linear`` (an fp32 copy of ``base_layer``), in place."""
        raise NotImplementedError

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        base = self.base_layer
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=base.weight.device)
        out.weight.copy_(base.weight.float())
        if base.bias is not None:
            out.bias.copy_(base.bias.float())
        self.fold_into(out)
        return out.requires_grad_(False)


@torch.no_grad()
def fold_affine_into_linear(linear: nn.Linear, M: Tensor, c: Tensor) -> None:
    """In place: make ``linear(x)`` compute ``linear(x @ M.T + c)``, i.e. ``W' = W M``, ``b' = W c + b``.

    A Linear after an affine map is a Linear, so RepAdapter's and ARC's adapters disappear after
    training. The algebra runs in fp32 (whatever the Linear's dtype) and the result is cast back.
    ``linear`` must have a bias unless ``c`` is zero (a new bias would change the state-dict keys).
    """
    d = linear.in_features
    if tuple(M.shape) != (d, d) or tuple(c.shape) != (d,):
        raise MergeError(
            f"Cannot fold an affine map with M {tuple(M.shape)} and c {tuple(c.shape)} into "
            f"Linear(in_features={d}); expected M ({d}, {d}) and c ({d},)."
        )
    w = linear.weight.float()
    M, c = M.to(w.device, torch.float32), c.to(w.device, torch.float32)
    shift = w @ c
    if linear.bias is None:
        if bool(shift.abs().max() > 0):
            raise MergeError(
                "The adapter has a non-zero bias but the Linear after it has none (e.g. a model built "
                "with qkv_bias=False); it cannot be folded without adding a bias."
            )
    else:
        linear.bias.copy_(linear.bias.float() + shift)
    linear.weight.copy_(w @ M)


def shallow_copy(module: ModuleT) -> ModuleT:
    """A new module object of the same class whose child, parameter, buffer and hook tables are its
    own, while every child module and tensor in them is ``module``'s (so replacing a child of the
    copy leaves ``module`` as it was)."""
    clone = copy.copy(module)
    for key, value in vars(module).items():
        if isinstance(value, dict):
            clone.__dict__[key] = type(value)(value)
    return clone


def wrap_linears(block: ModuleT, wraps: Mapping[str, Callable[[nn.Linear], nn.Module]]) -> ModuleT:
    """A copy of ``block`` whose Linear at each dotted path (e.g. ``"attn.qkv"``) is replaced by
    ``wraps[path](linear)``. The modules on each path are copied (:func:`shallow_copy`), everything
    else and every tensor is shared with ``block``, which is not modified."""
    out = shallow_copy(block)
    copied: dict[str, nn.Module] = {"": out}
    for path in wraps:
        parts = path.split(".")
        owner: nn.Module = out
        for i, name in enumerate(parts[:-1]):
            key = ".".join(parts[: i + 1])
            if key not in copied:
                child = getattr(owner, name, None)
                if not isinstance(child, nn.Module):
                    raise ConfigError(f"{type(block).__name__} has no {key!r} module holding {path!r} to wrap.")
                copied[key] = shallow_copy(child)
                setattr(owner, name, copied[key])
            owner = copied[key]
        linear = getattr(owner, parts[-1], None)
        if not isinstance(linear, nn.Linear):
            raise ConfigError(f"{type(block).__name__}.{path} is {type(linear).__name__}, not an nn.Linear to wrap.")
        setattr(owner, parts[-1], wraps[path](linear))
    return out


def adapter_layers(module: nn.Module) -> list[AdapterLayer]:
    """Every :class:`AdapterLayer` inside ``module``, in module order."""
    return [m for m in module.modules() if isinstance(m, AdapterLayer)]


def merge_adapter_layers(module: ModuleT) -> ModuleT:
    """In place: replace every :class:`AdapterLayer` inside ``module`` by its ``merged()`` layer (call it
    on a copy to keep the trainable form); a layer that cannot fold raises :class:`MergeError`."""
    if isinstance(module, AdapterLayer):
        raise MergeError(f"Merge the module that holds the {type(module).__name__}, not the layer itself.")
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, AdapterLayer):
                setattr(parent, name, child.merged())
    return module


__all__ = [
    "AdaptedLinear",
    "AdapterLayer",
    "LowRank",
    "adapter_layers",
    "fold_affine_into_linear",
    "merge_adapter_layers",
    "shallow_copy",
    "wrap_linears",
]
