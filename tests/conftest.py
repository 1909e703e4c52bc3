"""Shared fixtures. Tests never touch the network: the hub is forced offline here.

Real-data tests read ``../shared/assets`` (or ``$PETL_ASSETS``) and skip, saying why, when it is absent.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # share the cores between the pytest workers (and their children)
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)

import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))

warnings.filterwarnings("ignore", message=".*LeafSpec.*")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")

ASSETS = Path(os.environ.get("PETL_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
VITS_WEIGHTS = ASSETS / "weights" / "vit_small_patch14_dinov2.imgfocus_saliency.safetensors"
VTAB_ASSETS = ASSETS / "vtab1k"

#: The slowest test files, slowest first (measured in CI). pytest-xdist's ``--dist loadfile`` hands
#: files to its workers in collection order, so a long file collected last would keep one worker busy
#: while the other idles; running the long ones first (longest-processing-time-first) evens the end.
SLOW_FILES = (
    "test_segmentation_cli.py",
    "test_lifecycle.py",
    "test_dyt.py",
    "test_runner.py",
    "test_dyn_adapter.py",
    "test_cli.py",
    "test_data_sources_cli.py",
    "test_prepare.py",
    "test_arc.py",
    "test_faults.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The slow files first (:data:`SLOW_FILES`), the others after them in their own order."""
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable: order within a file kept


# The short real-data budget every method is compared under (LinearProbe included).
DTD10_BUDGET: dict[str, Any] = {
    "task": "dtd10",
    "model_name": "vit_small_patch14_dinov2",
    "img_size": 112,
    "batch_size": 32,
    "max_epochs": 5,
}


@pytest.fixture(scope="session")
def vits_weights() -> Path:
    if not VITS_WEIGHTS.is_file():
        pytest.skip(f"real ViT-S weights not found at {VITS_WEIGHTS} (shared assets absent)")
    return VITS_WEIGHTS


@pytest.fixture(scope="session")
def dtd10_root() -> Path:
    if not (VTAB_ASSETS / "dtd10" / "test.txt").is_file():
        pytest.skip(f"dtd10 assets not found under {VTAB_ASSETS} (shared assets absent)")
    return VTAB_ASSETS


@pytest.fixture(scope="session")
def dtd10_budget() -> dict[str, Any]:
    return dict(DTD10_BUDGET)


def fit_and_test(module: Any, datamodule: Any, max_epochs: int, seed: int = 0) -> float:
    """Fit ``module`` for ``max_epochs`` on CPU without logging, return its test accuracy."""
    import lightning as L

    L.seed_everything(seed, verbose=False)
    trainer = L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule)
    return float(trainer.test(module, datamodule, verbose=False)[0]["test/acc"])


def recipe_config(recipe: Path) -> dict[str, Any]:
    """The effective config of ``recipe`` as the CLI prints it (``fit -c recipe --print_config``)."""
    import subprocess
    import sys

    import yaml

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "petl_lightning", "fit", "-c", str(recipe), "--print_config"],
        cwd=recipe.parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return yaml.safe_load(proc.stdout)


# The short dtd10 budget of RepAdapter's and ARC's comparison with LinearProbe: the shared budget
# (DTD10_BUDGET: 112 px, 5 epochs) costs about 15 CPU-minutes per method that back-propagates
# through the backbone, so it keeps the task, weights and batch size but uses 56 px and 1 epoch.
DTD10_SHORT: dict[str, Any] = {
    "img_size": 56,
    "max_epochs": 1,
    "lr": 1e-2,
    "warmup_epochs": 0,
    "scheduler_interval": "step",
}


def method_vs_linear_probe_dtd10(
    method_cls: Any, weights: Path, datamodule_factory: Any, **method_kwargs: Any
) -> tuple[float, float]:
    """Test accuracies (method, LinearProbe) on dtd10, both trained under :data:`DTD10_SHORT`."""
    from petl_lightning.methods.baselines import LinearProbe

    def make_dm() -> Any:
        return datamodule_factory(img_size=DTD10_SHORT["img_size"])

    kwargs = dict(
        num_classes=make_dm().num_classes,
        model_name=DTD10_BUDGET["model_name"],
        checkpoint_path=str(weights),
        img_size=DTD10_SHORT["img_size"],
        lr=DTD10_SHORT["lr"],
        warmup_epochs=DTD10_SHORT["warmup_epochs"],
        scheduler_interval=DTD10_SHORT["scheduler_interval"],
    )
    lp_acc = fit_and_test(LinearProbe(**kwargs), make_dm(), DTD10_SHORT["max_epochs"])
    acc = fit_and_test(method_cls(**kwargs, **method_kwargs), make_dm(), DTD10_SHORT["max_epochs"])
    return acc, lp_acc


@pytest.fixture(scope="session")
def dtd10_datamodule_factory(dtd10_root: Path, dtd10_budget: dict[str, Any]):
    """Builds the dtd10 DataModule of the shared budget (decoded images cached in memory)."""
    from petl_lightning.data.vtab import VTAB1kDataModule

    def make(**overrides: Any) -> VTAB1kDataModule:
        kwargs = dict(
            root=str(dtd10_root),
            task=dtd10_budget["task"],
            img_size=dtd10_budget["img_size"],
            batch_size=dtd10_budget["batch_size"],
            num_workers=0,
            cache=True,
        )
        kwargs.update(overrides)
        return VTAB1kDataModule(**kwargs)

    return make


@pytest.fixture(scope="session")
def linear_probe_dtd10(vits_weights: Path, dtd10_datamodule_factory, dtd10_budget: dict[str, Any]) -> dict[str, Any]:
    """LinearProbe's dtd10 test accuracy under the shared budget (computed once per session)."""
    from petl_lightning.methods.baselines import LinearProbe

    dm = dtd10_datamodule_factory()
    model = LinearProbe(
        num_classes=dm.num_classes,
        model_name=dtd10_budget["model_name"],
        checkpoint_path=str(vits_weights),
        img_size=dtd10_budget["img_size"],
        lr=1e-2,
        warmup_epochs=1,
    )
    acc = fit_and_test(model, dm, dtd10_budget["max_epochs"])
    return {"acc": acc, **dtd10_budget}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(name="fit_and_test")
def _fit_and_test_fixture():
    """The :func:`fit_and_test` helper as a fixture: ``fit_and_test(module, datamodule, max_epochs)``."""
    return fit_and_test


@pytest.fixture(scope="session")
def seg_mosaics(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Texture mosaics of the DTD assets (200 train, 100 test), built once per test process."""
    dtd10 = VTAB_ASSETS / "dtd10"
    if not dtd10.is_dir() or not VITS_WEIGHTS.is_file():
        pytest.skip(f"dtd10 or the ViT-S weights not found under {VTAB_ASSETS.parent} (shared assets absent)")
    from petl_lightning.data.mosaics import build_texture_mosaics

    counts = {"train": 200, "val": 0, "test": 100}
    return build_texture_mosaics(dtd10, tmp_path_factory.mktemp("seg_data") / "mosaics", counts=counts)


@pytest.fixture(scope="module")
def frozen_seg_miou(seg_mosaics: Path, tmp_path_factory: pytest.TempPathFactory) -> float:
    """Test mIoU of the frozen-backbone segmenter (linear head), fit and tested through the console.
    (ARC and DyT against it, and both heads: ``python benchmarks/segmentation.py mosaics``.)"""
    from segmentation_cli_helpers import fit_and_test, overlay

    tmp = tmp_path_factory.mktemp("frozen")
    return fit_and_test("frozen", overlay(tmp, seg_mosaics), tmp / "run")
