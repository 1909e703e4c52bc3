"""``make demo`` / ``python -m petl_lightning.demo``: the whole pipeline, offline, on CPU, in minutes.

It writes scikit-learn's bundled handwritten digits (1,797 real labelled 8×8 images, 10 classes) as a
task folder in the VTAB-1K layout, then fits and tests ``recipes/demo.yaml`` through the same CLI
users run, and prints test accuracy and GFLOPs per image. The ViT is a small random-weight model (no
download is possible offline), so the accuracy shows the pipeline works; it is not a benchmark.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image


def build_digits_task(root: Path, size: int = 32) -> Path:
    """Write the digits as ``<root>/digits/`` with train800/val200/train800val200/test lists."""
    from sklearn.datasets import load_digits

    task_dir = root / "digits"
    if (task_dir / "test.txt").is_file():
        return task_dir
    digits = load_digits()
    order = np.random.RandomState(0).permutation(len(digits.target))
    (task_dir / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, idx in enumerate(order):
        pixels = (digits.images[idx] * (255.0 / 16.0)).astype(np.uint8)
        img = Image.fromarray(pixels).resize((size, size), Image.NEAREST).convert("RGB")
        name = f"images/{i:04d}.png"
        img.save(task_dir / name)
        lines.append(f"{name} {digits.target[idx]}")
    splits = {"train800": lines[:800], "val200": lines[800:1000], "train800val200": lines[:1000], "test": lines[1000:]}
    for split, rows in splits.items():
        (task_dir / f"{split}.txt").write_text("\n".join(rows) + "\n")
    (task_dir / "classes.txt").write_text("\n".join(str(d) for d in range(10)) + "\n")
    return task_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="recipes/demo.yaml", help="recipe to fit (default: %(default)s)")
    parser.add_argument("--data-root", default="demo_data", help="where the digits task is written")
    parser.add_argument("--out", default="runs/demo", help="trainer.default_root_dir")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from petl_lightning.cli import PETLCLI

    start = time.perf_counter()
    build_digits_task(Path(args.data_root))
    cli = PETLCLI(
        args=["fit", "-c", args.config, "--data.init_args.root", args.data_root, "--trainer.default_root_dir", args.out]
    )
    result = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    stats = cli.model.inference_stats()
    summary = cli.model.parameter_summary()
    print("\n=== petl_lightning demo (random-weight ViT on scikit-learn digits; not a benchmark) ===")
    print(f"method            {type(cli.model).__name__} over {cli.model.hparams.model_name}")
    print(f"trainable params  {summary['trainable']:,} of {summary['total']:,}")
    print(f"test accuracy     {result['test/acc']:.4f}  ({len(cli.datamodule.dataset('test'))} images)")
    print(f"GFLOPs per image  {float(stats['gflops']):.4f}  (backbone {float(stats['gflops_backbone']):.4f})")
    print(f"wall time         {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
