"""DyT's exported token-skipping model: the top-k programs (ONNX, torch.export, dynamic batch) equal
the eager model at the same keep rule, gather only the kept tokens, and execute <= 0.72 of the
backbone's FLOPs at r = 0.5."""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from petl_lightning.errors import ConfigError
from petl_lightning.flops import vit_flops
from petl_lightning.methods.dyt import DyT

TOL = 1e-4
# 8-px patches at 48 px: 36 patches and a cheap patch embedding (a small share, as in ViT-B at 224)
SMALL: dict[str, Any] = dict(
    model_name="vit_tiny_patch16_224", pretrained=False, img_size=48, model_kwargs={"depth": 4, "patch_size": 8}
)


def make(placement: str = "mlp", depth: int = 4, **skipping: Any) -> DyT:
    """A DyT with random adapters and decisive random dispatchers (so every image keeps other tokens)."""
    torch.manual_seed(0)
    shape = dict(SMALL, model_kwargs={**SMALL["model_kwargs"], "depth": depth})
    m = DyT(num_classes=5, skipping={"sites": placement, **skipping}, **shape)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "dispatchers" in name else 0.05))
    return m.eval()


@functools.cache
def load(path: Path) -> Any:
    """An exported program as a deployment loads it (onnxruntime, or torch.export.load), once per file."""
    if path.suffix == ".onnx":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    return torch.export.load(str(path)).module()


def run(path: Path, x: torch.Tensor) -> torch.Tensor:
    """The first output of an exported program, run with no petl_lightning code."""
    with torch.no_grad():
        return load(path)(x)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[DyT, Path]]:
    """DyT (placement mlp, fixed_keep_rate 0.5) as ONNX (fused attention) and as a .pt2 program
    (unfused attention, so FlopCounterMode sees every product)."""
    folder = tmp_path_factory.mktemp("dyt")
    fused = make(fixed_keep_rate=0.5)
    unfused = make(fixed_keep_rate=0.5)
    unfused.vit.set_fused_attn(False)
    return {
        "onnx": (fused, fused.export(folder / "dyt.onnx")),
        "torch_export": (unfused, unfused.export(folder / "dyt.pt2")),
    }


@pytest.mark.parametrize("fmt", ["onnx", "torch_export"])
def test_top_k_program_equals_eager_dyt_and_catches_a_changed_adapter(fmt: str, exported) -> None:
    m, path = exported[fmt]
    for batch in (1, 6):
        x = torch.randn(batch, 3, 48, 48)
        with torch.no_grad():
            want = m(x)  # DyT's own eval forward at fixed_keep_rate 0.5 (gathered, top-k)
        assert (run(path, x) - want).abs().max().item() < TOL
    x = torch.randn(4, 3, 48, 48)
    up = m.vit.blocks[2].adapters["mlp"].up.weight
    with torch.no_grad():
        up.add_(0.5)
        changed = m(x)
        up.sub_(0.5)
    assert (run(path, x) - changed).abs().max().item() > 10 * TOL


def test_exported_program_executes_the_skipping_flops(exported) -> None:
    m, path = exported["torch_export"]
    program = torch.export.load(str(path)).module()
    x = torch.randn(2, 3, 48, 48)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        program(x)
    executed = counter.get_total_flops() / 2  # per batch, multiply-adds
    k = round(0.5 * m.vit.num_patches)
    kept = torch.full((1, 4, 1), float(k))
    analytic = m.vit.executed_flops(kept, norm=False)[0] + m.model.head_flops()
    assert executed == 2 * float(analytic)  # what the analytic counter says
    backbone = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=48, depth=4, patch_size=8
    )
    for blk in backbone.blocks:
        blk.attn.fused_attn = False
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        backbone(x)
    assert counter.get_total_flops() == 2 * 2 * vit_flops(m.vit.shape(), 5, norm=False)
    ratio = executed / (counter.get_total_flops() / 2)
    assert ratio <= 0.72, ratio
    with_norms = m.vit.executed_flops(kept)[0] + m.model.head_flops()
    assert float(with_norms) / m.backbone_flops() <= 0.72  # papers' convention (norms counted)


def test_onnx_graph_gathers_with_top_k(exported) -> None:
    _, path = exported["onnx"]
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("TopK") >= 4  # one selection per block (sorting the kept indices may add more)
    assert ops.count("ScatterND") == 4  # the kept rows' MLP output added back, per block
    assert "NonZero" not in ops  # static shapes: no data-dependent sizes


def test_attention_skipping_exports_at_a_given_keep_rate(tmp_path: Path) -> None:
    """A threshold-rule DyT skipping attention queries too, exported with keep_rate (to ONNX, whose
    exporter runs torch.export first): equals the eager model at that fixed rate."""
    m = make("attn_mlp", depth=2)
    path = m.export(tmp_path / "dyt.onnx", keep_rate=0.25)
    assert m.skipping.fixed_keep_rate is None  # the module keeps its threshold rule
    x = torch.randn(3, 3, 48, 48)
    m.vit.skipping = replace(m.skipping, fixed_keep_rate=0.25)
    with torch.no_grad():
        want = m(x)
    assert (run(path, x) - want).abs().max().item() < TOL


def test_class_attention_prior_exports_to_onnx(tmp_path: Path) -> None:
    """The study's ranking-sooner dispatcher (class-attention prior, top-k training at 0.7) exports at
    its fixed keep rate and the ONNX program equals the eager model, over a dynamic batch."""
    m = make(depth=2, class_attention_prior=1.0, training_masks="topk", target_rate=0.7, fixed_keep_rate=0.7)
    path = m.export(tmp_path / "prior.onnx")
    for batch in (1, 4):
        x = torch.randn(batch, 3, 48, 48)
        with torch.no_grad():
            want = m(x)
        assert (run(path, x) - want).abs().max().item() < TOL


def test_export_needs_a_keep_rate_and_copies_the_model() -> None:
    m = make()
    with pytest.raises(ConfigError, match=r"pass keep_rate .*target_rate 0\.5"):
        m.export("dyt.onnx")
    with pytest.raises(ConfigError, match=r"keep_rate must lie in \[0, 1\]"):
        m.deploy_form(1.5)
    m.train()
    form = m.deploy_form(0.5)
    assert not form.training and m.training and form.vit.blocks[0] is not m.vit.blocks[0]
    assert form.vit.keep_count() == 18 and m.vit.keep_count() is None
    assert m.export_metadata(0.5)["keep_count"] == 18
