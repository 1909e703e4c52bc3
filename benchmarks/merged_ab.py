"""Merged RepAdapter / ARC against the plain timm ViT, timed A/B (ABBA order), nothing else running.

    python benchmarks/merged_ab.py            # ViT-B/16, 224 px, batch 16, CPU

The round-robin table of ``benchmark.py`` runs the frozen backbone first in every round, which on
this CPU favoured the later rows by up to ~5%; alternating the order each round removes that
position effect for the one question "does a merged model run at the backbone's speed?".
Adapters get random non-zero weights so the merge is not a no-op.
"""

import statistics
import time

import timm
import torch

from petl_lightning import ARC, RepAdapter

torch.manual_seed(0)
name = "vit_base_patch16_224"
base = timm.create_model(name, pretrained=False, num_classes=100).eval()
rep = RepAdapter(num_classes=100, model_name=name, pretrained=False).eval()
for p in rep.parameters():
    if p.requires_grad:
        torch.nn.init.normal_(p, std=0.02)
m_rep = rep.merge().eval()
arc = ARC(num_classes=100, model_name=name, pretrained=False).eval()
for p in arc.parameters():
    if p.requires_grad:
        torch.nn.init.normal_(p, std=0.02)
m_arc = arc.merge().eval()
x = torch.randn(16, 3, 224, 224)
mods = {"backbone": base, "repadapter merged": m_rep, "arc merged": m_arc}
t = {k: [] for k in mods}
with torch.inference_mode():
    for m in mods.values():
        m(x)
    for r in range(8):
        order = list(mods) if r % 2 == 0 else list(mods)[::-1]
        for k in order:
            s = time.perf_counter()
            mods[k](x)
            t[k].append(time.perf_counter() - s)
b = statistics.median(t["backbone"])
for k, v in t.items():
    print(f"{k:20s} {16 / statistics.median(v):6.2f} img/s  x{b / statistics.median(v):.3f}")
