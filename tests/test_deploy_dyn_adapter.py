"""Dyn-Adapter's stage programs and standalone early-exit driver: the driver, run in a process where
petl_lightning cannot be imported, gives the module's dynamic inference (predictions, exits, logits)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from petl_lightning.errors import ConfigError
from petl_lightning.methods.dyn_adapter import DynAdapter

TOL = 1e-4
TINY: dict[str, Any] = dict(model_name="vit_tiny_patch16_224", pretrained=False, img_size=32, model_kwargs={"depth": 4})
# Runs driver.py as a deployment would: any import of petl_lightning fails.
BLOCKED = (
    "import runpy, sys\n"
    "sys.modules['petl_lightning'] = None\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def make() -> DynAdapter:
    """A DynAdapter (RepAdapter base, exits after blocks 1, 2, 3) with random adapters and heads."""
    torch.manual_seed(0)
    m = DynAdapter(num_classes=7, exits={"blocks": [1, 2, 3]}, **TINY)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "head" in name else 0.02))
    return m.eval()


def spaced_thresholds(conf: torch.Tensor, share: float) -> list[float]:
    """Per early exit, a threshold ``share`` of the way up its confidences, midway between two of
    them, so float noise between programs cannot move an image across it."""
    out = []
    for c in conf.T:
        s = c.sort().values
        i = int(share * (len(s) - 1))
        out.append(float(s[i] + s[i + 1]) / 2)
    return out


def driver(folder: Path, images: np.ndarray, tmp: Path) -> tuple[np.ndarray, np.ndarray]:
    np.save(tmp / "images.npy", images)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            BLOCKED,
            str(folder / "driver.py"),
            str(tmp / "images.npy"),
            "--save",
            str(tmp / "out.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.splitlines()) == images.shape[0]
    out = np.load(tmp / "out.npz")
    return out["logits"], out["exits"]


@pytest.fixture(scope="module")
def model_and_images() -> tuple[DynAdapter, torch.Tensor]:
    m = make()
    x = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        conf = torch.stack([m.model.confidence(lg) for lg in m.forward_exits(x)], dim=1)[:, :-1]
    thr = spaced_thresholds(conf, 0.75)
    thr[1] = float("inf")  # the middle exit takes no image: its threshold is null in deploy.json
    m.thresholds.copy_(torch.tensor(thr))
    return m, x


@pytest.fixture(scope="module")
def exported(model_and_images, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The stage folder of each format, exported once per module."""
    cache: dict[str, Path] = {}

    def get(fmt: str) -> Path:
        if fmt not in cache:
            cache[fmt] = model_and_images[0].export_exits(tmp_path_factory.mktemp(fmt) / "exported", format=fmt)
        return cache[fmt]

    return get


@pytest.mark.parametrize("fmt", ["onnx", "torch_export"])
def test_driver_equals_dynamic_inference_without_petl_lightning(
    fmt: str, model_and_images, exported, tmp_path_factory: pytest.TempPathFactory
) -> None:
    m, x = model_and_images
    folder = exported(fmt)
    config = json.loads((folder / "deploy.json").read_text())
    assert config["exit_depths"] == [1, 2, 3, 4] and config["thresholds"][1] is None
    assert sorted(p.name for p in folder.iterdir()) == sorted([*config["stages"], "deploy.json", "driver.py"])
    with torch.no_grad():
        want = m.infer(x)
    counts = want.exit_index.bincount(minlength=4).tolist()
    assert counts[0] > 0 and counts[1] == 0 and counts[2] > 0 and counts[3] > 0  # the batch really shrinks
    logits, exits = driver(folder, x.numpy(), tmp_path_factory.mktemp("run"))
    assert exits.tolist() == want.exit_index.tolist()
    assert logits.argmax(1).tolist() == want.logits.argmax(1).tolist()
    assert np.abs(logits - want.logits.numpy()).max() < TOL
    # a changed adapter after export shows up: the driver no longer matches the module
    adapter = m.vit.blocks[0].mlp.fc1.up.weight
    with torch.no_grad():
        adapter.add_(0.5)
        changed = m.infer(x).logits
        adapter.sub_(0.5)
    assert np.abs(logits - changed.numpy()).max() > 10 * TOL


