"""Distributed evaluation: exit shares, keep rates, FLOPs and accuracy under 2-process CPU DDP (gloo)
equal a single-process run on the same data.

The DDP side is launched the way a user launches a multi-node job, with ``torchrun`` (here
``python -m torch.distributed.run --standalone --nproc_per_node 2``) running this file as a
script; Lightning's ``strategy="ddp"`` then joins the processes torchrun created. Each case builds
the same tiny random model (same seed) and evaluates it with ``trainer.test``; rank 0 writes the
logged metrics and the callbacks' statistics to a JSON file that the test compares with an
in-process single-device run. A DyT fit under DDP calibrates its inference threshold on both ranks'
last batches together (the same threshold on every rank, equal to one process calibrating on the
union of those batches).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.slow  # two torchrun processes: make test, not make test-fast

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = dict(
    model_name="vit_tiny_patch16_224", pretrained=False, img_size=32, model_kwargs={"depth": 3, "patch_size": 8}
)
NUM_CLASSES = 4
# Evaluation-set sizes: a multiple of the world size (exact), and an odd one (DistributedSampler
# pads one repeated image, which the statistics then count; see the docs).
N_EVEN, N_ODD = 24, 23
CASES = ("dyn_adapter", "dyt", "dyt_odd")


def eval_data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)


def build(case: str) -> Any:
    """The same model in every process: fixed seed; Dyn-Adapter thresholds at the median
    confidence of each early exit on the evaluation data (halfway between the two middle ones, so
    how the images are batched cannot move one across), so images leave at every exit."""
    from torch.utils.data import DataLoader, TensorDataset

    from petl_lightning.methods.dyn_adapter import DynAdapter
    from petl_lightning.methods.dyt import DyT

    torch.manual_seed(0)
    if case == "dyn_adapter":
        model = DynAdapter(num_classes=NUM_CLASSES, exits={"blocks": [1, 2]}, calibration={"budget": None}, **TINY)
        x, y = eval_data(N_EVEN)
        out = model.collect_exits(DataLoader(TensorDataset(x, y), batch_size=8))
        middle = out.conf[:, :-1].sort(dim=0).values[N_EVEN // 2 - 1 : N_EVEN // 2 + 1].mean(dim=0)
        model.thresholds.copy_(middle.to(model.thresholds))
        return model
    return DyT(num_classes=NUM_CLASSES, **TINY)


def run_case(case: str, devices: int, strategy: str = "auto") -> dict[str, Any]:
    """``trainer.test`` of one case; the logged scalars and the callbacks' statistics."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from petl_lightning.callbacks import ExitRateLogger, FlopsLogger

    x, y = eval_data(N_ODD if case.endswith("odd") else N_EVEN)
    exits, flops = ExitRateLogger(charts=False, per_block=True), FlopsLogger()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=False,
        callbacks=[exits, flops],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.test(build(case), DataLoader(TensorDataset(x, y), batch_size=4), verbose=False)
    return {
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "stats": {k: v.tolist() for k, v in exits.last_stats["test"].items()},
        "world_size": trainer.world_size,
        "rank": trainer.global_rank,
    }


N_FIT, FIT_BATCH, AGREEMENT_BATCHES = 32, 4, 2


def calibrating_dyt() -> Any:
    """A DyT whose head reads every patch token, so skipping changes predictions."""
    from petl_lightning.methods.dyt import DyT

    torch.manual_seed(0)
    tiny = {**TINY, "model_kwargs": {**TINY["model_kwargs"], "global_pool": "avg"}}
    model = DyT(
        num_classes=NUM_CLASSES,
        lr=1e-2,
        warmup_epochs=0.0,
        agreement=0.9,
        agreement_batches=AGREEMENT_BATCHES,
        **tiny,
    )
    with torch.no_grad():
        for blk in model.vit.blocks:
            for d in blk.dispatchers.values():
                d.proj.weight.normal_(0.0, 0.5)
        model.head.weight.normal_(0.0, 2.0)
    return model


