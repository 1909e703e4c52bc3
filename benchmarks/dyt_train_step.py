"""Training step time of DyT against LinearProbe on the same batch.

    python benchmarks/dyt_train_step.py                         # ViT-B/16, 224 px, batch 32, CPU
    python benchmarks/dyt_train_step.py --model vit_small_patch16_224 --batch-size 16 --threads 1

One step = forward(s), loss, backward, AdamW update, timed round-robin (median of ``--repeats``
after one warm-up). Rows:

- LinearProbe: frozen forward, head-only backward (feature cache off, so the forward is timed).
- DyT (full loss): the paper's step, two forwards (dynamic with Gumbel masks + complete model),
  CE + CE + KL + rate, backward through both into adapters and dispatchers.
- DyT (no complete-model terms): ``w_complete_cls = w_distill = 0``, a single forward.

The paper reports its full loss at 1.8x the training time of the single-forward version (Tab.12).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from petl_lightning.methods.baselines import LinearProbe  # noqa: E402
from petl_lightning.methods.dyt import DyT  # noqa: E402


def _step_fn(module: nn.Module, x: torch.Tensor, y: torch.Tensor):
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = module.training_loss(x, y)[0]
        loss.backward()
        opt.step()

    return step


def train_step_times(
    model_name: str = "vit_base_patch16_224",
    img_size: int = 224,
    batch_size: int = 32,
    num_classes: int = 100,
    repeats: int = 3,
    device: str = "cpu",
) -> dict[str, float]:
    """Median seconds per training step of LinearProbe, DyT (full loss) and DyT (single forward),
    timed alternately on one random batch; also the ratios to LinearProbe."""
    dev = torch.device(device)
    common = dict(num_classes=num_classes, model_name=model_name, pretrained=False, img_size=img_size)
    torch.manual_seed(0)
    modules = {
        "linear_probe": LinearProbe(cache_features=False, **common),
        "dyt_full": DyT(**common),
        "dyt_single_forward": DyT(skipping={"w_complete_cls": 0.0, "w_distill": 0.0}, **common),
    }
    x = torch.randn(batch_size, 3, img_size, img_size, device=dev)
    y = torch.randint(0, num_classes, (batch_size,), device=dev)
    steps = {}
    for name, m in modules.items():
        m.to(dev).train()
        steps[name] = _step_fn(m, x, y)
        steps[name]()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            step()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times[name].append(time.perf_counter() - t0)
    out = {f"{k}_s": statistics.median(v) for k, v in times.items()}
    out["dyt_full_vs_linear_probe"] = out["dyt_full_s"] / out["linear_probe_s"]
    out["dyt_full_vs_single_forward"] = out["dyt_full_s"] / out["dyt_single_forward_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    r = train_step_times(args.model, args.img_size, args.batch_size, args.num_classes, args.repeats, args.device)
    print(
        f"{args.model} @ {args.img_size}px, batch {args.batch_size}, {args.device}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(f"  LinearProbe step:                    {r['linear_probe_s']:.3f} s")
    print(
        f"  DyT step (full loss, two forwards):  {r['dyt_full_s']:.3f} s  "
        f"({r['dyt_full_vs_linear_probe']:.2f}x LinearProbe)"
    )
    print(
        f"  DyT step (single forward):           {r['dyt_single_forward_s']:.3f} s  "
        f"(full loss = {r['dyt_full_vs_single_forward']:.2f}x this)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
