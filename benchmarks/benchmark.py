"""Performance of every method in one run: parameters, GFLOPs, inference and training speed, memory.

    python -m benchmarks.benchmark                       # CPU (or GPU when one is present)
    python -m benchmarks.benchmark --device cpu --batch-size 16 --repeats 3
    python -m benchmarks.benchmark --device cuda         # bf16 autocast, batch 256

Rows: the frozen backbone (a plain timm ViT with a linear head: the reference of every ratio),
LinearProbe, and every entry of every ``benchmarks/*_entries.py`` module
(``entries(model_name, img_size, num_classes) -> list[Entry]``); ``deploy_entries.py`` adds the
deployable forms: ``torch.compile`` (Inductor) and the exported ONNX programs in onnxruntime
(``--only deploy`` for those alone, with the backbone and LinearProbe).

Inference is timed round-robin: each repeat runs every entry once in turn, so all entries see the
same machine state; the figure is the median over repeats. Training is one optimiser step
(forward, loss, backward, AdamW) on the entry's training form, timed over ``--train-repeats`` steps
after one warm-up step; its peak memory is the step's own (activations, gradients, optimiser
state). On CUDA everything runs under bf16 autocast with ``torch.cuda.synchronize`` around each
timing; on CPU in fp32. Attention uses timm's fused ``F.scaled_dot_product_attention`` unless
``--no-fused-attn``; ``--compile`` wraps each inference forward in ``torch.compile``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import math
import platform
import re
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # so `python benchmarks/benchmark.py` finds the `benchmarks` package
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from benchmarks.common import (  # noqa: E402
    Entry,
    configure_malloc_for_rss,
    count_trainable,
    images_per_second,
    round_robin_inference,
    train_step_stats,
)
from torch import Tensor, nn  # noqa: E402


def base_entries(model_name: str, img_size: int, num_classes: int) -> list[Entry]:
    """The frozen backbone (plain timm ViT + head, no training) and LinearProbe."""
    import timm

    from petl_lightning.flops import vit_flops
    from petl_lightning.methods.baselines import LinearProbe

    probe = LinearProbe(
        cache_features=False, num_classes=num_classes, model_name=model_name, pretrained=False, img_size=img_size
    ).eval()
    backbone = timm.create_model(model_name, pretrained=False, num_classes=num_classes, img_size=img_size)
    backbone.eval().requires_grad_(False)
    gflops = vit_flops(probe.vit.shape(), num_classes) / 1e9
    return [
        Entry("Frozen backbone", backbone, 0, gflops, "plain timm ViT + linear head; nothing trained"),
        # A module's forward returns logits and records nothing, so it is timed as it is.
        Entry("LinearProbe", probe, count_trainable(probe), probe.inference_flops() / 1e9, "head only"),
    ]


#: Table order of the entries modules (others follow alphabetically).
ENTRY_ORDER = ("repadapter_arc_entries", "dyt_entries", "dyn_adapter_entries", "deploy_entries")


def discover_entries(
    model_name: str, img_size: int, num_classes: int, only: list[str] | None = None
) -> tuple[list[Entry], list[str]]:
    """Base entries plus those of every ``benchmarks/*_entries.py``; import failures are reported."""
    entries = base_entries(model_name, img_size, num_classes)
    problems = []
    order = {name: i for i, name in enumerate(ENTRY_ORDER)}
    paths = sorted(
        Path(__file__).resolve().parent.glob("*_entries.py"), key=lambda p: (order.get(p.stem, len(order)), p.stem)
    )
    for path in paths:
        name = f"benchmarks.{path.stem}"
        if only and not any(o.lower() in path.stem.lower() for o in only):
            continue
        try:
            module = importlib.import_module(name)
            got = module.entries(model_name, img_size, num_classes)
        except Exception as err:  # noqa: BLE001 - one broken module must not hide the others
            problems.append(f"{path.name}: {type(err).__name__}: {err}")
            traceback.print_exc()
            continue
        for e in got:
            if isinstance(e, tuple):  # (label, module, trainable_params, gflops)
                e = Entry(*e)
            entries.append(e)
    return entries, problems


def set_fused_attn(module: nn.Module, enabled: bool) -> None:
    """Switch timm's fused attention (``F.scaled_dot_product_attention``) on every Attention module."""
    for m in module.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = enabled


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def _training_form(e: Entry) -> nn.Module | None:
    m = e.train_module if e.train_module is not None else e.module
    return m if any(p.requires_grad for p in m.parameters()) else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (cuda when available)")
    p.add_argument("--batch-size", type=int, default=None, help="inference batch (default 256 on GPU, 32 on CPU)")
    p.add_argument("--train-batch-size", type=int, default=None, help="training batch (default: --batch-size)")
    p.add_argument("--model", default="vit_base_patch16_224", help="timm model name (random weights)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5, help="round-robin inference repeats (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards per entry before timing")
    p.add_argument("--train-repeats", type=int, default=2, help="timed training steps (after one warm-up)")
    p.add_argument("--no-train", action="store_true", help="skip the training step")
    p.add_argument("--only", nargs="*", default=None, help="entries modules to include (substring of the file name)")
    p.add_argument(
        "--select", default=None, help="regular expression: keep only entries whose label matches (re.search)"
    )
    p.add_argument("--no-fused-attn", action="store_true", help="use timm's unfused attention")
    p.add_argument("--compile", action="store_true", help="torch.compile each inference forward")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    p.add_argument("--json", default=None, help="also write the measurements to this JSON file")
    p.add_argument("--markdown", default=None, help="also write the markdown table to this file")
    args = p.parse_args(argv)
    return run(args, argv if argv is not None else sys.argv[1:])


def run(args: argparse.Namespace, argv: list[str]) -> int:
    import lightning
    import timm

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available.", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = device.type == "cuda"
    malloc_rss = configure_malloc_for_rss() if not gpu else False
    amp = torch.bfloat16 if gpu else None
    bs = args.batch_size or (256 if gpu else 32)
    tbs = args.train_batch_size or bs
    torch.manual_seed(0)
    t_start = time.time()
    entries, problems = discover_entries(args.model, args.img_size, args.num_classes, args.only)
    if args.select:
        entries = [e for e in entries if e.label == "Frozen backbone" or re.search(args.select, e.label)]
    for e in entries:
        for m in {id(m): m for m in (e.module, e.train_module) if m is not None}.values():
            m.to(device)
            set_fused_attn(m, not args.no_fused_attn)
        e.module.eval()
    fns = []
    for e in entries:
        fn = e.module
        if args.compile:
            fn = torch.compile(fn)
        fns.append(fn)
    x = torch.randn(bs, 3, args.img_size, args.img_size, device=device)
    print(
        f"[bench] {len(entries)} entries on {device_description(device)}; inference batch {bs}, "
        f"{args.repeats} round-robin repeats",
        file=sys.stderr,
        flush=True,
    )
    times = round_robin_inference(fns, x, device, repeats=args.repeats, warmup=args.warmup, amp_dtype=amp)
    rows: list[dict[str, Any]] = []
    for e, ts in zip(entries, times):
        rows.append(
            {
                "label": e.label,
                "notes": e.notes,
                "trainable_params": e.trainable_params,
                "gflops": e.gflops,
                "infer_s": ts,
                "infer_img_s": images_per_second(bs, ts),
                "extra": e.extra,
            }
        )
    if not args.no_train:
        xt = torch.randn(tbs, 3, args.img_size, args.img_size, device=device)
        yt = torch.randint(0, args.num_classes, (tbs,), device=device)
        trained: dict[int, tuple[str, dict[str, float]]] = {}
        for e, row in zip(entries, rows):
            m = _training_form(e)
            if m is None:
                row.update(train_img_s=float("nan"), peak_mem_mib=float("nan"))
                continue
            if id(m) not in trained:  # merged/unmerged pairs share one training form: measure once
                print(f"[bench] training step: {e.label}", file=sys.stderr, flush=True)
                trained[id(m)] = (e.label, training_step_stats(m, xt, yt, device, args.train_repeats, amp))
            first, stats = trained[id(m)]
            row.update(stats, train_same_as=first if first != e.label else None)
    base = next((r for r in rows if r["label"] == "Frozen backbone"), rows[0])
    for r in rows:
        r["gflops_ratio"] = r["gflops"] / base["gflops"]
        r["infer_ratio"] = r["infer_img_s"] / base["infer_img_s"]
    meta = {
        "device": device_description(device),
        "dtype": "bf16 autocast" if amp else "fp32",
        "torch": torch.__version__,
        "timm": timm.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "model": args.model,
        "img_size": args.img_size,
        "num_classes": args.num_classes,
        "batch_size": bs,
        "train_batch_size": tbs,
        "repeats": args.repeats,
        "fused_attn": not args.no_fused_attn,
        "compile": args.compile,
        "command": "python -m benchmarks.benchmark " + " ".join(shlex.quote(a) for a in argv),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "wall_s": time.time() - t_start,
        "problems": problems,
        "memory": "torch.cuda.max_memory_allocated above the pre-step allocation"
        if gpu
        else "peak process RSS growth during the step, sampled every 1 ms"
        + (" (glibc mmap threshold 1 MiB)" if malloc_rss else ""),
    }
    table = markdown(rows, meta)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    return 0


def training_step_stats(
    module: nn.Module, x: Tensor, y: Tensor, device: torch.device, repeats: int, amp: torch.dtype | None
) -> dict[str, float]:
    """One optimiser step's speed and memory, with the method's own ``training_loss`` if it has one
    (e.g. DyT's distillation and rate losses, Dyn-Adapter's exit losses), else cross-entropy."""
    if hasattr(module, "training_loss"):
        try:
            return train_step_stats(_LossModule(module, y), x, y, device, repeats, amp, loss_is_output=True)
        except (RuntimeError, AttributeError) as err:  # e.g. a loss schedule that needs a Trainer
            print(f"[bench] training_loss unavailable outside a Trainer ({err}); using cross-entropy", file=sys.stderr)
    return train_step_stats(module, x, y, device, repeats, amp)


class _LossModule(nn.Module):
    """``x -> training_loss(x, y)[0]`` for a fixed batch of labels."""

    def __init__(self, method: nn.Module, y: Tensor) -> None:
        super().__init__()
        self.method = method
        self.y = y

    def forward(self, x: Tensor) -> Tensor:
        return self.method.training_loss(x, self.y)[0]


def _num(v: float, digits: int | None = None) -> str:
    """A rate with 3 significant digits below 100 (e.g. 0.952, 12.3), whole numbers above."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if digits is None:
        digits = 0 if abs(v) >= 100 else max(0, 2 - int(math.floor(math.log10(abs(v))))) if v else 0
    return f"{v:,.{digits}f}"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The results table plus the device, versions and command it was measured with."""
    head = [
        "method",
        "trainable params (M)",
        "GFLOPs",
        "GFLOPs × backbone",
        "inference img/s (min–max)",
        "× backbone",
        "training img/s",
        "train step peak mem (MiB)",
        "notes",
    ]
    bs = meta["batch_size"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 2) + "---|"]
    for r in rows:
        train = [_num(r.get("train_img_s", float("nan"))), _num(r.get("peak_mem_mib", float("nan")), 0)]
        if r.get("train_same_as"):  # e.g. a merged form: it is trained as its unmerged form
            train = [f"= {r['train_same_as']}"] * 2
        lines.append(
            "| "
            + " | ".join(
                [
                    r["label"],
                    f"{r['trainable_params'] / 1e6:.3f}",
                    f"{r['gflops']:.2f}",
                    f"{r['gflops_ratio']:.3f}",
                    f"{_num(r['infer_img_s'])} ({_num(bs / max(r['infer_s']))}–{_num(bs / min(r['infer_s']))})",
                    f"{r['infer_ratio']:.2f}",
                    *train,
                    r["notes"],
                ]
            )
            + " |"
        )
    info = [
        "",
        f"- Device: {meta['device']}; {meta['dtype']}; inference batch {meta['batch_size']}, training batch "
        f"{meta['train_batch_size']}; {meta['repeats']} round-robin inference repeats (median).",
        f"- Model: `{meta['model']}` at {meta['img_size']} px, {meta['num_classes']} classes, random weights; "
        f"attention: {'fused (F.scaled_dot_product_attention)' if meta['fused_attn'] else 'unfused'}; "
        f"torch.compile: {'yes' if meta['compile'] else 'no'}.",
        f"- Versions: torch {meta['torch']}, timm {meta['timm']}, lightning {meta['lightning']}, "
        f"Python {meta['python']}.",
        f"- Training peak memory: {meta['memory']}; it covers activations, gradients and AdamW state, not the weights.",
        f"- Command: `{meta['command']}` ({meta['date']}, {meta['wall_s'] / 60:.1f} min).",
    ]
    if meta["problems"]:
        info.append("- Not measured (import/build failed): " + "; ".join(meta["problems"]))
    return "\n".join(lines + info) + "\n"


if __name__ == "__main__":
    sys.exit(main())
