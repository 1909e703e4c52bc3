"""A benchmark run's results: ``results.csv`` (one row per pair) and ``results.md`` (per-task means ±
std over seeds and the suite's summary, e.g. VTAB-1K's group means, the group mean and the 19-task
mean, or the FGVC mean, under three selection rules (last epoch, best val, max over test epochs)
beside the papers' numbers, and each task's data fingerprint), rebuilt atomically from every finished pair's
``result.json``; and the same table sent to W&B."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from petl_lightning.callbacks.selection import MAX_TEST_NOTE, SELECTION_LABELS
from petl_lightning.vtab.plan import RESULT_FILE, task_order
from petl_lightning.vtab.run import atomic_write
from petl_lightning.vtab.suites import VTAB, Suite, group_of

CSV_COLUMNS = [
    "task",
    "group",
    "seed",
    "acc",
    "acc_best_val",
    "acc_max_test",
    "best_val_epoch",
    "max_test_epoch",
    "test_every",
    "test_loss",
    "trainable_params",
    "trainable_params_no_head",
    "total_params",
    "gflops",
    "gflops_backbone",
    "gflops_ratio",
    "keep_rate",
    "exit_share",
    "test_images",
    "epochs",
    "fit_s",
    "test_s",
    "wall_s",
    "method",
    "model_name",
    "device",
    "finished_at",
    "fingerprint",
    "data_fingerprint",
]


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
        for k in ("acc_best_val", "acc_max_test"):
            if isinstance(row.get(k), float):
                row[k] = f"{row[k]:.4f}"
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
    best_val: list[float]
    max_test: list[float]
    data_fingerprints: list[str]
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

    def accs_by(self, rule: str) -> list[float]:
        """Accuracies over seeds under a selection rule (``last``, ``best_val``, ``max_test``)."""
        return {"last": self.accs, "best_val": self.best_val, "max_test": self.max_test}[rule]

    def mean_by(self, rule: str) -> float | None:
        """Mean over seeds under ``rule``; None unless every seed has it (best val needs a val split)."""
        accs = self.accs_by(rule)
        return statistics.fmean(accs) if accs and len(accs) == len(self.accs) else None

    @property
    def data_fingerprint(self) -> str:
        """The data's fingerprint, ``mixed: a, b`` when seeds ran on different data, ``n/r`` when not recorded."""
        found = sorted(set(self.data_fingerprints))
        return "n/r" if not found else found[0] if len(found) == 1 else "mixed: " + ", ".join(found)


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
        out.append(
            TaskSummary(
                task=task,
                group=rs[0].get("group", group_of(task)),
                accs=[float(r["acc"]) for r in rs],
                seeds=[int(r["seed"]) for r in rs],
                best_val=[float(r["acc_best_val"]) for r in rs if r.get("acc_best_val") is not None],
                max_test=[float(r["acc_max_test"]) for r in rs if r.get("acc_max_test") is not None],
                data_fingerprints=[str(r["data_fingerprint"]) for r in rs if r.get("data_fingerprint")],
                trainable_params=statistics.fmean(r.get("trainable_params", 0) for r in rs),
                trainable_params_no_head=statistics.fmean(r.get("trainable_params_no_head", 0) for r in rs),
                gflops=statistics.fmean(float(r.get("gflops", float("nan"))) for r in rs),
                gflops_ratio=statistics.fmean(float(r.get("gflops_ratio", float("nan"))) for r in rs),
                keep_rate=statistics.fmean(float(r.get("keep_rate", 1.0)) for r in rs),
                exit_share=exit_share,
                wall_s=sum(float(r.get("wall_s", 0.0)) for r in rs),
            )
        )
    return out


