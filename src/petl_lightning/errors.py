"""User-facing errors.

Every problem a user can cause (bad path, bad file, bad name, bad label) is raised as a
:class:`PETLError`; the CLI prints its message without a stack trace and exits with status 2.
"""

from __future__ import annotations


class PETLError(Exception):
    """A problem with the user's input, with a message that says what is wrong and how to fix it."""


class DataError(PETLError, ValueError):
    """Missing or malformed VTAB-1K data (root, task folder, list file, image, label)."""


class CheckpointError(PETLError, ValueError):
    """A checkpoint or weights file that is missing, of an unknown format, or does not fit."""


class ModelNameError(PETLError, ValueError):
    """An unknown timm model name."""


class WeightsUnavailableError(PETLError, RuntimeError):
    """No weights source is available offline (no local file, no hub cache, no ``demo`` extra)."""
