"""``petl-lightning vtab``: run one recipe on many VTAB-1K (or FGVC) tasks and write the results table.

    petl-lightning vtab -c recipes/repadapter.yaml --data.root /path/vtab-1k \\
        [--tasks all|natural|specialized|structured|present|cifar,dtd] [--seeds 0 1 2] \\
        [--out runs/vtab/repadapter] [--gpus 0,1] [--compare RepAdapter] [--wandb] \\
        [any PETLCLI argument, e.g. --trainer.max_epochs 10]

The recipe's data class picks the suite (:mod:`~petl_lightning.vtab.suites`): an ``FGVCDataModule``
recipe (``recipes/fgvc/``) runs the five FGVC tasks (``--tasks all|fgvc|present|cub,nabirds``).

Each (task, seed) is fit then tested with the recipe, the task's settings and the user's extra
arguments (the method's per-task hyper-parameters come from its ``task_overrides`` hook, applied by
the CLI), in a worker process (default) or in this process (``--launcher inprocess``). A pair is
finished when ``<out>/runs/<task>/seed<k>/result.json`` exists; a re-run skips it, and an
interrupted pair resumes from its ``checkpoints/last.ckpt``. After every pair ``results.csv`` and
``results.md`` are rewritten from all finished pairs. Modules: ``plan`` (what to run), ``run``
(one pair), ``launch`` (processes, slots), ``claims`` (several launchers on one output folder),
``remote`` (Ray and submitit), ``report`` (tables), ``reference`` (the papers' numbers), ``suites``
(VTAB-1K and FGVC).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence

from petl_lightning.errors import RunnerError, require, run_user_command
from petl_lightning.vtab.claims import DEFAULT_TIMEOUT
from petl_lightning.vtab.launch import ClaimOptions, Launcher, execute, make_slots, run_inprocess, run_subprocess
from petl_lightning.vtab.plan import TaskRun, plan_runs
from petl_lightning.vtab.remote import RayOptions, SubmititOptions, execute_ray, execute_submitit
from petl_lightning.vtab.report import collect_results, log_to_wandb, write_tables
from petl_lightning.vtab.run import atomic_write
from petl_lightning.vtab.suites import suite_named


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="petl-lightning vtab",
        allow_abbrev=False,
        description="Run a recipe on VTAB-1K tasks, or FGVC tasks for an FGVCDataModule recipe (resumable), and "
        "write results.csv / results.md. "
        "Any other --key value argument is passed to the Lightning CLI of every run.",
    )
    p.add_argument("-c", "--config", action="append", default=[], help="recipe YAML (repeatable)")
    p.add_argument(
        "--data.root",
        "--data.init_args.root",
        dest="root",
        default=None,
        help="data root holding the task folders (default: the recipe's data.root)",
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        default=["all"],
        help="all | natural | specialized | structured (VTAB-1K) | fgvc (FGVC) | present | names "
        "(comma/space separated); all = the recipe's suite",
    )
    p.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=None,
        help="seeds to run per task (default: the recipe's seed_everything, else 0)",
    )
    p.add_argument(
        "--out", default=None, help="output folder (default: runs/vtab/<recipe name>; runs/fgvc/<recipe name> for FGVC)"
    )
    p.add_argument(
        "--launcher",
        choices=["local", "inprocess", "ray", "submitit"],
        default="local",
        help="local: each pair in its own process on this machine (default); inprocess: in this process; "
        "ray: one Ray task per pair; submitit: one SLURM job array (docs/sweeps.md)",
    )
    p.add_argument("--ray-address", default=None, help="ray: 'auto' or HOST:PORT of a running cluster (default: local)")
    p.add_argument("--ray-num-cpus", type=int, default=None, help="ray: CPUs of the local instance it starts")
    p.add_argument("--cpus-per-pair", type=float, default=1.0, help="ray / submitit: CPUs one pair needs")
    p.add_argument("--gpus-per-pair", type=float, default=0.0, help="ray / submitit: GPUs one pair needs")
    p.add_argument("--slurm-cluster", default=None, help="submitit: 'local' runs the jobs here (no SLURM)")
    p.add_argument("--slurm-partition", default=None)
    p.add_argument("--slurm-time", type=int, default=24 * 60, help="submitit: minutes per pair")
    p.add_argument("--slurm-account", default=None)
    p.add_argument("--slurm-parallelism", type=int, default=64, help="submitit: array tasks running at once")
    p.add_argument(
        "--gpus", default=None, help="comma-separated CUDA device ids; pairs run side by side, one per device"
    )
    p.add_argument("--jobs", type=int, default=1, help="pairs run side by side without --gpus (CPU)")
    p.add_argument(
        "--compare",
        nargs="*",
        default=None,
        help="reference rows to print beside ours (default: the method's own; 'none' for none)",
    )
    p.add_argument("--wandb", action="store_true", help="log the results table to Weights & Biases")
    p.add_argument("--wandb-project", default="petl-lightning-vtab")
    p.add_argument("--wandb-name", default=None)
    p.add_argument(
        "--restart-unfinished",
        action="store_true",
        help="start interrupted pairs over instead of resuming from their last checkpoint",
    )
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="accept finished pairs in --out that were produced with other settings",
    )
    p.add_argument(
        "--claim-timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="seconds without a heartbeat after which another machine's claim on a pair is taken over "
        "(a dead process on this machine is noticed at once)",
    )
    p.add_argument(
        "--test-every",
        type=int,
        default=10,
        help="test every N epochs during fit for the best-val and max-over-test columns (0: the final test only; "
        "each costs a pass over the test split)",
    )
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failed pair")
    p.add_argument("--table-only", action="store_true", help="only rebuild results.csv/.md from --out")
    p.add_argument("--dry-run", action="store_true", help="print the plan (and CLI arguments) and exit")
    return p


def check_fingerprints(out_records: list[dict], fp: str, out: str, allow: bool) -> list[str]:
    """Finished pairs made with other settings: an error unless ``allow``."""
    other = [f"{r['task']} seed {r['seed']}" for r in out_records if r.get("fingerprint") != fp]
    if other and not allow:
        raise RunnerError(
            f"{out} already holds results made with other settings (recipe, extra arguments or data root): "
            f"{', '.join(other[:5])}{' ...' if len(other) > 5 else ''}. Use a new --out, delete those run "
            f"folders, or pass --allow-config-change to keep them in the table."
        )
    return other


def slurm_passthrough(extra: list[str]) -> tuple[dict[str, str], list[str]]:
    """Other ``--slurm-KEY VALUE`` arguments (SLURM's own options, e.g. ``--slurm-qos high``) for
    submitit, and the rest (the Lightning CLI's)."""
    slurm, rest, i = {}, [], 0
    while i < len(extra):
        arg = extra[i]
        if arg.startswith("--slurm-"):
            key, eq, value = arg[len("--slurm-") :].partition("=")
            if not eq:
                if i + 1 >= len(extra):
                    raise RunnerError(f"{arg} needs a value, e.g. {arg} VALUE.")
                value, i = extra[i + 1], i + 1
            slurm[key.replace("-", "_")] = value
        else:
            rest.append(arg)
        i += 1
    return slurm, rest


def vtab_main(argv: Sequence[str]) -> int:
    """Entry of ``petl-lightning vtab``: 0 all done, 1 some pairs failed, 2 bad input."""
    ns, extra = build_parser().parse_known_args(list(argv))
    ns.slurm_extra, extra = slurm_passthrough(extra)
    status: list[int] = [0]

    def go() -> None:
        status[0] = _main(ns, extra, list(argv))

    code = run_user_command(go)
    return code or status[0]


def _main(ns: argparse.Namespace, extra: list[str], argv: list[str]) -> int:
    if ns.launcher in ("ray", "submitit") and not ns.table_only:
        require(ns.launcher, ns.launcher)  # before anything is planned or written
    if ns.test_every < 0:
        raise RunnerError(f"--test-every takes 0 (final test only) or a number of epochs (got {ns.test_every}).")
    runs, out, info = plan_runs(
        ns.config, extra, ns.tasks, ns.seeds, ns.out, ns.root, resolve=not ns.table_only, test_every=ns.test_every
    )
    suite = suite_named(info["suite"])
    slots = make_slots(ns.gpus, ns.jobs)
    if len(slots) > 1 and ns.launcher == "inprocess":
        raise RunnerError("--launcher inprocess runs one pair at a time; drop --gpus/--jobs or use --launcher local.")
    compare: list[str] | None = None
    if ns.compare is not None:
        from petl_lightning.vtab.reference import resolve_name

        compare = [] if [c.lower() for c in ns.compare] in ([], ["none"]) else [resolve_name(c) for c in ns.compare]
    header = [
        "Command: `petl-lightning vtab " + " ".join(shlex.quote(a) for a in argv) + "`",
        f"Recipe(s): {', '.join(info['configs'])}; data root: `{info['root']}`; extra arguments: "
        f"`{' '.join(extra) or '(none)'}`; settings fingerprint `{info['fingerprint']}`.",
    ]
    if ns.table_only:
        if not collect_results(out):
            raise RunnerError(
                f"--table-only: no finished pair under {str(out)!r} (no runs/<task>/seed<k>/result.json); "
                f"check --out (the folder a vtab run wrote)."
            )
        records = write_tables(out, compare, header_lines=header, suite=suite)
        print(f"[vtab] {len(records)} finished pairs -> {out / 'results.md'}")
        return 0
    if ns.dry_run:
        for r in runs:
            state = "done" if r.finished else "todo"
            print(f"[{state}] {r.label}: petl-lightning fit/test " + " ".join(shlex.quote(a) for a in r.cli_args))
        return 0
    mixed = check_fingerprints(collect_results(out), info["fingerprint"], str(out), ns.allow_config_change)
    if mixed:
        header.append(f"Warning: {len(mixed)} pair(s) were produced with other settings (--allow-config-change).")
    atomic_write(out / "vtab_run.json", json.dumps({**info, "argv": argv}, indent=1, default=str))
    return _execute(ns, runs, out, info, compare, header)


def _execute(
    ns: argparse.Namespace, runs: list[TaskRun], out, info: dict, compare: list[str] | None, header: list[str]
) -> int:
    todo = [r for r in runs if not r.finished]
    skipped = len(runs) - len(todo)
    print(
        f"[vtab] {len(runs)} pairs ({len(info['tasks'])} tasks x {len(info['seeds'])} seeds): {skipped} already "
        f"finished, {len(todo)} to run -> {out}",
        file=sys.stderr,
        flush=True,
    )
    failed: dict[str, str] = {}
    pending = {r.label for r in todo}
    suite = suite_named(info["suite"])
    done_count = [skipped]

    elsewhere: list[str] = []  # pairs another launcher holds

    def tables() -> list[dict]:
        return write_tables(
            out,
            compare,
            header_lines=header,
            pending=sorted([*pending, *(f"{label} (running elsewhere)" for label in elsewhere)]),
            failed=[f"{k}: {v}" for k, v in failed.items()],
            suite=suite,
        )

    def on_done(run: TaskRun, status: str, msg: str) -> None:
        pending.discard(run.label)
        done_count[0] += 1
        if status == "elsewhere":
            if not run.finished:
                elsewhere.append(run.label)
            print(f"[vtab] [{done_count[0]}/{len(runs)}] {run.label}: skipped, {msg}", file=sys.stderr, flush=True)
        elif status == "ok":
            acc = json.loads(run.result_path.read_text())["acc"]
            print(f"[vtab] [{done_count[0]}/{len(runs)}] {run.label}: acc {acc:.2f}%", file=sys.stderr, flush=True)
        else:
            failed[run.label] = msg
            print(f"[vtab] [{done_count[0]}/{len(runs)}] {run.label}: FAILED {msg}", file=sys.stderr, flush=True)
        tables()

    claims = ClaimOptions(ns.launcher, ns.claim_timeout)
    try:
        if ns.launcher == "ray":
            ray = RayOptions(ns.ray_address, ns.cpus_per_pair, ns.gpus_per_pair, ns.ray_num_cpus)
            execute_ray(todo, on_done, not ns.restart_unfinished, claims, ray)
        elif ns.launcher == "submitit":
            slurm = SubmititOptions(
                ns.slurm_cluster,
                ns.slurm_partition,
                ns.slurm_time,
                int(ns.gpus_per_pair),
                max(1, int(ns.cpus_per_pair)),
                ns.slurm_account,
                ns.slurm_parallelism,
                ns.slurm_extra,
            )
            execute_submitit(todo, on_done, claims, out / "submitit", slurm)
        else:
            launcher: Launcher = run_subprocess if ns.launcher == "local" else run_inprocess
            execute(
                todo,
                make_slots(ns.gpus, ns.jobs),
                launcher,
                on_done,
                resume=not ns.restart_unfinished,
                fail_fast=ns.fail_fast,
                claims=claims,
            )
    finally:
        records = tables()
    print(
        f"[vtab] results: {out / 'results.md'} and {out / 'results.csv'} ({len(records)} finished pairs)",
        file=sys.stderr,
        flush=True,
    )
    if ns.wandb and records:
        log_to_wandb(records, ns.wandb_project, ns.wandb_name, out, suite)
    if failed:
        print(
            f"[vtab] {len(failed)} pair(s) failed; fix and re-run the same command to finish them (finished pairs "
            f"are skipped).",
            file=sys.stderr,
        )
        return 1
    return 0


__all__ = ["build_parser", "vtab_main"]
