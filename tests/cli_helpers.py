"""Helpers of the tests that run the console scripts as a user does (a new process each)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# One torch thread per process: two test workers each running a console script would otherwise ask
# this 2-core machine for four threads, and oversubscribed OpenMP threads run many times slower.
# Nor may a script inherit the PL_GLOBAL_SEED an earlier in-process test's seed_everything left here.
# Nor see TensorFlow (tests/no_tensorflow): only vtab-prepare's tests need it (WITH_TENSORFLOW).
NO_TENSORFLOW = ROOT / "tests" / "no_tensorflow"
WITH_TENSORFLOW = {
    **{k: v for k, v in os.environ.items() if k not in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")},
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "PYTHONWARNINGS": "ignore",
    "OMP_NUM_THREADS": "1",
}
ENV = {**WITH_TENSORFLOW, "PYTHONPATH": os.pathsep.join(filter(None, [str(NO_TENSORFLOW), os.getenv("PYTHONPATH")]))}

# A tiny random ViT for recipes of methods that need a few blocks (fast to build and to run).
TINY_MODEL = ("--model.init_args.model_name", "vit_tiny_patch16_224", "--model.init_args.pretrained", "false")


def run(
    *args: str, script: str = "petl-lightning", timeout: int = 600, env: dict | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    """A console script in a new process (its own process group: a timeout stops every process it
    started, e.g. the other ranks of a two-process run)."""
    exe = [str(BIN / script)] if script != "python" else [sys.executable, "-m", "petl_lightning"]
    with subprocess.Popen(
        [*exe, *args], cwd=cwd, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    ) as proc:  # fmt: skip
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def metric(output: str, name: str) -> float:
    found = re.search(rf"{re.escape(name)}\W+([0-9.]+)", output)
    assert found, f"{name} not in output:\n{output[-3000:]}"
    return float(found.group(1))


def assert_user_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert re.search(pattern, proc.stderr), proc.stderr[-3000:]


def assert_one_line(proc: subprocess.CompletedProcess, pattern: str) -> None:
    """Exit status 2, and stderr is exactly one line, matching ``pattern``."""
    assert_user_error(proc, pattern)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def tiny_task(root: Path, n: int = 12) -> Path:
    """A 2-class task of ``n`` 32x32 images per list, with images that can be corrupted later."""
    from PIL import Image

    task = root / "tiny"
    (task / "images").mkdir(parents=True)
    for split in ("train800", "val200", "train800val200", "test"):
        lines = []
        for i in range(n):
            Image.new("RGB", (32, 32), (i * 20 % 255, 0, 0)).save(task / "images" / f"{split}{i}.png")
            lines.append(f"images/{split}{i}.png {i % 2}")
        (task / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return task


def tiny_args(root: Path, out: Path, recipe: str = "linear_probe") -> list[str]:
    """A recipe on :func:`tiny_task` at 32 px with a random ViT-Ti of two blocks, one epoch, under ``out``."""
    if recipe == "linear_probe":
        extra = ["--model.init_args.cache_features", "false"]
    else:
        extra = ["--model.init_args.model_kwargs", "{depth: 2}"]
    return [
        "-c",
        f"recipes/{recipe}.yaml",
        "--data.init_args.root",
        str(root),
        "--data.init_args.task",
        "tiny",
        "--data.init_args.img_size",
        "32",
        "--data.init_args.num_workers",
        "0",
        "--data.init_args.batch_size",
        "4",
        *TINY_MODEL,
        *extra,
        "--trainer.max_epochs",
        "1",
        "--trainer.default_root_dir",
        str(out),
    ]


def tiny_fit(
    root: Path, out: Path, *extra: str, env: dict | None = None, recipe: str = "linear_probe", timeout: int = 600
) -> subprocess.CompletedProcess:
    return run("fit", *tiny_args(root, out, recipe), *extra, env=env, timeout=timeout)


def assert_one_line_and_nothing_written(proc: subprocess.CompletedProcess, pattern: str, out: Path) -> None:
    assert_user_error(proc, pattern)
    assert len([ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]) == 1
    written = files_under(out)
    assert not written, written


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def fit_interrupted(args: list[str], run_dir: Path, cwd: Path, env: dict | None = None) -> int:
    """Start ``fit``, press Ctrl-C (SIGINT) once the first epoch's checkpoint exists, wait for exit;
    the global step of the checkpoint it left. The fit gets SIGINT's default action, as in a terminal:
    a suite started in the background (``make test &``) would pass on an ignored SIGINT, and Python
    then installs no KeyboardInterrupt handler."""
    import torch

    last = run_dir / "checkpoints" / "last.ckpt"
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [str(BIN / "petl-lightning"), "fit", *args],
        cwd=cwd,
        env=env or ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )
    deadline = time.time() + 300
    while not last.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"fit ended before it could be interrupted:\n{proc.communicate()[1][-3000:]}"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, "the interrupted fit should not report success"
    assert last.is_file(), err[-3000:]
    return int(torch.load(last, map_location="cpu", weights_only=True)["global_step"])
