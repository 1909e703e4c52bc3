"""Shared pieces of the real-data studies (``dyt_robustness.py``, ``dyt_budget.py``,
``dyn_adapter_dyt.py``): the shared real ViT-S/14, the short budget (AdamW, no warm-up, step-wise
cosine, no validation or logging), and cells run one process each, appended to a JSONL file as they
finish, so a study can be stopped and resumed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
WEIGHTS = ASSETS / "weights" / "vit_small_patch14_dinov2.imgfocus_saliency.safetensors"
ROW = "ROW "  # the line a cell process prints its result on


def budget_trainer(epochs: int = 1) -> Any:
    """A CPU Trainer for ``epochs`` without validation, logging, checkpoints or progress bars."""
    import lightning as L

    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def vtab_data(root: Path, task: str, img_size: int, cache: bool = False) -> Any:
    """A task in the VTAB-1K layout, train800val200 -> test, batch 32 (evaluation 100), no workers."""
    from petl_lightning.data.vtab import VTAB1kDataModule

    return VTAB1kDataModule(
        root=str(root),
        task=task,
        protocol="trainval_test",
        img_size=img_size,
        batch_size=32,
        eval_batch_size=100,
        num_workers=0,
        cache=cache,
    )


def vits_module(cls: type, img_size: int, lr: float, num_classes: int = 10, **kwargs: Any) -> Any:
    """``cls`` on the shared ViT-S/14 weights with the short budget's optimiser settings."""
    return cls(
        num_classes=num_classes,
        model_name="vit_small_patch14_dinov2",
        checkpoint_path=str(WEIGHTS),
        img_size=img_size,
        lr=lr,
        warmup_epochs=0.0,
        scheduler_interval="step",
        **kwargs,
    )


def load_rows(out: Path) -> list[dict[str, Any]]:
    """The finished cells in ``out`` (JSONL)."""
    return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


def run_cells(script: str, cells: Sequence[dict[str, Any]], out: Path, workers: int, args: Sequence[str]) -> None:
    """Run ``python script --cell <json> *args`` for every cell, ``workers`` at a time with one thread
    each; append each cell's ``ROW`` line to ``out`` as it finishes (failures are printed, not kept)."""

    def launch(cell: dict[str, Any]) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(
            [sys.executable, script, "--cell", json.dumps(cell), *args], capture_output=True, text=True, env=env
        )
        rows = [line[len(ROW) :] for line in proc.stdout.splitlines() if line.startswith(ROW)]
        if proc.returncode or not rows:
            print(f"cell {cell} failed:\n{proc.stderr[-2000:]}", file=sys.stderr, flush=True)
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(rows[0] + "\n")
        print(f"done {cell}", flush=True)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(launch, cells))


def print_row(row: dict[str, Any]) -> None:
    """What a cell process prints for :func:`run_cells`."""
    print(ROW + json.dumps(row), flush=True)
