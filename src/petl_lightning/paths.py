"""Checks of where a command will write, made before any work, so that a bad path is one line and
not a traceback after minutes of work (nothing is left behind by the checks)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from petl_lightning.errors import ConfigError


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    probe = path.expanduser().absolute()
    while not probe.exists():
        probe = probe.parent
    return probe


def check_writable(folder: str | os.PathLike, option: str = "--trainer.default_root_dir") -> None:
    """Raise a one-line :class:`ConfigError` unless ``folder`` is, or can be created as, a folder we
    can write in (checked by writing and removing a probe file in its closest existing ancestor, so a
    read-only filesystem or ``/proc`` fails here; nothing else is created)."""
    probe = nearest_existing(Path(folder))
    if not probe.is_dir():
        raise ConfigError(
            f"Cannot create the folder {str(folder)!r}: {str(probe)!r} is not a folder; pass another {option}."
        )
    try:
        fd, name = tempfile.mkstemp(prefix=".petl-write-check-", dir=probe)
    except OSError as err:
        raise ConfigError(
            f"Cannot write under {str(folder)!r}: {str(probe)!r} is not writable ({err.strerror}); pass a "
            f"writable {option}."
        ) from None
    os.close(fd)
    os.unlink(name)


def check_output_file(path: str | os.PathLike, option: str = "--out") -> None:
    """A file to be written at ``path``: not an existing folder, and its folder writable."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"{option} {str(path)!r} is a folder; name the file to write.")
    check_writable(p.parent, option)


def check_output_folder(path: str | os.PathLike, option: str = "--out") -> None:
    """A folder to be written at ``path``: not an existing file, and writable (or creatable)."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{option} {str(path)!r} is an existing file; name a folder to write the files into.")
    check_writable(p, option)


__all__ = ["check_output_file", "check_output_folder", "check_writable", "nearest_existing"]
