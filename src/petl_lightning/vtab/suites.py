"""The benchmark suites the runner knows: VTAB-1K and FGVC.

A :class:`Suite` says which tasks a run may select (its registry and group names), what makes a
folder one of its task folders, how its tables summarise accuracies (VTAB-1K's group means, FGVC's
one mean) and which papers' rows it compares with. The recipe's data class picks the suite
(:func:`suite_for`); any other data class runs as VTAB-1K, whose layout takes custom tasks.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from petl_lightning.data.fgvc import FGVC_TASKS
from petl_lightning.data.tasks import GROUPS, LIST_FILES, VTAB_TASKS
from petl_lightning.vtab import reference as ref


class SummaryRow(NamedTuple):
    """One summary figure: ``value`` (None unless complete: compared with the papers and logged),
    ``cell`` (what the table prints), ``label`` (summary table) and ``short`` (papers' layout)."""

    key: str
    label: str
    short: str
    value: float | None
    cell: str


@dataclass(frozen=True)
class Suite:
    """A benchmark: its tasks (name -> group, in the papers' order) and their table columns.

    The base summary is one mean over the suite's tasks (FGVC's convention); with some tasks
    missing it prints the mean of those finished, marked ``(k/n tasks)``, and compares nothing.
    """

    name: str  # "FGVC": titles and messages
    key: str  # "fgvc": W&B keys
    a_name: str  # "an FGVC": the name with its article, for errors
    data_class: str  # the DataModule class path that selects this suite
    tasks: Mapping[str, str]
    columns: Mapping[str, str]
    split_files: tuple[str, ...]  # a task folder holds at least one of these
    custom_tasks: bool  # other folders of the layout are tasks too
    root_hint: str  # "cub/, nabirds/, ...": what the data root holds
    root_example: str  # "/path/fgvc"
    example: str  # "cub,stanford_dogs"
    mean_note: str
    references: Mapping[str, ref.Reference]

    @property
    def groups(self) -> tuple[str, ...]:
        """The group names ``--tasks`` accepts, in order."""
        return tuple(dict.fromkeys(self.tasks.values()))

    def tasks_in(self, group: str) -> list[str]:
        return [t for t, g in self.tasks.items() if g == group]

    def is_task_dir(self, path: Path) -> bool:
        """A folder holding the suite's split files (for a registry task, unless custom tasks are allowed)."""
        known = self.custom_tasks or path.name in self.tasks
        return known and path.is_dir() and any((path / f).is_file() for f in self.split_files)

    def summary(self, per_task: Mapping[str, float]) -> list[SummaryRow]:
        """The suite's mean of a ``{task: accuracy}`` mapping (other tasks and NaN are left out)."""
        have = [float(v) for t, v in per_task.items() if t in self.tasks and not math.isnan(float(v))]
        k, n = len(have), len(self.tasks)
        mean = statistics.fmean(have) if have else None
        if mean is None:
            cell = f"n/a (0/{n} tasks)"
        else:
            cell = f"{mean:.2f}" if k == n else f"{mean:.2f} ({k}/{n} tasks)"
        label = f"{self.name} mean"
        return [SummaryRow("mean", label, label, mean if k == n else None, cell)]

    def reference(self, name: str) -> ref.Reference | None:
        """The papers' row ``name`` (canonical, see :func:`~petl_lightning.vtab.reference.resolve_name`) for
        this suite, or None."""
        return self.references.get(name)

    def reference_for_module(self, class_name: str, hparams: Mapping[str, Any]) -> str | None:
        """The row matching a trained module (its class, full placement), or None."""
        if hparams.get("placement", "attn_mlp") != "attn_mlp":
            return None
        try:
            name = ref.resolve_name(class_name)
        except ref.UnknownReferenceError:
            return None
        return name if name in self.references else None

    def paper_table(self, rows: Mapping[str, Mapping[str, float]], digits: int = 1) -> str:
        """Markdown in the papers' layout: one column per task, then the summary figures; one row
        per ``{label: {task: acc}}``; missing values print ``-``."""
        keys = self.summary({})
        head = ["method", *self.columns.values(), *[s.short for s in keys]]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for label, accs in rows.items():
            cells = [label]
            for t in self.tasks:
                v = accs.get(t)
                cells.append("-" if v is None or math.isnan(v) else f"{v:.{digits}f}")
            for s in self.summary(accs):
                cells.append("-" if s.value is None else f"{s.value:.{digits + 1}f}")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


class VTABSuite(Suite):
    """VTAB-1K: the group means, their mean and the 19-task mean, and the papers' rows of
    ``data/reference_results.json``."""

    LABELS = {
        "natural": ("Natural mean", "Natural"),
        "specialized": ("Specialized mean", "Specialized"),
        "structured": ("Structured mean", "Structured"),
        "group_mean": ("Group mean (mean of 3 group means)", "Group mean"),
        "mean19": ("19-task mean", "19-mean"),
    }

    def summary(self, per_task: Mapping[str, float]) -> list[SummaryRow]:
        s = ref.summarize(per_task)
        rows = []
        for key, (label, short) in self.LABELS.items():
            if s[key] is not None:
                cell = f"{s[key]:.2f}"
            elif key == "group_mean":
                cell = f"n/a ({sum(1 for g in GROUPS if s[g] is not None)}/3 groups complete)"
            else:
                k, n = s["counts"]["all" if key == "mean19" else key]
                cell = f"n/a ({k}/{n} tasks)"
            rows.append(SummaryRow(key, label, short, s[key], cell))
        return rows

    def reference(self, name: str) -> ref.Reference | None:
        return ref.reference(name)

    def reference_for_module(self, class_name: str, hparams: Mapping[str, Any]) -> str | None:
        return ref.reference_for_module(class_name, hparams)


VTAB = VTABSuite(
    name="VTAB-1K",
    key="vtab",
    a_name="a VTAB-1K",
    data_class="petl_lightning.data.vtab.VTAB1kDataModule",
    tasks={t.name: t.group for t in VTAB_TASKS.values()},
    columns=ref.SHORT_NAMES,
    split_files=LIST_FILES,
    custom_tasks=True,
    root_hint="cifar/, dtd/, ...",
    root_example="/path/vtab-1k",
    example="cifar,dtd",
    mean_note="Group mean = mean of the Natural, Specialized and Structured means (VPT/NOAH/RepAdapter/DyT "
    'convention); 19-task mean = mean over all tasks (ARC\'s "Mean Total"). Custom tasks are not in any mean.',
    references={},
)

FGVC = Suite(
    name="FGVC",
    key="fgvc",
    a_name="an FGVC",
    data_class="petl_lightning.data.fgvc.FGVCDataModule",
    tasks={t: "fgvc" for t in FGVC_TASKS},
    columns={
        "cub": "CUB",
        "nabirds": "NABirds",
        "oxford_flowers": "Flowers",
        "stanford_dogs": "Dogs",
        "stanford_cars": "Cars",
    },
    split_files=("train.json", "val.json", "test.json"),
    custom_tasks=False,
    root_hint="cub/, nabirds/, ...",
    root_example="/path/fgvc",
    example="cub,stanford_dogs",
    mean_note="FGVC mean = mean over the five tasks (the papers' Mean); while some are missing, the mean of "
    "those finished, marked (k/5 tasks) and not compared with the papers.",
    references=ref.FGVC_REFERENCES,
)

SUITES: tuple[Suite, ...] = (VTAB, FGVC)


def suite_for(data_class: str | None) -> Suite:
    """The suite of a recipe's data class (its class path, or a subclass of a suite's): VTAB-1K
    for any other."""
    from petl_lightning.cli_keys import import_class

    if not data_class:
        return VTAB
    for suite in SUITES:
        if data_class == suite.data_class:
            return suite
    cls = import_class(data_class)
    for suite in SUITES:
        base = import_class(suite.data_class)
        if isinstance(cls, type) and base is not None and issubclass(cls, base):
            return suite
    return VTAB


def suite_named(name: str) -> Suite:
    """The suite whose ``name`` is ``name`` (VTAB-1K for an unknown one, as in older run folders)."""
    return next((s for s in SUITES if s.name == name), VTAB)


def group_of(task: str) -> str:
    """The group of a task of any suite; ``custom`` for other tasks."""
    return next((s.tasks[task] for s in SUITES if task in s.tasks), "custom")


def task_order(task: str) -> tuple[int, str]:
    """Sort key: each suite's tasks in the papers' order (VTAB-1K's first), then custom tasks by name."""
    names = [t for s in SUITES for t in s.tasks]
    return (names.index(task), "") if task in names else (len(names), task)


__all__ = [
    "FGVC",
    "SUITES",
    "VTAB",
    "Suite",
    "SummaryRow",
    "VTABSuite",
    "group_of",
    "suite_for",
    "suite_named",
    "task_order",
]
