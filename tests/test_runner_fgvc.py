"""The benchmark runner on FGVC: the suite the recipe's data class picks, its task selection, its
results table (one FGVC mean), an end-to-end run through the console script, and FGVC few-shot draws."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_helpers import TINY_MODEL, run
from petl_lightning import vtab
from petl_lightning.data.fgvc import FGVC_TASKS, FGVCDataModule
from petl_lightning.data.transforms import Augmentation
from petl_lightning.errors import PETLError
from petl_lightning.vtab import plan, report
from petl_lightning.vtab.run import atomic_write
from petl_lightning.vtab.suites import FGVC, VTAB, suite_for

ROOT = Path(__file__).resolve().parents[1]


class MyFGVC(FGVCDataModule):
    """A user's subclass: still the FGVC suite."""


def write_fgvc_task(root: Path, task: str, train_per_class: int = 1) -> None:
    """A task folder in VPT's JSON layout with the benchmark's class count: 8x8 images (one per class in
    val and test, ``train_per_class`` in train), labels numbered from 1 as the JSON files number them."""
    info = FGVC_TASKS[task]
    rng = np.random.default_rng(len(task))
    images = root / task / info.image_dir
    for split, n in (("train", train_per_class), ("val", 1), ("test", 1)):
        entries = {}
        for c in range(info.num_classes):
            for i in range(n):
                rel = f"{c:03d}/{split}{i}.png"
                (images / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(images / rel)
                entries[rel] = c + 1
        (root / task / f"{split}.json").write_text(json.dumps(entries))


@pytest.fixture(scope="session")
def fgvc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All five tasks, plus a folder that is no task and a non-FGVC folder holding JSON splits."""
    root = tmp_path_factory.mktemp("fgvc")
    for task in FGVC_TASKS:
        write_fgvc_task(root, task)
    (root / "notes").mkdir()
    (root / "extra").mkdir()
    (root / "extra" / "train.json").write_text("{}")
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.read_text().splitlines()))


def md_row(md: str, first_cell: str) -> list[str]:
    """Cells of the markdown table row whose first cell is ``first_cell``."""
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in\n{md}")


# --------------------------------------------------------------------------------------------------
def test_the_recipes_data_class_picks_the_suite(
    fgvc_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert suite_for("petl_lightning.data.fgvc.FGVCDataModule") is FGVC
    assert suite_for("petl_lightning.FGVCDataModule") is FGVC  # jsonargparse's name for --data FGVCDataModule
    assert suite_for(f"{__name__}.MyFGVC") is FGVC
    assert suite_for(None) is suite_for("petl_lightning.data.vtab.VTAB1kDataModule") is VTAB
    assert suite_for("petl_lightning.data.folder.ImageFolderDataModule") is VTAB
    # An FGVC recipe plans FGVC's five tasks; so does a VTAB recipe whose --data names FGVCDataModule.
    runs, _, info = plan.plan_runs(
        [f"{ROOT}/recipes/fgvc/linear_probe.yaml"], [], ["all"], [0], str(tmp_path), str(fgvc_root)
    )
    assert info["suite"] == "FGVC" and [r.task for r in runs] == list(FGVC_TASKS)
    assert {r.group for r in runs} == {"fgvc"}
    _, out, _ = plan.plan_runs([f"{ROOT}/recipes/fgvc/arc.yaml"], [], ["cub"], [0], None, str(fgvc_root))
    assert out == Path("runs/fgvc/arc").resolve()  # not recipes/arc.yaml's runs/vtab/arc
    argv = ["-c", f"{ROOT}/recipes/linear_probe.yaml", "--data", "FGVCDataModule", "--data.root", str(fgvc_root)]
    assert vtab.vtab_main([*argv, "--tasks", "fgvc", "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert [line.split(":")[0] for line in printed.splitlines()] == [f"[todo] {t} seed 42" for t in FGVC_TASKS]


def test_task_selection(fgvc_root: Path, tmp_path: Path) -> None:
    five = list(FGVC_TASKS)
    assert plan.resolve_tasks(["all"], None, FGVC) == plan.resolve_tasks(["fgvc"], fgvc_root, FGVC) == five
    assert plan.resolve_tasks(["present"], fgvc_root, FGVC) == five  # not notes/ (no splits) nor extra/ (no task)
    assert plan.resolve_tasks(["stanford_dogs,cub", "cub"], fgvc_root, FGVC) == ["stanford_dogs", "cub"]
    with pytest.raises(PETLError, match=r"Unknown task 'stanford_dog': not an FGVC task or group\. Did you mean "):
        plan.resolve_tasks(["stanford_dog"], fgvc_root, FGVC)
    with pytest.raises(PETLError, match=r"Unknown task 'extra': .* Use all, fgvc, present, or names like cub"):
        plan.resolve_tasks(["extra"], fgvc_root, FGVC)  # a folder, but FGVC takes no custom tasks
    with pytest.raises(PETLError, match="Unknown task 'natural'"):
        plan.resolve_tasks(["natural"], None, FGVC)
    with pytest.raises(PETLError, match="Unknown task 'fgvc': not a VTAB-1K task"):
        plan.resolve_tasks(["fgvc"], None)  # VTAB-1K stays as it was
    partial = tmp_path / "partial"
    write_fgvc_task(partial, "oxford_flowers")
    assert plan.resolve_tasks(["present"], partial, FGVC) == ["oxford_flowers"]
    with pytest.raises(PETLError, match=r"missing under .*: cub, nabirds, stanford_dogs.* holds: oxford_flowers"):
        plan.resolve_tasks(["all"], partial, FGVC)
    with pytest.raises(PETLError, match=r"--tasks present: no task folders with split files"):
        plan.resolve_tasks(["present"], tmp_path / "empty", FGVC)


def record(task: str, seed: int, acc: float, method: str = "ARC") -> dict:
    return {
        "task": task,
        "group": "fgvc",
        "seed": seed,
        "acc": acc,
        "acc_max_test": acc + 1.0,
        "trainable_params": 1000,
        "trainable_params_no_head": 500,
        "gflops": 17.58,
        "gflops_backbone": 17.58,
        "gflops_ratio": 1.0,
        "keep_rate": 1.0,
        "exit_share": [1.0],
        "method": method,
        "model_name": "vit_base_patch16_224",
        "hparams": {"placement": "attn_mlp"},
        "fingerprint": "x",
        "wall_s": 60.0,
    }


def test_table_shows_one_fgvc_mean_beside_arcs_row(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    accs = {(t, s): float(rng.uniform(50, 95)) for t in FGVC_TASKS for s in (0, 1)}
    for (task, seed), acc in accs.items():
        atomic_write(tmp_path / "runs" / task / f"seed{seed}" / "result.json", json.dumps(record(task, seed, acc)))
    report.write_tables(tmp_path, suite=FGVC)
    md = (tmp_path / "results.md").read_text()
    means = {t: statistics.fmean(accs[(t, s)] for s in (0, 1)) for t in FGVC_TASKS}
    mean = statistics.fmean(means.values())
    assert md.startswith("# FGVC results: ARC") and "FGVC tasks: 5/5; custom tasks: 0." in md
    # Last epoch, best val (no val split here), max over test epochs: ARC's rule, so the difference is against it.
    top = mean + 1.0
    assert md_row(md, "FGVC mean") == [
        "FGVC mean",
        f"{mean:.2f}",
        "n/a (0/5 tasks)",
        f"{top:.2f}",
        "90.14",
        f"{top - 90.14:+.2f}",
    ]
    assert "Natural mean" not in md and "19-task mean" not in md
    assert md_row(md, "method") == ["method", "CUB", "NABirds", "Flowers", "Dogs", "Cars", "FGVC mean"]
    assert md_row(md, "ours (last epoch)")[-1] == f"{mean:.2f}"
    assert md_row(md, "ours (max over test epochs)")[-1] == f"{top:.2f}"
    assert md_row(md, "ARC (paper)")[1:] == [
        "88.5",
        "85.3",
        "99.3",
        "91.9",
        "85.7",
        "90.14",
    ]
    assert md_row(md, "fgvc")[1] == "cub"  # the per-task rows: group fgvc, in the papers' order
    assert [r["task"] for r in read_csv(tmp_path / "results.csv")][::2] == list(FGVC_TASKS)
    # Three tasks missing: the mean of the two finished, marked, and not compared with the paper's.
    for task in ("nabirds", "oxford_flowers", "stanford_cars"):
        for s in (0, 1):
            (tmp_path / "runs" / task / f"seed{s}" / "result.json").unlink()
    report.write_tables(tmp_path, suite=FGVC)
    md = (tmp_path / "results.md").read_text()
    two = statistics.fmean([means["cub"], means["stanford_dogs"]])
    assert md_row(md, "FGVC mean") == [
        "FGVC mean",
        f"{two:.2f} (2/5 tasks)",
        "n/a (0/5 tasks)",
        f"{two + 1:.2f} (2/5 tasks)",
        "90.14",
        "n/a",
    ]
    assert md_row(md, "ours (last epoch)")[-1] == "-"


@pytest.mark.slow
def test_console_script_runs_two_fgvc_tasks(fgvc_root: Path, tmp_path: Path) -> None:
    """``petl-lightning vtab`` with the FGVC LinearProbe recipe on a tiny random ViT: both tasks in
    the tables, and the FGVC mean is the mean of their accuracies."""
    out = tmp_path / "out"
    proc = run(
        "vtab",
        "-c",
        "recipes/fgvc/linear_probe.yaml",
        "--data.root",
        str(fgvc_root),
        "--tasks",
        "cub,stanford_dogs",
        "--seeds",
        "0",
        "--out",
        str(out),
        "--launcher",
        "inprocess",
        *TINY_MODEL,
        "--model.init_args.model_kwargs",
        "{depth: 2}",
        "--data.init_args.img_size",
        "32",
        "--data.init_args.num_workers",
        "0",
        "--data.init_args.eval_batch_size",
        "128",
        "--trainer.max_epochs",
        "1",
        "--trainer.accelerator",
        "cpu",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_csv(out / "results.csv")
    assert [(r["task"], r["group"], r["test_images"]) for r in rows] == [
        ("cub", "fgvc", "200"),
        ("stanford_dogs", "fgvc", "120"),
    ]
    accs = {
        t: json.loads((out / "runs" / t / "seed0" / "result.json").read_text())["acc"] for t in ("cub", "stanford_dogs")
    }
    md = (out / "results.md").read_text()
    assert md.startswith("# FGVC results: LinearProbe")
    assert md_row(md, "FGVC mean")[1] == f"{statistics.fmean(accs.values()):.2f} (2/5 tasks)"
    assert md_row(md, "fgvc")[1:3] == ["cub", f"{accs['cub']:.2f}"]
    assert f"| fgvc | stanford_dogs | {accs['stanford_dogs']:.2f} |" in md


@pytest.mark.parametrize("method", ["arc", "dyn_adapter", "dyt", "linear_probe", "repadapter"])
def test_recipes_parse_and_build_their_data(fgvc_root: Path, method: str) -> None:
    """Each FGVC recipe parses with the CLI's own parser and its data section builds on the mock
    layout: the script's 256 -> 224 centre crop for evaluation, random crops for training."""
    cfg = plan.parse_fit_config(["-c", f"{ROOT}/recipes/fgvc/{method}.yaml", "--data.init_args.root", str(fgvc_root)])
    assert cfg["data"]["class_path"] == FGVC.data_class and suite_for(cfg["data"]["class_path"]) is FGVC
    args = {**cfg["data"]["init_args"], "img_size": 16, "num_workers": 0, "batch_size": 4}
    args["augmentation"] = Augmentation(**args["augmentation"])
    data = FGVCDataModule(**args)
    assert data.task == "cub" and data.num_classes == 200 and data.crop_pct == 0.875
    assert data.augmentation is not None and data.augmentation.crop_mode == "rkrr"
    assert next(iter(data.train_dataloader()))[0].shape == (4, 3, 16, 16)
