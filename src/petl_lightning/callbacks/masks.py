"""Class maps as palette PNGs: what ``predict`` writes for a segmenter, one file per image.

A palette PNG stores the class index of each pixel (read it back with ``numpy.array(Image.open(p))``)
and shows each class in its own colour. The palette is the bit-interleaving colour map of PASCAL VOC
(class 0 black), so the files look like the benchmarks' own.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor


def palette(n: int = 256) -> list[int]:
    """Flat RGB palette of ``n`` colours: the bits of each class index spread over R, G and B."""
    colours = []
    for i in range(n):
        r = g = b = 0
        c = i
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours += [r, g, b]
    return colours


PALETTE = palette()


def write_mask_png(mask: Tensor, path: Path, size: tuple[int, int] | None = None) -> Path:
    """Write a class map (H, W) as a palette PNG at ``path`` (resized, nearest, to ``size`` = (W, H)
    when given), through a temporary file so no half-written file is left."""
    classes = int(mask.max()) if mask.numel() else 0
    if classes > 255:
        raise ValueError(f"A palette PNG holds class indices up to 255; this map has {classes}.")
    image = Image.fromarray(mask.to("cpu").numpy().astype(np.uint8), mode="P")
    image.putpalette(PALETTE)
    if size is not None and image.size != tuple(size):
        image = image.resize((int(size[0]), int(size[1])), Image.Resampling.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


__all__ = ["PALETTE", "palette", "write_mask_png"]
