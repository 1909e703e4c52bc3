"""Trainable-parameter counts of every method on ViT-B/16, ViT-L/16 and ViT-H/14 (100 classes, defaults):
a closed form here, the modules built on the meta device (no memory, no weights), and the table in
docs/families.md must all agree, so users can size a run before they start one."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from petl_lightning import ARC, DynAdapter, DyT, LinearProbe, RepAdapter

DOC = Path(__file__).resolve().parent.parent / "docs" / "families.md"
C = 100
#: (timm name, embed dim, depth) of the sizes in the table.
SIZES = {
    "ViT-B/16": ("vit_base_patch16_224", 768, 12),
    "ViT-L/16": ("vit_large_patch16_224", 1024, 24),
    "ViT-H/14": ("vit_huge_patch14_224", 1280, 32),
}
#: table row -> (method class, constructor arguments)
ROWS: dict[str, tuple[type, dict[str, Any]]] = {
    "LinearProbe": (LinearProbe, {}),
    "RepAdapter": (RepAdapter, {}),
    "ARC": (ARC, {}),
    "DyT": (DyT, {}),
    "DynAdapter (repadapter)": (DynAdapter, {"base": "repadapter"}),
    "DynAdapter (arc)": (DynAdapter, {"base": "arc"}),
    "DynAdapter (lora)": (DynAdapter, {"base": "lora"}),
    "DynAdapter (adapter)": (DynAdapter, {"base": "adapter"}),
}


def head(d: int) -> int:
    return d * C + C


def repadapter_layer(d: int, r: int = 8, groups: int = 2) -> int:
    return d * r + r + r * d // groups + d  # down (with bias), grouped up (with bias)


def exit_heads(d: int, hidden: tuple[int, ...] = (256, 128, 0)) -> int:
    """Dyn-Adapter's three early heads on [CLS, mean patch] (2d wide): LayerNorm, MLP or linear."""
    total = 0
    for h in hidden:
        total += 2 * d + (2 * d * h + h + h * C + C if h else 2 * d * C + C)
    return total


def closed_form(row: str, d: int, depth: int) -> int:
    if row == "LinearProbe":
        return head(d)
    if row == "RepAdapter":
        return 2 * depth * repadapter_layer(d) + head(d)
    if row == "ARC":
        r = 50
        return 2 * d * r + 2 * depth * (r + d) + head(d)  # two shared bases; per layer r coefficients + bias
    if row == "DyT":
        return depth * ((d + 1) + (d * 8 + 8 + 8 * d + d)) + head(d)  # dispatcher + parallel MLP adapter
    base = row.split("(")[1].rstrip(")")
    per_block = {
        "repadapter": 2 * repadapter_layer(d),
        "arc": 2 * (50 + d),
        "lora": 8 * d + 3 * d * 8,  # A (8 x d) and B (3d x 8) on attn.qkv
        "adapter": d * 8 + 8 + 8 * d + d,
    }[base]
    bases = 2 * d * 50 if base == "arc" else 0
    return depth * per_block + bases + exit_heads(d) + head(d)


def documented() -> dict[str, dict[str, int]]:
    """The parameter table of docs/families.md: row -> size -> count."""
    text = DOC.read_text().split("## Trainable parameters", 1)[1]
    table: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 1 + len(SIZES) and cells[0].strip("`") in ROWS:
            table[cells[0].strip("`")] = {s: int(re.sub(r"[,\s]", "", v)) for s, v in zip(SIZES, cells[1:])}
    return table


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("row", ROWS)
def test_built_modules_match_the_closed_form(row: str, size: str) -> None:
    cls, kw = ROWS[row]
    name, d, depth = SIZES[size]
    with torch.device("meta"):
        m = cls(num_classes=C, model_name=name, pretrained=False, **kw)
    assert m.vit.dim == d and m.vit.depth == depth
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == closed_form(row, d, depth)


def test_the_documented_table_is_the_closed_form() -> None:
    table = documented()
    assert set(table) == set(ROWS), f"docs/families.md rows: {sorted(table)}"
    for row, counts in table.items():
        for size, count in counts.items():
            _, d, depth = SIZES[size]
            assert count == closed_form(row, d, depth), (row, size)
