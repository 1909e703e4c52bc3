"""``petl-lightning vtab``: run one recipe on many VTAB-1K tasks and write the results table.

    petl-lightning vtab -c recipes/repadapter.yaml --data.root /path/vtab-1k \\
        [--tasks all|natural|specialized|structured|present|cifar,dtd] [--seeds 0 1 2] \\
        [--out runs/vtab/repadapter] [--gpus 0,1] [--compare RepAdapter] [--wandb] \\
        [any PETLCLI argument, e.g. --trainer.max_epochs 10]

For every (task, seed) the command line given to the Lightning CLI is composed as: the recipe(s),
then the task's settings (``data.task``, ``data.root``, the seed, the run folder, and the method's
per-task hyper-parameters from ``<ModelClass>.task_overrides(task)`` when the class defines it), then
the user's extra arguments (which therefore win). Each pair is trained (``fit``) and evaluated on the
test list (``test``) in a subprocess (default; a crash cannot take the runner down, and ``--gpus``
runs pairs side by side, one per device) or in this process (``--launcher inprocess``).

Resumable: a pair is finished when ``<out>/runs/<task>/seed<k>/result.json`` exists; a re-run skips
it. A pair that was interrupted mid-training resumes from the newest checkpoint in its run folder
(``--restart-unfinished`` starts it over). After every pair, ``results.csv`` (one row per pair)
and ``results.md`` (per-task table with mean ± std over seeds, Natural / Specialized / Structured
means, the group mean, the 19-task mean, trainable parameters, GFLOPs per image, keep / exit rates
for dynamic methods, and the papers' reported numbers beside ours) are rewritten atomically from all
finished pairs in ``<out>``. Custom tasks (folders outside the 19) are listed under "custom" and left
out of every mean. ``results.md`` only prints a group mean when every task of the group is present.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import difflib
import gc
import hashlib
import importlib
import io
import json
import math
import os
import queue
import shlex
import statistics
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from petl_lightning.data.vtab import GROUPS, LIST_FILES, VTAB_TASKS
from petl_lightning.errors import PETLError

RESULT_FILE = "result.json"
SPEC_FILE = "spec.json"
LOG_FILE = "worker.log"
WORKER_ENV = "PETL_VTAB_WORKER"
CSV_COLUMNS = [
    "task", "group", "seed", "acc", "test_loss", "trainable_params", "trainable_params_no_head",
    "total_params", "gflops", "gflops_backbone", "gflops_ratio", "keep_rate", "exit_share",
    "test_images", "epochs", "fit_s", "test_s", "wall_s", "method", "model_name", "device",
    "finished_at", "fingerprint",
]


class RunnerError(PETLError, ValueError):
    """A bad ``petl-lightning vtab`` invocation (tasks, recipe, output folder)."""


# --------------------------------------------------------------------------------------------------
# Planning: which tasks, which arguments
# --------------------------------------------------------------------------------------------------
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
            if root is None:
                raise RunnerError("--tasks present needs the data root (--data.root).")
            found = present_tasks(root)
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
            have = present_tasks(root)
            raise RunnerError(
                f"Task folder(s) missing under {str(root)!r}: {', '.join(missing)}. The root holds: "
                f"{', '.join(have) or '(no task folders)'}. Choose --tasks among those (or --tasks present)."
            )
    return tasks


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise RunnerError(f"Recipe {path!r} not found. Pass -c recipes/<method>.yaml.")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise RunnerError(f"Recipe {path!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise RunnerError(f"Recipe {path!r} must be a YAML mapping with model/data/trainer keys.")
    return data


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _extra_value(extra: Sequence[str], *keys: str) -> str | None:
    """The last value given to any of ``keys`` in the pass-through arguments (``--k v`` or ``--k=v``)."""
    value = None
    for i, a in enumerate(extra):
        for k in keys:
            if a == k and i + 1 < len(extra):
                value = extra[i + 1]
            elif a.startswith(k + "="):
                value = a.split("=", 1)[1]
    return value


def model_class(config: dict[str, Any], extra: Sequence[str]) -> type | None:
    """The recipe's model class (``model.class_path``), imported; ``None`` if it cannot be found."""
    path = _extra_value(extra, "--model.class_path", "--model")
    if path is None:
        model = config.get("model")
        path = model.get("class_path") if isinstance(model, dict) else model if isinstance(model, str) else None
    if not path or path.startswith("{"):
        return None
    import petl_lightning

    if "." not in path:
        return getattr(petl_lightning, path, None)
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def task_override_args(cls: type | None, task: str) -> list[str]:
    """``--model.init_args.<k> <json v>`` for the class's per-task hyper-parameters (if it has any)."""
    hook = getattr(cls, "task_overrides", None) if cls is not None else None
    if hook is None:
        return []
    overrides = hook(task) or {}
    args: list[str] = []
    for k, v in overrides.items():
        args += [f"--model.init_args.{k}", json.dumps(v)]
    return args


