"""The user's lifecycle across processes, through the console scripts, from a clean folder:
fit -> Ctrl-C -> resume (exact) -> test from ``last`` -> predict (CSV) -> export -> plain timm.

Every step is a new ``petl-lightning`` process run in a fresh working directory, on a tiny ViT
whose weights come from a local ``.safetensors`` file (as a user's would) and on the digits task
written in the VTAB-1K layout. Each numbered problem of the lifecycle issue has a test here.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from cli_helpers import BIN, ENV, ROOT, fit_interrupted

pytestmark = pytest.mark.slow

RECIPES = ROOT / "recipes"
METHODS = ("linear_probe", "repadapter", "arc", "dyt", "dyn_adapter", "dyn_adapter_dyt")
EPOCHS = 3


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from petl_lightning.demo import build_digits_task

    root = tmp_path_factory.mktemp("vtab")
    build_digits_task(root)
    return root


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's local weights file: a 4-block ViT-Ti at 32 px with random (fixed) weights."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, depth=4)
    path = tmp_path_factory.mktemp("weights") / "vit_tiny_4.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return path


def cli(
    *args: str, cwd: Path, script: str = "petl-lightning", timeout: int = 600, check: bool = True
) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([str(BIN / script), *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def method_args(method: str, weights: Path, root: Path, run_dir: Path, epochs: int = EPOCHS) -> list[str]:
    """The method's recipe, shrunk to the tiny ViT and the digits task."""
    args = [
        "-c",
        str(RECIPES / f"{method}.yaml"),
        "--model.init_args.model_name",
        "vit_tiny_patch16_224",
        "--model.init_args.checkpoint_path",
        str(weights),
        "--model.init_args.model_kwargs",
        "{depth: 4}",
        "--model.init_args.warmup_epochs",
        "1",
        "--data.init_args.root",
        str(root),
        "--data.init_args.task",
        "digits",
        "--data.init_args.img_size",
        "32",
        "--data.init_args.batch_size",
        "50",
        "--data.init_args.eval_batch_size",
        "100",
        "--data.init_args.num_workers",
        "0",
        "--trainer.max_epochs",
        str(epochs),
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(run_dir),
    ]
    if method.startswith("dyn_adapter"):
        args += [
            "--model.init_args.exits.blocks",
            "[1, 2, 3]",
            "--trainer.check_val_every_n_epoch",
            "1",
            "--data.init_args.protocol",
            "train_val",
        ]
    if method == "linear_probe":
        args += ["--model.init_args.cache_features", "false"]
    if method == "dyt":  # the recipe is the paper's fixed threshold; this runs the default calibration
        args += ["--model.init_args.agreement", "0.99"]
    return args


def last_ckpt(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "last.ckpt"


def trainable_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def metric(output: str, name: str) -> float:
    found = re.search(rf"{re.escape(name)}\W+([0-9.]+)", output)
    assert found, f"{name} not in output:\n{output[-3000:]}"
    return float(found.group(1))


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory: pytest.TempPathFactory, digits_root: Path, tiny_weights: Path) -> Any:
    """Runs, per method and once per module: a straight fit, and an interrupted fit then resumed."""
    cache: dict[str, dict[str, Path]] = {}

    def get(method: str) -> dict[str, Path]:
        if method not in cache:
            base = tmp_path_factory.mktemp(method)
            straight, killed = base / "straight", base / "killed"
            cli("fit", *method_args(method, tiny_weights, digits_root, straight), cwd=base / "cwd_a")
            args = method_args(method, tiny_weights, digits_root, killed)
            step = fit_interrupted(args, killed, base / "cwd_b", env=ENV)
            cli("fit", *args, "--ckpt_path", "last", cwd=base / "cwd_c")
            cache[method] = {"straight": straight, "killed": killed, "base": base, "interrupted_at": step}
        return cache[method]

    return get


# -- problem 2: every recipe writes last.ckpt at every epoch end -----------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_every_recipe_writes_last_checkpoint(method: str, lifecycle: Any) -> None:
    run = lifecycle(method)["straight"]
    ckpt = torch.load(last_ckpt(run), map_location="cpu", weights_only=False)
    steps = 16 if method.startswith("dyn_adapter") else 20  # train800 (train_val) or train800val200, batch 50
    assert ckpt["global_step"] == EPOCHS * steps  # the last epoch's end
    assert not any(k.startswith("model.vit.vit.") or "base_layer" in k for k in ckpt["state_dict"])  # adapter-only


