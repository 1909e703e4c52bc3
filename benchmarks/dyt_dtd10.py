"""DyT at r=0.5 against LinearProbe on DTD-10 (ViT-S weights), same budget, several seeds.

    python benchmarks/dyt_dtd10.py --img-size 112 --epochs 10 --seeds 0 1     # ~11 min per seed, 2-core CPU

Prints one row per seed: DyT's test accuracy, keep rate and executed-FLOPs ratio (threshold 0.5,
the paper's rule), the complete model (every token) and LinearProbe trained on the same budget
(data, epochs, lr 1e-2, warm-up 0.3 epoch, step-wise cosine). The short-run DyT settings are those of
``tests/test_dyt.py`` (adapter_scale 0.1, dispatcher_init_std 1.0, w_rate 50; ours, not the paper's).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch

from petl_lightning import DyT, LinearProbe
from petl_lightning.data.vtab import VTAB1kDataModule

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"


def fit_and_test(module: L.LightningModule, dm: VTAB1kDataModule, epochs: int, seed: int) -> float:
    L.seed_everything(seed, verbose=False)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, dm)
    return float(trainer.test(module, dm, verbose=False)[0]["test/acc"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=str(ASSETS / "vtab1k"), help="folder holding dtd10/")
    p.add_argument(
        "--weights", default=str(ASSETS / "weights" / "vit_small_patch14_dinov2.imgfocus_saliency.safetensors")
    )
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = p.parse_args()
    dm = VTAB1kDataModule(
        root=args.root, task="dtd10", img_size=args.img_size, batch_size=32, num_workers=0, cache=True
    )
    common = dict(
        num_classes=dm.num_classes,
        model_name="vit_small_patch14_dinov2",
        checkpoint_path=args.weights,
        img_size=args.img_size,
        lr=1e-2,
        warmup_epochs=0.3,
        scheduler_interval="step",
    )
    print(f"DTD-10, ViT-S, {args.img_size} px, {args.epochs} epochs, torch {torch.__version__}")
    print("| seed | DyT r=0.5 | keep rate | GFLOPs x backbone | complete model | LinearProbe |")
    print("|---:|---:|---:|---:|---:|---:|")
    for seed in args.seeds:
        torch.manual_seed(seed)
        dyt = DyT(target_rate=0.5, adapter_scale=0.1, dispatcher_init_std=1.0, w_rate=50.0, **common)
        acc = fit_and_test(dyt, dm, args.epochs, seed)
        stats = dyt.inference_stats()
        ratio = stats["gflops"].item() / stats["gflops_backbone"].item()
        dyt.set_logit_threshold(-30.0)  # every token kept: the complete model
        complete = float(
            L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).test(dyt, dm, verbose=False)[0][
                "test/acc"
            ]
        )
        torch.manual_seed(seed)
        lp = fit_and_test(LinearProbe(**common), dm, args.epochs, seed)
        print(
            f"| {seed} | {acc:.3f} | {stats['keep_rate'].item():.3f} | {ratio:.3f} | {complete:.3f} | {lp:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
