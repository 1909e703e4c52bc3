"""Merged RepAdapter / ARC against the plain timm ViT, timed A/B (ABBA order), nothing else running.

    python benchmarks/merged_ab.py            # ViT-B/16, 224 px, batch 16, 8 rounds, CPU
    python benchmarks/merged_ab.py --model vit_tiny_patch16_224 --img-size 32 --batch-size 2 --rounds 2 --threads 1

The round-robin table of ``benchmark.py`` runs the frozen backbone first in every round, which on
this CPU favoured the later rows by up to ~5%; alternating the order each round removes that
position effect for the one question "does a merged model run at the backbone's speed?".
Adapters get random non-zero weights so the merge is not a no-op. ``merge()`` returns a plain timm
``VisionTransformer``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

from petl_lightning import ARC, RepAdapter


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_base_patch16_224", help="timm model name (random weights)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=8, help="timed rounds (the order flips every round)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    common = dict(num_classes=100, model_name=args.model, pretrained=False, img_size=args.img_size)
    base = timm.create_model(args.model, pretrained=False, num_classes=100, img_size=args.img_size).eval()
    rep = RepAdapter(adapter_dim=8, adapter_groups=2, adapter_scale=1.0, placement="attn_mlp", **common).eval()
    arc = ARC(adapter_dim=50, placement="attn_mlp", **common).eval()
    for method in (rep, arc):
        for prm in method.parameters():
            if prm.requires_grad:
                torch.nn.init.normal_(prm, std=0.02)
    mods = {"backbone": base, "repadapter merged": rep.merge().eval(), "arc merged": arc.merge().eval()}
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    t: dict[str, list[float]] = {k: [] for k in mods}
    with torch.inference_mode():
        for m in mods.values():
            m(x)
        for r in range(args.rounds):
            order = list(mods) if r % 2 == 0 else list(mods)[::-1]
            for k in order:
                s = time.perf_counter()
                mods[k](x)
                t[k].append(time.perf_counter() - s)
    b = statistics.median(t["backbone"])
    for k, v in t.items():
        print(f"{k:20s} {args.batch_size / statistics.median(v):6.2f} img/s  x{b / statistics.median(v):.3f}")


if __name__ == "__main__":
    main()
