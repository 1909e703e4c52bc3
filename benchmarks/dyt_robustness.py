"""DyT robustness study: DyT (r = 0.5) vs its complete model vs LinearProbe vs RepAdapter, defaults only.

    python benchmarks/dyt_robustness.py --out dyt_robustness.jsonl          # ~1 h on a 2-core CPU

Every cell trains with the methods' default arguments on the same budget: the shared real ViT-S/14
at 112 px, 5 epochs, AdamW, no warm-up, step-wise cosine, on dtd10 and cifar10 (VTAB-1K layout,
train800val200 -> test) at lr 1e-3 and 1e-2, two seeds. DyT's "complete" column is the same trained
DyT run with every token through every MLP (no skipping); its keep rate and GFLOPs are the test
set's, at the inference threshold the default ``agreement`` calibration chose at the end of
fit (the paper's rule is a fixed 0.5). Each cell runs in its own process (``--workers`` at a
time, one thread each); finished cells are appended to ``--out`` and skipped when it is run again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # so `python benchmarks/dyt_robustness.py` finds the `benchmarks` package
    sys.path.insert(0, str(ROOT))

from benchmarks.studies import (  # noqa: E402
    ASSETS,
    budget_trainer,
    load_rows,
    print_row,
    run_cells,
    vits_module,
    vtab_data,
)

METHODS = ("dyt", "linear_probe", "repadapter")


def run_cell(task: str, method: str, lr: float, seed: int, epochs: int, img_size: int, root: Path) -> dict[str, Any]:
    """Train and test one method on one task; DyT also reports its complete model, keep rate and GFLOPs."""
    import lightning as L
    import torch

    from petl_lightning import DyT, LinearProbe, RepAdapter

    torch.set_num_threads(1)
    dm = vtab_data(root, task, img_size, cache=method == "linear_probe")
    L.seed_everything(seed, verbose=False)
    cls = {"dyt": DyT, "linear_probe": LinearProbe, "repadapter": RepAdapter}[method]
    module = vits_module(cls, img_size, lr)
    trainer = budget_trainer(epochs)
    trainer.fit(module, dm)
    row: dict[str, Any] = dict(task=task, method=method, lr=lr, seed=seed)
    row["acc"] = round(float(trainer.test(module, dm, verbose=False)[0]["test/acc"]), 4)
    if isinstance(module, DyT):
        stats = module.inference_stats()
        row["keep"] = round(float(stats["keep_rate"]), 3)
        row["gflops"] = round(float(stats["gflops"]), 3)
        row["gflops_ratio"] = round(float(stats["gflops"] / stats["gflops_backbone"]), 3)
        row["threshold"] = round(module.dyt.threshold, 3)
        module.eval()
        correct = total = 0
        with torch.inference_mode():
            for x, y in dm.test_dataloader():
                correct += int((module.head(module.vit.forward_complete(x)).argmax(-1) == y).sum())
                total += len(y)
        row["complete"] = round(correct / total, 4)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """One markdown row per (task, lr, seed)."""
    cells: dict[tuple[str, float, int], dict[str, dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["task"], r["lr"], r["seed"]), {})[r["method"]] = r
    lines = [
        "| task | lr | seed | LinearProbe | RepAdapter | DyT complete | DyT r=0.5 | DyT - complete | DyT - LP "
        "| threshold | keep | GFLOPs (x backbone) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (task, lr, seed), by in sorted(cells.items()):
        lp, rep, dyt = by.get("linear_probe"), by.get("repadapter"), by.get("dyt")

        def acc(r: dict[str, Any] | None, key: str = "acc") -> str:
            return "-" if r is None else f"{r[key]:.3f}"

        gap_c = "-" if dyt is None else f"{dyt['acc'] - dyt['complete']:+.3f}"
        gap_lp = "-" if dyt is None or lp is None else f"{dyt['acc'] - lp['acc']:+.3f}"
        flops = "-" if dyt is None else f"{dyt['gflops']:.2f} ({dyt['gflops_ratio']:.2f})"
        keep = "-" if dyt is None else f"{dyt['keep']:.2f}"
        thr = "-" if dyt is None else f"{dyt.get('threshold', 0.5):.2f}"
        lines.append(
            f"| {task} | {lr:g} | {seed} | {acc(lp)} | {acc(rep)} | {acc(dyt, 'complete')} | {acc(dyt)} "
            f"| {gap_c} | {gap_lp} | {thr} | {keep} | {flops} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=ASSETS / "vtab1k")
    p.add_argument("--tasks", nargs="+", default=["dtd10", "cifar10"])
    p.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 1e-2])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("dyt_robustness.jsonl"))
    p.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run one cell (JSON) and print its row
    a = p.parse_args()
    if a.cell:
        print_row(run_cell(**json.loads(a.cell), epochs=a.epochs, img_size=a.img_size, root=a.root))
        return
    have = {(r["task"], r["method"], r["lr"], r["seed"]) for r in load_rows(a.out)}
    # DyT cells first (the longest), so the short ones fill the gaps at the end
    todo = [
        dict(task=t, method=m, lr=lr, seed=s)
        for m in a.methods
        for s in a.seeds
        for lr in a.lrs
        for t in a.tasks
        if (t, m, lr, s) not in have
    ]
    run_cells(
        __file__,
        todo,
        a.out,
        a.workers,
        ["--epochs", str(a.epochs), "--img-size", str(a.img_size), "--root", str(a.root)],
    )
    print(table(load_rows(a.out)))


if __name__ == "__main__":
    main()
