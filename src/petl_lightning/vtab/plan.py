"""Planning a VTAB-1K run: which tasks and seeds, where each pair lives, and its CLI arguments.

The recipe is read by the CLI's own parser (:func:`parse_fit_config`), so the runner sees exactly
the configuration ``petl-lightning fit`` would build, per-task hyper-parameters included (the
method's ``task_overrides`` hook, applied by the CLI).
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from petl_lightning.data.vtab import GROUPS, LIST_FILES, VTAB_TASKS
from petl_lightning.errors import RunnerError

RESULT_FILE = "result.json"
RESERVED = ("--data.init_args.task", "--data.task", "--seed_everything", "--trainer.default_root_dir")


@dataclass
class TaskRun:
    """One (task, seed) pair: where it lives and the Lightning CLI arguments that run it."""

    task: str
    seed: int
    run_dir: Path
    cli_args: list[str]
    fingerprint: str

    @property
    def group(self) -> str:
        info = VTAB_TASKS.get(self.task)
        return info.group if info else "custom"

    @property
    def result_path(self) -> Path:
        return self.run_dir / RESULT_FILE

    @property
    def finished(self) -> bool:
        return self.result_path.is_file()

    @property
    def last_checkpoint(self) -> Path | None:
        """Lightning's ``last.ckpt`` of an interrupted fit (the checkpoint callback's convention)."""
        path = self.run_dir / "checkpoints" / "last.ckpt"
        return path if path.is_file() else None

    @property
    def label(self) -> str:
        return f"{self.task} seed {self.seed}"


def task_order(task: str) -> tuple[int, str]:
    """Sort key: the 19 tasks in the papers' order, then custom tasks by name."""
    names = list(VTAB_TASKS)
    return (names.index(task), "") if task in VTAB_TASKS else (len(names), task)


def present_tasks(root: Path) -> list[str]:
    """Task folders under ``root`` that hold VTAB-1K list files (VTAB ones first, in order)."""
    if not root.is_dir():
        return []
    found = [p.name for p in root.iterdir() if p.is_dir() and any((p / f).is_file() for f in LIST_FILES)]
    return sorted(found, key=task_order)


