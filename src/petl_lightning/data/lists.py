"""File lists of the VTAB-1K layout: parsing ``relative/path <label>`` lists (or a folder of images
for ``predict``) into samples that name their file and list line in errors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from petl_lightning.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Sample:
    """An image file and its label; ``list_file``/``line``: where it was declared (None for a folder walk)."""

    path: Path
    label: int
    list_file: Path | None = None
    line: int = 0

    def where(self) -> str:
        """``list.txt:12`` for a listed image, the image's path for a found one."""
        return f"{self.list_file}:{self.line}" if self.list_file is not None else str(self.path)

    def describe(self) -> str:
        """``list.txt:12: image <path>`` or ``image <path>``: how errors name it."""
        return f"{self.where()}: image {self.path}" if self.list_file is not None else f"image {self.path}"


def read_list(list_file: Path) -> list[Sample]:
    """Parse a VTAB-1K list file (``relative/path <int label>`` per line)."""
    if not list_file.is_file():
        raise DataError(f"List file not found: {list_file}.")
    samples = []
    base = list_file.parent
    for i, raw in enumerate(list_file.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{list_file}:{i}: expected '<relative image path> <integer label>', got {raw!r}.")
        samples.append(Sample(base / parts[0], int(parts[1]), list_file, i))
    if not samples:
        raise DataError(f"List file {list_file} is empty.")
    return samples


def read_images(source: Path) -> list[Sample]:
    """What ``predict`` reads: a list file (labels optional; -1 where absent) or a folder of images
    (searched recursively, sorted)."""
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"No images ({', '.join(IMAGE_SUFFIXES)}) under {source}.")
        return [Sample(p, -1, source, i) for i, p in enumerate(files, start=1)]
    if not source.is_file():
        raise DataError(
            f"Predict source {str(source)!r} not found: pass a list file or a folder of images "
            f"(--data.init_args.predict_list)."
        )
    samples = []
    for i, raw in enumerate(source.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        parts = line.rsplit(maxsplit=1)
        labelled = len(parts) == 2 and parts[1].lstrip("-").isdigit()
        samples.append(
            Sample(source.parent / (parts[0] if labelled else line), int(parts[1]) if labelled else -1, source, i)
        )
    if not samples:
        raise DataError(f"Predict list {source} is empty.")
    return samples


__all__ = ["IMAGE_SUFFIXES", "Sample", "read_images", "read_list"]
