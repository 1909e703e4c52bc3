"""Semantic segmentation: what the deployed segmenters cost at 512 px, and how the methods compare on
texture mosaics at a small budget.

    python benchmarks/segmentation.py cost       # ViT-B/16 + UperNet at 512 px, random weights (~5 min, CPU)
    python benchmarks/segmentation.py mosaics    # 5 methods x 2 heads through the console script (~15 min)

``cost``: one row per method of ``recipes/segmentation/`` (its ``method`` block, read from the recipe)
on ``--model`` (default ViT-B/16 ``vit_base_patch16_224.orig_in21k``, random weights) at ``--img-size``
(512) with UperNet (``--head-channels`` 512, ``--num-classes`` 150: ADE20K's), plus the frozen backbone
with the linear head (``--no-linear``: left out). Each row is the form a deployment runs: adapters
folded into a plain timm ViT (``SegmentationModel.merge()``), DyT's top-k form at each
``--keep-rates`` (``deploy_form(keep_rate)``). Per row: analytic GFLOPs per image (papers' convention,
one multiply-add = one FLOP; ``full_flops(merged=True)``, or for DyT ``executed_flops`` of what its
forward kept), checked against ``torch.utils.flop_counter`` on one untimed forward with unfused
attention (the counter counts 2 per multiply-add and no LayerNorm; ``--no-flop-check`` skips it);
trainable parameters of the trained form (adapters + head); images/s at batch 1 in eval mode under
``torch.inference_mode()`` on the CPU (``--threads``, default 2; one warm-up forward per row, then
``--repeats`` round-robin rounds, median), and on the GPU as well when CUDA is available (bf16
autocast, ``--gpu-repeats`` rounds, synchronised).

``mosaics``: builds the dtd10 texture mosaics once (``python -m petl_lightning.data.mosaics``, into
``--root``), then for every ``--heads`` x ``--methods`` runs ``petl-lightning fit`` and ``test
--ckpt_path last`` in new processes, each with its shipped recipe and an overlay written to the run's
folder (real ViT-S/14, 112 px, batch 16, ``--epochs``), parses the test metrics from the printed
table, and draws ``--figure``: three test mosaics, their truth and each method's prediction with the
head whose mean mIoU over the methods is higher (``--figure-head``). ``--figure-only`` redraws it
from the runs already in ``--work-dir``.

Both print a markdown table and append one JSON line per row (with the device, versions and command)
to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # so `python benchmarks/segmentation.py` finds the `benchmarks` package
    sys.path.insert(0, str(ROOT))

from benchmarks.benchmark import cpu_name  # noqa: E402
from benchmarks.studies import ASSETS, WEIGHTS  # noqa: E402

METHODS = ("frozen", "repadapter", "arc", "lora", "dyt")
HEADS = ("linear", "upernet")
RECIPES = ROOT / "recipes" / "segmentation"
#: The DyT paper's ADE20K figures (UperNet on ViT-B, 512 x 512): full fine-tuning and DyT.
PAPER_GFLOPS = {"full fine-tuning": 605.36, "DyT": 584.57}
TEST_METRICS = ("test/mIoU", "test/mAcc", "test/aAcc", "test/gflops_per_image", "test/keep_rate")


# -- shared ----------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    import lightning
    import timm
    import torch

    return {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
    }


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def recipe_method(name: str) -> dict[str, Any] | None:
    """The ``model.init_args.method`` block of ``recipes/segmentation/<name>.yaml`` (None: frozen)."""
    import yaml

    recipe = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    return recipe["model"]["init_args"].get("method")


def method_label(method: dict[str, Any] | None) -> str:
    """A short description of a recipe's method block, e.g. ``RepAdapterConfig(adapter_dim=8, ...)``."""
    if method is None:
        return "none"
    name = method["class_path"].rsplit(".", 1)[-1]
    args = {k: v for k, v in (method.get("init_args") or {}).items() if "dropout" not in k}
    return f"{name}({', '.join(f'{k}={v}' for k, v in args.items())})"


def fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return format(value, spec)


# -- cost --------------------------------------------------------------------------------------------
def set_fused_attn(module: Any, enabled: bool) -> None:
    for m in module.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = enabled


def counted_flops(model: Any, x: Any) -> tuple[float, Any]:
    """``torch.utils.flop_counter``'s count of one forward (unfused attention: the counter has no
    formula for the CPU's fused kernel), halved to multiply-adds, and the blocks' kept tokens."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    set_fused_attn(model, False)
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            out = model.run(x)
    finally:
        set_fused_attn(model, True)
    return counter.get_total_flops() / 2, out.kept


def cost(args: argparse.Namespace, argv: list[str]) -> int:
    import torch
    from benchmarks.common import count_trainable, synchronize

    from petl_lightning.tasks.segmentation import Segmenter

    t_start = time.time()
    load_start = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    specs: list[tuple[str, str, str, float | None]] = []  # (label, recipe, head, keep rate)
    for name in args.methods:
        if name == "dyt":
            specs += [(f"dyt (top-k, keep {r:g})", name, "upernet", r) for r in args.keep_rates]
        else:
            specs.append((name if name == "frozen" else f"{name} (merged)", name, "upernet", None))
    if not args.no_linear and "frozen" in args.methods:
        specs.insert(1, ("frozen", "frozen", "linear", None))

    rows: list[dict[str, Any]] = []
    forms: list[Any] = []
    x = torch.randn(1, 3, args.img_size, args.img_size)
    trained: dict[tuple[str, str], Any] = {}
    for label, name, head, keep in specs:
        print(f"[segmentation] building {label}, {head}", file=sys.stderr, flush=True)
        method = recipe_method(name)
        key = (name, head)
        if key not in trained:  # DyT's keep rates share one trained form
            trained.clear()
            gc.collect()
            trained[key] = Segmenter(
                num_classes=args.num_classes,
                method=method,
                head=head,
                head_channels=args.head_channels,
                model_name=args.model,
                pretrained=False,
                img_size=args.img_size,
            ).eval()
        seg = trained[key]
        model = seg.model
        head_params = sum(p.numel() for p in model.head.parameters() if p.requires_grad)
        trainable = count_trainable(seg)
        form = model.deploy_form(keep) if keep is not None else model.merge()
        row: dict[str, Any] = {
            "benchmark": "segmentation.cost",
            "label": label,
            "method": name,
            "method_config": method_label(method),
            "head": head,
            "head_channels": args.head_channels if head == "upernet" else None,
            "levels": list(model.levels),
            "grid": list(model.grid),
            "keep_rate": keep,
            "deployed_as": f"{type(form.vit.vit).__name__} with {type(form.vit.blocks[0]).__name__} blocks",
            "trainable_params": trainable,
            "head_params": head_params,
            "adapter_params": trainable - head_params,
            "gflops_unmerged": model.full_flops(merged=False) / 1e9,
        }
        if args.no_flop_check:
            with torch.inference_mode():
                kept = form.run(x).kept
            row["counter_gflops"] = None
        else:
            counted, kept = counted_flops(form, x)
            row["counter_gflops"] = counted / 1e9
        if keep is None:
            row["gflops"] = form.full_flops(merged=True) / 1e9
            row["gflops_no_norm"] = form.full_flops(norm=False, merged=True) / 1e9
        else:
            row["gflops"] = float(form.executed_flops(kept, merged=True)[0]) / 1e9
            row["gflops_no_norm"] = float(form.executed_flops(kept, norm=False, merged=True)[0]) / 1e9
            row["kept_tokens_per_block"] = kept[0].sum(-1).tolist()
            row["patches"] = form.vit.num_patches
        if row["counter_gflops"] is not None:
            row["counter_check"] = row["counter_gflops"] / row["gflops_no_norm"]
        row["gflops_head"] = form.head.flops(form.grid) / 1e9
        row["gflops_vit"] = row["gflops"] - row["gflops_head"]
        rows.append(row)
        forms.append(form)
    trained.clear()
    gc.collect()

    cpu = torch.device("cpu")
    print(f"[segmentation] timing {len(forms)} rows on the CPU", file=sys.stderr, flush=True)
    times = time_rows(forms, x, cpu, args.warmup, args.repeats)
    for row, t in zip(rows, times):
        row.update(cpu_img_s=1 / statistics.median(t), cpu_s=[round(v, 3) for v in t])
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        print(f"[segmentation] timing {len(forms)} rows on {torch.cuda.get_device_name(gpu)}", file=sys.stderr)
        forms = [f.to(gpu) for f in forms]
        times = time_rows(forms, x.to(gpu), gpu, args.warmup, args.gpu_repeats, amp=True)
        for row, t in zip(rows, times):
            row.update(gpu_img_s=1 / statistics.median(t), gpu_s=[round(v, 5) for v in t])
        synchronize(gpu)
    frozen = next(r for r in rows if r["method"] == "frozen" and r["head"] == "upernet") if rows else None
    for r in rows:
        r["gflops_vs_frozen"] = r["gflops"] / frozen["gflops"] if frozen else None
        r["cpu_vs_frozen"] = r["cpu_img_s"] / frozen["cpu_img_s"] if frozen else None
    meta = {
        "device": f"{cpu_name()}, {torch.get_num_threads()} threads",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        **versions(),
        "model": args.model,
        "img_size": args.img_size,
        "num_classes": args.num_classes,
        "batch_size": 1,
        "repeats": args.repeats,
        "weights": "random",
        "command": "python benchmarks/segmentation.py " + shlex.join(argv),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "wall_s": round(time.time() - t_start, 1),
        "load_avg_1min": [round(load_start, 2), round(os.getloadavg()[0], 2)],
    }
    print(cost_table(rows, meta))
    append_rows(args.out, [{**r, **meta} for r in rows])
    print(f"\n{len(rows)} rows appended to {args.out}", file=sys.stderr)
    return 0


def time_rows(forms: list[Any], x: Any, device: Any, warmup: int, repeats: int, amp: bool = False) -> list[list[float]]:
    """Seconds per forward of each form: ``warmup`` untimed forwards each, then ``repeats`` rounds
    calling every form once in turn (drifts of the machine spread evenly over the rows)."""
    import torch
    from benchmarks.common import autocast_for, synchronize, time_forward

    dtype = torch.bfloat16 if amp else None
    times: list[list[float]] = [[] for _ in forms]
    with torch.inference_mode(), autocast_for(device, dtype):
        for form in forms:
            for _ in range(warmup):
                form.run(x)
        synchronize(device)
        for r in range(repeats):
            for i, form in enumerate(forms):
                times[i].append(time_forward(lambda t, f=form: f.run(t), x, device))
            print(f"[segmentation] round {r + 1}/{repeats} done", file=sys.stderr, flush=True)
    return times


def cost_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    gpu = any("gpu_img_s" in r for r in rows)
    head = (
        "| method (deployed form) | head | trainable params (M) | of which head (M) | GFLOPs/img | × frozen | "
        "counter check | CPU img/s (min–max) | × frozen |" + (" GPU img/s |" if gpu else "")
    )
    lines = [head, "|" + "---|" * 2 + "---:|" * (7 + gpu)]
    for r in rows:
        lo, hi = 1 / max(r["cpu_s"]), 1 / min(r["cpu_s"])
        check = "-" if r.get("counter_check") is None else f"{r['counter_check']:.6f}"
        lines.append(
            f"| {r['label']} | {r['head']} | {r['trainable_params'] / 1e6:.3f} | {r['head_params'] / 1e6:.3f} | "
            f"{r['gflops']:.2f} | {fmt(r['gflops_vs_frozen'], '.3f')} | {check} | "
            f"{r['cpu_img_s']:.3f} ({lo:.3f}–{hi:.3f}) | {fmt(r['cpu_vs_frozen'], '.2f')} |"
            + (f" {fmt(r.get('gpu_img_s'), '.1f')} |" if gpu else "")
        )
    up = [r for r in rows if r["head"] == "upernet"]
    frozen = next((r for r in up if r["method"] == "frozen"), None)
    notes = [
        "",
        f"- Model: `{meta['model']}` at {meta['img_size']} px ({'×'.join(map(str, rows[0]['grid']))} patches), "
        f"{meta['num_classes']} classes, random weights; batch 1, fp32, eval mode, `torch.inference_mode()`.",
        f"- CPU: {meta['device']}; one warm-up forward per row, then {meta['repeats']} round-robin rounds (median); "
        f"1-min load average {meta['load_avg_1min'][0]} at the start, {meta['load_avg_1min'][1]} at the end."
        + (f" GPU: {meta['gpu']}, bf16 autocast, synchronised." if meta.get("gpu") else " No GPU here."),
        f"- Versions: torch {meta['torch']}, timm {meta['timm']}, lightning {meta['lightning']}, "
        f"Python {meta['python']}.",
        "- Methods: each recipe's `method` block: "
        + "; ".join(sorted({f"{r['method']} = {r['method_config']}" for r in rows if r["method"] != "frozen"}))
        + ". Merged rows are plain timm ViTs (`merge()`); DyT rows are `deploy_form(keep_rate)` (top-k "
        "tokens through each MLP).",
        "- GFLOPs: papers' convention (1 multiply-add = 1 FLOP) for one crop: the ViT's matmuls (patch "
        "embedding, qkv, attention's QKᵀ and AV, projection, MLP, DyT's dispatchers and adapters), its "
        "LayerNorms (5 per element; the final norm at each level the head reads), and the head's "
        "convolutions and deconvolutions; not counted: BatchNorm, activations, softmax, pooling, bilinear "
        "resizing, biases, additions. 'counter check' = `torch.utils.flop_counter` (unfused attention) / 2 "
        "divided by our count without LayerNorms (1.000000: every multiply-add accounted for).",
    ]
    if frozen:
        notes.append(
            f"- Of the frozen UperNet row's {frozen['gflops']:.2f} GFLOPs, the ViT (with norms) is "
            f"{frozen['gflops_vit']:.2f} and the UperNet head {frozen['gflops_head']:.2f} (BEiT's neck: "
            f"2×2 deconvolutions and a max-pool, no 3×3 convolutions; width "
            f"{frozen['head_channels']}). Unmerged (as trained), the adapter rows cost "
            + ", ".join(
                f"{r['method']} {r['gflops_unmerged']:.2f}"
                for r in up
                if r["method"] not in ("frozen", "dyt") and r["keep_rate"] is None
            )
            + " GFLOPs."
        )
        dyt = [r for r in up if r["keep_rate"] is not None]
        if dyt:
            notes.append(
                "- DyT: "
                + "; ".join(
                    f"keep {r['keep_rate']:g} = {int(r['kept_tokens_per_block'][0])} of {r['patches']} patch tokens "
                    f"per block, {r['gflops'] - frozen['gflops']:+.2f} GFLOPs vs frozen"
                    for r in dyt
                )
                + "."
            )
    ft, d = PAPER_GFLOPS["full fine-tuning"], PAPER_GFLOPS["DyT"]
    notes.append(
        f"- For context, the DyT paper (ADE20K, UperNet on ViT-B, 512 px) reports {ft} GFLOPs for full "
        f"fine-tuning and {d} for DyT ({d - ft:+.2f}, ×{d / ft:.3f}). The paper states neither its "
        "UperNet's neck nor its counting tool (nor whether a figure is per crop or per sliding-window image): "
        "our absolute numbers are not comparable to its; the saving DyT makes (MLP work of the skipped tokens "
        "only) is the comparable part."
    )
    notes.append(f"- Command: `{meta['command']}` ({meta['date']}, {meta['wall_s'] / 60:.1f} min).")
    return "\n".join(lines + notes)


# -- mosaics -----------------------------------------------------------------------------------------
def overlay_text(root: Path, head: str, epochs: int) -> str:
    channels = "\n    head_channels: 64" if head == "upernet" else ""
    return f"""model:
  init_args:
    model_name: vit_small_patch14_dinov2
    checkpoint_path: {WEIGHTS}
    drop_path_rate: 0.0
    head: {head}{channels}
    warmup_iters: 0
