"""Both savings at once: Dyn-Adapter over a DyT base against exits only, DyT only and a LinearProbe.

    python benchmarks/dyn_adapter_dyt.py --seeds 0 1          # real ViT-S and dtd10 from ../shared/assets

Every model trains on the same budget (dtd10's train800, ``--img-size`` px, ``--epochs`` epochs, AdamW
lr 1e-2, no warm-up, step-wise cosine); the early-exit models are calibrated on val200 (held out) for
their FLOPs budget (composed: 0.35, exits only: 0.5, shares of the model with no exit and no
skipping), DyT alone keeps ``target_rate`` 0.5. The DyT-based rows take adapter_scale 0.1: at lr 1e-2
the default 1.0 diverges (``docs/dyt.md``, "Short budgets"; the composed model scored 0.295 with it).
Table 1: test accuracy and executed FLOPs per seed.
Table 2: inference images/s at ``--speed-size`` px, batch 32, timed in turns in one process beside the
frozen backbone: the trained adapters and heads are moved onto a backbone built at that size and
recalibrated there on val200 (their exit mix and keep rates are the trained dispatchers' and heads').
``--curve PNG``: the first seed's test accuracy vs executed GFLOPs, the early-exit models calibrated on
val200 at budgets 0.2-1.0, beside the DyT and LinearProbe points (needs the ``plots`` extra).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from petl_lightning import DynAdapter, DyT, LinearProbe
from petl_lightning.adapted import AdaptedViT
from petl_lightning.data.vtab import VTAB1kDataModule
from petl_lightning.tasks.classification import PETLModule

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # so `python benchmarks/dyn_adapter_dyt.py` finds the `benchmarks` package
    sys.path.insert(0, str(ROOT))

from benchmarks.studies import ASSETS, budget_trainer, vits_module  # noqa: E402

MODELS: dict[str, tuple[type[PETLModule], dict[str, Any], float | None]] = {
    # row -> (class, arguments, FLOPs budget of the exit thresholds)
    "Dyn-Adapter + DyT (composed)": (DynAdapter, {"base": "dyt", "adapter_scale": 0.1}, 0.35),
    "Dyn-Adapter (exits only, repadapter)": (DynAdapter, {"base": "repadapter", "adapter_scale": 1.0}, 0.5),
    "DyT (r = 0.5)": (DyT, {"skipping": {"target_rate": 0.5}, "adapter_scale": 0.1}, None),
    "LinearProbe": (LinearProbe, {}, None),
}


def build(cls: type[PETLModule], kw: dict[str, Any], img_size: int, num_classes: int) -> PETLModule:
    return vits_module(cls, img_size, 1e-2, num_classes, **kw)


def fit(row: str, dm: VTAB1kDataModule, args: argparse.Namespace, seed: int) -> PETLModule:
    cls, kw, _ = MODELS[row]
    L.seed_everything(seed, verbose=False)
    model = build(cls, kw, args.img_size, dm.num_classes)
    budget_trainer(args.epochs).fit(model, dm)
    return model.eval()


def evaluate(model: PETLModule, dm: VTAB1kDataModule, budget: float | None) -> dict[str, float]:
    if budget is not None:
        model.calibrate(dm, budget)  # type: ignore[operator]  # the early-exit models
    acc = float(budget_trainer().test(model, dm, verbose=False)[0]["test/acc"])
    stats = model.inference_stats()
    return {
        "acc": acc,
        "flops": float(stats["gflops"]) / (model.backbone_flops() / 1e9),
        "keep": float(stats["keep_rate"]),
        "exit": " / ".join(f"{v:.2f}" for v in stats["exit_share"].tolist()),
    }


def at_size(row: str, model: PETLModule, size: int, num_classes: int) -> PETLModule:
    """The trained adapters and heads on a backbone built at ``size`` px."""
    cls, kw, _ = MODELS[row]
    big = build(cls, kw, size, num_classes)
    state = {k: v for k, v in model.state_dict().items() if "pos_embed" not in k}
    big.load_state_dict(state, strict=False)
    return big.eval()


CURVE_BUDGETS = (0.2, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)


def curve_points(model: PETLModule, dm: VTAB1kDataModule, r: dict[str, float]) -> list[dict[str, Any]]:
    """Test accuracy and GFLOPs per budget (thresholds searched on val200), or the one point ``r``."""
    if isinstance(model, DynAdapter):
        return model.curve(dm, dm.test_dataloader(), CURVE_BUDGETS)
    return [{"acc": r["acc"], "gflops": r["flops"] * model.backbone_flops() / 1e9}]


def save_curve(series: dict[str, list[dict[str, Any]]], path: str) -> None:
    from petl_lightning.plotting import accuracy_gflops_figure, save_figure

    title = "dtd10 test accuracy vs executed GFLOPs"
    print(f"curve: {save_figure(accuracy_gflops_figure(series, title=title), path)}")


def images_per_second(fn: Any, x: Tensor, rounds: int) -> float:
    with torch.inference_mode():
        fn(x)
        start = time.perf_counter()
        for _ in range(rounds):
            fn(x)
        return rounds * x.shape[0] / (time.perf_counter() - start)


def speed_table(trained: dict[str, PETLModule], args: argparse.Namespace) -> None:
    dm = VTAB1kDataModule(
        root=args.root,
        task="dtd10",
        protocol="train_val",
        img_size=args.speed_size,
        batch_size=32,
        eval_batch_size=32,
        num_workers=0,
    )
    dm.setup("fit")
    x = next(iter(dm.val_dataloader()))[0]
    calls: dict[str, Any] = {}
    notes: dict[str, str] = {}
    for row, model in trained.items():
        big = at_size(row, model, args.speed_size, dm.num_classes)
        budget = MODELS[row][2]
        if budget is not None:
            res = big.calibrate(dm, budget)  # type: ignore[operator]
            notes[row] = f"{res['flops_ratio']:.2f} of the full model on val200"
        if isinstance(big, DynAdapter) and big.hparams.base == "repadapter":
            merged = big.merge()  # the foldable base folded: only the exit heads cost extra
            merged_vit = AdaptedViT(merged, merged.blocks)

            def run(b: Tensor, m: DynAdapter = big, vit: AdaptedViT = merged_vit) -> Tensor:
                return m.infer(b, vit=vit).logits

            calls[row] = run
        elif isinstance(big, LinearProbe):
            calls["frozen backbone"] = big.merge()
        else:
            calls[row] = big
    speed: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(3):  # in turns, so load changes hit every model alike
        for name, fn in calls.items():
            speed[name].append(images_per_second(fn, x, args.rounds))
    base = statistics.median(speed["frozen backbone"])
    print(f"\nInference, ViT-S/14 at {args.speed_size} px, batch {x.shape[0]}, images/s (median of 3 turns):")
    print("| model | images/s | x frozen backbone | calibration |")
    print("|---|---:|---:|---|")
    for name, v in speed.items():
        print(f"| {name} | {statistics.median(v):.1f} | {statistics.median(v) / base:.2f} | {notes.get(name, '')} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=str(ASSETS / "vtab1k"), help="folder holding dtd10/")
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--speed-size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--curve", default=None, help="write the first seed's accuracy-vs-GFLOPs curve to this PNG")
    p.add_argument("--no-speed", action="store_true", help="skip the speed table")
    args = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    dm = VTAB1kDataModule(
        root=args.root, task="dtd10", protocol="train_val", img_size=args.img_size, batch_size=32, num_workers=0
    )
    print(
        f"dtd10, ViT-S/14 (real weights), {args.img_size} px, {args.epochs} epochs on train800, "
        f"torch {torch.__version__}"
    )
    print("| seed | model | test acc | FLOPs x backbone | keep rate | exit shares |")
    print("|---:|---|---:|---:|---:|---|")
    trained: dict[str, PETLModule] = {}
    series: dict[str, list[dict[str, Any]]] = {}
    for seed in args.seeds:
        for row, (_, _, budget) in MODELS.items():
            model = fit(row, dm, args, seed)
            r = evaluate(model, dm, budget)
            print(f"| {seed} | {row} | {r['acc']:.3f} | {r['flops']:.3f} | {r['keep']:.3f} | {r['exit']} |", flush=True)
            if seed == args.seeds[0]:
                trained[row] = model
                if args.curve:
                    dm.setup("test")
                    series[row] = curve_points(model, dm, r)
    if args.curve:
        save_curve(series, args.curve)
    if not args.no_speed:
        speed_table(trained, args)


if __name__ == "__main__":
    main()
