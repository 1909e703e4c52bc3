"""ONNX and torch.export programs of RepAdapter, ARC and Dyn-Adapter's merged base: parity with the
module (dynamic batch), no adapter ops in the graph, metadata, no mutation, one-line errors."""

from __future__ import annotations

import functools
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from torch import nn

from petl_lightning.deploy.programs import PT2_METADATA, export_program
from petl_lightning.errors import ConfigError, MergeError, MissingExtraError, PETLError
from petl_lightning.layers.wrapper import adapter_layers
from petl_lightning.methods.arc import ARC
from petl_lightning.methods.dyn_adapter import DynAdapter
from petl_lightning.methods.repadapter import RepAdapter

TOL = 1e-4
TINY: dict[str, Any] = dict(model_name="vit_tiny_patch16_224", pretrained=False, img_size=32, model_kwargs={"depth": 2})
METHODS = {"repadapter": RepAdapter, "arc": ARC}
FORMATS = {"onnx": ".onnx", "torch_export": ".pt2"}


def randomize(module: nn.Module, std: float = 0.05, seed: int = 0) -> None:
    """Random values in every trainable tensor (adapters, heads), so no adapter is the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@functools.cache
def load(path: Path) -> Any:
    """An exported program as a deployment loads it (onnxruntime, or torch.export.load), once per file."""
    if path.suffix == ".onnx":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    return torch.export.load(str(path)).module()


def run_program(path: Path, x: torch.Tensor) -> torch.Tensor:
    """The first output of an exported program, run with no petl_lightning code."""
    with torch.no_grad():
        return load(path)(x)


def onnx_ops(path: Path) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Per (method, format), once per module: the trained-looking module and its exported file."""
    cache: dict[tuple[str, str], tuple[nn.Module, Path]] = {}

    def get(method: str, fmt: str) -> tuple[nn.Module, Path]:
        if (method, fmt) not in cache:
            torch.manual_seed(0)
            m = METHODS[method](num_classes=5, **TINY)
            randomize(m)
            path = m.export(tmp_path_factory.mktemp(method) / f"model{FORMATS[fmt]}", format=fmt)
            cache[method, fmt] = (m.eval(), path)
        return cache[method, fmt]

    return get


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("method", list(METHODS))
def test_program_equals_module_at_any_batch_and_catches_a_changed_adapter(method: str, fmt: str, exported) -> None:
    m, path = exported(method, fmt)
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            want = m(x)
        got = run_program(path, x)
        assert got.shape == (batch, 5)
        assert (got - want).abs().max().item() < TOL
    # the parity check can fail: one changed adapter weight after export shows as a mismatch
    x = torch.randn(4, 3, 32, 32)
    adapter = m.vit.blocks[1].attn.qkv
    weight = adapter.up.weight if method == "repadapter" else adapter.coeff
    with torch.no_grad():
        weight.add_(0.5)
        changed = m(x)
        weight.sub_(0.5)
    assert (run_program(path, x) - changed).abs().max().item() > 10 * TOL


@pytest.mark.parametrize("method", list(METHODS))
def test_onnx_graph_is_the_plain_vits_graph(method: str, exported, tmp_path: Path) -> None:
    """Merged: the same ops as timm's own ViT exported the same way (no adapter MatMul/Gemm left)."""
    _, path = exported(method, "onnx")
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, depth=2)
    reference = export_program(plain, (torch.randn(2, 3, 32, 32),), tmp_path / "plain.onnx", "onnx")
    ours, theirs = onnx_ops(path), onnx_ops(reference)
    assert ours["MatMul"] + ours["Gemm"] == theirs["MatMul"] + theirs["Gemm"] > 0
    assert ours == theirs


def test_programs_carry_the_metadata(exported) -> None:
    _, onnx_path = exported("repadapter", "onnx")
    meta = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).get_modelmeta()
    props = meta.custom_metadata_map
    assert (props["model_name"], props["img_size"], props["num_classes"], props["method"]) == (
        "vit_tiny_patch16_224",
        "32",
        "5",
        "RepAdapter",
    )
    _, pt2_path = exported("repadapter", "torch_export")
    extra = {PT2_METADATA: ""}
    torch.export.load(str(pt2_path), extra_files=extra)
    assert '"img_size": 32' in extra[PT2_METADATA] and '"mean": [0.485' in extra[PT2_METADATA]


def test_export_merges_a_copy_and_leaves_the_module_alone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = RepAdapter(num_classes=5, **TINY)
    randomize(m)
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    modes = [mod.training for mod in m.modules()]
    m.export(tmp_path / "model.pt2")
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    assert [mod.training for mod in m.modules()] == modes  # still in training mode, adapters unfolded
    assert len(adapter_layers(m.vit)) == 2 * m.vit.depth


def test_dyn_adapter_exports_its_merged_base_without_exits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = DynAdapter(num_classes=5, exits={"blocks": [1]}, **TINY)
    randomize(m)
    m.eval()
    path = m.export(tmp_path / "base.onnx")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        full = m.forward_exits(x)[-1]  # the final exit: the base model without early exit
    assert (run_program(path, x) - full).abs().max().item() < TOL


@pytest.fixture(scope="module")
def small_model() -> RepAdapter:
    torch.manual_seed(0)
    return RepAdapter(num_classes=5, **dict(TINY, model_kwargs={"depth": 1}))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(path="model.tflite"), r"Cannot tell the export format"),
        (dict(path="model.onnx", format="tflite"), r"Unknown export format 'tflite'"),
        (dict(path="model.pt2", format="onnx"), r"The onnx format writes \.onnx files"),
        (dict(path="model.onnx", opset=12), r"opset 12 is not supported; choose 18-23"),
        (dict(path="model.pt2", opset=18), r"opset is an ONNX option"),
        (dict(path="model.onnx", keep_rate=0.5), r"keep_rate is DyT's export option"),
        (dict(path="model.safetensors", keep_rate=0.5), r"keep_rate applies to the onnx and torch_export"),
    ],
)
def test_bad_export_arguments_give_one_line(small_model: RepAdapter, tmp_path: Path, kwargs: dict, match: str) -> None:
    kwargs = dict(kwargs, path=tmp_path / kwargs["path"])
    with pytest.raises(ConfigError, match=match) as err:
        small_model.export(**kwargs)
    assert "\n" not in str(err.value)
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("missing", ["onnx", "onnxscript", "onnxruntime"])
def test_missing_onnx_dependency_names_the_extra(
    small_model: RepAdapter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # import then raises ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'petl-lightning\[export\]'") as err:
        small_model.export(tmp_path / "model.onnx")
    assert missing in str(err.value) and "\n" not in str(err.value)
    assert isinstance(err.value, PETLError)
    small_model.export(tmp_path / "model.pt2")  # torch.export needs no extra


def test_safetensors_export_of_a_method_that_does_not_fold_says_why(tmp_path: Path) -> None:
    from petl_lightning.methods.dyt import DyT

    d = DyT(num_classes=5, **dict(TINY, model_kwargs={"depth": 1}))
    with pytest.raises(MergeError, match="does not fold"):
        d.export(tmp_path / "dyt.safetensors")
