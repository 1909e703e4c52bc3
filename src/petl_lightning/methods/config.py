"""What every method's config shares: a dataclass of its options that adapts a frozen timm ViT.

Each method folder has one (``RepAdapterConfig``, ``ARCConfig``, ``LoRAConfig``, ``AdapterConfig``,
``DyTConfig``, ``DynAdapterConfig``), validated in ``__post_init__`` with one-line errors;
:func:`petl_lightning.adapt` calls its :meth:`MethodConfig.build`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, is_dataclass
from typing import Any, TypeVar, get_type_hints

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


def config_to_dict(config: MethodConfig) -> dict[str, Any]:
    """``{"class_path": ..., "init_args": {...}}`` of a method's config (plain values: what a checkpoint's
    hyper-parameters hold and a recipe's ``method:`` key takes)."""
    cls = type(config)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": asdict(config)}


def config_from(value: MethodConfig | Mapping[str, Any]) -> MethodConfig:
    """A method's config from itself or from :func:`config_to_dict`'s form (option groups as dicts)."""
    if isinstance(value, MethodConfig):
        return value
    path = str(value.get("class_path", "")) if isinstance(value, Mapping) else ""
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, MethodConfig)):
        raise ConfigError(
            f"method must be a method's config (class_path petl_lightning.RepAdapterConfig, ARCConfig, LoRAConfig, "
            f"DyTConfig, ...), got {path or value!r}."
        )
    args = dict(value.get("init_args") or {})
    hints = get_type_hints(cls)
    for f in fields(cls):
        if isinstance(args.get(f.name), Mapping) and is_dataclass(hints.get(f.name)):
            args[f.name] = as_group(hints[f.name], args[f.name], f.name)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ConfigError(f"Unknown key(s) {unknown} for {cls.__name__}; known: {', '.join(sorted(known))}.")
    return cls(**args)


__all__ = [
    "PLACEMENTS",
    "config_from",
    "config_to_dict",
    "as_group",
    "PLACEMENT_LINEARS",
    "MethodConfig",
    "check_choice",
    "check_count",
    "check_rate",
]
