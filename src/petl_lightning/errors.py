"""User-facing errors, and the one wrapper that turns them into a one-line message and exit status 2.

Every problem a user can cause (bad path, bad file, bad name, bad label, bad argument) is raised as a
:class:`PETLError` whose message says what is wrong and how to fix it. Both console entry points
(``petl-lightning fit|test|...`` and ``petl-lightning vtab``) run through :func:`run_user_command`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


class PETLError(Exception):
    """A problem with the user's input, with a message that says what is wrong and how to fix it."""


class DataError(PETLError, ValueError):
    """Missing or malformed VTAB-1K data (root, task folder, list file, image, label)."""


class CheckpointError(PETLError, ValueError):
    """A checkpoint or weights file that is missing, of an unknown format, or does not fit."""


class ModelNameError(PETLError, ValueError):
    """An unknown timm model name, or a model the method cannot wrap."""


class ConfigError(PETLError, ValueError):
    """An argument value or configuration key that does not fit (sizes, rates, budgets, old names)."""


class MissingExtraError(PETLError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class MergeError(PETLError, ValueError):
    """An adapter cannot be folded into the layer it acts on (non-linear, or per-token decisions)."""


class ExportError(PETLError, RuntimeError):
    """A program could not be exported, or the written file does not compute what the module does."""


class RunnerError(PETLError, ValueError):
    """A bad ``petl-lightning vtab`` invocation (tasks, recipe, output folder)."""


class UnknownReferenceError(PETLError, KeyError):
    """An unknown name of a method whose published VTAB-1K numbers are looked up."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def require(module: str, extra: str) -> Any:
    """Import an optional dependency, or raise :class:`MissingExtraError` naming the pip extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(
            f"{module} is not installed; install the extra: pip install 'petl-lightning[{extra}]'."
        ) from None


def find_user_error(err: BaseException) -> PETLError | None:
    """The :class:`PETLError` behind ``err``, if any (jsonargparse and DataLoader workers wrap errors)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, PETLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line. A DataLoader worker re-raises the worker's exception with
    its traceback in the message ("Caught DataError in DataLoader worker ... Original Traceback"):
    only the original message, its last line, is kept."""
    text = str(err).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split())


def run_user_command(fn: Callable[[], Any]) -> int:
    """Run ``fn``; a user error prints ``error: <one line>`` on stderr and returns 2, success returns 0.
    Anything else (a bug) propagates with its traceback."""
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - only user errors are handled; the rest re-raise
        user_error = find_user_error(err)
        if user_error is None:
            raise
        print(f"error: {one_line(user_error)}", file=sys.stderr)
        return 2
    return 0


__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ExportError",
    "MergeError",
    "MissingExtraError",
    "ModelNameError",
    "PETLError",
    "RunnerError",
    "UnknownReferenceError",
    "find_user_error",
    "one_line",
    "require",
    "run_user_command",
]
