"""Planning a benchmark run: which tasks and seeds, where each pair lives, and its CLI arguments.

The recipe is read by the CLI's own parser (:func:`parse_fit_config`), so the runner sees exactly
the configuration ``petl-lightning fit`` would build, per-task hyper-parameters included (the
method's ``task_overrides`` hook, applied by the CLI); its data class picks the suite (VTAB-1K or
FGVC, :mod:`~petl_lightning.vtab.suites`) whose tasks ``--tasks`` selects.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from petl_lightning.errors import RunnerError
from petl_lightning.vtab import suites
from petl_lightning.vtab.suites import VTAB, Suite

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
    test_every: int = 10

    @property
    def group(self) -> str:
        return suites.group_of(self.task)

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
    """Sort key: each suite's tasks in the papers' order (VTAB-1K's 19 first), then custom tasks by name."""
    return suites.task_order(task)


def present_tasks(root: Path, suite: Suite = VTAB) -> list[str]:
    """Task folders under ``root`` that hold the suite's split files (its own tasks first, in order)."""
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir() if suite.is_task_dir(p)), key=task_order)


def resolve_tasks(specs: Sequence[str], root: Path | None, suite: Suite = VTAB) -> list[str]:
    """Expand ``all`` / a group name / ``present`` / task names (comma or space separated).

    Every named task must be one of the suite's tasks or (where its layout takes custom tasks) a
    folder under ``root``; with a known root, every selected task's folder must exist (so a typo
    fails now, not after hours of training).
    """
    items = [s.strip() for spec in specs for s in spec.split(",") if s.strip()]
    choices = ", ".join(["all", *suite.groups])
    if not items:
        raise RunnerError(f"--tasks is empty; pass {choices}, present or task names.")
    tasks: list[str] = []
    for item in items:
        if item == "all":
            tasks += list(suite.tasks)
        elif item in suite.groups:
            tasks += suite.tasks_in(item)
        elif item == "present":
            found = present_tasks(root, suite) if root is not None else []
            if not found:
                files = "list files" if suite.custom_tasks else "split files"
                raise RunnerError(f"--tasks present: no task folders with {files} under {str(root)!r}.")
            tasks += found
        elif item in suite.tasks or (suite.custom_tasks and root is not None and (root / item).is_dir()):
            tasks.append(item)
        else:
            here = present_tasks(root, suite) if root is not None else []
            close = difflib.get_close_matches(
                item, list(dict.fromkeys([*suite.tasks, *here, "all", *suite.groups])), n=3
            )
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            what = "task, group or folder of the data root" if suite.custom_tasks else "task or group"
            raise RunnerError(
                f"Unknown task {item!r}: not {suite.a_name} {what}.{hint} "
                f"Use {choices}, present, or names like {suite.example}."
            )
    tasks = list(dict.fromkeys(tasks))
    if root is not None:
        if not root.is_dir():
            raise RunnerError(
                f"Data root {str(root)!r} does not exist. Pass --data.root, the folder holding {suite.root_hint}"
            )
        missing = [t for t in tasks if not (root / t).is_dir()]
        if missing:
            raise RunnerError(
                f"Task folder(s) missing under {str(root)!r}: {', '.join(missing)}. The root holds: "
                f"{', '.join(present_tasks(root, suite)) or '(no task folders)'}. Choose --tasks among those "
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
    test_every: int = 10,
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
    suite = suites.suite_for(config.get("data", {}).get("class_path"))
    root_str = config.get("data", {}).get("init_args", {}).get("root")
    if not root_str:
        raise RunnerError(
            f"No data root: pass --data.root {suite.root_example} (the folder holding {suite.root_hint})."
        )
    data_root = Path(root_str).expanduser().resolve()
    tasks = resolve_tasks(task_specs, data_root, suite) if resolve else []
    if seeds is None:
        s = config.get("seed_everything")
        seeds = [int(s)] if isinstance(s, int) and not isinstance(s, bool) else [0]
    seeds = list(dict.fromkeys(seeds))
    out_dir = (Path(out) if out else Path("runs") / suite.key / Path(configs[-1]).stem).expanduser().resolve()
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
            runs.append(TaskRun(task, seed, run_dir, args, fp, test_every))
    info = {
        "suite": suite.name,
        "root": str(data_root),
        "tasks": tasks,
        "seeds": seeds,
        "fingerprint": fp,
        "test_every": test_every,
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
