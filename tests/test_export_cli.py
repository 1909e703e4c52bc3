"""``petl-lightning export --format/--opset/--keep_rate/--exits``: a checkpoint to an ONNX program
through the console script in a new process, and one-line errors for bad arguments. The DyT and
Dyn-Adapter exports of trained checkpoints run in ``tests/test_lifecycle.py`` (slow)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import onnx
import onnxruntime as ort
import pytest
import torch

from petl_lightning.export import export_main
from petl_lightning.methods.repadapter import RepAdapter
from test_lifecycle import cli, tiny_weights  # noqa: F401 - the lifecycle's console-script helper and weights fixture

pytestmark = pytest.mark.slow  # console-script processes: in make test, not in make test-fast


@pytest.fixture(scope="module")
def repadapter_checkpoint(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[RepAdapter, Path]:  # noqa: F811
    """A RepAdapter on the tiny ViT's weights file with random adapters and head, saved as a
    Lightning checkpoint (adapter-only, as ``fit`` writes it)."""
    torch.manual_seed(0)
    m = RepAdapter(
        num_classes=5, model_name="vit_tiny_patch16_224", checkpoint_path=str(tiny_weights), img_size=32,
        model_kwargs={"depth": 4},
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.strategy.connect(m)
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    trainer.save_checkpoint(path)
    return m.eval(), path


def test_export_subcommand_writes_an_onnx_program(
    repadapter_checkpoint: tuple[RepAdapter, Path], tmp_path: Path
) -> None:
    m, ckpt = repadapter_checkpoint
    proc = cli(
        "export", "--ckpt_path", str(ckpt), "--out", "model.onnx", "--format", "onnx", "--opset", "19", cwd=tmp_path
    )
    out = tmp_path / "model.onnx"
    assert f"exported {out}" in proc.stdout or "exported model.onnx" in proc.stdout
    assert [o.version for o in onnx.load(str(out)).opset_import if o.domain == ""] == [19]
    x = torch.randn(3, 3, 32, 32)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    with torch.no_grad():
        assert (got - m(x)).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "m.onnx", "--opset", "12"], "ONNX opset 12 is not supported; choose 18-23"),
        (["--out", "m.pt2", "--format", "onnx"], "The onnx format writes .onnx files"),
        (["--out", "m.bin"], "Cannot tell the export format of"),
        (["--out", "m.onnx", "--keep_rate", "0.5"], "keep_rate is DyT's export option"),
        (["--out", "folder", "--exits"], "--exits exports early-exit stages; RepAdapter has no exits"),
    ],
)
def test_bad_export_arguments_print_one_line(
    repadapter_checkpoint: tuple[RepAdapter, Path], tmp_path: Path, capsys: Any, args: list[str], message: str
) -> None:
    _, ckpt = repadapter_checkpoint
    out = tmp_path / args[1]
    assert export_main(["--ckpt_path", str(ckpt), "--out", str(out), *args[2:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not out.exists()
