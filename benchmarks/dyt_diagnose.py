"""DyT training diagnostics: what the dispatchers, adapters and loss terms do, step by step.

    python benchmarks/dyt_diagnose.py --task dtd10 --img-size 56 --epochs 2 --lr 1e-2 --every 8
    python benchmarks/dyt_diagnose.py --task dtd10 --set adapter_scale=0.1 w_rate=50 --every 8

Trains one DyT with Lightning (the real ``training_step``) and, through forward hooks on the
dispatchers, adapters and MLP branches (nothing in the module changes), prints every ``--every``
optimizer steps: the four loss terms; the keep rate of the sampled training masks and the keep rate
the inference rule would give on the same batch (``logit > threshold``) per layer; the dispatcher
logits' mean and spread; the adapter output's norm relative to the MLP branch's; and, on the test
list, the accuracy of the dynamic model (the inference path), of the complete model (every token),
and the inference keep rate. A diagnostic, not a test.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from torch import Tensor

from petl_lightning import DyT
from petl_lightning.data.vtab import VTAB1kDataModule

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
WEIGHTS = ASSETS / "weights" / "vit_small_patch14_dinov2.imgfocus_saliency.safetensors"


class Probe(L.Callback):
    """Collects per-layer signals of the *dynamic* forward of each training step through hooks."""

    def __init__(self, every: int, test_batches: list[tuple[Tensor, Tensor]]) -> None:
        self.every, self.test_batches, self.rows, self.handles = every, test_batches, [], []
        self.logits: dict[int, Tensor] = {}
        self.train_masks: dict[int, Tensor] = {}
        self.adapter_norm: dict[int, list[float]] = {}
        self.mlp_norm: dict[int, list[float]] = {}
        self.t0 = time.perf_counter()

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        for i, blk in enumerate(pl_module.vit.blocks):
            d, a = blk.dispatchers["mlp"], blk.adapters["mlp"]
            self.handles.append(d.proj.register_forward_hook(self._keep_logits(i)))
            sample = d.sample

            def wrapped(logits: Tensor, *args: Any, i: int = i, sample: Any = sample) -> Tensor:
                m = sample(logits, *args)
                self.train_masks[i] = m.detach()
                return m

            d.sample = wrapped
            self.handles.append(a.register_forward_hook(self._norm(self.adapter_norm, i)))
            self.handles.append(blk.ls2.register_forward_hook(self._norm(self.mlp_norm, i)))

    def _keep_logits(self, i: int) -> Any:
        def hook(mod: Any, inp: Any, out: Tensor) -> None:
            self.logits[i] = out.detach().squeeze(-1)

        return hook

    def _norm(self, store: dict[int, list[float]], i: int) -> Any:
        def hook(mod: Any, inp: Any, out: Tensor) -> None:
            if mod.training:
                store.setdefault(i, []).append(out.detach().norm(dim=-1).mean().item())

        return hook

    @torch.no_grad()
    def evaluate(self, m: Any, train_keep: Tensor) -> dict[str, Any]:
        """Test accuracy of: the inference rule (``logit > threshold``), the sampled training masks
        (what training optimises), per-image top-k at the target rate, per-layer top-k at each
        layer's training keep rate, and the complete model."""
        was = m.training
        m.eval()
        p = m.vit.num_patches
        k_target = int(round(m.skipping.target_rate * p))
        k_layer = [int(round(float(r) * p)) for r in train_keep]
        hits = dict.fromkeys(("dynamic", "sampled", "topk_r", "topk_train_rate", "complete"), 0)
        n, kept = 0, []
        for x, y in self.test_batches:
            gathered = m.vit.forward_gathered(x, m.vit.keep_count())
            kept.append(gathered.kept[:, :, 0].double() / p)
            outs = {
                "dynamic": m.head(gathered.features),
                "sampled": m.head(m.vit.forward_masked(x, sample=True).features),
                "complete": m.head(m.vit.forward_complete(x)),
            }
            for name, ks in (("topk_r", [k_target] * m.vit.depth), ("topk_train_rate", k_layer)):
                t = m.vit.embed(x)
                for blk, kk in zip(m.vit.blocks, ks):
                    t = blk(t, kk)[0]
                outs[name] = m.head(m.vit.forward_head(m.vit.vit.norm(t), pre_logits=True))
            for name, lg in outs.items():
                hits[name] += int((lg.argmax(-1) == y).sum())
            n += len(y)
        m.train(was)
        return {"acc": {k: v / n for k, v in hits.items()}, "eval_keep": torch.cat(kept).mean(0)}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        step = trainer.global_step
        if step % self.every and step not in (1, trainer.estimated_stepping_batches):
            self.adapter_norm.clear()
            self.mlp_norm.clear()
            return
        m = pl_module
        p = m.vit.num_prefix_tokens
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.endswith("_step")}
        depth = m.vit.depth
        thr = torch.stack([m.vit.blocks[i].dispatchers["mlp"].logit_threshold for i in range(depth)])
        logits = [self.logits[i][:, p:] for i in range(depth)]
        train_keep = torch.stack([self.train_masks[i].mean() for i in range(depth)])
        infer_keep = torch.stack([(lg > thr[i]).float().mean() for i, lg in enumerate(logits)])
        expected = torch.stack([torch.sigmoid(lg).mean() for lg in logits])
        spread = torch.stack([lg.std() for lg in logits])
        centre = torch.stack([lg.mean() for lg in logits])
        ratio = [
            (self.adapter_norm[i][0] / max(self.mlp_norm[i][0], 1e-12)) if self.mlp_norm.get(i) else float("nan")
            for i in range(depth)
        ]
        self.adapter_norm.clear()
        self.mlp_norm.clear()
        ev = self.evaluate(m, train_keep)
        row = {
            "step": step,
            "time_s": round(time.perf_counter() - self.t0, 1),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            **{k.removeprefix("train/").removesuffix("_step"): round(v, 4) for k, v in metrics.items()},
            "train_keep": [round(v, 2) for v in train_keep.tolist()],
            "batch_infer_keep": [round(v, 2) for v in infer_keep.tolist()],
            "sigmoid_mean": [round(v, 2) for v in expected.tolist()],
            "logit_mean": [round(v, 2) for v in centre.tolist()],
            "logit_std": [round(v, 2) for v in spread.tolist()],
            "adapter_over_mlp": [round(v, 2) for v in ratio],
            "test_acc": ev["acc"],
            "test_keep": [round(v, 2) for v in ev["eval_keep"].tolist()],
            "test_keep_mean": round(float(ev["eval_keep"].mean()), 3),
        }
        self.rows.append(row)
        print(yaml.safe_dump([row], width=200, default_flow_style=None, sort_keys=False), flush=True)


def parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=str(ASSETS / "vtab1k"))
    p.add_argument("--weights", default=str(WEIGHTS))
    p.add_argument("--task", default="dtd10")
    p.add_argument("--img-size", type=int, default=56)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--warmup-epochs", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=8, help="print every N optimizer steps")
    p.add_argument("--test-images", type=int, default=200, help="test images evaluated at each print")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="DyT arguments, e.g. skipping.w_rate=50")
    p.add_argument("--out", default=None, help="write the rows as YAML here")
    args = p.parse_args()
    dm = VTAB1kDataModule(
        root=args.root, task=args.task, img_size=args.img_size, batch_size=32, num_workers=0, cache=True
    )
    test = dm.dataset("test")
    idx = list(range(min(args.test_images, len(test))))
    xs = torch.stack([test[i][0] for i in idx])
    ys = torch.tensor([int(test[i][1]) for i in idx])
    batches = [(xs[i : i + 100], ys[i : i + 100]) for i in range(0, len(idx), 100)]
    overrides = dict(kv.split("=", 1) for kv in args.set)
    kwargs = dict(
        num_classes=dm.num_classes,
        model_name="vit_small_patch14_dinov2",
        checkpoint_path=args.weights,
        img_size=args.img_size,
        lr=args.lr,
        warmup_epochs=args.warmup_epochs,
        scheduler_interval="step",
    )
    for key, value in overrides.items():  # skipping.w_rate=50 goes into the skipping group
        group, _, name = key.rpartition(".")
        (kwargs.setdefault(group, {}) if group else kwargs)[name] = parse_value(value)
    L.seed_everything(args.seed, verbose=False)
    model = DyT(**kwargs)
    probe = Probe(args.every, batches)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[probe],
        log_every_n_steps=1,
    )
    print(f"# {args.task} {args.img_size}px epochs={args.epochs} lr={args.lr} seed={args.seed} set={overrides}")
    t0 = time.perf_counter()
    trainer.fit(model, dm)
    print(f"# fit wall time {time.perf_counter() - t0:.0f} s")
    if args.out:
        Path(args.out).write_text(yaml.safe_dump(probe.rows, width=200, default_flow_style=None, sort_keys=False))


if __name__ == "__main__":
    main()