# -- problem 6: Ctrl-C then --ckpt_path last resumes exactly ----------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_interrupt_and_resume_is_exact(method: str, lifecycle: Any) -> None:
    runs = lifecycle(method)
    steps = 16 if method.startswith("dyn_adapter") else 20
    assert 0 < runs["interrupted_at"] < EPOCHS * steps  # the interrupt came mid-fit: the resume trained on
    a, b = trainable_state(last_ckpt(runs["straight"])), trainable_state(last_ckpt(runs["killed"]))
    assert a.keys() == b.keys()
    worst = max(
        float(torch.where(a[k] == b[k], 0.0, (a[k].double() - b[k].double()).abs()).max())
        for k in a
        if a[k].is_floating_point()
    )  # == first: equal infinities (thresholds) differ by 0
    assert worst <= 1e-6, f"resumed run differs from the uninterrupted one by {worst:.3g}"
    moved = max(float(a[k].abs().max()) for k in a if k.startswith("model.head.") and a[k].is_floating_point())
    assert moved > 0


# -- problem 1: test --ckpt_path last loads the checkpoint in a new process -------------------------
@pytest.mark.parametrize("method", METHODS)
def test_test_from_last_in_a_new_process(method: str, lifecycle: Any, tiny_weights: Path, digits_root: Path) -> None:
    runs = lifecycle(method)
    args = method_args(method, tiny_weights, digits_root, runs["straight"])
    by_last = cli("test", *args, "--ckpt_path", "last", "--trainer.logger", "false", cwd=runs["base"] / "t1")
    # "last" resolved to this run's last.ckpt (not the interrupted run's, not a newer file elsewhere)
    assert f"checkpoint path at {last_ckpt(runs['straight'])}" in by_last.stdout + by_last.stderr
    acc = metric(by_last.stdout, "test/acc")
    assert acc > 0.3  # trained: chance is 0.1