def test_every_stage_takes_a_batch_of_one(model_and_images, exported) -> None:
    import onnxruntime as ort

    m, x = model_and_images
    folder = exported("onnx")
    stages = [ort.InferenceSession(str(folder / f"stage{k}.onnx")) for k in range(4)]
    tokens = x[:1].numpy()
    with torch.no_grad():
        want = m.forward_exits(x[:1])[:, 0]
    for k, session in enumerate(stages):
        out = session.run(None, {session.get_inputs()[0].name: tokens})
        logits = out[0] if k == 3 else out[1]
        assert np.abs(logits - want[k].numpy()).max() < TOL
        if k < 3:
            tokens = out[0]
            assert np.abs(out[2] - m.model.confidence(want[k][None]).numpy()).max() < 1e-5  # the model's own rule


def test_stage_export_errors_and_no_mutation(model_and_images, tmp_path: Path) -> None:
    m, _ = model_and_images
    with pytest.raises(ConfigError, match="onnx or torch_export"):
        m.export_exits(tmp_path / "x", format="safetensors")
    with pytest.raises(ConfigError, match="opset 11"):
        m.export_exits(tmp_path / "x", opset=11)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.train()
    m.export_exits(tmp_path / "y", format="torch_export")
    assert m.training and all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    m.eval()


def test_the_unfoldable_adapter_base_exports_its_trained_blocks(tmp_path: Path) -> None:
    """The bottleneck adapter base does not merge: its stages run the trained blocks and agree too."""
    import importlib.util

    torch.manual_seed(0)
    m = DynAdapter(num_classes=7, base="adapter", exits={"blocks": [1]}, **dict(TINY, model_kwargs={"depth": 2}))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.3 if "head" in name else 0.05)
    m.eval()
    x = torch.randn(20, 3, 32, 32)
    with torch.no_grad():
        m.thresholds.copy_(torch.tensor(spaced_thresholds(m.model.confidence(m.forward_exits(x)[0])[:, None], 0.5)))
        want = m.infer(x)
    folder = m.export_exits(tmp_path / "exported", format="torch_export")
    spec = importlib.util.spec_from_file_location("exported_driver", folder / "driver.py")
    assert spec is not None and spec.loader is not None
    driver_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(driver_module)
    logits, exits = driver_module.EarlyExitModel(folder)(x.numpy())
    assert exits.tolist() == want.exit_index.tolist() and 0 < exits.sum() < 20
    assert np.abs(logits - want.logits.numpy()).max() < TOL


def test_dyt_base_stages_skip_tokens_and_equal_its_fixed_keep_rate_inference(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Both savings survive export: the stages keep the top-k tokens per block and the driver gives
    the composed model's exits and logits at the same fixed keep rate."""
    torch.manual_seed(0)
    m = DynAdapter(
        num_classes=7, base="dyt", exits={"blocks": [1, 2, 3]}, skipping={"fixed_keep_rate": 0.5}, **TINY
    ).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "head" in name or "dispatch" in name else 0.02))
    x = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        conf = torch.stack([m.model.confidence(lg) for lg in m.forward_exits(x)], dim=1)[:, :-1]
    m.thresholds.copy_(torch.tensor(spaced_thresholds(conf, 0.6)))
    with pytest.raises(ConfigError, match="keep_rate"):
        m.export_exits(tmp_path_factory.mktemp("bad") / "e", keep_rate=1.5)
    folder = m.export_exits(tmp_path_factory.mktemp("dyt") / "exported", format="onnx")
    with torch.no_grad():
        want = m.infer(x)
    assert bool((want.kept[want.offered > 0] == 2).all())  # round(0.5 * 4 patches) in every block run
    assert len(set(want.exit_index.tolist())) >= 2
    logits, exits = driver(folder, x.numpy(), tmp_path_factory.mktemp("run"))
    assert exits.tolist() == want.exit_index.tolist()
    assert np.abs(logits - want.logits.numpy()).max() < TOL