def _fmt(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _acc_cell(accs: Sequence[float], seeds: int) -> str:
    """Mean ± sample std over seeds; ``n/a`` unless every seed has the figure."""
    if not accs or len(accs) != seeds:
        return "n/a"
    mean = statistics.fmean(accs)
    return f"{mean:.2f}" if len(accs) == 1 else f"{mean:.2f} ± {statistics.stdev(accs):.2f}"


def _params_m(n: float) -> str:
    return f"{n / 1e6:.3f}"


def default_references(records: Sequence[dict[str, Any]], suite: Suite = VTAB) -> list[str]:
    """The papers' row matching the trained method (by class name and its hyper-parameters)."""
    if not records:
        return []
    r = records[0]
    name = suite.reference_for_module(r.get("method", ""), r.get("hparams", {}))
    return [name] if name else []


RULES = ("last", "best_val", "max_test")


def rule_of(reference: Any) -> str:
    """Our selection rule to put beside a papers' row: theirs where known, else the last epoch."""
    return reference.selection if getattr(reference, "selection", None) in RULES else "last"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def render_markdown(
    records: Sequence[dict[str, Any]],
    references: Sequence[str] = (),
    title: str | None = None,
    header_lines: Sequence[str] = (),
    pending: Sequence[str] = (),
    failed: Sequence[str] = (),
    note_missing_reference: bool = True,
    suite: Suite = VTAB,
) -> str:
    """``results.md``: the suite's summary (e.g. VTAB-1K's group means, group mean, 19-task mean) under
    each selection rule vs the papers, per-task table, the papers' layout, and what is still missing."""
    from petl_lightning.vtab.reference import format_delta

    tasks = summarize_tasks(records)
    method = records[0].get("method", "?") if records else "?"
    found = [suite.reference(n) for n in references]
    refs = [r for r in found if r is not None and r.per_task is not None]
    dynamic = any((s.keep_rate < 0.9999) or (len(s.exit_share) > 1) for s in tasks)
    ours = {rule: {s.task: m for s in tasks if (m := s.mean_by(rule)) is not None} for rule in RULES}
    summ = {rule: suite.summary(ours[rule]) for rule in RULES}
    lines = [f"# {suite.name} results: {title or method}", ""]
    lines += [f"- {h}" for h in header_lines]
    seeds = sorted({seed for s in tasks for seed in s.seeds})
    n_suite = sum(1 for s in tasks if s.task in suite.tasks)
    every = sorted({int(r.get("test_every", 0)) for r in records})
    lines += [
        f"- Method: `{method}`; backbone `{records[0].get('model_name', '?') if records else '?'}`; "
        f"seeds: {', '.join(map(str, seeds)) or '-'}; finished pairs: {len(records)}; "
        f"{suite.name} tasks: {n_suite}/{len(suite.tasks)}; custom tasks: {len(tasks) - n_suite}.",
        "- Accuracy: top-1 % on the task's test list; ± is the sample standard deviation over seeds. "
        + suite.mean_note,
        "- Selection rules: *last* = the last epoch (ours, the default); *best val* = the tested epoch with the "
        "highest validation accuracy (only where the protocol has a val split, e.g. `train_val`); "
        f"*max test* = {MAX_TEST_NOTE}. Test accuracy was measured every "
        f"{', '.join(str(e) for e in every) or '?'} epoch(s) (`--test-every`; 0 = final epoch only) and at the last.",
        "- Data: each task's fingerprint (sha256 of its list files and the normalisation) is in the per-task "
        "table; tables with different fingerprints were run on different data.",
        "",
        "## Summary",
        "",
    ]
    rule_heads = {"last": "ours: last epoch", "best_val": "ours: best val", "max_test": "ours: max test †"}
    head = ["", *rule_heads.values(), *[f"{r.name} (paper; {SELECTION_LABELS.get(rule_of(r), '?')})" for r in refs]]
    if refs:
        head.append(f"Δ vs {refs[0].name} (ours by its rule)")
    lines += [_row(head), "|" + "---|" * len(head)]
    ref_summ = [suite.summary(r.per_task or {}) for r in refs]
    for i, mine in enumerate(summ["last"]):
        row = [mine.label, *[summ[rule][i].cell for rule in RULES], *[_fmt(rs[i].value) for rs in ref_summ]]
        if refs:
            row.append(format_delta(summ[rule_of(refs[0])][i].value, ref_summ[0][i].value, 2))
        lines.append(_row(row))
    pad = ["", ""] + [""] * len(refs) + ([""] if refs else [])
    if tasks:
        tp = statistics.fmean(s.trainable_params for s in tasks)
        tp_nh = statistics.fmean(s.trainable_params_no_head for s in tasks)
        row = [
            "Trainable params (M): mean over tasks, with head / without head",
            f"{tp / 1e6:.3f} / {tp_nh / 1e6:.3f}",
            "",
            "",
            *[_fmt(r.trainable_params_m) if r.trainable_params_m is not None else "n/r" for r in refs],
        ]
        lines.append(_row(row + ([""] if refs else [])))
        gf = statistics.fmean(s.gflops for s in tasks)
        ratio = statistics.fmean(s.gflops_ratio for s in tasks)
        row = [
            "GFLOPs / image (mean over tasks; × backbone)",
            f"{gf:.3f} ({ratio:.3f}×)",
            "",
            "",
            *[_fmt(r.gflops) if r.gflops is not None else "n/r" for r in refs],
        ]
        lines.append(_row(row + ([""] if refs else [])))
        if dynamic:
            keep = statistics.fmean(s.keep_rate for s in tasks)
            width = max(len(s.exit_share) for s in tasks)
            shares = [
                statistics.fmean(s.exit_share[i] if i < len(s.exit_share) else 0.0 for s in tasks) for i in range(width)
            ]
            for label, value in (
                ("Token keep rate (mean over tasks)", f"{keep:.3f}"),
                ("Exit shares, first to last exit (mean over tasks)", " / ".join(f"{v:.2f}" for v in shares)),
            ):
                lines.append(_row([label, value, *pad]))
    lines += ["", f"† {MAX_TEST_NOTE}."]
    if not refs and records and note_missing_reference:
        lines += [
            "",
            f"No reported per-task numbers to compare with for `{method}` in this configuration "
            f"(see `petl_lightning.reference.reference_methods()`; choose rows with --compare).",
        ]
    model_name = str(records[0].get("model_name", "")) if records else ""
    if refs and not model_name.startswith("vit_base_patch16_224"):
        lines += [
            "",
            f"Note: the papers' numbers are for ViT-B/16 (ImageNet-21k) at 224 px; this run used "
            f"`{model_name}`, so the differences compare different backbones.",
        ]
    if refs:
        lines += ["", "Reference sources: " + "; ".join(f"{r.name}: {r.source} ({r.backbone})" for r in refs) + "."]
    mixed = [s.task for s in tasks if s.data_fingerprint.startswith("mixed")]
    if mixed:
        lines += ["", f"Warning: seeds of {', '.join(mixed)} ran on different data (see the data column)."]
    lines += ["", "## Per task", ""]
    head = ["group", "task", "last %", "best val %", "max test % †", "seeds"]
    if refs:
        head += [f"{refs[0].name} (paper)", "Δ"]
    head += ["trainable params (M)", "GFLOPs", "× backbone"]
    if dynamic:
        head += ["keep rate", "exit shares"]
    head += ["data", "time (min)"]
    lines += [_row(head), "|" + "---|" * len(head)]
    for s in tasks:
        row = [s.group, s.task, *[_acc_cell(s.accs_by(rule), len(s.accs)) for rule in RULES], str(len(s.seeds))]
        if refs:
            ref_acc = (refs[0].per_task or {}).get(s.task)
            row += [_fmt(ref_acc, 1), format_delta(s.mean_by(rule_of(refs[0])), ref_acc, 2)]
        row += [_params_m(s.trainable_params), _fmt(s.gflops, 3), _fmt(s.gflops_ratio, 3)]
        if dynamic:
            row += [_fmt(s.keep_rate, 3), " / ".join(f"{v:.2f}" for v in s.exit_share)]
        row += [f"`{s.data_fingerprint}`", f"{s.wall_s / 60:.1f}"]
        lines.append(_row(row))
    in_suite = {rule: {t: a for t, a in ours[rule].items() if t in suite.tasks} for rule in RULES}
    if in_suite["last"]:
        lines += ["", "## Paper layout", ""]
        rows: dict[str, dict[str, float]] = {
            f"ours ({SELECTION_LABELS[rule]})": in_suite[rule] for rule in RULES if in_suite[rule]
        }
        for r in refs:
            rows[f"{r.name} (paper)"] = r.per_task or {}
        table = suite.paper_table(rows)
        if refs:
            ref_tasks = refs[0].per_task or {}
            same_rule = in_suite[rule_of(refs[0])]
            delta = f"| Δ vs {refs[0].name} (ours: {SELECTION_LABELS[rule_of(refs[0])]}) | " + " | ".join(
                format_delta(same_rule.get(t), ref_tasks.get(t)) if t in same_rule else "-" for t in suite.tasks
            )
            pairs = zip(summ[rule_of(refs[0])], ref_summ[0])
            delta += " | " + " | ".join(format_delta(m.value, r.value, 2) for m, r in pairs) + " |"
            table += "\n" + delta
        lines.append(table)
        lines.append("")
        lines.append("Columns: " + ", ".join(f"{v} = {k}" for k, v in suite.columns.items()) + ".")
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
    suite: Suite = VTAB,
) -> list[dict[str, Any]]:
    """Rewrite ``results.csv`` and ``results.md`` from every finished pair under ``out``."""
    records = collect_results(out)
    refs = default_references(records, suite) if references is None else list(references)
    write_csv(records, out / "results.csv")
    atomic_write(
        out / "results.md",
        render_markdown(
            records, refs, title, header_lines, pending, failed, note_missing_reference=references is None, suite=suite
        ),
    )
    return records


