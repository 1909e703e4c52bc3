"""Many tasks over one frozen backbone: a mixed batch vs grouping by task vs one merged model per task.

    python benchmarks/multitask.py [--model vit_small_patch16_224] [--img-size 224] [--batch 32]
        [--tasks 1 4 16] [--method repadapter|dyt] [--repeats 5] [--device cpu]

For each task count a batch of ``--batch`` random images is spread evenly over the tasks and run:

- **mixed**: one :class:`~petl_lightning.tasks.multitask.MultiTaskModel` (every frozen layer once
  on the whole batch, each image's adapters and head by its own task), with its adapters
  ``batched`` (each image's factors gathered, batched matmuls) or ``grouped`` (each task's adapter
  on its rows);
- **grouped by task**: each task's own single-task classifier on its images (the backbone shared,
  one forward per task present);
- **merged** (RepAdapter): each task's adapters folded into its own copy of the backbone, one
  forward per task (what deploying merged models per task costs).

Images/s is the median over ``--repeats`` round-robin repeats after one warm-up; "model bytes" are
the parameters and buffers each form holds (the backbone once, or once per task when merged). The
backbone is randomly initialised: speed and memory do not depend on its weights.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import timm
import torch
from torch import Tensor, nn

from petl_lightning import DyTConfig, RepAdapterConfig, adapt
from petl_lightning.adapted import ViTClassifier
from petl_lightning.tasks.multitask import MultiTaskModel


def classifiers(vit: nn.Module, method: str, n: int, num_classes: int) -> list[ViTClassifier]:
    """``n`` classifiers of ``method`` over ``vit`` with random trained tensors (so no adapter is the identity)."""
    out = []
    for seed in range(n):
        config = RepAdapterConfig() if method == "repadapter" else DyTConfig()
        clf = ViTClassifier(adapt(vit, config), num_classes)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in clf.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        out.append(clf.eval())
    return out


def held_bytes(*modules: nn.Module) -> int:
    """Bytes of the distinct parameters and buffers the modules hold."""
    seen: dict[int, int] = {}
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def per_task(models: list[nn.Module], x: Tensor, task: Tensor) -> Tensor:
    """Each task's model on its images; the logits back in the batch's order."""
    out = None
    for t, model in enumerate(models):
        rows = (task == t).nonzero().squeeze(1)
        if rows.numel():
            y = model(x.index_select(0, rows))
            out = y.new_empty(x.shape[0], y.shape[1]) if out is None else out
            out.index_copy_(0, rows, y)
    assert out is not None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tasks", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--method", choices=("repadapter", "dyt"), default="repadapter")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    device = torch.device(a.device)
    torch.manual_seed(0)
    vit = timm.create_model(a.model, pretrained=False, num_classes=0, img_size=a.img_size).eval().to(device)
    backbone = held_bytes(vit)
    x = torch.randn(a.batch, 3, a.img_size, a.img_size, device=device)
    print(
        f"{a.method} on {a.model} at {a.img_size} px, batch {a.batch}, {device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; backbone {backbone / 2**20:.1f} MiB"
    )
    print("| tasks | form | images/s | model bytes (MiB) | x backbone |")
    print("|---|---|---|---|---|")
    for n in a.tasks:
        for name, rate, size in measure(vit, a.method, n, x, a.num_classes, a.repeats):
            print(f"| {n} | {name} | {rate:.1f} | {size / 2**20:.1f} | {size / backbone:.2f} |")


def measure(
    vit: nn.Module, method: str, n: int, x: Tensor, num_classes: int, repeats: int
) -> list[tuple[str, float, int]]:
    """(form, images/s, model bytes) of each form on ``x`` spread evenly over ``n`` tasks."""
    device, batch = x.device, x.shape[0]
    task = (torch.arange(batch) % n)[torch.randperm(batch, generator=torch.Generator().manual_seed(n))].to(device)
    own = [c.to(device) for c in classifiers(vit, method, n, num_classes)]
    memo = {id(t): t for t in [*vit.modules(), *vit.parameters(), *vit.buffers()]}
    mixed = {
        kind: MultiTaskModel({f"t{i}": copy.deepcopy(c, memo=dict(memo)) for i, c in enumerate(own)}, kind).to(device)
        for kind in ("batched", "grouped")
    }
    forms: dict[str, tuple[Callable[[], Tensor], int]] = {
        "mixed, adapters batched": (lambda: mixed["batched"].infer(x, task).logits, held_bytes(mixed["batched"])),
        "mixed, adapters grouped": (lambda: mixed["grouped"].infer(x, task).logits, held_bytes(mixed["grouped"])),
        "grouped by task": (lambda: per_task(own, x, task), held_bytes(*own)),
    }
    if method == "repadapter":
        merged = [c.merge().to(device) for c in own]
        forms["merged per task"] = (lambda: per_task(merged, x, task), held_bytes(*merged))
    times: dict[str, list[float]] = {k: [] for k in forms}
    with torch.inference_mode():
        for fn, _ in forms.values():
            fn()  # warm-up
        for _ in range(repeats):  # round-robin: drifts of the machine spread over every form
            for name, (fn, _) in forms.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
    return [(name, batch / statistics.median(times[name]), size) for name, (_, size) in forms.items()]


if __name__ == "__main__":
    main()