def fingerprint(config: dict[str, Any], extra: Sequence[str], root: str) -> str:
    """A hash of what decides the results (recipe contents, extra arguments, data root)."""
    blob = json.dumps({"config": config, "extra": list(extra), "root": root}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------------
# Running one pair
# --------------------------------------------------------------------------------------------------
def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest ``.ckpt`` under a run folder (to resume an interrupted fit), if any."""
    ckpts = [p for p in run_dir.rglob("*.ckpt") if p.is_file()]
    return max(ckpts, key=lambda p: p.stat().st_mtime) if ckpts else None


def _to_py(value: Any) -> Any:
    try:
        import torch

        if isinstance(value, torch.Tensor):
            return value.detach().cpu().tolist()
    except ImportError:  # pragma: no cover
        pass
    return value


def _json_safe_hparams(hparams: Any) -> dict[str, Any]:
    out = {}
    for k, v in dict(hparams).items():
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[k] = v
    return out


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace`` (never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_task(run: TaskRun, resume: bool = True) -> dict[str, Any]:
    """Fit and test one (task, seed) in this process; write and return its ``result.json`` record."""
    import torch
    from lightning.pytorch.callbacks import Callback

    from petl_lightning.cli import PETLCLI

    class StatsCapture(Callback):
        """Reads ``inference_stats()`` at the end of testing, before any other callback resets it."""

        def __init__(self) -> None:
            self.stats: dict[str, Any] = {}

        def on_test_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            if hasattr(pl_module, "reset_inference_stats"):
                pl_module.reset_inference_stats()

        def on_test_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            if hasattr(pl_module, "inference_stats"):
                self.stats = {k: _to_py(v) for k, v in pl_module.inference_stats().items()}

    run.run_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    with warnings.catch_warnings():
        # In-process runs pass args while sys.argv holds the runner's own command line: intended.
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        cli = PETLCLI(args=run.cli_args, run=False)
    model, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    if trainer.world_size > 1 and os.environ.get(WORKER_ENV) != "1":
        # Lightning's DDP launcher re-runs this process's command line for each rank: in-process
        # that would be the whole runner; in a worker process it is just this pair.
        raise RunnerError(f"{run.label}: several devices per pair need --launcher subprocess.")
    capture = StatsCapture()
    trainer.callbacks.insert(0, capture)
    ckpt = latest_checkpoint(run.run_dir) if resume else None
    if ckpt is not None:
        print(f"[vtab] {run.label}: resuming from {ckpt}", file=sys.stderr, flush=True)
    t0 = time.time()
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
    fit_s = time.time() - t0
    t0 = time.time()
    metrics = trainer.test(model, datamodule=datamodule, verbose=False)
    test_s = time.time() - t0
    m = metrics[0] if metrics else {}
    if "test/acc" not in m:
        raise RuntimeError(f"{run.label}: trainer.test returned no 'test/acc' (got {sorted(m)}).")
    params = model.parameter_summary() if hasattr(model, "parameter_summary") else {}
    is_head = getattr(model, "is_head_parameter", lambda name: name.startswith("head."))
    no_head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not is_head(n))
    stats = capture.stats
    gflops = float(stats.get("gflops", float("nan")))
    gflops_backbone = float(stats.get("gflops_backbone", float("nan")))
    exit_share = stats.get("exit_share", [1.0])
    record = {
        "task": run.task,
        "group": run.group,
        "seed": run.seed,
        "acc": 100.0 * float(m["test/acc"]),
        "test_loss": float(m.get("test/loss", float("nan"))),
        "trainable_params": int(params.get("trainable", no_head)),
        "trainable_params_no_head": int(no_head),
        "total_params": int(params.get("total", 0)),
        "gflops": gflops,
        "gflops_backbone": gflops_backbone,
        "gflops_ratio": gflops / gflops_backbone if gflops_backbone else float("nan"),
        "keep_rate": float(stats.get("keep_rate", 1.0)),
        "exit_share": [float(v) for v in (exit_share if isinstance(exit_share, list) else [exit_share])],
        "test_images": int(stats.get("images", 0)),
        "epochs": int(trainer.current_epoch),
        "fit_s": fit_s,
        "test_s": test_s,
        "wall_s": time.time() - t_start,
        "method": type(model).__name__,
        "model_name": getattr(model.hparams, "model_name", ""),
        "hparams": _json_safe_hparams(model.hparams),
        "device": str(model.device),
        "finished_at": _dt.datetime.now().isoformat(timespec="seconds"),
        "fingerprint": run.fingerprint,
        "cli_args": run.cli_args,
    }
    if trainer.is_global_zero:
        atomic_write(run.result_path, json.dumps(record, indent=1))
    del cli, model, datamodule, trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return record


def worker_main(argv: Sequence[str]) -> int:
    """Subprocess entry: ``python -m petl_lightning.runner <spec.json>``."""
    from petl_lightning.cli import find_user_error

    spec = json.loads(Path(argv[0]).read_text())
    run = TaskRun(spec["task"], spec["seed"], Path(spec["run_dir"]), spec["cli_args"], spec["fingerprint"])
    try:
        run_task(run, resume=spec.get("resume", True))
    except Exception as err:
        user_error = find_user_error(err)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        return 2
    return 0


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------
def collect_results(out: Path) -> list[dict[str, Any]]:
    """Every finished pair's record under ``<out>/runs``, in task order then seed."""
    records = []
    for path in sorted((out / "runs").glob(f"*/seed*/{RESULT_FILE}")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue  # a result being written right now is complete only after os.replace
    return sorted(records, key=lambda r: (task_order(r["task"]), r["seed"]))


def write_csv(records: Sequence[dict[str, Any]], path: Path) -> None:
    """``results.csv``: one row per (task, seed); ``exit_share`` as ``;``-separated shares."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in records:
        row = dict(r)
        row["exit_share"] = ";".join(f"{v:.4f}" for v in r.get("exit_share", []))
        for k in ("acc", "test_loss", "gflops", "gflops_backbone", "gflops_ratio", "keep_rate"):
            if isinstance(row.get(k), float):
                row[k] = f"{row[k]:.6g}" if k != "acc" else f"{row[k]:.4f}"
        for k in ("fit_s", "test_s", "wall_s"):
            if isinstance(row.get(k), float):
                row[k] = f"{row[k]:.1f}"
        writer.writerow(row)
    atomic_write(path, buf.getvalue())


@dataclass
class TaskSummary:
    """Per-task aggregate over seeds."""

    task: str
    group: str
    accs: list[float]
    seeds: list[int]
    trainable_params: float
    trainable_params_no_head: float
    gflops: float
    gflops_ratio: float
    keep_rate: float
    exit_share: list[float]
    wall_s: float

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accs)

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds (``None`` with one seed)."""
        return statistics.stdev(self.accs) if len(self.accs) > 1 else None


def summarize_tasks(records: Sequence[dict[str, Any]]) -> list[TaskSummary]:
    """Group records by task; mean over seeds of every per-pair figure."""
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    out = []
    for task in sorted(by_task, key=task_order):
        rs = sorted(by_task[task], key=lambda r: r["seed"])
        shares = [r.get("exit_share") or [1.0] for r in rs]
        width = max(len(s) for s in shares)
        exit_share = [statistics.fmean(s[i] if i < len(s) else 0.0 for s in shares) for i in range(width)]
        out.append(TaskSummary(
            task=task,
            group=rs[0].get("group", VTAB_TASKS[task].group if task in VTAB_TASKS else "custom"),
            accs=[float(r["acc"]) for r in rs],
            seeds=[int(r["seed"]) for r in rs],
            trainable_params=statistics.fmean(r.get("trainable_params", 0) for r in rs),
            trainable_params_no_head=statistics.fmean(r.get("trainable_params_no_head", 0) for r in rs),
            gflops=statistics.fmean(float(r.get("gflops", float("nan"))) for r in rs),
            gflops_ratio=statistics.fmean(float(r.get("gflops_ratio", float("nan"))) for r in rs),
            keep_rate=statistics.fmean(float(r.get("keep_rate", 1.0)) for r in rs),
            exit_share=exit_share,
            wall_s=sum(float(r.get("wall_s", 0.0)) for r in rs),
        ))
    return out


def _fmt(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _acc_cell(s: TaskSummary) -> str:
    return f"{s.mean:.2f}" if s.std is None else f"{s.mean:.2f} ± {s.std:.2f}"


def _params_m(n: float) -> str:
    return f"{n / 1e6:.3f}"


def default_references(records: Sequence[dict[str, Any]]) -> list[str]:
    """The papers' row matching the trained method (by class name and its hyper-parameters)."""
    from petl_lightning.reference import reference_for_module

    if not records:
        return []
    r = records[0]
    name = reference_for_module(r.get("method", ""), r.get("hparams", {}))
    return [name] if name else []


def render_markdown(
    records: Sequence[dict[str, Any]],
    references: Sequence[str] = (),
    title: str | None = None,
    header_lines: Sequence[str] = (),
    pending: Sequence[str] = (),
    failed: Sequence[str] = (),
    note_missing_reference: bool = True,
) -> str:
    """``results.md``: summary (group means, group mean, 19-task mean vs the papers), per-task table,
    the papers' 19-column layout, and what is still missing."""
    from petl_lightning.reference import SHORT_NAMES, format_delta, paper_table, reference, summarize

    tasks = summarize_tasks(records)
    method = records[0].get("method", "?") if records else "?"
    refs = [reference(n) for n in references]
    refs = [r for r in refs if r.per_task is not None]
    dynamic = any(
        (s.keep_rate < 0.9999) or (len(s.exit_share) > 1) for s in tasks
    )
    ours = {s.task: s.mean for s in tasks}
    summ = summarize(ours)
    lines = [f"# VTAB-1K results: {title or method}", ""]
    lines += [f"- {h}" for h in header_lines]
    seeds = sorted({seed for s in tasks for seed in s.seeds})
    n_vtab = sum(1 for s in tasks if s.task in VTAB_TASKS)
    lines += [
        f"- Method: `{method}`; backbone `{records[0].get('model_name', '?') if records else '?'}`; "
        f"seeds: {', '.join(map(str, seeds)) or '-'}; finished pairs: {len(records)}; "
        f"VTAB-1K tasks: {n_vtab}/19; custom tasks: {len(tasks) - n_vtab}.",
        "- Accuracy: top-1 % on the task's test list; ± is the sample standard deviation over seeds. "
        "Group mean = mean of the Natural, Specialized and Structured means (VPT/NOAH/RepAdapter/DyT "
        "convention); 19-task mean = mean over all tasks (ARC's \"Mean Total\"). Custom tasks are not in any mean.",
        "",
        "## Summary",
        "",
    ]
    head = ["", "ours", *[f"{r.name} (paper)" for r in refs]]
    if refs:
        head.append(f"Δ vs {refs[0].name}")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref_summ = [summarize(r.per_task or {}) for r in refs]
    labels = {
        "natural": "Natural mean", "specialized": "Specialized mean", "structured": "Structured mean",
        "group_mean": "Group mean (mean of 3 group means)", "mean19": "19-task mean",
    }
    for key, label in labels.items():
        if summ[key] is None:
            k, n = summ["counts"]["all" if key in ("mean19", "group_mean") else key]
            if key == "group_mean":
                done = sum(1 for g in GROUPS if summ[g] is not None)
                cell = f"n/a ({done}/3 groups complete)"
            else:
                cell = f"n/a ({k}/{n} tasks)"
        else:
            cell = f"{summ[key]:.2f}"
        row = [label, cell, *[_fmt(rs[key]) for rs in ref_summ]]
        if refs:
            row.append(format_delta(summ[key], ref_summ[0][key], 2))
        lines.append("| " + " | ".join(row) + " |")
    if tasks:
        tp = statistics.fmean(s.trainable_params for s in tasks)
        tp_nh = statistics.fmean(s.trainable_params_no_head for s in tasks)
        row = ["Trainable params (M): mean over tasks, with head / without head",
               f"{tp / 1e6:.3f} / {tp_nh / 1e6:.3f}",
               *[_fmt(r.trainable_params_m) if r.trainable_params_m is not None else "n/r" for r in refs]]
        if refs:
            row.append("")
        lines.append("| " + " | ".join(row) + " |")
        gf = statistics.fmean(s.gflops for s in tasks)
        ratio = statistics.fmean(s.gflops_ratio for s in tasks)
        row = ["GFLOPs / image (mean over tasks; × backbone)", f"{gf:.3f} ({ratio:.3f}×)",
               *[_fmt(r.gflops) if r.gflops is not None else "n/r" for r in refs]]
        if refs:
            row.append("")
        lines.append("| " + " | ".join(row) + " |")
        if dynamic:
            keep = statistics.fmean(s.keep_rate for s in tasks)
            width = max(len(s.exit_share) for s in tasks)
            shares = [statistics.fmean(s.exit_share[i] if i < len(s.exit_share) else 0.0 for s in tasks)
                      for i in range(width)]
            for label, value in (("Token keep rate (mean over tasks)", f"{keep:.3f}"),
                                 ("Exit shares, first to last exit (mean over tasks)",
                                  " / ".join(f"{v:.2f}" for v in shares))):
                row = [label, value, *["" for _ in refs]]
                if refs:
                    row.append("")
                lines.append("| " + " | ".join(row) + " |")
    if not refs and records and note_missing_reference:
        lines += ["", f"No reported per-task numbers to compare with for `{method}` in this configuration "
                      f"(see `petl_lightning.reference.reference_methods()`; choose rows with --compare)."]
    model_name = str(records[0].get("model_name", "")) if records else ""
    if refs and not model_name.startswith("vit_base_patch16_224"):
        lines += ["", f"Note: the papers' numbers are for ViT-B/16 (ImageNet-21k) at 224 px; this run used "
                      f"`{model_name}`, so the differences compare different backbones."]
    if refs:
        lines += ["", "Reference sources: " + "; ".join(f"{r.name}: {r.source} ({r.backbone})" for r in refs) + "."]
    lines += ["", "## Per task", ""]
    head = ["group", "task", "acc %", "seeds"]
    if refs:
        head += [f"{refs[0].name} (paper)", "Δ"]
    head += ["trainable params (M)", "GFLOPs", "× backbone"]
    if dynamic:
        head += ["keep rate", "exit shares"]
    head += ["time (min)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in tasks:
        row = [s.group, s.task, _acc_cell(s), str(len(s.seeds))]
        if refs:
            ref_acc = (refs[0].per_task or {}).get(s.task)
            row += [_fmt(ref_acc, 1), format_delta(s.mean, ref_acc, 2)]
        row += [_params_m(s.trainable_params), _fmt(s.gflops, 3), _fmt(s.gflops_ratio, 3)]
        if dynamic:
            row += [_fmt(s.keep_rate, 3), " / ".join(f"{v:.2f}" for v in s.exit_share)]
        row.append(f"{s.wall_s / 60:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    vtab_only = {t: a for t, a in ours.items() if t in VTAB_TASKS}
    if vtab_only:
        lines += ["", "## Paper layout", ""]
        rows: dict[str, dict[str, float]] = {"ours": vtab_only}
        for r in refs:
            rows[f"{r.name} (paper)"] = r.per_task or {}
        table = paper_table(rows)
        if refs:
            ref_tasks = refs[0].per_task or {}
            delta = "| Δ vs " + refs[0].name + " | " + " | ".join(
                format_delta(vtab_only.get(t), ref_tasks.get(t)) if t in vtab_only else "-" for t in VTAB_TASKS
            )
            rs0 = ref_summ[0]
            delta += " | " + " | ".join(
                format_delta(summ[k], rs0[k], 2) for k in (*GROUPS, "group_mean", "mean19")
            ) + " |"
            table += "\n" + delta
        lines.append(table)
        lines.append("")
        lines.append("Columns: " + ", ".join(f"{v} = {k}" for k, v in SHORT_NAMES.items()) + ".")
    if pending or failed:
        lines += ["", "## Not finished", ""]
        lines += [f"- failed: {f}" for f in failed]
        lines += [f"- pending: {p}" for p in pending]
    return "\n".join(lines) + "\n"


def write_tables(
    out: Path,
    references: Sequence[str] | None = None,
    title: str | None = None,
    header_lines: Sequence[str] = (),
    pending: Sequence[str] = (),
    failed: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Rewrite ``results.csv`` and ``results.md`` from every finished pair under ``out``."""
    records = collect_results(out)
    refs = default_references(records) if references is None else list(references)
    write_csv(records, out / "results.csv")
    atomic_write(out / "results.md", render_markdown(records, refs, title, header_lines, pending, failed,
                                                     note_missing_reference=references is None))
    return records


def log_to_wandb(records: Sequence[dict[str, Any]], project: str, name: str | None, out: Path) -> None:
    """Send the per-pair table, the per-task means and the summary means to a W&B run."""
    from petl_lightning.reference import summarize

    try:
        import wandb
    except ImportError:
        print("[vtab] --wandb: wandb is not installed; skipping (pip install wandb).", file=sys.stderr)
        return
    tasks = summarize_tasks(records)
    summ = summarize({s.task: s.mean for s in tasks})
    run = wandb.init(project=project, name=name, job_type="vtab-summary", dir=str(out),
                     config={"method": records[0].get("method") if records else None,
                             "hparams": records[0].get("hparams") if records else None})
    table = wandb.Table(columns=[c for c in CSV_COLUMNS if c != "exit_share"])
    for r in records:
        table.add_data(*[r.get(c) for c in CSV_COLUMNS if c != "exit_share"])
    run.log({"vtab/results": table})
    scalars = {f"vtab/acc/{s.task}": s.mean for s in tasks}
    scalars.update({f"vtab/{k}": v for k, v in summ.items() if k != "counts" and v is not None})
    run.summary.update(scalars)
    run.finish()


# --------------------------------------------------------------------------------------------------
# Launching
# --------------------------------------------------------------------------------------------------
@dataclass
class Slot:
    """Where a worker runs: environment overrides and extra CLI arguments (e.g. one GPU)."""

    name: str
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)


def run_subprocess(run: TaskRun, slot: Slot, resume: bool) -> tuple[bool, str]:
    """Run a pair in ``python -m petl_lightning.runner``; output goes to the run's ``worker.log``."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    spec = {**asdict(run), "run_dir": str(run.run_dir), "resume": resume}
    spec["cli_args"] = [*run.cli_args, *slot.args]
    spec_path = run.run_dir / SPEC_FILE
    atomic_write(spec_path, json.dumps(spec, indent=1))
    env = {**os.environ, **slot.env, WORKER_ENV: "1"}
    log_path = run.run_dir / LOG_FILE
    with open(log_path, "a") as log:
        log.write(f"\n=== {_dt.datetime.now().isoformat(timespec='seconds')} on {slot.name}\n")
        log.flush()
        proc = subprocess.run(
            [sys.executable, "-m", "petl_lightning.runner", str(spec_path)],
            stdout=log, stderr=subprocess.STDOUT, env=env, check=False,
        )
    if proc.returncode == 0 and run.finished:
        return True, ""
    tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
    errors = [ln for ln in tail if ln.startswith("error:")]
    reason = errors[-1] if errors else (tail[-1] if tail else f"exit status {proc.returncode}")
    return False, f"{reason} (exit {proc.returncode}; log: {log_path})"


def run_inprocess(run: TaskRun, slot: Slot, resume: bool) -> tuple[bool, str]:
    """Run a pair in this process; a Python exception marks it failed (KeyboardInterrupt stops all)."""
    from petl_lightning.cli import find_user_error

    try:
        run_task(TaskRun(run.task, run.seed, run.run_dir, [*run.cli_args, *slot.args], run.fingerprint), resume)
    except Exception as err:  # noqa: BLE001 - recorded and reported; other pairs continue
        user_error = find_user_error(err)
        run.run_dir.mkdir(parents=True, exist_ok=True)
        with open(run.run_dir / LOG_FILE, "a") as log:
            traceback.print_exc(file=log)
        msg = f"error: {user_error}" if user_error else f"{type(err).__name__}: {err}"
        return False, f"{msg} (traceback: {run.run_dir / LOG_FILE})"
    return True, ""


Launcher = Callable[[TaskRun, Slot, bool], tuple[bool, str]]


def execute(
    runs: Sequence[TaskRun],
    slots: Sequence[Slot],
    launcher: Launcher,
    on_done: Callable[[TaskRun, bool, str], None],
    resume: bool = True,
    fail_fast: bool = False,
) -> None:
    """Run ``runs`` over ``slots`` (one worker thread per slot), calling ``on_done`` after each."""
    todo: queue.Queue[TaskRun] = queue.Queue()
    for r in runs:
        todo.put(r)
    stop = threading.Event()
    lock = threading.Lock()
    interrupted: list[BaseException] = []

    def worker(slot: Slot) -> None:
        while not stop.is_set():
            try:
                run = todo.get_nowait()
            except queue.Empty:
                return
            try:
                ok, msg = launcher(run, slot, resume)
            except BaseException as err:  # KeyboardInterrupt / SystemExit in the in-process launcher
                interrupted.append(err)
                stop.set()
                return
            with lock:
                on_done(run, ok, msg)
            if not ok and fail_fast:
                stop.set()

    if len(slots) == 1:
        worker(slots[0])
    else:
        threads = [threading.Thread(target=worker, args=(s,), daemon=True) for s in slots]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if interrupted:
        raise interrupted[0]


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="petl-lightning vtab",
        description="Run a recipe on VTAB-1K tasks (resumable) and write results.csv / results.md. "
        "Any other --key value argument is passed to the Lightning CLI of every run.",
        allow_abbrev=False,
    )
    p.add_argument("-c", "--config", action="append", default=[], help="recipe YAML (repeatable)")
    p.add_argument("--data.root", "--data.init_args.root", dest="root", default=None,
                   help="VTAB-1K root holding the task folders (default: the recipe's data.root)")
    p.add_argument("--tasks", nargs="+", default=["all"],
                   help="all | natural | specialized | structured | present | names (comma/space separated)")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="seeds to run per task (default: the recipe's seed_everything, else 0)")
    p.add_argument("--out", default=None, help="output folder (default: runs/vtab/<recipe name>)")
    p.add_argument("--launcher", choices=["subprocess", "inprocess"], default="subprocess",
                   help="run each pair in its own process (default) or in this one")
    p.add_argument("--gpus", default=None,
                   help="comma-separated CUDA device ids; pairs run side by side, one per device")
    p.add_argument("--jobs", type=int, default=1, help="pairs run side by side without --gpus (CPU)")
    p.add_argument("--compare", nargs="*", default=None,
                   help="reference rows to print beside ours (default: the method's own; 'none' for none)")
    p.add_argument("--wandb", action="store_true", help="log the results table to Weights & Biases")
    p.add_argument("--wandb-project", default="petl-lightning-vtab")
    p.add_argument("--wandb-name", default=None)
    p.add_argument("--restart-unfinished", action="store_true",
                   help="start interrupted pairs over instead of resuming from their last checkpoint")
    p.add_argument("--allow-config-change", action="store_true",
                   help="accept finished pairs in --out that were produced with other settings")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failed pair")
    p.add_argument("--table-only", action="store_true", help="only rebuild results.csv/.md from --out")
    p.add_argument("--dry-run", action="store_true", help="print the plan (and CLI arguments) and exit")
    return p


_RESERVED = ("--data.init_args.task", "--data.task", "--seed_everything", "--trainer.default_root_dir")


def plan(ns: argparse.Namespace, extra: list[str], resolve: bool = True) -> tuple[list[TaskRun], Path, dict[str, Any]]:
    """Resolve tasks, seeds and output folder; compose each pair's CLI arguments (no tasks and no
    checks of the data root with ``resolve=False``, for rebuilding tables)."""
    for a in extra:
        if a.split("=", 1)[0] in _RESERVED:
            raise RunnerError(
                f"{a.split('=', 1)[0]} is set by the runner for each pair; use --tasks / --seeds / --out instead."
            )
        if a in ("fit", "validate", "test", "predict"):
            raise RunnerError(f"'{a}' is not needed: 'petl-lightning vtab' runs fit then test for each pair.")
    if not ns.config:
        raise RunnerError("Pass a recipe: petl-lightning vtab -c recipes/<method>.yaml --data.root /path/vtab-1k")
    config: dict[str, Any] = {}
    for c in ns.config:
        config = _merge(config, _load_yaml(c))
    data_cfg = config.get("data") if isinstance(config.get("data"), dict) else {}
    recipe_root = (data_cfg.get("init_args") or {}).get("root", data_cfg.get("root"))
    root_str = ns.root or recipe_root
    if not root_str:
        raise RunnerError("No data root: pass --data.root /path/vtab-1k (the folder holding cifar/, dtd/, ...).")
    root = Path(root_str).expanduser().resolve()
    tasks = resolve_tasks(ns.tasks, root) if resolve else []
    seeds = ns.seeds
    if seeds is None:
        s = config.get("seed_everything")
        seeds = [int(s)] if isinstance(s, int) and not isinstance(s, bool) else [0]
    seeds = list(dict.fromkeys(seeds))
    out = Path(ns.out) if ns.out else Path("runs") / "vtab" / Path(ns.config[-1]).stem
    out = out.expanduser().resolve()
    fp = fingerprint(config, extra, str(root))
    cls = model_class(config, extra)
    runs = []
    for task in tasks:
        for seed in seeds:
            run_dir = out / "runs" / task / f"seed{seed}"
            args = [a for c in ns.config for a in ("--config", c)]
            args += [
                "--data.init_args.root", str(root),
                "--data.init_args.task", task,
                "--data.init_args.seed", str(seed),
                "--seed_everything", str(seed),
                "--trainer.default_root_dir", str(run_dir),
            ]
            args += task_override_args(cls, task)
            args += extra
            runs.append(TaskRun(task, seed, run_dir, args, fp))
    info = {"root": str(root), "tasks": tasks, "seeds": seeds, "fingerprint": fp,
            "configs": ns.config, "extra": extra, "model_class": cls.__name__ if cls else None}
    return runs, out, info


def check_fingerprints(out: Path, fp: str, allow: bool) -> list[str]:
    """Finished pairs in ``out`` made with other settings: an error unless ``allow``."""
    other = [f"{r['task']} seed {r['seed']}" for r in collect_results(out) if r.get("fingerprint") != fp]
    if other and not allow:
        raise RunnerError(
            f"{out} already holds results made with other settings (recipe, extra arguments or data root): "
            f"{', '.join(other[:5])}{' ...' if len(other) > 5 else ''}. Use a new --out, delete those run "
            f"folders, or pass --allow-config-change to keep them in the table."
        )
    return other


def make_slots(ns: argparse.Namespace) -> list[Slot]:
    if ns.gpus:
        ids = [g.strip() for g in str(ns.gpus).split(",") if g.strip()]
        if not ids:
            raise RunnerError("--gpus takes comma-separated CUDA device ids, e.g. --gpus 0,1.")
        return [Slot(f"cuda:{g}", {"CUDA_VISIBLE_DEVICES": g}, ["--trainer.devices", "1"]) for g in ids]
    if ns.jobs < 1:
        raise RunnerError("--jobs must be at least 1.")
    return [Slot(f"worker {i}") for i in range(ns.jobs)]


def vtab_main(argv: list[str]) -> int:
    """Entry of ``petl-lightning vtab``; returns the exit status (0 all done, 1 some failed, 2 bad input)."""
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    try:
        return _main(ns, extra, argv)
    except PETLError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _main(ns: argparse.Namespace, extra: list[str], argv: Sequence[str]) -> int:
    runs, out, info = plan(ns, extra, resolve=not ns.table_only)
    slots = make_slots(ns)
    if len(slots) > 1 and ns.launcher == "inprocess":
        raise RunnerError("--launcher inprocess runs one pair at a time; drop --gpus/--jobs or use subprocess.")
    compare: list[str] | None
    if ns.compare is None:
        compare = None
    elif [c.lower() for c in ns.compare] in ([], ["none"]):
        compare = []
    else:
        from petl_lightning.reference import resolve_name

        compare = [resolve_name(c) for c in ns.compare]
    header = [
        "Command: `petl-lightning vtab " + " ".join(shlex.quote(a) for a in argv) + "`",
        f"Recipe(s): {', '.join(info['configs'])}; data root: `{info['root']}`; extra arguments: "
        f"`{' '.join(extra) or '(none)'}`; settings fingerprint `{info['fingerprint']}`.",
    ]
    if ns.table_only:
        records = write_tables(out, compare, header_lines=header)
        print(f"[vtab] {len(records)} finished pairs -> {out / 'results.md'}")
        return 0
    if ns.dry_run:
        for r in runs:
            state = "done" if r.finished else "todo"
            print(f"[{state}] {r.label}: petl-lightning fit/test " + " ".join(shlex.quote(a) for a in r.cli_args))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    mixed = check_fingerprints(out, info["fingerprint"], ns.allow_config_change)
    if mixed:
        header.append(f"Warning: {len(mixed)} pair(s) were produced with other settings (--allow-config-change).")
    atomic_write(out / "vtab_run.json", json.dumps({**info, "argv": list(argv)}, indent=1, default=str))
    todo = [r for r in runs if not r.finished]
    skipped = len(runs) - len(todo)
    print(f"[vtab] {len(runs)} pairs ({len(info['tasks'])} tasks × {len(info['seeds'])} seeds): "
          f"{skipped} already finished, {len(todo)} to run -> {out}", file=sys.stderr, flush=True)
    failed: dict[str, str] = {}
    pending = {r.label for r in todo}
    done_count = [skipped]

    def on_done(run: TaskRun, ok: bool, msg: str) -> None:
        pending.discard(run.label)
        done_count[0] += 1
        if ok:
            acc = json.loads(run.result_path.read_text())["acc"]
            print(f"[vtab] [{done_count[0]}/{len(runs)}] {run.label}: acc {acc:.2f}%", file=sys.stderr, flush=True)
        else:
            failed[run.label] = msg
            print(f"[vtab] [{done_count[0]}/{len(runs)}] {run.label}: FAILED {msg}", file=sys.stderr, flush=True)
        write_tables(out, compare, header_lines=header, pending=sorted(pending),
                     failed=[f"{k}: {v}" for k, v in failed.items()])

    launcher: Launcher = run_subprocess if ns.launcher == "subprocess" else run_inprocess
    try:
        execute(todo, slots, launcher, on_done, resume=not ns.restart_unfinished, fail_fast=ns.fail_fast)
    finally:
        records = write_tables(out, compare, header_lines=header, pending=sorted(pending),
                               failed=[f"{k}: {v}" for k, v in failed.items()])
    print(f"[vtab] results: {out / 'results.md'} and {out / 'results.csv'} ({len(records)} finished pairs)",
          file=sys.stderr, flush=True)
    if ns.wandb and records:
        log_to_wandb(records, ns.wandb_project, ns.wandb_name, out)
    if failed:
        print(f"[vtab] {len(failed)} pair(s) failed; fix and re-run the same command to finish them "
              f"(finished pairs are skipped).", file=sys.stderr)
        return 1
    return 0


__all__ = [
    "RunnerError", "TaskRun", "collect_results", "render_markdown", "resolve_tasks", "run_task",
    "summarize_tasks", "vtab_main", "write_tables",
]


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
