"""`petl-lightning vtab`: task selection, results tables, resume after a crash, parallel workers,
and an end-to-end run on the real VTAB-1K-layout assets."""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_helpers import BIN, ENV
from petl_lightning import vtab
from petl_lightning.data.vtab import VTAB_TASKS
from petl_lightning.errors import PETLError
from petl_lightning.flops import vit_flops
from petl_lightning.vtab import claims, launch, plan, report, run
from petl_lightning.vtab.reference import reference, summarize

pytestmark = pytest.mark.slow  # console-script processes: in make test, not in make test-fast

FAKE_TASKS = {"dtd": 3, "eurosat": 3, "mytask": 2}  # natural, specialized, custom; labels used
N_TEST = 6

RECIPE = """\
seed_everything: 0
model:
  class_path: petl_lightning.methods.baselines.LinearProbe
  init_args:
    model_name: vit_tiny_patch16_224
    pretrained: false
    img_size: 32
    model_kwargs: {depth: 2}
    lr: 0.05
    warmup_epochs: 0
data:
  class_path: petl_lightning.data.vtab.VTAB1kDataModule
  init_args:
    root: ./not-used
    task: cifar
    img_size: 32
    batch_size: 4
    num_workers: 0
trainer:
  max_epochs: 1
  accelerator: cpu
  devices: 1
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
"""


def write_task(root: Path, task: str, n_labels: int, seed: int = 0) -> None:
    """A task folder in the VTAB-1K list layout with a handful of 16x16 images (label ~ brightness)."""
    rng = np.random.RandomState(seed)
    d = root / task
    (d / "images").mkdir(parents=True, exist_ok=True)
    lists: dict[str, list[str]] = {}
    for split, n in (("train800", 8), ("val200", 2), ("test", N_TEST)):
        lines = []
        for i in range(n):
            y = i % n_labels
            img = (rng.rand(16, 16, 3) * 60 + y * 90).astype("uint8")
            rel = f"images/{split}_{i}.png"
            Image.fromarray(img).save(d / rel)
            lines.append(f"{rel} {y}")
        lists[split] = lines
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for name, lines in lists.items():
        (d / f"{name}.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vtab1k")
    for i, (task, k) in enumerate(FAKE_TASKS.items()):
        write_task(root, task, k, seed=i)
    return root


@pytest.fixture()
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(RECIPE)
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def md_row(md: str, first_cell: str, index: int = 0, value: str | None = None) -> list[str]:
    """Cells of the first markdown table row whose first cell is ``first_cell`` (and whose cell
    ``index`` is ``value``, when given)."""
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip()[1:-1].split("|")]
        if line.startswith("|") and cells[0] == first_cell and (value is None or cells[index] == value):
            return cells
    raise AssertionError(f"no row {first_cell!r} in\n{md}")


# --------------------------------------------------------------------------------------------------
def test_task_selection(fake_root: Path) -> None:
    assert plan.resolve_tasks(["all"], None) == list(VTAB_TASKS)
    assert plan.resolve_tasks(["natural"], None)[:2] == ["cifar", "caltech101"]
    assert len(plan.resolve_tasks(["structured"], None)) == 8
    assert plan.resolve_tasks(["present"], fake_root) == ["dtd", "eurosat", "mytask"]
    assert plan.resolve_tasks(["mytask,dtd", "dtd"], fake_root) == ["mytask", "dtd"]
    with pytest.raises(PETLError, match="Did you mean 'eurosat'"):
        plan.resolve_tasks(["eurosta"], fake_root)
    with pytest.raises(PETLError, match="missing under .*cifar.*holds: dtd, eurosat, mytask"):
        plan.resolve_tasks(["natural"], fake_root)


