"""Faults a new user meets, through the console scripts in new processes: each is one line on stderr,
exit status 2, no traceback, and leaves only the files the command is for (or says what it does
instead, in one line, when the run can go on)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from cli_helpers import (
    ROOT,
    assert_one_line,
    files_under,
    metric,
    run,
    tiny_args,
    tiny_fit,
    tiny_task,
)

pytestmark = pytest.mark.slow  # console-script processes: in make test, not in make test-fast


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vtab")
    tiny_task(root)
    return root


@pytest.fixture(scope="module")
def fitted(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LinearProbe fitted one epoch on a random ViT-Ti (pretrained=false): its run folder."""
    out = tmp_path_factory.mktemp("fitted") / "run"
    proc = tiny_fit(tiny_root, out, "--seed_everything", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoints" / "last.ckpt").is_file()
    return out


def assert_fault(proc: subprocess.CompletedProcess, pattern: str, out: Path, before: list[Path] | None = None) -> None:
    """One line matching ``pattern``, exit 2, and the files under ``out`` as they were (``before``)."""
    assert_one_line(proc, pattern)
    assert files_under(out) == (before or []), files_under(out)


# -- 2: an endless run has no schedule length -----------------------------------------------------
@pytest.mark.parametrize("recipe", ["linear_probe", "dyt"])
def test_endless_run_is_refused(tiny_root: Path, tmp_path: Path, recipe: str) -> None:
    out = tmp_path / "run"
    proc = tiny_fit(tiny_root, out, "--trainer.max_epochs", "-1", recipe=recipe)
    assert_fault(proc, r"max_epochs -1 with no --trainer\.max_steps: .*set --trainer\.max_steps N", out)


def test_endless_epochs_with_max_steps_schedule_over_the_steps() -> None:
    """max_epochs=-1 with max_steps: the cosine runs over max_steps (it used to sit at the floor
    from the second epoch on)."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from petl_lightning.methods.baselines import LinearProbe

    model = LinearProbe(
        num_classes=2, model_name="vit_tiny_patch16_224", pretrained=False, img_size=32, model_kwargs={"depth": 1},
        cache_features=False, lr=1.0, warmup_epochs=0, min_lr=0.0,
    )  # fmt: skip
    lrs: list[float] = []

    class Record(L.Callback):
        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    data = TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 2, (8,)))
    trainer = L.Trainer(
        max_epochs=-1, max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()],
    )  # fmt: skip
    trainer.fit(model, DataLoader(data, batch_size=4))  # 2 steps an epoch: 4 epochs of the cosine
    expected = [0.5 * (1 + torch.cos(torch.tensor(torch.pi * e / 4))).item() for e in range(4)]
    assert lrs == pytest.approx(expected, abs=1e-6)


# -- 3 and 4: a random-init backbone is rebuilt exactly; contradictory weights options ------------
def test_random_init_checkpoint_rebuilds_the_same_backbone(fitted: Path, tiny_root: Path) -> None:
    from petl_lightning.export import load_trained

    ckpt = fitted / "checkpoints" / "last.ckpt"
    torch.manual_seed(1)
    first = load_trained(ckpt).state_dict()
    torch.manual_seed(2)
    second = load_trained(ckpt).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    args = tiny_args(tiny_root, fitted)
    accs = []
    for seed in ("0", "7"):
        proc = run("test", *args, "--ckpt_path", "last", "--trainer.logger", "false", "--seed_everything", seed)
        assert proc.returncode == 0, proc.stderr[-3000:]
        accs.append(metric(proc.stdout, "test/acc"))
    assert accs[0] == accs[1]


def test_random_init_with_a_weights_file_is_refused(tiny_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = tiny_fit(tiny_root, out, "--model.init_args.checkpoint_path", str(tmp_path / "missing.npz"))
    assert_fault(proc, r"pretrained=false \(random weights\) contradicts checkpoint_path=", out)


# -- 5 and 17: evaluating needs a checkpoint; resuming with none yet says so ----------------------
@pytest.mark.parametrize("sub", ["test", "predict"])
def test_evaluation_without_a_checkpoint_is_refused(tiny_root: Path, tmp_path: Path, sub: str) -> None:
    out = tmp_path / "run"
    proc = run(sub, *tiny_args(tiny_root, out))
    assert_fault(proc, rf"{sub} without --ckpt_path would evaluate an untrained model: pass --ckpt_path last", out)
    on_purpose = run(sub, *tiny_args(tiny_root, out), "--ckpt_path", "untrained", "--trainer.logger", "false")
    assert on_purpose.returncode == 0, on_purpose.stderr[-3000:]


def test_resume_with_no_checkpoint_yet_starts_fresh_in_one_line(tiny_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = tiny_fit(tiny_root, out, "--ckpt_path", "last", "--trainer.enable_progress_bar", "false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"--ckpt_path last: no checkpoint in {out / 'checkpoints'} yet; training starts fresh." in proc.stderr
    assert "HINT" not in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "checkpoints" / "last.ckpt").is_file()


# -- 11 and 14: export's output path is checked first; damaged checkpoints are named --------------
@pytest.mark.parametrize(
    "out, exits, pattern",
    [
        ("/proc/petl_model.onnx", False, r"Cannot write under '/proc': '/proc' is not writable"),
        ("{file}/model.onnx", False, r"Cannot create the folder .*: .* is not a folder; pass another --out"),
        ("{file}", True, r"--out .* is an existing file; name a folder"),
    ],
)
def test_export_checks_its_output_before_any_work(
    fitted: Path, tmp_path: Path, out: str, exits: bool, pattern: str
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    ckpt = fitted / "checkpoints" / "last.ckpt"
    proc = run("export", "--ckpt_path", str(ckpt), "--out", out.format(file=blocker), *(["--exits"] if exits else []))
    assert_fault(proc, pattern, tmp_path, [blocker])
    assert blocker.read_text() == "keep me"


@pytest.mark.parametrize(
    "damage, pattern",
    [
        (lambda b: b[: len(b) // 2], r"is damaged \(truncated or corrupt"),
        (lambda b: b"", r"is empty \(0 bytes\)"),
        (lambda b: b"epoch=3 loss=0.1\n", r"is not a Lightning checkpoint"),
    ],
)
def test_damaged_checkpoint_is_named(fitted: Path, tiny_root: Path, tmp_path: Path, damage, pattern: str) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(damage((fitted / "checkpoints" / "last.ckpt").read_bytes()))
    out = tmp_path / "run"
    proc = run("test", *tiny_args(tiny_root, out), "--ckpt_path", str(bad))
    assert_fault(proc, pattern, out)
    exported = run("export", "--ckpt_path", str(bad), "--out", str(tmp_path / "m.safetensors"))
    assert_one_line(exported, pattern)
    assert "--model.init_args" not in exported.stderr  # a fit option is no hint for export
    assert not (tmp_path / "m.safetensors").exists()


# -- 12: folders, workers and rates -----------------------------------------------------------------
@pytest.mark.parametrize(
    "recipe, extra, pattern",
    [
        ("linear_probe", ("--trainer.default_root_dir", "/proc/petl_run"), r"Cannot write under '/proc/petl_run'"),
        ("linear_probe", ("--data.init_args.num_workers", "-1"), r"num_workers must be 0 .* or more, got -1"),
        ("linear_probe", ("--model.init_args.drop_path_rate", "1.5"), r"drop_path_rate must lie in \[0, 1\), got 1\.5"),
        ("repadapter", ("--model.init_args.adapter_dropout", "1.0"), r"adapter_dropout must lie in \[0, 1\), got 1\.0"),
        ("arc", ("--model.init_args.adapter_dropout", "-0.1"), r"adapter_dropout must lie in \[0, 1\), got -0\.1"),
        ("dyt", ("--model.init_args.adapter_dropout", "2"), r"adapter_dropout must lie in \[0, 1\), got 2"),
        ("dyn_adapter", ("--model.init_args.exits.dropout", "1.0"), r"exits\.dropout must lie in \[0, 1\), got 1\.0"),
        (  # 7: negative exit loss weights (the training loss reached -31)
            "dyn_adapter",
            ("--model.init_args.loss.start", "-1", "--model.init_args.loss.final_weight", "-1"),
            r"Exit loss weights must be non-negative .*: loss\.start=-1\.0, loss\.final_weight=-1\.0",
        ),
    ],
)
def test_bad_folders_workers_and_rates(
    tiny_root: Path, tmp_path: Path, recipe: str, extra: tuple, pattern: str
) -> None:
    out = tmp_path / "run"
    proc = tiny_fit(tiny_root, out, *extra, recipe=recipe)
    assert_fault(proc, pattern, out)


# -- 15: a YAML syntax error names its file and line -------------------------------------------------
def test_yaml_syntax_error_names_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "mine.yaml"
    broken.write_text("model:\n  init_args:\n    lr: 0.1\n   weight_decay: [0.1\n")
    proc = run("fit", "-c", "recipes/repadapter.yaml", "-c", str(broken), "--print_config", cwd=ROOT)
    assert_one_line(proc, rf"Config file '{broken}' is not valid YAML: line 4, column \d+: .*; fix the file\.")


# -- 9 and 10: the VTAB runner's devices and tables ------------------------------------------------
@pytest.fixture(scope="module")
def dtd_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root whose one task folder is named as a VTAB-1K task (``dtd``)."""
    root = tmp_path_factory.mktemp("vtab_dtd")
    tiny_task(root).rename(root / "dtd")
    return root


def test_runner_gpus_that_do_not_exist(dtd_root: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has devices 0-7")
    out = tmp_path / "out"
    proc = run("vtab", "-c", "recipes/linear_probe.yaml", "--data.root", str(dtd_root), "--tasks", "dtd",
               "--gpus", "0,7", "--out", str(out))  # fmt: skip
    assert_fault(proc, r"--gpus 0,7: this machine has .*device\(s\) .*7.* do not exist; drop --gpus", out)
    assert not out.exists()


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_runner_table_only_without_results(dtd_root: Path, tmp_path: Path, make: str) -> None:
    out = tmp_path / "out"
    if make == "empty":
        out.mkdir()
    proc = run("vtab", "-c", "recipes/linear_probe.yaml", "--data.root", str(dtd_root), "--tasks", "dtd",
               "--table-only", "--out", str(out))  # fmt: skip
    assert_fault(proc, r"--table-only: no finished pair under .*; check --out", tmp_path, [])
    assert out.exists() == (make == "empty")


# -- 6: Dyn-Adapter trained with a plain Trainer applies its budget, or says why not -----------------
PLAIN_TRAINER = """
import json, sys, warnings
import lightning as L
from petl_lightning.data.vtab import VTAB1kDataModule
from petl_lightning.methods.dyn_adapter import DynAdapter

dm = VTAB1kDataModule(sys.argv[1], task="tiny", img_size=32, batch_size=4, num_workers=0, protocol=sys.argv[2])
model = DynAdapter(num_classes=2, model_name="vit_tiny_patch16_224", pretrained=False, img_size=32,
                   model_kwargs={"depth": 4}, exits={"blocks": [1, 2]})
L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
          enable_model_summary=False).fit(model, dm)
print(json.dumps({"thresholds": model.thresholds.tolist(), "calibration": model.calibration_result}))
"""


@pytest.mark.parametrize("protocol", ["train_val", "trainval_test"])
def test_dyn_adapter_with_a_plain_trainer(tiny_root: Path, protocol: str) -> None:
    import json
    import math
    import sys

    from cli_helpers import ENV

    env = {k: v for k, v in ENV.items() if k != "PYTHONWARNINGS"}  # warnings shown, as a user sees them
    proc = subprocess.run([sys.executable, "-c", PLAIN_TRAINER, str(tiny_root), protocol], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if protocol == "train_val":  # calibrated on val200 for the default budget
        assert result["calibration"]["budget"] == 0.5 and result["calibration"]["flops_ratio"] <= 0.5
        assert not all(t == math.inf for t in result["thresholds"])  # calibrated: images leave early
    else:  # no held-out split: thresholds stay infinite, and one warning says what to do
        assert result["calibration"] is None and result["thresholds"] == [math.inf, math.inf]
        warned = [ln for ln in proc.stderr.splitlines() if "no held-out split to calibrate" in ln]
        assert len(warned) == 1 and "protocol='train_val', or call model.calibrate(loader)" in warned[0]


# -- 1: a two-process CPU fit with the default progress bar finishes ---------------------------------
def test_two_process_cpu_fit_with_the_progress_bar_finishes(tiny_root: Path, tmp_path: Path) -> None:
    """It hung at the first epoch end without validation: the progress bar computed the epoch's
    metrics (collectives) on rank 0 only, crossing the other rank's checkpoint barrier; the same
    for Dyn-Adapter's curve, whose log folder is a broadcast. The trained model then tests the same
    in two processes as in one."""
    out = tmp_path / "run"
    exits = (
        "--model.init_args.exits",
        "{blocks: [1, 2], hidden: [0, 0]}",
        "--model.init_args.model_kwargs",
        "{depth: 3}",
    )
    ddp = ("--trainer.devices", "2", "--trainer.accelerator", "cpu")
    for recipe, extra in (("repadapter", ()), ("dyn_adapter", exits)):
        proc = tiny_fit(tiny_root, out / recipe, *ddp, *extra, recipe=recipe, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (out / recipe / "checkpoints" / "last.ckpt").is_file()
    args = [*tiny_args(tiny_root, out / "repadapter", "repadapter"), "--ckpt_path", "last", "--trainer.logger", "false"]
    accs = {}
    for devices in ("1", "2"):
        proc = run("test", *args, "--trainer.devices", devices, "--trainer.accelerator", "cpu", timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        accs[devices] = metric(proc.stdout, "test/acc")
    assert accs["1"] == accs["2"]
