"""Texture mosaics: a small, real-image segmentation task built from a texture-classification folder.

Each mosaic is a square canvas split into 3-6 Voronoi regions, each filled with a random crop of a
texture image of a different class; the mask is each pixel's class. Built from a VTAB-1K-layout
folder (``classes.txt``, ``train800.txt``, ``val200.txt``, ``test.txt``), e.g. DTD, train mosaics
draw only from ``train800``, val from ``val200`` and test from ``test`` images, so no split leaks
into another. The result is a :class:`~petl_lightning.data.segmentation.SegmentationFolderDataModule`
folder; images and masks are PNG (lossless: the same seed gives the same bytes, and borders stay sharp).

    python -m petl_lightning.data.mosaics SOURCE OUT [--size 112] [--train N --val N --test N] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from petl_lightning.data.lists import read_list
from petl_lightning.data.seg_dataset import read_class_names
from petl_lightning.errors import DataError, run_user_command

SPLIT_LISTS = {"train": "train800.txt", "val": "val200.txt", "test": "test.txt"}
DEFAULT_COUNTS = {"train": 200, "val": 40, "test": 100}
MANIFEST = "mosaics.json"


def _seed_points(rng: np.random.Generator, size: int, k: int) -> np.ndarray:
    """``k`` distinct pixels, at least ``size / (k + 1)`` apart where that is found quickly (no sliver regions)."""
    points: list[np.ndarray] = []
    tries = 0
    while len(points) < k:
        p = rng.integers(0, size, 2)
        gap = size / (k + 1) if tries < 1000 else 1.0
        tries += 1
        if all(np.hypot(*(p - q)) >= gap for q in points):
            points.append(p)
    return np.stack(points)


def _texture(rng: np.random.Generator, path: Path, size: int) -> np.ndarray:
    """A random square crop of the image at ``path`` (side from ``size`` to the short side), resized to ``size``."""
    with Image.open(path) as im:
        img = im.convert("RGB")
    w, h = img.size
    side = int(rng.integers(min(size, w, h), min(w, h) + 1))
    x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    return np.asarray(img.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.BILINEAR))


def _mosaic(
    rng: np.random.Generator, pool: Mapping[int, Sequence[Path]], size: int, regions: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """One ``(image, mask, source images)``: a Voronoi partition from random seed points, a class per region."""
    k = int(rng.integers(regions[0], regions[1] + 1))
    labels = rng.choice(sorted(pool), size=k, replace=False)
    points = _seed_points(rng, size, k)
    yy, xx = np.mgrid[:size, :size]
    region = ((yy[None] - points[:, :1, None]) ** 2 + (xx[None] - points[:, 1:, None]) ** 2).argmin(0)
    canvas = np.zeros((size, size, 3), np.uint8)
    used = []
    for r, label in enumerate(labels):
        files = pool[int(label)]
        path = files[int(rng.integers(len(files)))]
        canvas[region == r] = _texture(rng, path, size)[region == r]
        used.append(path)
    return canvas, labels[region].astype(np.uint8), used


def build_texture_mosaics(
    source_root: str | Path,
    out_root: str | Path,
    size: int = 112,
    counts: Mapping[str, int] | None = None,
    regions: tuple[int, int] = (3, 6),
    seed: int = 0,
) -> Path:
    """Write ``counts[split]`` mosaics per split (a split left out or 0 is not written) to ``out_root``
    and return it. The build is written beside ``out_root`` and renamed into place; a non-empty
    ``out_root`` is refused unless it is a build with the same parameters (then it is returned as it
    is). ``mosaics.json`` holds the parameters and each mosaic's source images, relative to the source."""
    source, out = Path(source_root).expanduser().resolve(), Path(out_root).expanduser()
    counts = dict(DEFAULT_COUNTS if counts is None else counts)
    unknown = sorted(set(counts) - set(SPLIT_LISTS))
    if unknown or any(n < 0 for n in counts.values()) or counts.get("train", 0) < 1:
        raise DataError(
            f"counts must give train (at least 1) and optionally val and test, each 0 or more; got {counts}."
        )
    lo, hi = regions
    split_counts = {s: int(counts.get(s, 0)) for s in SPLIT_LISTS}
    params = {
        "source": str(source),
        "size": size,
        "counts": split_counts,
        "regions": [lo, hi],
        "seed": seed,
    }

    def built() -> bool:
        manifest = out / MANIFEST
        return manifest.is_file() and json.loads(manifest.read_text()).get("params") == params

    if out.is_dir() and any(out.iterdir()):
        if built():
            return out
        raise DataError(
            f"{out} is not empty and is not a mosaic build with these parameters: pass a new or empty folder."
        )
    if size < 8:
        raise DataError(f"size must be at least 8 pixels, got {size}.")
    classes = read_class_names(source / "classes.txt")
    if not 1 <= lo <= hi <= len(classes):
        raise DataError(f"regions must be (low, high) with 1 <= low <= high <= {len(classes)} classes, got {regions}.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        sources: dict[str, list[list[str]]] = {}
        for index, (split, list_name) in enumerate(SPLIT_LISTS.items()):
            n = split_counts[split]
            if not n:
                continue
            pool: dict[int, list[Path]] = {}
            for s in read_list(source / list_name):
                pool.setdefault(s.label, []).append(s.path)
            if len(pool) < hi or max(pool) >= len(classes):
                raise DataError(
                    f"{source / list_name} needs images of at least {hi} classes, labels below {len(classes)}: "
                    f"lower regions or fix the list."
                )
            rng = np.random.default_rng([seed, index])
            for sub in ("images", "masks"):
                (tmp / split / sub).mkdir(parents=True)
            sources[split] = []
            for i in range(n):
                image, mask, used = _mosaic(rng, pool, size, (lo, hi))
                Image.fromarray(image, "RGB").save(tmp / split / "images" / f"{split}_{i:04d}.png")
                Image.fromarray(mask, "L").save(tmp / split / "masks" / f"{split}_{i:04d}.png")
                sources[split].append([str(p.relative_to(source)) for p in used])
        (tmp / "classes.txt").write_text("\n".join(classes) + "\n")
        (tmp / MANIFEST).write_text(json.dumps({"params": params, "classes": classes, "sources": sources}, indent=1))
        if out.is_dir():
            out.rmdir()
        try:
            tmp.rename(out)
        except OSError:  # another process finished the same build first
            if not built():
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build texture-mosaic segmentation data from a VTAB-1K texture folder."
    )
    parser.add_argument("source", help="VTAB-1K-layout folder (classes.txt, train800.txt, val200.txt, test.txt)")
    parser.add_argument("out", help="output folder (new or empty)")
    parser.add_argument("--size", type=int, default=112)
    for split, n in DEFAULT_COUNTS.items():
        parser.add_argument(f"--{split}", type=int, default=n, help=f"{split} mosaics (default {n})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    def run() -> None:
        counts = {s: getattr(args, s) for s in DEFAULT_COUNTS}
        out = build_texture_mosaics(args.source, args.out, args.size, counts, seed=args.seed)
        print(f"Texture mosaics ({', '.join(f'{s} {n}' for s, n in counts.items())}) in {out}")

    return run_user_command(run)


__all__ = ["DEFAULT_COUNTS", "build_texture_mosaics", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