def resolve_tasks(specs: Sequence[str], root: Path | None) -> list[str]:
    """Expand ``all`` / a group name / ``present`` / task names (comma or space separated).

    Every named task must be a VTAB-1K task or a folder under ``root``; with a known root, every
    selected task's folder must exist (so a typo fails now, not after hours of training).
    """
    items = [s.strip() for spec in specs for s in spec.split(",") if s.strip()]
    if not items:
        raise RunnerError("--tasks is empty; pass all, natural, specialized, structured, present or task names.")
    tasks: list[str] = []
    for item in items:
        if item == "all":
            tasks += list(VTAB_TASKS)
        elif item in GROUPS:
            tasks += [t.name for t in VTAB_TASKS.values() if t.group == item]
        elif item == "present":
            found = present_tasks(root) if root is not None else []
            if not found:
                raise RunnerError(f"--tasks present: no task folders with list files under {str(root)!r}.")
            tasks += found
        elif item in VTAB_TASKS or (root is not None and (root / item).is_dir()):
            tasks.append(item)
        else:
            here = present_tasks(root) if root is not None else []
            close = difflib.get_close_matches(item, [*VTAB_TASKS, *here, "all", *GROUPS], n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise RunnerError(
                f"Unknown task {item!r}: not a VTAB-1K task, group or folder of the data root.{hint} "
                f"Use all, natural, specialized, structured, present, or names like cifar,dtd."
            )
    tasks = list(dict.fromkeys(tasks))
    if root is not None:
        if not root.is_dir():
            raise RunnerError(
                f"Data root {str(root)!r} does not exist. Pass --data.root, the folder holding cifar/, dtd/, ..."
            )
        missing = [t for t in tasks if not (root / t).is_dir()]
        if missing:
            raise RunnerError(
                f"Task folder(s) missing under {str(root)!r}: {', '.join(missing)}. The root holds: "
                f"{', '.join(present_tasks(root)) or '(no task folders)'}. Choose --tasks among those "
                f"(or --tasks present)."
            )
    return tasks


class _Parsed(Exception):
    """Carries the parsed configuration out of :class:`_ParseOnly` (nothing is instantiated)."""

    def __init__(self, config: Any) -> None:
        super().__init__("parsed")
        self.config = config


def parse_fit_config(args: Sequence[str]) -> dict[str, Any]:
    """The effective ``fit`` configuration of recipe files and arguments, as ``petl-lightning fit``
    parses it (same parser, checks and per-task overrides), without building any class."""
    import warnings

    from petl_lightning.cli import PETLCLI

    class _ParseOnly(PETLCLI):
        def before_instantiate_classes(self) -> None:
            super().before_instantiate_classes()
            raise _Parsed(self.config)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        try:
            _ParseOnly(args=["fit", *args])
        except _Parsed as done:
            return done.config["fit"].as_dict()
    raise RunnerError("The recipe could not be parsed.")  # pragma: no cover - _ParseOnly always raises


def fingerprint(config: dict[str, Any]) -> str:
    """A hash of what decides the results (the parsed configuration minus per-pair settings)."""
    blob = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def plan_runs(
    configs: Sequence[str],
    extra: Sequence[str],
    task_specs: Sequence[str],
    seeds: Sequence[int] | None,
    out: str | None,
    root: str | None,
    resolve: bool = True,
) -> tuple[list[TaskRun], Path, dict[str, Any]]:
    """Resolve tasks, seeds and output folder; compose each pair's CLI arguments (no task checks with
    ``resolve=False``, for rebuilding tables)."""
    for a in extra:
        if a.split("=", 1)[0] in RESERVED:
            raise RunnerError(
                f"{a.split('=', 1)[0]} is set by the runner for each pair; use --tasks / --seeds / --out instead."
            )
        if a in ("fit", "validate", "test", "predict"):
            raise RunnerError(f"'{a}' is not needed: 'petl-lightning vtab' runs fit then test for each pair.")
    if not configs:
        raise RunnerError("Pass a recipe: petl-lightning vtab -c recipes/<method>.yaml --data.root /path/vtab-1k")
    for c in configs:
        if not Path(c).expanduser().is_file():
            raise RunnerError(f"Recipe {c!r} not found. Pass -c recipes/<method>.yaml.")
    recipe_args = [a for c in configs for a in ("--config", c)]
    root_args = ["--data.init_args.root", root] if root else []
    config = parse_fit_config([*recipe_args, *root_args, *extra])
    root_str = config.get("data", {}).get("init_args", {}).get("root")
    if not root_str:
        raise RunnerError("No data root: pass --data.root /path/vtab-1k (the folder holding cifar/, dtd/, ...).")
    data_root = Path(root_str).expanduser().resolve()
    tasks = resolve_tasks(task_specs, data_root) if resolve else []
    if seeds is None:
        s = config.get("seed_everything")
        seeds = [int(s)] if isinstance(s, int) and not isinstance(s, bool) else [0]
    seeds = list(dict.fromkeys(seeds))
    out_dir = (Path(out) if out else Path("runs") / "vtab" / Path(configs[-1]).stem).expanduser().resolve()
    for key in ("task", "seed"):
        config["data"]["init_args"].pop(key, None)
    config.pop("seed_everything", None)
    config["trainer"].pop("default_root_dir", None)
    fp = fingerprint(config)
    runs = []
    for task in tasks:
        for seed in seeds:
            run_dir = out_dir / "runs" / task / f"seed{seed}"
            args = [
                *recipe_args,
                "--data.init_args.root",
                str(data_root),
                "--data.init_args.task",
                task,
                "--data.init_args.seed",
                str(seed),
                "--seed_everything",
                str(seed),
                "--trainer.default_root_dir",
                str(run_dir),
                *extra,
            ]
            runs.append(TaskRun(task, seed, run_dir, args, fp))
    info = {
        "root": str(data_root),
        "tasks": tasks,
        "seeds": seeds,
        "fingerprint": fp,
        "configs": list(configs),
        "extra": list(extra),
        "model_class": str(config.get("model", {}).get("class_path", "")),
    }
    return runs, out_dir, info


__all__ = [
    "RESULT_FILE",
    "TaskRun",
    "fingerprint",
    "parse_fit_config",
    "plan_runs",
    "present_tasks",
    "resolve_tasks",
    "task_order",
]
