"""Launching pairs: in a worker process each (default) or in this process, side by side over slots
(one per GPU, or CPU jobs) with ``concurrent.futures``; each pair under a claim (:mod:`.claims`), so
several launchers may work on one output folder."""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from typing import IO

from petl_lightning.errors import RunnerError, find_user_error, one_line
from petl_lightning.vtab.claims import DEFAULT_TIMEOUT, describe, try_claim
from petl_lightning.vtab.plan import TaskRun
from petl_lightning.vtab.run import WORKER_ENV, atomic_write, run_task

SPEC_FILE = "spec.json"
LOG_FILE = "worker.log"


@dataclass
class Slot:
    """Where a worker runs: environment overrides and extra CLI arguments (e.g. one GPU)."""

    name: str
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)


def cuda_device_count() -> int:
    """CUDA devices this process can see (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def make_slots(gpus: str | None, jobs: int) -> list[Slot]:
    """One slot per CUDA device id in ``gpus`` (``"0,1"``), else ``jobs`` CPU slots."""
    if gpus:
        ids = [g.strip() for g in str(gpus).split(",") if g.strip()]
        if not ids or not all(g.isdigit() for g in ids):
            raise RunnerError(f"--gpus takes comma-separated CUDA device ids, e.g. --gpus 0,1 (got {gpus!r}).")
        count = cuda_device_count()
        missing = [g for g in ids if int(g) >= count]
        if missing:
            seen = f"{count} CUDA device(s) (ids 0-{count - 1})" if count else "no CUDA device"
            raise RunnerError(
                f"--gpus {gpus}: this machine has {seen}, so device(s) {','.join(missing)} do not exist; "
                f"drop --gpus to run on the CPU (--jobs N for pairs side by side)."
            )
        return [Slot(f"cuda:{g}", {"CUDA_VISIBLE_DEVICES": g}, ["--trainer.devices", "1"]) for g in ids]
    if jobs < 1:
        raise RunnerError("--jobs must be at least 1.")
    return [Slot(f"worker {i}") for i in range(jobs)]


def start_log(log: IO[str], slot: Slot) -> None:
    """The line that opens each attempt at a pair in its ``worker.log`` (a resume adds one more)."""
    log.write(f"\n=== {_dt.datetime.now().isoformat(timespec='seconds')} on {slot.name}\n")
    log.flush()


def run_subprocess(run: TaskRun, slot: Slot, resume: bool) -> tuple[bool, str]:
    """Run a pair in ``python -m petl_lightning.vtab.run``; its output goes to the run's ``worker.log``."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    spec = {**asdict(run), "run_dir": str(run.run_dir), "resume": resume, "cli_args": [*run.cli_args, *slot.args]}
    spec_path = run.run_dir / SPEC_FILE
    atomic_write(spec_path, json.dumps(spec, indent=1))
    log_path = run.run_dir / LOG_FILE
    with open(log_path, "a") as log:
        start_log(log, slot)
        proc = subprocess.run(
            [sys.executable, "-m", "petl_lightning.vtab.run", str(spec_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **slot.env, WORKER_ENV: "1"},
            check=False,
        )
    if proc.returncode == 0 and run.finished:
        return True, ""
    tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
    errors = [ln for ln in tail if ln.startswith("error:")]
    reason = errors[-1] if errors else (tail[-1] if tail else f"exit status {proc.returncode}")
    return False, f"{reason} (exit {proc.returncode}; log: {log_path})"


def run_inprocess(run: TaskRun, slot: Slot, resume: bool) -> tuple[bool, str]:
    """Run a pair in this process; an exception marks it failed (KeyboardInterrupt stops everything)."""
    try:
        run_task(replace(run, cli_args=[*run.cli_args, *slot.args]), resume)
    except Exception as err:  # noqa: BLE001 - recorded and reported; other pairs continue
        user_error = find_user_error(err)
        run.run_dir.mkdir(parents=True, exist_ok=True)
        with open(run.run_dir / LOG_FILE, "a") as log:
            traceback.print_exc(file=log)
        msg = f"error: {one_line(user_error)}" if user_error else f"{type(err).__name__}: {err}"
        return False, f"{msg} (traceback: {run.run_dir / LOG_FILE})"
    return True, ""


def run_dedicated(run: TaskRun, slot: Slot, resume: bool) -> tuple[bool, str]:
    """Run a pair in this process when the process exists for that pair alone (a Ray task with
    ``max_calls=1``, a SLURM array job): what :func:`run_subprocess` does without starting a second
    interpreter. Its output goes to the run's ``worker.log`` while it runs."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    with open(run.run_dir / LOG_FILE, "a") as log:
        start_log(log, slot)
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            return run_inprocess(run, slot, resume)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, old in zip((1, 2), saved):
                os.dup2(old, fd)
                os.close(old)


Launcher = Callable[[TaskRun, Slot, bool], tuple[bool, str]]
#: What became of a pair: "ok", "failed", or "elsewhere" (done or claimed by another launcher meanwhile).
OnDone = Callable[[TaskRun, str, str], None]


@dataclass
class ClaimOptions:
    """How a launcher claims pairs: its name in claim files, and when another holder's claim is stale."""

    name: str = "local"
    timeout: float = DEFAULT_TIMEOUT


def run_claimed(run: TaskRun, slot: Slot, launcher: Launcher, resume: bool, claims: ClaimOptions) -> tuple[str, str]:
    """Claim the pair (:mod:`.claims`), run it with ``launcher``, release the claim; ``("elsewhere", who)``
    when another launcher finished or holds it."""
    claim = try_claim(run.run_dir, claims.name, claims.timeout)
    if claim is None:
        return "elsewhere", describe(run.run_dir) or "finished by another launcher"
    try:
        ok, msg = launcher(run, slot, resume)
    finally:
        claim.release()
    return ("ok" if ok else "failed"), msg


def execute(
    runs: Sequence[TaskRun],
    slots: Sequence[Slot],
    launcher: Launcher,
    on_done: OnDone,
    resume: bool = True,
    fail_fast: bool = False,
    claims: ClaimOptions | None = None,
) -> None:
    """Run ``runs`` over ``slots`` (each slot runs one pair at a time), each under a claim, calling
    ``on_done`` after each in this thread. ``fail_fast``: no new pair starts after a failure."""
    claims = claims or ClaimOptions()
    todo, free = list(runs), list(slots)
    if len(slots) == 1:  # no threads: an in-process run keeps the main thread (signals, Lightning's launcher)
        for run in todo:
            status, msg = run_claimed(run, slots[0], launcher, resume, claims)
            on_done(run, status, msg)
            if status == "failed" and fail_fast:
                return
        return
    running: dict[Future[tuple[str, str]], tuple[TaskRun, Slot]] = {}
    stop = False
    with ThreadPoolExecutor(max_workers=len(slots)) as pool:
        while running or (todo and not stop):
            while free and todo and not stop:
                run, slot = todo.pop(0), free.pop(0)
                running[pool.submit(run_claimed, run, slot, launcher, resume, claims)] = (run, slot)
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in done:
                run, slot = running.pop(fut)
                free.append(slot)
                status, msg = fut.result()
                on_done(run, status, msg)
                stop = stop or (status == "failed" and fail_fast)


__all__ = [
    "LOG_FILE",
    "ClaimOptions",
    "OnDone",
    "Slot",
    "execute",
    "run_claimed",
    "make_slots",
    "run_dedicated",
    "run_inprocess",
    "run_subprocess",
]
