"""What every method's config shares: a dataclass of its options that adapts a frozen timm ViT.

Each method folder has one (``RepAdapterConfig``, ``ARCConfig``, ``LoRAConfig``, ``AdapterConfig``,
``DyTConfig``, ``DynAdapterConfig``), validated in ``__post_init__`` with one-line errors;
:func:`petl_lightning.adapt` calls its :meth:`MethodConfig.build`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from timm.models.vision_transformer import VisionTransformer
from torch import nn

from petl_lightning.errors import ConfigError

#: Where adapters go: on the input of ``attn.qkv`` and ``mlp.fc1``, or of ``attn.qkv`` only.
PLACEMENTS = ("attn_mlp", "attn")
PLACEMENT_LINEARS = {"attn_mlp": ("attn.qkv", "mlp.fc1"), "attn": ("attn.qkv",)}


@dataclass
class MethodConfig:
    """A PETL method's options (subclasses add the fields and implement :meth:`build`)."""

    def build(self, vit: VisionTransformer) -> nn.Module:
        """The adapted model over ``vit`` (a frozen timm ViT, shared, not modified)."""
        raise NotImplementedError


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    """A one-line :class:`ConfigError` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"Unknown {name} {value!r}; choose one of {', '.join(map(str, choices))}.")


def check_count(name: str, value: int) -> None:
    """A one-line :class:`ConfigError` unless ``value`` is at least 1 (widths, ranks, experts)."""
    if not value >= 1:
        raise ConfigError(f"{name} must be at least 1, got {value}.")


def check_rate(name: str, value: float, upper_open: bool = True) -> None:
    """A one-line :class:`ConfigError` unless ``value`` lies in [0, 1) (or [0, 1] when not ``upper_open``)."""
    ok = 0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0
    if not ok:
        raise ConfigError(f"{name} must lie in [0, {'1)' if upper_open else '1]'}, got {value}.")


G = TypeVar("G")


def as_group(cls: type[G], value: G | Mapping[str, Any] | None, name: str) -> G:
    """An option group (a dataclass) from itself, a plain dict (as checkpoints' hyper-parameters store
    it) or None (its defaults); unknown keys are a one-line error naming the valid ones."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"Unknown key(s) {unknown} for {name}; known: {', '.join(sorted(known))}.")
        return cls(**value)
    raise ConfigError(f"Expected a {cls.__name__} or a dict for {name}, got {type(value).__name__}.")


__all__ = ["PLACEMENTS", "as_group", "PLACEMENT_LINEARS", "MethodConfig", "check_choice", "check_count", "check_rate"]
