"""The papers' reported VTAB-1K numbers (and ARC's FGVC row), and the summary statistics every
VTAB-1K table uses.

``data/reference_results.json`` holds the per-task top-1 accuracies (%) of ViT-B/16 (ImageNet-21k)
printed by the RepAdapter, ARC and DyT papers for themselves and for the usual baselines (Full
fine-tuning, Linear probing, BitFit, VPT, Adapter, AdaptFormer, LoRA, NOAH, FacT, SSF, ConvPass,
Res-Tuning). Dyn-Adapter's per-task numbers were not retrievable; its entry has none.

Two averages are in use and the papers disagree on which to print, so we always print both, labelled:
the *group mean* (mean of the Natural, Specialized and Structured means; VPT/NOAH/RepAdapter/DyT)
and the *19-task mean* (ARC's "Mean Total").
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

from petl_lightning.data.vtab import GROUPS, VTAB_TASKS
from petl_lightning.errors import UnknownReferenceError

#: Column headings of the papers' tables, in the papers' order (= ``VTAB_TASKS`` order).
SHORT_NAMES: dict[str, str] = {
    "cifar": "C100",
    "caltech101": "Cal",
    "dtd": "DTD",
    "oxford_flowers102": "Flw",
    "oxford_iiit_pet": "Pets",
    "svhn": "SVHN",
    "sun397": "Sun",
    "patch_camelyon": "Cam",
    "eurosat": "EuroS",
    "resisc45": "Res45",
    "diabetic_retinopathy": "Retino",
    "clevr_count": "Clv-c",
    "clevr_dist": "Clv-d",
    "dmlab": "DMLab",
    "kitti": "KITTI",
    "dsprites_loc": "dSpr-l",
    "dsprites_ori": "dSpr-o",
    "smallnorb_azi": "sN-a",
    "smallnorb_ele": "sN-e",
}


@dataclass(frozen=True)
class Reference:
    """One method's reported VTAB-1K row.

    ``per_task`` is ``None`` when the paper's per-task numbers are not available (Dyn-Adapter).
    ``reported`` holds the summary numbers as printed (``group_mean``, ``mean19``, group means).
    ``selection`` is the epoch rule behind the numbers where known (``"max_test"``: the maximum over
    epochs of test accuracy), None where the paper does not say.
    """

    name: str
    per_task: dict[str, float] | None
    trainable_params_m: float | None
    gflops: float | None
    backbone: str
    source: str
    kind: str
    reported: dict[str, float] = field(default_factory=dict)
    selection: str | None = None


#: FGVC rows (ViT-B/16, ImageNet-21k; per-task top-1 %), keyed by the names :func:`resolve_name` gives.
FGVC_REFERENCES: dict[str, Reference] = {
    "ARC": Reference(
        name="ARC",
        per_task={"cub": 88.5, "nabirds": 85.3, "oxford_flowers": 99.3, "stanford_dogs": 91.9, "stanford_cars": 85.7},
        trainable_params_m=0.25,
        gflops=None,
        backbone="ViT-B/16 (ImageNet-21k)",
        source="ARC (Dong et al., NeurIPS 2023) FGVC row, as reprinted by the same authors in HTA and RLRR",
        kind="method",
        reported={"mean": 90.1},
        selection="max_test",
    ),
}


@lru_cache(maxsize=1)
def _load() -> dict[str, Any]:
    text = resources.files("petl_lightning").joinpath("data/reference_results.json").read_text()
    return json.loads(text)


def reference_methods() -> list[str]:
    """Names of every method with reported numbers, in table order."""
    return list(_load()["methods"])


def resolve_name(name: str) -> str:
    """Canonical reference name for ``name`` (a table name, a class name alias, any letter case)."""
    data = _load()
    methods, aliases = data["methods"], data["aliases"]
    if name in methods:
        return name
    if name in aliases:
        return aliases[name]
    lowered = {k.lower(): k for k in [*methods, *aliases]}
    if name.lower() in lowered:
        key = lowered[name.lower()]
        return aliases.get(key, key)
    close = difflib.get_close_matches(name, list(methods), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownReferenceError(f"No reported VTAB-1K numbers for {name!r}.{hint} Known: {', '.join(methods)}.")


def reference(name: str) -> Reference:
    """The reported row of ``name`` (see :func:`reference_methods`; class names like ``LinearProbe``
    and ``DyT`` are accepted as aliases)."""
    key = resolve_name(name)
    m = _load()["methods"][key]
    return Reference(
        name=key,
        per_task=None if m["per_task"] is None else {k: float(v) for k, v in m["per_task"].items()},
        trainable_params_m=m["trainable_params_m"],
        gflops=m["gflops"],
        backbone=m["backbone"],
        source=m["source"],
        kind=m["kind"],
        reported=dict(m.get("reported", {})),
        selection=m.get("selection"),
    )


def reference_for_module(class_name: str, hparams: Mapping[str, Any] | None = None) -> str | None:
    """The reference row matching a trained module, or ``None`` when the papers report none.

    DyT picks the row of its ``skipping.target_rate`` (0.5/0.7/0.9); RepAdapter's attention-only placement
    and ARC's attention-only variant have no verified per-task numbers, so they get none.
    """
    hp = dict(hparams or {})
    if class_name == "DyT":
        rate = (hp.get("skipping") or {}).get("target_rate", 0.5)
        name = f"DyT r={float(rate):g}"
        return name if name in _load()["methods"] else None
    if class_name == "RepAdapter" and hp.get("placement", "attn_mlp") != "attn_mlp":
        return None
    if class_name == "ARC" and hp.get("placement", "attn_mlp") != "attn_mlp":
        return None
    try:
        key = resolve_name(class_name)
    except UnknownReferenceError:
        return None
    return key if _load()["methods"][key]["per_task"] is not None else None


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summarize(per_task: Mapping[str, float]) -> dict[str, Any]:
    """Group means, the group mean and the 19-task mean of a ``{task: accuracy}`` mapping.

    A group's mean is given only when all of its tasks are present, the group mean only when all
    three groups are, the 19-task mean only when all 19 tasks are; otherwise the value is ``None``
    and ``counts[group] = (present, total)`` says what is missing. Tasks outside VTAB-1K (custom
    tasks) are ignored here. NaN accuracies count as missing.
    """
    present = {t: float(v) for t, v in per_task.items() if t in VTAB_TASKS and not math.isnan(float(v))}
    out: dict[str, Any] = {"counts": {}}
    for g in GROUPS:
        names = [t.name for t in VTAB_TASKS.values() if t.group == g]
        have = [present[t] for t in names if t in present]
        out["counts"][g] = (len(have), len(names))
        out[g] = _mean(have) if len(have) == len(names) else None
    groups = [out[g] for g in GROUPS]
    out["group_mean"] = _mean(groups) if all(v is not None for v in groups) else None
    out["mean19"] = _mean(list(present.values())) if len(present) == len(VTAB_TASKS) else None
    out["counts"]["all"] = (len(present), len(VTAB_TASKS))
    return out


def format_delta(ours: float | None, ref: float | None, digits: int = 1) -> str:
    """``+1.2`` / ``-0.3`` / ``n/a``."""
    if ours is None or ref is None or math.isnan(ours) or math.isnan(ref):
        return "n/a"
    return f"{ours - ref:+.{digits}f}"


def paper_table(rows: Mapping[str, Mapping[str, float]], digits: int = 1) -> str:
    """A markdown table in the papers' layout: 19 task columns, the three group means, the group
    mean and the 19-task mean; one row per ``{label: {task: acc}}``. Missing values print ``-``."""
    head = ["method", *SHORT_NAMES.values(), "Natural", "Specialized", "Structured", "Group mean", "19-mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, accs in rows.items():
        s = summarize(accs)
        cells = [label]
        for t in VTAB_TASKS:
            v = accs.get(t)
            cells.append("-" if v is None or math.isnan(v) else f"{v:.{digits}f}")
        for key in (*GROUPS, "group_mean", "mean19"):
            cells.append("-" if s[key] is None else f"{s[key]:.{digits + 1}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = [
    "FGVC_REFERENCES",
    "Reference",
    "UnknownReferenceError",
    "SHORT_NAMES",
    "format_delta",
    "paper_table",
    "reference",
    "reference_for_module",
    "reference_methods",
    "resolve_name",
    "summarize",
]