# -- problem 3: checkpoints of another method are refused; non-structural CLI values win ------------
def test_checkpoint_of_another_method_is_refused(lifecycle: Any, tiny_weights: Path, digits_root: Path) -> None:
    arc = lifecycle("arc")
    out = arc["base"] / "refused"
    proc = cli(
        "test",
        *method_args("repadapter", tiny_weights, digits_root, out),
        "--ckpt_path",
        str(last_ckpt(arc["straight"])),
        cwd=out,
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert re.search(r"error: .*ARC.*RepAdapter|error: .*RepAdapter.*ARC", proc.stderr), proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1


def test_relocated_weights_path_on_the_command_line_wins(
    lifecycle: Any, tiny_weights: Path, digits_root: Path, tmp_path: Path
) -> None:
    runs = lifecycle("repadapter")
    moved = tmp_path / "moved" / "weights.safetensors"
    moved.parent.mkdir()
    moved.write_bytes(tiny_weights.read_bytes())
    args = method_args("repadapter", moved, digits_root, runs["straight"])
    proc = cli(
        "test",
        *args,
        "--ckpt_path",
        str(last_ckpt(runs["straight"])),
        "--trainer.logger",
        "false",
        cwd=tmp_path / "cwd",
    )
    assert metric(proc.stdout, "test/acc") > 0.3


def test_test_time_budget_and_thresholds_win_over_the_stored_ones(
    lifecycle: Any, tiny_weights: Path, digits_root: Path
) -> None:
    runs = lifecycle("dyn_adapter")
    args = [
        *method_args("dyn_adapter", tiny_weights, digits_root, runs["straight"]),
        "--ckpt_path",
        str(last_ckpt(runs["straight"])),
        "--trainer.logger",
        "false",
    ]
    stored = torch.load(last_ckpt(runs["straight"]), map_location="cpu", weights_only=True)["petl"]["calibration"]
    assert stored["budget"] == 0.5
    budget = cli("test", *args, "--model.init_args.calibration.budget", "0.6", cwd=runs["base"] / "b")
    assert "calibrated for budget 0.6" in budget.stderr + budget.stdout
    assert metric(budget.stdout, "test/flops_vs_full") <= 0.6 + 0.1  # calibrated on val200, measured on test
    fixed = cli("test", *args, "--model.init_args.calibration.thresholds", "[0.0, 0.0, 0.0]", cwd=runs["base"] / "t")
    assert metric(fixed.stdout, "test/exit_share/block01") == 1.0  # every image leaves at the first exit


# -- problem 4: the calibration travels with the checkpoint -----------------------------------------
def test_dyn_adapter_checkpoint_keeps_its_calibration(lifecycle: Any) -> None:
    from petl_lightning.methods.dyn_adapter import DynAdapter

    runs = lifecycle("dyn_adapter")
    model = DynAdapter.load_from_checkpoint(last_ckpt(runs["straight"]), map_location="cpu")
    assert torch.isfinite(model.thresholds).any(), model.thresholds


# -- problem 5: predict writes a CSV for any list file or image folder ------------------------------
@pytest.fixture(scope="module")
def predictions(lifecycle: Any, tiny_weights: Path, digits_root: Path) -> Any:
    """``predict --ckpt_path last`` of the test list in a new process, once per method and module:
    the rows of the CSV it wrote (each test that reads them asks for them, so any order works)."""
    cache: dict[str, list[dict[str, str]]] = {}

    def get(method: str) -> list[dict[str, str]]:
        if method not in cache:
            runs = lifecycle(method)
            args = method_args(method, tiny_weights, digits_root, runs["straight"])
            test_list = str(digits_root / "digits" / "test.txt")
            cli(
                "predict",
                *args,
                "--ckpt_path",
                "last",
                "--data.init_args.predict_list",
                test_list,
                cwd=runs["base"] / "p1",
            )
            csvs = sorted((runs["straight"] / "predictions").glob("*.csv"))
            assert csvs, f"no predictions CSV under {runs['straight']}"
            with open(csvs[-1]) as f:
                cache[method] = list(csv.DictReader(f))
        return cache[method]

    return get


@pytest.mark.parametrize("method", METHODS)
def test_predict_writes_a_csv(method: str, predictions: Any, digits_root: Path) -> None:
    rows = predictions(method)
    labels = [int(line.split()[1]) for line in (digits_root / "digits" / "test.txt").read_text().splitlines()]
    assert len(rows) == len(labels)
    assert {"path", "class_index", "class_name", "confidence"} <= set(rows[0])
    acc = sum(int(r["class_index"]) == y for r, y in zip(rows, labels)) / len(labels)
    assert acc > 0.3
    assert all(0.0 <= float(r["confidence"]) <= 1.0 for r in rows)
    if method.startswith("dyn_adapter"):
        assert min(int(r["exit_block"]) for r in rows) < 4  # calibrated: not every image runs the full depth
    if method in ("dyt", "dyn_adapter_dyt"):
        assert 0.0 < sum(float(r["keep_rate"]) for r in rows) / len(rows) < 1.0


# -- problem 7: exported models carry metadata and load in plain timm at any image size --------------
@pytest.mark.parametrize("method", ["linear_probe", "repadapter", "arc"])
def test_export_loads_in_plain_timm_with_equal_predictions(method: str, lifecycle: Any, predictions: Any) -> None:
    import timm
    from PIL import Image
    from safetensors import safe_open

    runs = lifecycle(method)
    out = runs["base"] / "exported.safetensors"
    cli("export", "--ckpt_path", str(last_ckpt(runs["straight"])), "--out", str(out), cwd=runs["base"] / "e")
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["model_name"] == "vit_tiny_patch16_224" and meta["img_size"] == "32"
    model = timm.create_model(
        meta["model_name"],
        num_classes=int(meta["num_classes"]),
        img_size=int(meta["img_size"]),
        checkpoint_path=str(out),
        **json.loads(meta.get("model_kwargs", "{}")),
    ).eval()
    rows = predictions(method)[:50]
    mean, std = json.loads(meta["mean"]), json.loads(meta["std"])
    import torchvision.transforms as T

    tf = T.Compose(
        [T.Resize((32, 32), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(), T.Normalize(mean, std)]
    )
    x = torch.stack([tf(Image.open(r["path"]).convert("RGB")) for r in rows])
    with torch.no_grad():
        pred = model(x).argmax(-1).tolist()
    assert pred == [int(r["class_index"]) for r in rows]


# -- deployable programs: DyT's top-k ONNX and Dyn-Adapter's stages through `export` ---------------
def test_export_dyt_top_k_program_equals_the_checkpoint_at_that_rate(lifecycle: Any) -> None:
    import onnxruntime as ort

    from petl_lightning.export import load_trained

    runs = lifecycle("dyt")
    out = runs["base"] / "dyt.onnx"
    ckpt = last_ckpt(runs["straight"])
    cli("export", "--ckpt_path", str(ckpt), "--out", str(out), "--keep_rate", "0.5", cwd=runs["base"] / "e_dyt")
    model = load_trained(ckpt)
    model.vit.skipping = replace(model.skipping, fixed_keep_rate=0.5)  # the eager model at the exported keep rule
    x = torch.randn(5, 3, 32, 32)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    with torch.no_grad():
        assert (got - model(x)).abs().max().item() < 1e-4
    assert session.get_modelmeta().custom_metadata_map["keep_count"] == "2"  # half of the 4 patches


def test_export_dyn_adapter_stages_and_driver_give_the_calibrated_exits(lifecycle: Any) -> None:
    import importlib.util

    from petl_lightning.export import load_trained

    runs = lifecycle("dyn_adapter")
    out = runs["base"] / "exported"
    ckpt = last_ckpt(runs["straight"])
    cli("export", "--ckpt_path", str(ckpt), "--out", str(out), "--exits", cwd=runs["base"] / "e_dyn")
    assert json.loads((out / "deploy.json").read_text())["exit_depths"] == [1, 2, 3, 4]
    spec = importlib.util.spec_from_file_location("exported_driver", out / "driver.py")
    assert spec is not None and spec.loader is not None
    driver = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(driver)
    model = load_trained(ckpt)
    x = torch.randn(64, 3, 32, 32)
    logits, exits = driver.EarlyExitModel(out)(x.numpy())
    with torch.no_grad():
        want = model.infer(x)
    assert exits.tolist() == want.exit_index.tolist()
    assert (torch.from_numpy(logits) - want.logits).abs().max().item() < 1e-4
