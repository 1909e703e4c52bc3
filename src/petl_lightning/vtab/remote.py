"""Running pairs past one machine: one Ray task per pair (``--launcher ray``), or one SLURM array
job per invocation through submitit (``--launcher submitit``). Each remote pair claims itself
(:mod:`.claims`) and runs in a process of its own (a Ray worker used for one task, an array job),
as the local launcher's worker does, so every launcher writes the same ``result.json`` for the
same pair."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from petl_lightning.errors import RunnerError, require
from petl_lightning.vtab.launch import ClaimOptions, OnDone, Slot, run_claimed, run_dedicated
from petl_lightning.vtab.plan import TaskRun


def run_remote_pair(run: TaskRun, resume: bool, claims: ClaimOptions) -> tuple[str, str]:
    """What a Ray task or a SLURM array job runs for one pair, in a process of its own: claim it, run
    it, release the claim."""
    return run_claimed(run, Slot(claims.name), run_dedicated, resume, claims)


@dataclass
class RayOptions:
    """``--ray-address`` (``auto``: a running cluster; None: start a local instance), the resources of
    one pair, and the local instance's CPUs."""

    address: str | None = None
    cpus_per_pair: float = 1.0
    gpus_per_pair: float = 0.0
    num_cpus: int | None = None


def execute_ray(
    runs: Sequence[TaskRun], on_done: OnDone, resume: bool, claims: ClaimOptions, options: RayOptions
) -> None:
    """One Ray task per pair; ``on_done`` as each finishes. A local instance this call starts is shut down."""
    ray = require("ray", "ray")
    started = not ray.is_initialized()
    if started:
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if options.address is None and options.num_cpus is not None:
            kwargs["num_cpus"] = options.num_cpus
        ray.init(address=options.address, **kwargs)
    try:
        # max_calls=1: a fresh worker process per pair, as the local launcher's (no state between pairs)
        task = ray.remote(num_cpus=options.cpus_per_pair, num_gpus=options.gpus_per_pair, max_calls=1)(run_remote_pair)
        pending = {task.remote(run, resume, claims): run for run in runs}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            run = pending.pop(done[0])
            try:
                status, msg = ray.get(done[0])
            except Exception as err:  # noqa: BLE001 - a lost worker or node: reported, the others go on
                status, msg = "failed", f"Ray task failed: {type(err).__name__}: {err}"
            on_done(run, status, msg)
    finally:
        if started:
            ray.shutdown()


@dataclass
class SubmititOptions:
    """The SLURM array's options (``--slurm-*``); ``cluster`` ``local`` runs the jobs as local processes
    (submitit's local executor: what the tests use), None picks SLURM where it is installed."""

    cluster: str | None = None
    partition: str | None = None
    time_min: int = 60 * 24
    gpus_per_pair: int = 0
    cpus_per_pair: int = 4
    account: str | None = None
    parallelism: int = 64
    extra: dict[str, str] = field(default_factory=dict)


class PairJob:
    """A pair as a submitit job; on preemption or timeout submitit requeues it (``checkpoint``), and the
    requeued job resumes the pair from its ``last.ckpt``."""

    def __init__(self, claims: ClaimOptions) -> None:
        self.claims = claims

    def __call__(self, run: TaskRun) -> tuple[str, str]:
        return run_remote_pair(run, True, self.claims)

    def checkpoint(self, run: TaskRun) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, run)


def execute_submitit(
    runs: Sequence[TaskRun], on_done: OnDone, claims: ClaimOptions, folder: Path, options: SubmititOptions
) -> None:
    """One job array for ``runs`` (logs under ``folder``); ``on_done`` as each job ends, in plan order."""
    submitit = require("submitit", "submitit")
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=options.cluster)
    params: dict[str, Any] = {
        "name": "petl-vtab",
        "timeout_min": options.time_min,
        "gpus_per_node": options.gpus_per_pair,
        "cpus_per_task": options.cpus_per_pair,
        "slurm_array_parallelism": options.parallelism,
        "slurm_additional_parameters": dict(options.extra),
    }
    if options.partition:
        params["slurm_partition"] = options.partition
    if options.account:
        params["slurm_additional_parameters"]["account"] = options.account
    try:
        executor.update_parameters(**params)
    except ValueError as err:  # an unknown --slurm-* key
        raise RunnerError(f"submitit refused the SLURM options: {err}") from None
    if not runs:
        return
    jobs = executor.map_array(PairJob(claims), list(runs))
    for job, run in zip(jobs, runs):
        try:
            status, msg = job.result()
        except Exception as err:  # noqa: BLE001 - a failed or cancelled job: reported, the others go on
            status, msg = (
                "failed",
                f"job {job.job_id} failed: {str(err).strip().splitlines()[-1:] or type(err).__name__}",
            )
        on_done(run, status, msg)


__all__ = ["PairJob", "RayOptions", "SubmititOptions", "execute_ray", "execute_submitit", "run_remote_pair"]