def fit_calibrated(rank: int) -> Any:
    """:func:`calibrating_dyt` after a one-epoch 2-process DDP fit (which calibrates its threshold at
    the end); rank ``r`` trains on images ``r, r + 2, ...`` of :func:`eval_data`, in order."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    model = calibrating_dyt()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    x, y = eval_data(N_FIT)
    trainer.fit(model, DataLoader(TensorDataset(x[rank::2], y[rank::2]), batch_size=FIT_BATCH))
    return model


def worker(out_path: str) -> None:
    """Entry point under torchrun: every case in one process group; rank 0 writes the results,
    every rank its fitted threshold."""
    results = {case: run_case(case, devices=2, strategy="ddp") for case in CASES}
    rank = int(os.environ.get("RANK", "0"))
    fitted = fit_calibrated(rank)
    Path(f"{out_path}.threshold{rank}").write_text(json.dumps(fitted.dyt.threshold))
    if rank == 0:
        torch.save(fitted.state_dict(), f"{out_path}.state.pt")
        Path(out_path).write_text(json.dumps(results))


def _close(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("ddp") / "ddp.json"
    env = {  # without the seed an earlier test's seed_everything left here: Lightning would reseed every rank with it
        **{k: v for k, v in os.environ.items() if k not in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")},
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(Path(__file__).resolve()),
        str(out),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, f"torchrun failed ({elapsed:.0f}s):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    results = json.loads(out.read_text())
    results["fit_thresholds"] = [json.loads(Path(f"{out}.threshold{r}").read_text()) for r in (0, 1)]
    results["fit_state"] = torch.load(f"{out}.state.pt")
    return results


@pytest.mark.parametrize("case", ["dyn_adapter", "dyt"])
def test_ddp_metrics_equal_single_process(ddp_results: dict[str, Any], case: str) -> None:
    ddp = ddp_results[case]
    assert ddp["world_size"] == 2 and ddp["rank"] == 0
    single = run_case(case, devices=1)
    assert single["world_size"] == 1
    # Every image once: no padding with 24 images on 2 ranks, and no image counted twice.
    assert ddp["metrics"]["test/images"] == single["metrics"]["test/images"] == N_EVEN
    assert set(ddp["metrics"]) == set(single["metrics"])
    wrong = {k: (ddp["metrics"][k], v) for k, v in single["metrics"].items() if not _close(ddp["metrics"][k], v)}
    assert not wrong, f"DDP vs single-process metrics differ: {wrong}"
    for key, value in single["stats"].items():
        a = torch.tensor(ddp["stats"][key], dtype=torch.float64)
        b = torch.tensor(value, dtype=torch.float64)
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12, equal_nan=True), (key, a, b)
    m = single["metrics"]
    if case == "dyn_adapter":
        shares = [m[f"test/exit_share/block{d:02d}"] for d in (1, 2, 3)]
        assert math.isclose(sum(shares), 1.0, abs_tol=1e-6)
        assert min(shares[:2]) > 0.2, f"median thresholds should send images out early: {shares}"
        assert m["test/flops_vs_backbone"] < 1.0
        # The accuracy equals the exit-weighted accuracy of the images that left at each exit.
        weighted = sum(
            m[f"test/exit_share/block{d:02d}"] * m.get(f"test/exit_acc/block{d:02d}", 0.0) for d in (1, 2, 3)
        )
        assert math.isclose(weighted, m["test/acc"], abs_tol=1e-6)
    else:
        assert 0.0 < m["test/keep_rate"] < 1.0
        assert m["test/flops_vs_backbone"] < 1.0


def test_ddp_fit_calibrates_one_threshold_on_every_ranks_batches(ddp_results: dict[str, Any]) -> None:
    """Each rank collects its own last training batches; the agreement counts are summed over the
    ranks, so both set the threshold one process sets on the union of those batches."""
    ranks = ddp_results["fit_thresholds"]
    assert ranks[0] == ranks[1]
    x, y = eval_data(N_FIT)
    union = [x[r::2][-AGREEMENT_BATCHES * FIT_BATCH :] for r in (0, 1)]  # each rank's last batches
    model = calibrating_dyt()
    model.load_state_dict(ddp_results["fit_state"])  # the weights the DDP fit ended with
    single = model.calibrate_agreement([(b, y[:1]) for b in union], max_batches=None)
    assert 0.0 < single["threshold"] < 0.5  # calibrated: the paper's 0.5 missed the target
    assert ranks[0] == pytest.approx(single["threshold"], abs=1e-6)
    one_rank = model.calibrate_agreement([(union[0], y[:1])], max_batches=None)
    assert one_rank["threshold"] != pytest.approx(single["threshold"], abs=1e-6)  # the sum over ranks matters


def test_ddp_padding_is_visible_in_the_image_count(ddp_results: dict[str, Any]) -> None:
    """23 images on 2 ranks: DistributedSampler repeats one, and the statistics say so."""
    assert ddp_results["dyt_odd"]["metrics"]["test/images"] == N_ODD + 1


if __name__ == "__main__":
    worker(sys.argv[1])