def log_to_wandb(
    records: Sequence[dict[str, Any]], project: str, name: str | None, out: Path, suite: Suite = VTAB
) -> None:
    """Send the per-pair table, the per-task means and the summary means to a W&B run."""
    try:
        import wandb
    except ImportError:
        print("[vtab] --wandb: wandb is not installed; skipping (pip install wandb).", file=sys.stderr)
        return
    tasks = summarize_tasks(records)
    summ = suite.summary({s.task: s.mean for s in tasks})
    run = wandb.init(
        project=project,
        name=name,
        job_type=f"{suite.key}-summary",
        dir=str(out),
        config={
            "method": records[0].get("method") if records else None,
            "hparams": records[0].get("hparams") if records else None,
        },
    )
    table = wandb.Table(columns=[c for c in CSV_COLUMNS if c != "exit_share"])
    for r in records:
        table.add_data(*[r.get(c) for c in CSV_COLUMNS if c != "exit_share"])
    run.log({f"{suite.key}/results": table})
    scalars = {f"{suite.key}/acc/{s.task}": s.mean for s in tasks}
    scalars.update({f"{suite.key}/{m.key}": m.value for m in summ if m.value is not None})
    for rule in ("best_val", "max_test"):  # the last epoch's figures are the unprefixed ones
        per_task = {s.task: m for s in tasks if (m := s.mean_by(rule)) is not None}
        scalars.update({f"{suite.key}/{rule}/{m.key}": m.value for m in suite.summary(per_task) if m.value is not None})
    run.summary.update(scalars)
    run.finish()


__all__ = ["CSV_COLUMNS", "collect_results", "log_to_wandb", "render_markdown", "summarize_tasks", "write_tables"]
