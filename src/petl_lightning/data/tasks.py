"""The 19 VTAB-1K tasks (folder name, class count, group) and the names that select them."""

from __future__ import annotations

from dataclasses import dataclass

from petl_lightning.errors import DataError

LIST_FILES = ("train800.txt", "val200.txt", "train800val200.txt", "test.txt")
GROUPS = ("natural", "specialized", "structured")


@dataclass(frozen=True)
class TaskInfo:
    """One VTAB-1K task: folder name, class count, group."""

    name: str
    num_classes: int
    group: str


VTAB_TASKS: dict[str, TaskInfo] = {
    t.name: t
    for t in [
        TaskInfo("cifar", 100, "natural"),
        TaskInfo("caltech101", 102, "natural"),
        TaskInfo("dtd", 47, "natural"),
        TaskInfo("oxford_flowers102", 102, "natural"),
        TaskInfo("oxford_iiit_pet", 37, "natural"),
        TaskInfo("svhn", 10, "natural"),
        TaskInfo("sun397", 397, "natural"),
        TaskInfo("patch_camelyon", 2, "specialized"),
        TaskInfo("eurosat", 10, "specialized"),
        TaskInfo("resisc45", 45, "specialized"),
        TaskInfo("diabetic_retinopathy", 5, "specialized"),
        TaskInfo("clevr_count", 8, "structured"),
        TaskInfo("clevr_dist", 6, "structured"),
        TaskInfo("dmlab", 6, "structured"),
        TaskInfo("kitti", 4, "structured"),
        TaskInfo("dsprites_loc", 16, "structured"),
        TaskInfo("dsprites_ori", 16, "structured"),
        TaskInfo("smallnorb_azi", 18, "structured"),
        TaskInfo("smallnorb_ele", 9, "structured"),
    ]
}


def tasks_in_group(group: str) -> list[str]:
    """Task names of a group (``natural``, ``specialized``, ``structured``) or ``all``."""
    if group == "all":
        return list(VTAB_TASKS)
    if group not in GROUPS:
        raise DataError(f"Unknown VTAB-1K group {group!r}; choose one of all, {', '.join(GROUPS)}.")
    return [t.name for t in VTAB_TASKS.values() if t.group == group]


def parse_tasks(spec: str) -> list[str]:
    """``all``, a group (``natural``, ``specialized``, ``structured``) or a comma list of tasks and groups."""
    tasks: list[str] = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item != "all" and item not in GROUPS and item not in VTAB_TASKS:
            raise DataError(
                f"Unknown VTAB-1K task {item!r}: use all, {', '.join(GROUPS)} or task names "
                f"({', '.join(VTAB_TASKS)}), comma-separated."
            )
        tasks += tasks_in_group(item) if item == "all" or item in GROUPS else [item]
    if not tasks:
        raise DataError("No tasks given: use all, a group or a comma list of VTAB-1K tasks.")
    return list(dict.fromkeys(tasks))


__all__ = ["GROUPS", "LIST_FILES", "VTAB_TASKS", "TaskInfo", "parse_tasks", "tasks_in_group"]