data:
  class_path: petl_lightning.data.segmentation.SegmentationFolderDataModule
  init_args: {{root: {root}, img_size: 112, batch_size: 16, eval_batch_size: 50, num_workers: 0}}
trainer:
  max_epochs: {epochs}
  max_steps: -1
  val_check_interval: null
  check_val_every_n_epoch: 1
  log_every_n_steps: 5
"""


def console(*args: str, log: Path) -> tuple[int, str, float]:
    """``petl-lightning ARGS`` in a new process (cwd the repository); exit status, output, seconds."""
    exe = Path(sys.executable).parent / "petl-lightning"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "COLUMNS": "160"}
    t0 = time.time()
    proc = subprocess.run([str(exe), *args], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.time() - t0
    out = proc.stdout + "\n" + proc.stderr
    log.write_text(f"$ petl-lightning {shlex.join(args)}\n# exit {proc.returncode}, {seconds:.1f} s\n{out}")
    return proc.returncode, out, seconds


def metric(output: str, name: str) -> float | None:
    """``name``'s value in Lightning's printed test table (the key exactly: not ``name/...``)."""
    found = re.search(rf"{re.escape(name)}[\s│┃|]+([-+0-9.eE]+|nan)", output)
    return float(found.group(1)) if found else None


def mosaics(args: argparse.Namespace, argv: list[str]) -> int:
    t_start = time.time()
    root = args.root.resolve()
    work = args.work_dir.resolve()
    if args.figure_only:
        rows = [json.loads(p.read_text()) for p in work.glob("*/result.json")]
        rows.sort(key=lambda r: (HEADS.index(r["head"]), METHODS.index(r["method"])))
        if not rows:
            print(f"no runs under {work}: run without --figure-only first", file=sys.stderr)
            return 2
    else:
        build = [sys.executable, "-m", "petl_lightning.data.mosaics", str(args.source), str(root)]
        t0 = time.time()
        subprocess.run(build, cwd=ROOT, check=True)
        print(f"[segmentation] mosaics in {root} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
        meta = {
            "device": f"{cpu_name()}, {os.cpu_count()} CPUs, torch's default threads per run",
            **versions(),
            "model": "vit_small_patch14_dinov2",
            "weights": str(WEIGHTS),
            "root": str(root),
            "epochs": args.epochs,
            "command": "python benchmarks/segmentation.py " + shlex.join(argv),
        }
        rows = []
        for head in args.heads:
            for method in args.methods:
                row = run_one(method, head, root, work / f"{method}-{head}", args.epochs)
                row.update(meta, date=_dt.datetime.now().isoformat(timespec="seconds"))
                (work / f"{method}-{head}" / "result.json").write_text(json.dumps(row, indent=1))
                append_rows(args.out, [row])
                rows.append(row)
    wall = time.time() - t_start
    print(mosaics_table(rows, wall if not args.figure_only else None))
    if args.figure:
        draw(rows, root, args.figure, args.figure_head, args.figure_images)
    return 0


def run_one(method: str, head: str, root: Path, run_dir: Path, epochs: int) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    overlay = run_dir / "overlay.yaml"
    overlay.write_text(overlay_text(root, head, epochs))
    common = ["-c", f"recipes/segmentation/{method}.yaml", "-c", str(overlay), "--trainer.default_root_dir"]
    common.append(str(run_dir))
    print(f"[segmentation] fit {method} / {head}", file=sys.stderr, flush=True)
    fit_rc, fit_out, fit_s = console("fit", *common, log=run_dir / "fit.log")
    row: dict[str, Any] = {
        "benchmark": "segmentation.mosaics",
        "method": method,
        "head": head,
        "run_dir": str(run_dir),
        "fit_args": ["fit", *common],
        "fit_rc": fit_rc,
        "train_s": round(fit_s, 1),
    }
    found = re.search(r"([0-9,]+) trainable of ([0-9,]+) parameters", fit_out)
    if found:
        row["trainable_params"] = int(found.group(1).replace(",", ""))
    if fit_rc != 0:
        print(f"[segmentation] fit failed ({run_dir / 'fit.log'})", file=sys.stderr, flush=True)
        return row
    test_rc, test_out, test_s = console("test", *common, "--ckpt_path", "last", log=run_dir / "test.log")
    row.update(test_rc=test_rc, test_s=round(test_s, 1))
    for name in TEST_METRICS:
        row[name.split("/", 1)[1]] = metric(test_out, name)
    print(
        f"[segmentation] {method} / {head}: mIoU {row['mIoU']}, fit {fit_s:.0f} s, test {test_s:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    return row


def mosaics_table(rows: list[dict[str, Any]], wall: float | None) -> str:
    lines = [
        "| method | head | mIoU | mAcc | aAcc | GFLOPs/img (112 px) | keep rate | train s | trainable params (M) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        params = r.get("trainable_params")
        lines.append(
            f"| {r['method']} | {r['head']} | {fmt(r.get('mIoU'), '.4f')} | {fmt(r.get('mAcc'), '.4f')} | "
            f"{fmt(r.get('aAcc'), '.4f')} | {fmt(r.get('gflops_per_image'), '.3f')} | "
            f"{fmt(r.get('keep_rate'), '.3f')} | {r['train_s']:.0f} | "
            f"{fmt(params / 1e6 if params else None, '.3f')} |"
        )
    if rows:
        r = rows[0]
        lines += [
            "",
            f"- Data: dtd10 texture mosaics (`python -m petl_lightning.data.mosaics`: train 200, val 40, test 100 of "
            f"112×112, 10 classes) in `{r['root']}`; each cell `petl-lightning fit` then `test --ckpt_path last` in "
            f"new processes, the shipped `recipes/segmentation/<method>.yaml` plus the overlay in the run folder: "
            f"real ViT-S/14 (`{r['model']}`), 112 px, batch 16, {r['epochs']} epochs, lr 1e-3 poly, no warm-up, "
            f"drop path 0, UperNet width 64.",
            "- Metrics on the 100 test mosaics; GFLOPs/img and keep rate: the test's executed cost (head "
            "included; DyT at its calibrated threshold). 'train s': wall time of the fit process (start-up, "
            f"{r['epochs']} validations and checkpoints included).",
            f"- {r['device']}; torch {r['torch']}, timm {r['timm']}, lightning {r['lightning']}, Python {r['python']}.",
            f"- Command: `{r['command']}`" + (f" ({wall / 60:.1f} min)." if wall else "."),
        ]
    return "\n".join(lines)


def draw(rows: list[dict[str, Any]], root: Path, path: Path, head: str, count: int) -> None:
    """Test mosaics, their truth and each method's prediction with one head, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from petl_lightning.callbacks.masks import PALETTE
    from petl_lightning.data.segmentation import SegmentationFolderDataModule
    from petl_lightning.tasks.checkpoints import load_trained

    done = [r for r in rows if r.get("mIoU") is not None]
    if head == "auto":
        means = {h: statistics.fmean(r["mIoU"] for r in done if r["head"] == h) for h in {r["head"] for r in done}}
        head = max(means, key=lambda h: means[h])
        print(f"[segmentation] figure: {head} head (mean mIoU {means})", file=sys.stderr, flush=True)
    chosen = [r for r in done if r["head"] == head]
    dm = SegmentationFolderDataModule(str(root), img_size=112, backbone_name="vit_small_patch14_dinov2", num_workers=0)
    x, y = next(iter(dm.test_dataloader()))
    x, y = x[:count], y[:count]
    preds = {}
    for r in chosen:
        ckpt = max(Path(r["run_dir"]).rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
        module = load_trained(ckpt)
        with torch.inference_mode():
            preds[r["method"]] = module.infer(x).logits.argmax(1)
        del module
        gc.collect()
    colours = np.asarray(PALETTE, dtype=np.uint8).reshape(-1, 3)
    mean = torch.tensor(dm.mean).view(3, 1, 1)
    std = torch.tensor(dm.std).view(3, 1, 1)
    cols = ["image", "truth", *preds]
    fig, axes = plt.subplots(len(x), len(cols), figsize=(1.35 * len(cols), 1.45 * len(x) + 0.7), squeeze=False)
    for i in range(len(x)):
        image = (x[i] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        cells = [image, colours[y[i].numpy()], *(colours[p[i].numpy()] for p in preds.values())]
        for j, cell in enumerate(cells):
            ax = axes[i, j]
            ax.imshow(cell, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                miou = next((r["mIoU"] for r in chosen if r["method"] == cols[j]), None)
                ax.set_title(cols[j] + (f"\nmIoU {miou:.3f}" if miou is not None else "\n"), fontsize=8)
    fig.suptitle(f"dtd10 texture mosaics, test: predictions with the {head} head", fontsize=9)
    from matplotlib.patches import Patch

    handles = [Patch(color=colours[i] / 255, label=name) for i, name in enumerate(dm.class_names)]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"[segmentation] wrote {path} ({path.stat().st_size / 1024:.0f} KB)", file=sys.stderr, flush=True)


# -- command line ------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("cost", help="deployed cost per method at 512 px (random ViT-B/16 + UperNet)")
    c.add_argument("--model", default="vit_base_patch16_224.orig_in21k", help="timm name (random weights)")
    c.add_argument("--img-size", type=int, default=512)
    c.add_argument("--num-classes", type=int, default=150)
    c.add_argument("--head-channels", type=int, default=512, help="UperNet's width")
    c.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    c.add_argument("--keep-rates", nargs="+", type=float, default=[0.7, 0.5], help="DyT's top-k deploy forms")
    c.add_argument("--no-linear", action="store_true", help="leave out the frozen backbone with the linear head")
    c.add_argument("--no-flop-check", action="store_true", help="skip the flop-counter forward of each row")
    c.add_argument("--warmup", type=int, default=1)
    c.add_argument("--repeats", type=int, default=3, help="timed CPU rounds (every row once per round)")
    c.add_argument("--gpu-repeats", type=int, default=20, help="timed GPU rounds, when CUDA is available")
    c.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    c.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "segmentation.jsonl")

    m = sub.add_parser("mosaics", help="fit + test every method and head on texture mosaics via petl-lightning")
    m.add_argument("--root", type=Path, default=ROOT / "runs" / "mosaics", help="the mosaics' folder (built once)")
    m.add_argument("--source", type=Path, default=ASSETS / "vtab1k" / "dtd10", help="the texture folder")
    m.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "segmentation_mosaics", help="one folder per run")
    m.add_argument("--epochs", type=int, default=5)
    m.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    m.add_argument("--heads", nargs="+", choices=HEADS, default=list(HEADS))
    m.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "segmentation_mosaics.jsonl")
    m.add_argument("--figure", type=Path, default=ROOT / "docs" / "segmentation_mosaics.png", help="'' : none")
    m.add_argument("--figure-head", choices=("auto", *HEADS), default="auto", help="auto: the higher mean mIoU")
    m.add_argument("--figure-images", type=int, default=3, help="test mosaics (rows) in the figure")
    m.add_argument("--figure-only", action="store_true", help="redraw the figure from the runs in --work-dir")

    args = p.parse_args(argv)
    if args.command == "cost":
        return cost(args, argv)
    if args.command == "mosaics" and str(args.figure) in ("", "."):
        args.figure = None
    return mosaics(args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
