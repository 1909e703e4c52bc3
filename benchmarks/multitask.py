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
the parameters and buffers each form holds, the backbone included (once, or once per task when
merged); "RSS added" is what a fresh process holding the backbone gains by
building only that form and running one batch (CPU; activations included). The
backbone is randomly initialised: speed and memory do not depend on its weights.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import timm
import torch
from torch import Tensor, nn

from petl_lightning import DyTConfig, RepAdapterConfig, adapt
from petl_lightning.adapted import ViTClassifier
from petl_lightning.tasks.multitask import MultiTaskModel

Runner = Callable[[Tensor, Tensor], Tensor]


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


FORMS = ("mixed, adapters batched", "mixed, adapters grouped", "grouped by task", "merged per task")


def build_form(form: str, vit: nn.Module, method: str, n: int, num_classes: int) -> tuple[Runner, int]:
    """A function running ``form`` on (images, task indices) for ``n`` tasks, and the bytes it holds."""
    own = [c.to(next(vit.parameters()).device) for c in classifiers(vit, method, n, num_classes)]
    if form.startswith("mixed"):
        mixed = MultiTaskModel({f"t{i}": c for i, c in enumerate(own)}, "batched" if "batched" in form else "grouped")
        return (lambda x, task: mixed.infer(x, task).logits), held_bytes(mixed)
    models: list[nn.Module] = [c.merge() for c in own] if form == "merged per task" else list(own)
    return (lambda x, task: per_task(models, x, task)), held_bytes(*models)


def rss_mib() -> float:
    """This process's resident memory now (MiB; Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def added_rss_mib(args: argparse.Namespace, form: str, n: int) -> float:
    """Resident memory (MiB) a fresh process gains by building ``form`` for ``n`` tasks (over the
    backbone and a batch it already holds) and running one batch."""
    cmd = [sys.executable, __file__, "--rss-of", form, "--tasks", str(n), "--model", args.model]
    cmd += ["--img-size", str(args.img_size), "--batch", str(args.batch), "--method", args.method]
    cmd += ["--num-classes", str(args.num_classes)]
    return float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-1])


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
    p.add_argument("--rss-of", choices=FORMS, default=None, help=argparse.SUPPRESS)  # the child of added_rss_mib
    a = p.parse_args()
    device = torch.device(a.device)
    torch.manual_seed(0)
    vit = timm.create_model(a.model, pretrained=False, num_classes=0, img_size=a.img_size).eval().to(device)
    x = torch.randn(a.batch, 3, a.img_size, a.img_size, device=device)
    if a.rss_of:
        before = rss_mib()
        run, _ = build_form(a.rss_of, vit, a.method, a.tasks[0], a.num_classes)
        with torch.inference_mode():
            run(x, spread(a.batch, a.tasks[0], device))
        print(rss_mib() - before)
        return
    backbone = held_bytes(vit)
    print(
        f"{a.method} on {a.model} at {a.img_size} px, batch {a.batch}, {device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; backbone {backbone / 2**20:.1f} MiB"
    )
    print("| tasks | form | images/s | model bytes (MiB) | x backbone | RSS added (MiB) |")
    print("|---|---|---|---|---|---|")
    forms = [f for f in FORMS if a.method == "repadapter" or f != "merged per task"]
    for n in a.tasks:
        task = spread(a.batch, n, device)
        built = {f: build_form(f, vit, a.method, n, a.num_classes) for f in forms}
        times: dict[str, list[float]] = {f: [] for f in forms}
        with torch.inference_mode():
            for run, _ in built.values():
                run(x, task)  # warm-up
            for _ in range(a.repeats):  # round-robin: drifts of the machine spread over every form
                for f, (run, _) in built.items():
                    times[f].append(timed(run, x, task))
        for f, (_, size) in built.items():
            rate = a.batch / statistics.median(times[f])
            rss = added_rss_mib(a, f, n) if device.type == "cpu" else float("nan")
            print(f"| {n} | {f} | {rate:.1f} | {size / 2**20:.1f} | {size / backbone:.2f} | {rss:.0f} |")


def spread(batch: int, n: int, device: torch.device) -> Tensor:
    """Task indices of a batch spread evenly over ``n`` tasks, shuffled."""
    return (torch.arange(batch) % n)[torch.randperm(batch, generator=torch.Generator().manual_seed(n))].to(device)


def timed(run: Runner, x: Tensor, task: Tensor) -> float:
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run(x, task)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
