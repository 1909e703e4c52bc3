"""The command line, end to end through the installed console scripts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from cli_helpers import (
    ENV,
    ROOT,
    assert_one_line_and_nothing_written,
    assert_user_error,
    metric,
    run,
    tiny_fit,
    tiny_task,
)
from petl_lightning.__main__ import main

pytestmark = pytest.mark.slow  # console-script processes: in make test, not in make test-fast


# -- bad input: one line, exit status 2, no traceback, nothing written -------------------------------


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


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    proc = run("fit", "-c", "recipes/no_such.yaml", "--trainer.default_root_dir", str(tmp_path / "run"))
    assert_user_error(proc, r"error: Config file 'recipes/no_such.yaml' not found: check the path")
    assert not (tmp_path / "run").exists()


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


@pytest.mark.slow
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


@pytest.mark.parametrize(
    "extra, pattern",
    [
        (("--trainer.max_epochs", "-3"), r"max_epochs must be a positive number of epochs"),
        (("--data.init_args.batch_size", "0"), r"batch_size must be at least 1, got 0"),
        (("--data.init_args.img_size", "0"), r"img_size must be at least 1, got 0"),
        (("--data.init_args.img_size", "40"), r"img_size 40 is not a multiple of .* patch size 16 .*; use 32 or 48"),
        (("--trainer.accelerator", "gpu"), r"error: .*(GPU|gpu|CUDA|cuda).*\(fix the --trainer\.\* arguments\)"),
        (("--model.init_args.lrr", "0.1"), r"LinearProbe has no argument 'lrr' .*did you mean model\.init_args\.lr\?"),
        (("--trainer.max_epocks", "2"), r"Trainer has no argument 'max_epocks' .*did you mean trainer\.max_epochs\?"),
    ],
)
def test_bad_arguments_are_one_line_and_write_nothing(tmp_path: Path, extra: tuple[str, ...], pattern: str) -> None:
    root = tmp_path / "vtab"
    tiny_task(root)
    out = tmp_path / "run"
    assert_one_line_and_nothing_written(tiny_fit(root, out, *extra), pattern, out)


def test_old_recipe_keys_name_the_new_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = tmp_path / "old.yaml"
    old.write_text(
        (ROOT / "recipes" / "dyn_adapter.yaml")
        .read_text()
        .replace("    exits:", "    exit_blocks: [3, 6, 9]\n    exits:")
    )
    proc = run("fit", "-c", str(old), "--print_config")  # through the console script once; the rest in-process
    assert_user_error(proc, r"model\.init_args\.exit_blocks is now model\.init_args\.exits\.blocks")
    old_callback = tmp_path / "old_callbacks.yaml"
    old_callback.write_text("trainer:\n  callbacks:\n    - class_path: petl_lightning.callbacks.ExitCalibration\n")
    for args, message in (
        (
            ["-c", f"{ROOT}/recipes/repadapter.yaml", "--model.init_args.placement", "repblock"],
            r"placement: 'repblock' is now 'attn_mlp'",
        ),
        # DyT's token-skipping options are one group, shared with Dyn-Adapter's dyt base
        (
            ["-c", f"{ROOT}/recipes/dyt.yaml", "--model.init_args.target_rate", "0.7"],
            r"model\.init_args\.target_rate is now model\.init_args\.skipping\.target_rate",
        ),
        (
            ["-c", f"{ROOT}/recipes/dyt.yaml", "--model.init_args.placement", "mlp"],
            r"model\.init_args\.placement is now model\.init_args\.skipping\.sites",
        ),
        (
            ["-c", f"{ROOT}/recipes/dyn_adapter_dyt.yaml", "--model.init_args.skipping.placement", "mlp"],
            r"skipping\.placement is now model\.init_args\.skipping\.sites",
        ),
        (
            ["-c", f"{ROOT}/recipes/dyn_adapter.yaml", "-c", str(old_callback)],
            r"ExitCalibration was removed: DynAdapter calibrates its exit thresholds itself",
        ),
    ):
        with pytest.raises(SystemExit) as stop:
            main(["fit", *args, "--print_config"])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and "Traceback" not in err and re.search(message, err), err


def test_output_folder_that_cannot_be_created(tmp_path: Path) -> None:
    root = tmp_path / "vtab"
    tiny_task(root)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = tiny_fit(root, blocker / "run")
    assert_user_error(proc, r"Cannot create the folder .*not a folder")
    assert blocker.read_text() == "not a folder"


def test_corrupt_image_found_mid_epoch_stops_with_file_and_line(tmp_path: Path) -> None:
    """An image that exists (so the up-front check passes) but cannot be decoded, met during the
    first epoch: one line naming the list line and the file; no checkpoint, no log version left."""
    root = tmp_path / "vtab"
    task = tiny_task(root)
    (task / "images" / "train800val2005.png").write_bytes(b"not a png")
    out = tmp_path / "run"
    proc = tiny_fit(root, out, "--data.init_args.num_workers", "1")
    assert_one_line_and_nothing_written(
        proc, r"train800val200\.txt:6: image .*train800val2005\.png cannot be read", out
    )


def test_recipes_that_would_not_learn_warn_at_fit_start(tmp_path: Path) -> None:
    root = tmp_path / "vtab"
    tiny_task(root)
    env = {k: v for k, v in ENV.items() if k != "PYTHONWARNINGS"}  # warnings shown, as a user sees them
    flags = ["--model.init_args.warmup_epochs=5", "--data.init_args.protocol=train_val"]
    proc = tiny_fit(root, tmp_path / "run", *flags, "--trainer.check_val_every_n_epoch=4", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warmup_epochs=5 but max_epochs=1: the learning rate never leaves its warm-up" in proc.stderr
    assert "check_val_every_n_epoch=4 but max_epochs=1: no validation epoch runs" in proc.stderr


def test_model_summary_flops_are_the_real_forward() -> None:
    """Lightning's summary counts FlopCounterMode FLOPs on the module's example input: 2 x the
    papers' multiply-adds of one image, LayerNorms excluded (it used to print 0)."""
    from lightning.pytorch.utilities.model_summary import ModelSummary

    from petl_lightning.flops import vit_flops
    from petl_lightning.layers.wrapper import adapter_layers
    from petl_lightning.methods.repadapter import RepAdapter

    model = RepAdapter(
        num_classes=3, model_name="vit_tiny_patch16_224", pretrained=False, img_size=32, model_kwargs={"depth": 2}
    )
    model.vit.set_fused_attn(False)
    n = model.vit.num_tokens
    extra = sum(a.flops(n) for a in adapter_layers(model.vit))
    assert ModelSummary(model).total_flops == 2 * vit_flops(model.vit.shape(), 3, extra=extra, norm=False)
