"""Running one (task, seed) pair: fit (resumed from Lightning's ``last.ckpt`` when one exists), test,
and write its ``result.json`` atomically; plus the entry a worker process runs."""

from __future__ import annotations

import datetime as _dt
import gc
import hashlib
import json
import os
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from petl_lightning.errors import RunnerError, run_user_command
from petl_lightning.vtab.plan import TaskRun

WORKER_ENV = "PETL_VTAB_WORKER"


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace`` (never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _json_safe(hparams: Any) -> dict[str, Any]:
    out = {}
    for k, v in dict(hparams).items():
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[k] = v
    return out


def data_fingerprint(datamodule: Any) -> dict[str, Any]:
    """What the task's data is: the sha256 of each list file in its folder (``*.txt``, ``*.json``: VTAB-1K's
    four lists and ``classes.txt``, FGVC's split files) and the normalisation used, and a short hash of
    both, so results on different lists or normalisations never look comparable."""
    task_dir = getattr(datamodule, "task_dir", None)
    found = Path(task_dir).iterdir() if task_dir else iter(())
    files = sorted(p for p in found if p.is_file() and p.suffix in (".txt", ".json"))
    lists = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    norm = {"mean": [float(v) for v in datamodule.mean], "std": [float(v) for v in datamodule.std]}
    blob = json.dumps({"lists": lists, "normalization": norm}, sort_keys=True)
    return {"sha256": hashlib.sha256(blob.encode()).hexdigest()[:12], "lists": lists, "normalization": norm}


def run_task(run: TaskRun, resume: bool = True) -> dict[str, Any]:
    """Fit and test one (task, seed) in this process; write and return its ``result.json`` record."""
    import torch

    from petl_lightning.callbacks import TestAccuracyTracker, read_inference_stats
    from petl_lightning.cli import PETLCLI

    run.run_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    tracker = TestAccuracyTracker(run.test_every)  # Lightning runs it before the checkpoint callbacks
    with warnings.catch_warnings():
        # In-process runs pass args while sys.argv holds the runner's own command line: intended.
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        cli = PETLCLI(args=run.cli_args, run=False, trainer_defaults={"callbacks": [tracker]})
    model, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    if trainer.world_size > 1 and os.environ.get(WORKER_ENV) != "1":
        # Lightning's DDP launcher re-runs this process's command line for each rank: in-process
        # that would be the whole runner; in a worker process it is just this pair.
        raise RunnerError(f"{run.label}: several devices per pair need --launcher local.")
    ckpt = run.last_checkpoint if resume else None
    if ckpt is not None:
        print(f"[vtab] {run.label}: resuming from {ckpt}", file=sys.stderr, flush=True)
    t0 = time.time()
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
    fit_s, t0 = time.time() - t0, time.time()
    metrics = trainer.test(model, datamodule=datamodule, verbose=False)
    test_s = time.time() - t0
    m = metrics[0] if metrics else {}
    if "test/acc" not in m:
        raise RuntimeError(f"{run.label}: trainer.test returned no 'test/acc' (got {sorted(m)}).")
    chosen = tracker.finish(max(trainer.current_epoch - 1, 0), float(m["test/acc"]))
    stats: dict[str, Any] = {k: v.tolist() for k, v in read_inference_stats(model).items()}  # floats or lists
    data = data_fingerprint(datamodule)
    params = model.parameter_summary()
    no_head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not model.is_head_parameter(n))
    gflops, backbone = float(stats["gflops"]), float(stats["gflops_backbone"])
    record = {
        "task": run.task,
        "group": run.group,
        "seed": run.seed,
        "acc": 100.0 * float(m["test/acc"]),
        "acc_best_val": None if chosen.best_val is None else 100.0 * chosen.best_val,
        "acc_max_test": 100.0 * chosen.max_test,
        "best_val_epoch": chosen.best_val_epoch,
        "max_test_epoch": chosen.max_test_epoch,
        "tested_epochs": [asdict(h) for h in tracker.history],
        "test_every": run.test_every,
        "test_loss": float(m.get("test/loss", float("nan"))),
        "trainable_params": int(params["trainable"]),
        "trainable_params_no_head": int(no_head),
        "total_params": int(params["total"]),
        "gflops": gflops,
        "gflops_backbone": backbone,
        "gflops_ratio": gflops / backbone if backbone else float("nan"),
        "keep_rate": float(stats["keep_rate"]),
        "exit_share": [float(v) for v in stats["exit_share"]],
        "test_images": int(stats["images"]),
        "epochs": int(trainer.current_epoch),
        "fit_s": fit_s,
        "test_s": test_s,
        "wall_s": time.time() - t_start,
        "method": type(model).__name__,
        "model_name": model.hparams.model_name,
        "hparams": _json_safe(model.hparams),
        "device": str(model.device),
        "finished_at": _dt.datetime.now().isoformat(timespec="seconds"),
        "fingerprint": run.fingerprint,
        "data_fingerprint": data["sha256"],
        "data": data,
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
    """Subprocess entry: ``python -m petl_lightning.vtab.run <spec.json>``."""
    spec = json.loads(Path(argv[0]).read_text())
    fields = {k: spec[k] for k in ("task", "seed", "cli_args", "fingerprint", "test_every") if k in spec}
    run = TaskRun(run_dir=Path(spec["run_dir"]), **fields)
    return run_user_command(lambda: run_task(run, resume=spec.get("resume", True)))


__all__ = ["WORKER_ENV", "atomic_write", "data_fingerprint", "run_task", "worker_main"]


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