def test_plan_per_task_overrides_gpu_slots_and_dry_run(
    fake_root: Path, recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each pair's arguments: recipe, then the task's own settings, then the user's (who wins); the
    method's per-task hyper-parameters come from its task_overrides hook through the CLI's own
    parser; --gpus maps workers to one CUDA device each; --dry-run prints the plan and runs nothing."""
    rep = tmp_path / "rep.yaml"
    rep.write_text(
        RECIPE.replace("petl_lightning.methods.baselines.LinearProbe", "petl_lightning.methods.repadapter.RepAdapter")
    )
    runs, out, _ = plan.plan_runs(
        [str(rep)], ["--model.init_args.lr", "0.5"], ["eurosat", "mytask"], [3], str(tmp_path / "o"), str(fake_root)
    )
    a = runs[0].cli_args
    assert a[:2] == ["--config", str(rep)]
    assert a[a.index("--data.init_args.task") + 1] == "eurosat" and a[a.index("--seed_everything") + 1] == "3"
    assert a[-2:] == ["--model.init_args.lr", "0.5"]  # user args come last
    assert runs[0].run_dir == out / "runs" / "eurosat" / "seed3"
    scale = {r.task: plan.parse_fit_config(r.cli_args)["model"]["init_args"]["adapter_scale"] for r in runs}
    assert scale == {"eurosat": 1.0, "mytask": None}  # the official table; a custom task has no entry
    monkeypatch.setattr(launch, "cuda_device_count", lambda: 2)  # as on a two-GPU machine
    slots = launch.make_slots("0,1", 1)
    assert [s.env for s in slots] == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]
    assert (
        vtab.vtab_main(
            [
                "-c",
                str(recipe),
                "--data.root",
                str(fake_root),
                "--tasks",
                "dtd",
                "--out",
                str(tmp_path / "p"),
                "--dry-run",
            ]
        )
        == 0
    )
    assert "[todo] dtd seed 0:" in capsys.readouterr().out
    assert not (tmp_path / "p").exists()
    # The runner owns the task and seed.
    assert vtab.vtab_main(["-c", str(recipe), "--data.root", str(fake_root), "--data.init_args.task", "dtd"]) == 2
    assert "use --tasks" in capsys.readouterr().err


def test_claims_live_stale_and_released(tmp_path: Path) -> None:
    """A live claim keeps a pair from a second launcher; a dead local holder's or a silent remote
    holder's claim is taken over; a released claim is gone; a finished pair is never claimed."""
    pair = tmp_path / "runs" / "dtd" / "seed0"
    first = claims.try_claim(pair, "local", timeout=600)
    assert first is not None and claims.try_claim(pair, "ray", timeout=600) is None
    assert f"pid {os.getpid()} (local)" in claims.describe(pair)
    first.release()
    assert not (pair / claims.CLAIM_FILE).exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder = {"host": socket.gethostname(), "pid": int(dead.stdout), "launcher": "local", "since": "", "token": "x"}
    (pair / claims.CLAIM_FILE).write_text(json.dumps(holder))  # a launcher on this machine that was killed
    taken = claims.try_claim(pair, "local", timeout=600)
    assert taken is not None and taken.owned()
    taken.release()
    (pair / claims.CLAIM_FILE).write_text(json.dumps({**holder, "host": "elsewhere", "pid": 1}))
    assert claims.try_claim(pair, "local", timeout=600) is None  # another machine's claim, heartbeat fresh
    old = time.time() - 30
    os.utime(pair / claims.CLAIM_FILE, (old, old))
    beating = claims.try_claim(pair, "local", timeout=10)  # silent for 30 s > 10 s: taken over
    assert beating is not None
    before = (pair / claims.CLAIM_FILE).stat().st_mtime
    time.sleep(3.0)  # heartbeats every timeout / 4 = 2.5 s
    assert (pair / claims.CLAIM_FILE).stat().st_mtime > before
    beating.release()
    (pair / plan.RESULT_FILE).write_text("{}")
    assert claims.try_claim(pair, "local", timeout=600) is None


def test_a_pair_claimed_by_another_launcher_is_left_to_it(
    fake_root: Path, recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    held = claims.try_claim(out / "runs" / "dtd" / "seed0", "another launcher")  # as a second launcher holds it
    assert held is not None
    argv = ["-c", str(recipe), "--data.root", str(fake_root), "--tasks", "dtd", "mytask", "--out", str(out)]
    try:
        code = vtab.vtab_main([*argv, "--launcher", "inprocess"])
    finally:
        held.release()
    err = capsys.readouterr().err
    assert code == 0 and "dtd seed 0: skipped, " in err and "(another launcher)" in err
    assert not (out / "runs" / "dtd" / "seed0" / plan.RESULT_FILE).exists()
    assert (out / "runs" / "mytask" / "seed0" / plan.RESULT_FILE).is_file()
    assert "dtd seed 0 (running elsewhere)" in (out / "results.md").read_text()


@pytest.mark.parametrize("launcher", ["ray", "submitit"])
def test_a_missing_launcher_extra_is_named_before_anything_is_written(
    fake_root: Path,
    recipe: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    launcher: str,
) -> None:
    monkeypatch.setitem(sys.modules, launcher, None)  # as if not installed: importing it raises ImportError
    argv = ["-c", str(recipe), "--data.root", str(fake_root), "--tasks", "dtd", "--out", str(tmp_path / "o")]
    assert vtab.vtab_main([*argv, "--launcher", launcher]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {launcher} is not installed; install the extra: pip install 'petl-lightning[{launcher}]'."
    assert not (tmp_path / "o").exists()


def test_table_means_std_and_partial_groups(tmp_path: Path) -> None:
    """results.md/csv from hand-made records: per-task mean ± sample std over seeds under each selection
    rule (last, best val, max over test epochs), the group means, the mean of the three group means and
    the 19-task mean equal their closed forms, labelled; the paper's RepAdapter row (max over test
    epochs) is compared with ours by the same rule; incomplete groups print n/a (k/n)."""
    rng = np.random.RandomState(1)
    tasks = [*VTAB_TASKS, "mytask"]
    accs = {
        (t, s): {rule: float(rng.uniform(20, 95)) for rule in ("last", "best_val", "max_test")}
        for t in tasks
        for s in (0, 1, 2)
    }
    for (task, seed), acc in accs.items():
        rec = {
            "task": task,
            "group": VTAB_TASKS[task].group if task in VTAB_TASKS else "custom",
            "seed": seed,
            "acc": acc["last"],
            "acc_best_val": acc["best_val"],
            "acc_max_test": acc["max_test"],
            "test_every": 10,
            "trainable_params": 1000,
            "trainable_params_no_head": 500,
            "gflops": 17.58,
            "gflops_backbone": 17.58,
            "gflops_ratio": 1.0,
            "keep_rate": 1.0,
            "exit_share": [1.0],
            "method": "RepAdapter",
            "model_name": "vit_base_patch16_224",
            "hparams": {"placement": "attn_mlp"},
            "fingerprint": "x",
            "data_fingerprint": f"data-{task}" if (task, seed) != ("dtd", 2) else "other-lists",
            "wall_s": 60.0,
        }
        run.atomic_write(tmp_path / "runs" / task / f"seed{seed}" / "result.json", json.dumps(rec))
    report.write_tables(tmp_path)
    rows = read_csv(tmp_path / "results.csv")
    assert len(rows) == 20 * 3 and rows[0]["task"] == "cifar" and rows[-1]["task"] == "mytask"
    assert float(rows[0]["acc_max_test"]) == pytest.approx(accs[("cifar", 0)]["max_test"], abs=1e-4)
    md = (tmp_path / "results.md").read_text()
    assert "seeds: 0, 1, 2;" in md and "max over test epochs: the official repos' selection, not a clean estimate" in md

    def mean(task: str, rule: str) -> float:
        return statistics.fmean(accs[(task, s)][rule] for s in (0, 1, 2))

    def sd(task: str, rule: str) -> float:
        return statistics.stdev(accs[(task, s)][rule] for s in (0, 1, 2))

    head = md_row(md, "")
    assert head[1:4] == ["ours: last epoch", "ours: best val", "ours: max test †"]
    cells = md_row(md, "natural")  # first per-task row: cifar
    assert cells[1] == "cifar"
    assert cells[2:5] == [f"{mean('cifar', r):.2f} ± {sd('cifar', r):.2f}" for r in ("last", "best_val", "max_test")]
    assert cells[-2] == "`data-cifar`"
    assert md_row(md, "custom")[1:3] == ["mytask", f"{mean('mytask', 'last'):.2f} ± {sd('mytask', 'last'):.2f}"]
    assert md_row(md, "natural", 1, "dtd")[-2] == "`mixed: data-dtd, other-lists`"
    assert "Warning: seeds of dtd ran on different data" in md
    ref19 = summarize(reference("RepAdapter").per_task)["mean19"]
    for i, rule in enumerate(("last", "best_val", "max_test")):
        means = {t: mean(t, rule) for t in tasks}
        group = {
            g: statistics.fmean(means[t] for t in VTAB_TASKS if VTAB_TASKS[t].group == g)
            for g in ("natural", "specialized", "structured")
        }
        mean19 = statistics.fmean(means[t] for t in VTAB_TASKS)  # mytask excluded
        assert md_row(md, "Natural mean")[1 + i] == f"{group['natural']:.2f}"
        assert md_row(md, "Group mean (mean of 3 group means)")[1 + i] == f"{statistics.fmean(group.values()):.2f}"
        assert md_row(md, "19-task mean")[1 + i] == f"{mean19:.2f}"
        if rule == "max_test":  # the paper's rule: the difference is taken against this column
            assert md_row(md, "19-task mean")[4:] == [f"{ref19:.2f}", f"{mean19 - ref19:+.2f}"]
    assert "RepAdapter (paper; max over test epochs)" in head
    # Drop one natural task: natural / group mean / 19-task mean become n/a with counts.
    for s in (0, 1, 2):
        (tmp_path / "runs" / "svhn" / f"seed{s}" / "result.json").unlink()
    report.write_tables(tmp_path)
    md = (tmp_path / "results.md").read_text()
    spe = statistics.fmean(mean(t, "last") for t in VTAB_TASKS if VTAB_TASKS[t].group == "specialized")
    assert md_row(md, "Natural mean")[1] == "n/a (6/7 tasks)"
    assert md_row(md, "Specialized mean")[1] == f"{spe:.2f}"
    assert md_row(md, "Group mean (mean of 3 group means)")[1] == "n/a (2/3 groups complete)"
    assert md_row(md, "19-task mean")[1] == "n/a (18/19 tasks)"


class SimulatedKill(BaseException):
    """Stands for the process being killed between two tasks."""


def test_run_table_and_resume_after_crash(
    fake_root: Path, recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run in-process on 3 tasks, 'kill' it after the first, re-run: the finished task is not
    recomputed, the rest are, and the tables hold correct numbers for all three."""
    out = tmp_path / "out"
    argv = [
        "-c",
        str(recipe),
        "--data.root",
        str(fake_root),
        "--tasks",
        "dtd,eurosat,mytask",
        "--out",
        str(out),
        "--launcher",
        "inprocess",
    ]
    calls: list[str] = []
    real_run_task = run.run_task

    def counting_run_task(run: plan.TaskRun, resume: bool = True) -> dict:
        if len(calls) == 1 and os.environ.get("_KILL_AFTER_FIRST") == "1":
            raise SimulatedKill
        calls.append(run.task)
        return real_run_task(run, resume)

    monkeypatch.setattr(launch, "run_task", counting_run_task)
    monkeypatch.setenv("_KILL_AFTER_FIRST", "1")
    with pytest.raises(SimulatedKill):
        vtab.vtab_main(argv)
    assert calls == ["dtd"]
    rows = read_csv(out / "results.csv")
    assert [r["task"] for r in rows] == ["dtd"]  # written before the crash
    first = (out / "runs/dtd/seed0/result.json").read_text()
    mtime = (out / "runs/dtd/seed0/result.json").stat().st_mtime_ns

    monkeypatch.setenv("_KILL_AFTER_FIRST", "0")
    assert vtab.vtab_main(argv) == 0
    assert calls == ["dtd", "eurosat", "mytask"]  # dtd not recomputed
    assert (out / "runs/dtd/seed0/result.json").stat().st_mtime_ns == mtime
    assert (out / "runs/dtd/seed0/result.json").read_text() == first
    # A third run computes nothing; it only sends the table to W&B (offline mode in tests).
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert vtab.vtab_main([*argv, "--wandb", "--wandb-project", "t"]) == 0 and len(calls) == 3
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))

    rows = {r["task"]: r for r in read_csv(out / "results.csv")}
    assert list(rows) == ["dtd", "eurosat", "mytask"]
    for task, r in rows.items():
        info = VTAB_TASKS.get(task)
        k = info.num_classes if info else FAKE_TASKS[task]  # custom: largest label + 1
        assert r["group"] == (info.group if info else "custom")
        assert int(r["test_images"]) == N_TEST
        correct = float(r["acc"]) * N_TEST / 100
        assert correct == pytest.approx(round(correct), abs=1e-3)  # a whole number of images
        assert int(r["trainable_params"]) == 192 * k + k and int(r["trainable_params_no_head"]) == 0
        assert float(r["gflops"]) == pytest.approx(vit_flops(_tiny_shape(), k) / 1e9, rel=1e-5)
        assert float(r["gflops_ratio"]) == pytest.approx(1.0)
    md = (out / "results.md").read_text()
    dtd = rows["dtd"]
    assert md_row(md, "natural")[1:6] == ["dtd", f"{float(dtd['acc']):.2f}", "n/a", f"{float(dtd['acc']):.2f}", "1"]
    assert md_row(md, "custom")[1] == "mytask"
    assert md_row(md, "Natural mean")[1] == "n/a (1/7 tasks)"
    # The paper's Linear row is printed beside ours (its rule is not stated: our last epoch), with the difference.
    cells = md_row(md, "natural")
    assert cells[6] == "63.2" and cells[7] == f"{float(rows['dtd']['acc']) - 63.2:+.2f}"


def _tiny_shape():
    from petl_lightning.backbone import FrozenViT

    return FrozenViT("vit_tiny_patch16_224", pretrained=False, img_size=32, model_kwargs={"depth": 2}).shape()


def test_failed_task_is_reported_then_finished(fake_root: Path, recipe: Path, tmp_path: Path) -> None:
    """A task with a bad label fails with a clear message, the others finish, the exit status is 1;
    once the data is fixed, re-running runs only that task. Different settings in the same --out
    are refused."""
    root = tmp_path / "root"
    write_task(root, "dtd", 3)
    write_task(root, "kitti", 3)
    good = (root / "kitti/test.txt").read_text()
    (root / "kitti/test.txt").write_text(good.replace(" 2\n", " 9\n", 1))  # kitti has 4 classes
    out = tmp_path / "out"
    argv = [
        "-c",
        str(recipe),
        "--data.root",
        str(root),
        "--tasks",
        "kitti,dtd",
        "--out",
        str(out),
        "--launcher",
        "inprocess",
    ]
    assert vtab.vtab_main(argv) == 1
    md = (out / "results.md").read_text()
    assert re.search(r"failed: kitti seed 0: error: .*label 9 is outside \[0, 4\)", md)
    assert [r["task"] for r in read_csv(out / "results.csv")] == ["dtd"]
    dtd_mtime = (out / "runs/dtd/seed0/result.json").stat().st_mtime_ns
    (root / "kitti/test.txt").write_text(good)
    assert vtab.vtab_main(argv) == 0
    assert [r["task"] for r in read_csv(out / "results.csv")] == ["dtd", "kitti"]
    assert (out / "runs/dtd/seed0/result.json").stat().st_mtime_ns == dtd_mtime
    assert "failed: " not in (out / "results.md").read_text()
    # Other settings into the same folder: refused before anything runs.
    assert vtab.vtab_main([*argv, "--model.init_args.lr", "0.1"]) == 2


@pytest.mark.parametrize("method", ["RepAdapter"])  # LinearProbe: test_killed_launcher_restarts_where_it_stopped
def test_interrupted_fit_resumes_from_checkpoint_exactly(
    fake_root: Path,
    recipe: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    method: str,
) -> None:
    """A pair killed at the start of epoch 2 of 2 resumes from its epoch-1 ``last.ckpt`` (every
    method writes one, whatever the protocol); the result equals an uninterrupted run (optimiser,
    scheduler, RNG and data order all restored)."""
    from petl_lightning.tasks.classification import PETLModule

    path = {
        "LinearProbe": "petl_lightning.methods.baselines.LinearProbe",
        "RepAdapter": "petl_lightning.methods.repadapter.RepAdapter",
    }[method]
    recipe.write_text(RECIPE.replace("petl_lightning.methods.baselines.LinearProbe", path))
    extra = ["--model.init_args.cache_features", "false"] if method == "LinearProbe" else []

    def pair(run_dir: Path) -> plan.TaskRun:
        args = [
            "--config",
            str(recipe),
            "--data.init_args.root",
            str(fake_root),
            "--data.init_args.task",
            "eurosat",
            "--trainer.default_root_dir",
            str(run_dir),
            "--trainer.max_epochs",
            "2",
            "--model.init_args.warmup_epochs",
            "1",
            *extra,
        ]
        return plan.TaskRun("eurosat", 0, run_dir, args, "fp")

    straight = run.run_task(pair(tmp_path / "a"))

    def killed(self: PETLModule) -> None:
        if self.current_epoch == 1:
            raise SimulatedKill

    with monkeypatch.context() as m:
        m.setattr(PETLModule, "on_train_epoch_start", killed, raising=False)
        with pytest.raises(SimulatedKill):
            run.run_task(pair(tmp_path / "b"))
    assert not (tmp_path / "b" / "result.json").exists()
    assert pair(tmp_path / "b").last_checkpoint is not None
    capsys.readouterr()
    resumed = run.run_task(pair(tmp_path / "b"))
    assert "resuming from" in capsys.readouterr().err
    assert resumed["epochs"] == straight["epochs"] == 2
    assert resumed["test_loss"] == pytest.approx(straight["test_loss"], abs=1e-6)
    assert resumed["acc"] == straight["acc"]


@pytest.mark.slow
def test_real_assets_end_to_end(tmp_path: Path, dtd10_root: Path, vits_weights: Path) -> None:
    """The real VTAB-1K-layout assets (dtd10, cifar10: custom tasks) with the real ViT-S weights,
    through the ``petl-lightning vtab`` entry point on a tiny budget: the table holds both tasks,
    the reported accuracy is the checkpoint's true accuracy, and the probe beats chance."""
    import torch

    from petl_lightning.__main__ import main
    from petl_lightning.data.vtab import VTAB1kDataModule
    from petl_lightning.methods.baselines import LinearProbe

    root, weights = dtd10_root, vits_weights
    if not (root / "cifar10" / "test.txt").is_file():
        pytest.skip(f"cifar10 assets not found under {root}")
    recipe = tmp_path / "probe.yaml"
    recipe.write_text(
        RECIPE.replace("vit_tiny_patch16_224", "vit_small_patch14_dinov2")
        .replace("model_kwargs: {depth: 2}", f"checkpoint_path: {weights}")
        .replace("pretrained: false", "pretrained: true")
        .replace("lr: 0.05", "lr: 0.01")
        .replace("img_size: 32", "img_size: 56")
        .replace("batch_size: 4", "batch_size: 32")
    )
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "vtab",
                "-c",
                str(recipe),
                "--data.root",
                str(root),
                "--tasks",
                "dtd10,cifar10",
                "--out",
                str(out),
                "--launcher",
                "inprocess",
                "--trainer.max_epochs",
                "2",
                "--trainer.limit_train_batches",
                "3",
                "--trainer.limit_test_batches",
                "2",
                "--data.init_args.eval_batch_size",
                "50",
            ]
        )
    assert exit_info.value.code == 0
    rows = {r["task"]: r for r in read_csv(out / "results.csv")}
    assert list(rows) == ["cifar10", "dtd10"]
    for r in rows.values():
        assert r["group"] == "custom" and int(r["test_images"]) == 100
        assert int(r["trainable_params"]) == 384 * 10 + 10 and r["epochs"] == "2"
    assert statistics.fmean(float(r["acc"]) for r in rows.values()) > 20.0  # chance: 10%
    md = (out / "results.md").read_text()
    assert "VTAB-1K tasks: 0/19; custom tasks: 2" in md
    assert md_row(md, "19-task mean")[1] == "n/a (0/19 tasks)"
    # Independent check: the saved (head-only) checkpoint scores the reported accuracy on the same images.
    ckpt = out / "runs" / "dtd10" / "seed0" / "checkpoints" / "last.ckpt"
    model = LinearProbe.load_from_checkpoint(ckpt, map_location="cpu").eval()
    dm = VTAB1kDataModule(str(root), "dtd10", img_size=56, eval_batch_size=50, num_workers=0)
    correct = 0
    with torch.no_grad():
        for i, (x, y) in enumerate(dm.test_dataloader()):
            if i == 2:
                break
            correct += int((model(x).argmax(-1) == y).sum())
    assert float(rows["dtd10"]["acc"]) == pytest.approx(correct, abs=1e-3)  # 100 images: % == count


# -- launchers on the digits task: local, Ray, submitit, and a killed launcher restarted ------------
DIGITS_TASKS = ("digits", "digits_b")  # the digits twice (a custom task each): 2 tasks x 2 seeds
COMPARED = ("acc", "acc_best_val", "acc_max_test", "test_loss", "best_val_epoch", "max_test_epoch", "data_fingerprint")


@pytest.fixture(scope="module")
def digits_plan(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """``petl-lightning vtab`` arguments (without --out): a 2-block ViT-Ti probe (features not cached, so
    every epoch runs the backbone) on the digits at 32 px, 2 epochs, protocol train_val, tested each epoch."""
    import shutil

    from petl_lightning.demo import build_digits_task

    root = tmp_path_factory.mktemp("digits")
    shutil.copytree(build_digits_task(root), root / "digits_b")
    recipe = root / "probe.yaml"
    recipe.write_text(RECIPE.replace("batch_size: 4", "batch_size: 100"))
    return [
        "vtab",
        *("-c", str(recipe), "--data.root", str(root), "--tasks", *DIGITS_TASKS, "--seeds", "0", "1"),
        *("--data.init_args.protocol", "train_val", "--trainer.max_epochs", "2", "--test-every", "1"),
        *("--model.init_args.cache_features", "false", "--model.init_args.lr", "0.01"),
    ]


def vtab_cli(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(BIN / "petl-lightning"), *args], env=ENV, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def table(out: Path) -> dict[tuple[str, str], dict[str, str]]:
    return {(r["task"], r["seed"]): {k: r[k] for k in COMPARED} for r in read_csv(out / "results.csv")}


def assert_same_table(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, row in want.items():
        for k, v in row.items():
            if k in ("data_fingerprint", "best_val_epoch", "max_test_epoch"):
                assert got[key][k] == v, (key, k, got[key][k], v)
            else:
                assert abs(float(got[key][k]) - float(v)) <= 1e-6, (key, k, got[key][k], v)


@pytest.fixture(scope="module")
def digits_local(digits_plan: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The table of an uninterrupted ``--launcher local`` run, two worker processes side by side (--jobs 2)."""
    out = tmp_path_factory.mktemp("local")
    vtab_cli([*digits_plan, "--out", str(out), "--jobs", "2"])
    for task in DIGITS_TASKS:
        for s in (0, 1):
            assert (out / f"runs/{task}/seed{s}/worker.log").is_file()
            spec = json.loads((out / f"runs/{task}/seed{s}/spec.json").read_text())
            assert spec["cli_args"][spec["cli_args"].index("--seed_everything") + 1] == str(s)
            tested = json.loads((out / f"runs/{task}/seed{s}/result.json").read_text())["tested_epochs"]
            assert [h["epoch"] for h in tested] == [0, 1] and all(h["val"] is not None for h in tested)
    rows = read_csv(out / "results.csv")
    accs = [float(r["acc"]) for r in rows if r["task"] == "digits"]
    cell = md_row((out / "results.md").read_text(), "custom", 1, "digits")
    assert cell[2] == f"{statistics.fmean(accs):.2f} ± {statistics.stdev(accs):.2f}" and cell[5] == "2"
    got = table(out)
    assert all(r["acc_best_val"] and r["acc_max_test"] for r in got.values())  # val200 and per-epoch tests
    assert any(float(r["acc_max_test"]) >= float(r["acc"]) for r in got.values())
    return got


@pytest.mark.parametrize("launcher", ["ray", "submitit"])
def test_remote_launchers_write_the_local_results(
    digits_plan: list[str], digits_local: dict, tmp_path: Path, launcher: str
) -> None:
    """``--launcher ray`` (a local Ray instance of 2 CPUs, shut down at the end) and ``--launcher submitit``
    (submitit's local executor: no SLURM) write the results of ``--launcher local``."""
    pytest.importorskip(launcher)
    extra = {"ray": ["--ray-num-cpus", "2"], "submitit": ["--slurm-cluster", "local"]}[launcher]
    vtab_cli([*digits_plan, "--out", str(tmp_path), "--launcher", launcher, *extra])
    assert_same_table(table(tmp_path), digits_local)
    if launcher == "submitit":
        assert list((tmp_path / "submitit").glob("*/*_log.out")), "no per-job logs"


def test_killed_launcher_restarts_where_it_stopped(digits_plan: list[str], digits_local: dict, tmp_path: Path) -> None:
    """Kill the launcher and its worker (SIGKILL to the process group) while the second pair trains, after
    its first epoch's ``last.ckpt``; then start the same command twice at once on the same --out. The
    finished pair is not run again, the interrupted one resumes from its checkpoint (its claim, held by a
    dead process, is taken over), the two launchers share the other pairs, every pair finishes once, and
    the table equals the uninterrupted run's."""
    import signal

    runs = tmp_path / "runs"
    first, second = runs / "digits" / "seed0", runs / "digits" / "seed1"
    cmd = [str(BIN / "petl-lightning"), *digits_plan, "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        while not (second / "checkpoints" / "last.ckpt").is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (first / plan.RESULT_FILE).is_file() and not (second / plan.RESULT_FILE).exists(), "not killed mid-pair"
    assert (second / claims.CLAIM_FILE).is_file()  # left behind by the killed launcher
    done_at = (first / plan.RESULT_FILE).stat().st_mtime_ns
    procs = [subprocess.Popen(cmd, env=ENV, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert (first / plan.RESULT_FILE).stat().st_mtime_ns == done_at
    for task in DIGITS_TASKS:
        for seed in (0, 1):
            pair = runs / task / f"seed{seed}"
            log = (pair / launch.LOG_FILE).read_text()
            assert log.count("\n=== ") == (2 if pair == second else 1), f"{task} seed {seed}"
            assert ("resuming from" in log) == (pair == second)
            assert not (pair / claims.CLAIM_FILE).exists()
    ran = [len(re.findall(r": acc ", e)) for e in errs]
    assert sum(ran) == 3 and min(ran) >= 1, errs  # the 3 unfinished pairs, shared, none twice
    assert_same_table(table(tmp_path), digits_local)
