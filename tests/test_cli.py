"""The command line, end to end through the installed console scripts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}


def run(*args: str, script: str = "petl-lightning", timeout: int = 600) -> subprocess.CompletedProcess:
    exe = [str(BIN / script)] if script != "python" else [sys.executable, "-m", "petl_lightning"]
    return subprocess.run([*exe, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def metric(output: str, name: str) -> float:
    found = re.search(rf"{re.escape(name)}\W+([0-9.]+)", output)
    assert found, f"{name} not in output:\n{output[-3000:]}"
    return float(found.group(1))


def assert_user_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert re.search(pattern, proc.stderr), proc.stderr[-3000:]


def test_print_config_shows_the_recipe() -> None:
    proc = run("fit", "-c", "recipes/linear_probe.yaml", "--print_config", script="python")
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = yaml.safe_load(proc.stdout)
    assert config["model"]["class_path"] == "petl_lightning.methods.baselines.LinearProbe"
    assert config["model"]["init_args"]["lr"] == 0.01
    assert config["data"]["init_args"]["task"] == "cifar"


def test_missing_data_root_fails_cleanly_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run(
        "fit",
        "-c",
        "recipes/linear_probe.yaml",
        "--data.init_args.root",
        str(tmp_path / "nowhere"),
        "--model.init_args.pretrained",
        "false",
        "--trainer.default_root_dir",
        str(out),
    )
    assert_user_error(proc, r"error: VTAB-1K data root .* does not exist")
    assert not out.exists()


def test_unknown_model_name_fails_cleanly(dtd10_root: Path) -> None:
    proc = run(
        "fit",
        "-c",
        "recipes/linear_probe.yaml",
        "--data.init_args.root",
        str(dtd10_root),
        "--data.init_args.task",
        "dtd10",
        "--model.init_args.model_name",
        "vit_smal_patch16_224",
        script="lightning",
    )
    assert_user_error(proc, r"Unknown timm model name 'vit_smal_patch16_224'.*vit_small_patch16_224")


def test_offline_without_weights_says_how_to_pass_a_file(dtd10_root: Path, tmp_path: Path) -> None:
    proc = run(
        "fit",
        "-c",
        "recipes/linear_probe.yaml",
        "--data.init_args.root",
        str(dtd10_root),
        "--data.init_args.task",
        "dtd10",
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
    )
    assert_user_error(proc, r"not in the local Hugging Face cache.*--model.checkpoint_path")
    assert not (tmp_path / "run").exists()


def test_lightning_script_hands_other_commands_on() -> None:
    proc = run("studio", "list", script="lightning")
    assert proc.returncode != 0 and "not a petl_lightning command" in proc.stderr


def test_linear_probe_on_dtd10_through_the_lightning_script(
    dtd10_root: Path, vits_weights: Path, tmp_path: Path
) -> None:
    """The acceptance run: fit, then test and validate from the small adapter-only checkpoint."""
    out = tmp_path / "lp"
    common = [
        "--model.init_args.model_name",
        "vit_small_patch14_dinov2",
        "--model.init_args.checkpoint_path",
        str(vits_weights),
        "--model.init_args.img_size",
        "112",
        "--data.init_args.root",
        str(dtd10_root),
        "--data.init_args.task",
        "dtd10",
        "--data.init_args.img_size",
        "112",
        "--data.init_args.num_workers",
        "0",
        "--data.init_args.cache",
        "true",
        "--trainer.enable_progress_bar",
        "false",
    ]
    fit = run(
        "fit",
        "-c",
        "recipes/linear_probe.yaml",
        *common,
        "--trainer.max_epochs",
        "20",
        "--model.init_args.warmup_epochs",
        "1",
        "--trainer.default_root_dir",
        str(out),
        script="lightning",
    )
    assert fit.returncode == 0, fit.stderr[-4000:]
    ckpts = list(out.rglob("*.ckpt"))
    assert len(ckpts) == 1 and ckpts[0].stat().st_size < 1_000_000
    config = next(out.rglob("config.yaml"))
    test = run("test", "-c", str(config), "--ckpt_path", str(ckpts[0]), "--trainer.logger", "false", script="lightning")
    assert test.returncode == 0, test.stderr[-4000:]
    acc = metric(test.stdout, "test/acc")
    print(f"LinearProbe dtd10 test accuracy: {acc:.4f}, checkpoint {ckpts[0].stat().st_size} bytes")
    assert acc >= 0.70
    val = run("validate", "-c", str(config), "--ckpt_path", str(ckpts[0]), "--trainer.logger", "false")
    assert val.returncode == 0, val.stderr[-4000:]
    assert metric(val.stdout, "val/acc") == pytest.approx(acc, abs=1e-6)

    # A checkpoint that is not one, or does not fit, is refused before anything runs.
    bad = run("validate", "-c", str(config), "--ckpt_path", str(vits_weights), "--trainer.logger", "false")
    assert_user_error(bad, r"not a Lightning checkpoint|holds no 'state_dict'")
    missing = run("validate", "-c", str(config), "--ckpt_path", str(tmp_path / "none.ckpt"))
    assert_user_error(missing, r"Checkpoint not found")
    other = run(
        "validate",
        "-c",
        str(config),
        "--ckpt_path",
        str(ckpts[0]),
        "--model.init_args.num_classes",
        "12",
        "--data.init_args.num_classes",
        "12",
        "--trainer.logger",
        "false",
    )
    assert_user_error(other, r"num_classes 10 \(checkpoint\) vs 12 \(this run\)")


def test_model_follows_the_data_image_size(dtd10_root: Path) -> None:
    """A recipe that sets only ``data.img_size`` builds the backbone for it (it used to crash at fit
    start in Lightning's hparams merge: model img_size None vs data 64)."""
    from petl_lightning.cli import PETLCLI

    cli = PETLCLI(
        args=[
            "-c",
            str(ROOT / "recipes" / "dyt.yaml"),
            f"--data.init_args.root={dtd10_root}",
            "--data.init_args.task=dtd10",
            "--data.init_args.img_size=64",
            "--model.init_args.model_name=vit_tiny_patch16_224",
            "--model.init_args.pretrained=false",
        ],
        run=False,
    )
    assert cli.model.hparams.img_size == 64 == cli.datamodule.hparams.img_size
    assert cli.model.vit.shape().num_patches == (64 // 16) ** 2


def test_conflicting_image_sizes_fail_cleanly(dtd10_root: Path) -> None:
    proc = run(
        "fit",
        "-c",
        "recipes/linear_probe.yaml",
        "--data.init_args.root",
        str(dtd10_root),
        "--data.init_args.task",
        "dtd10",
        "--model.init_args.pretrained",
        "false",
        "--model.init_args.img_size",
        "32",
        "--data.init_args.img_size",
        "48",
    )
    assert_user_error(proc, r"--model.init_args.img_size=32 but --data.init_args.img_size=48")
