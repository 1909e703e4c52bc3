"""Benchmark entries for the deployable forms: ``torch.compile`` (Inductor) and the exported ONNX
programs in onnxruntime, for the frozen backbone, RepAdapter (merged), DyT r=0.5 (top-k) and
Dyn-Adapter at budget 0.5 (stage programs and the early-exit driver).

Every ratio is to the eager PyTorch frozen backbone of the same run. The compiled forms compile at
their first (warm-up) call, which is not timed. The ONNX programs are exported at build time
(fp32, CPU trace, ``docs/deploy.md``) and run in onnxruntime with as many intra-op threads as
PyTorch's rows use; on a GPU run with the CUDA execution provider when onnxruntime has it (the batch
is copied to the host and back, in fp32 whatever the autocast), else those rows are left out. ARC's merged form is
the same graph as RepAdapter's, so it has no rows of its own.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from benchmarks.common import Entry
from benchmarks.dyn_adapter_entries import DynamicLogits
from benchmarks.dyn_adapter_entries import build as build_dyn_adapter
from benchmarks.dyt_entries import build_dyt
from torch import Tensor, nn

from petl_lightning.deploy.driver import EarlyExitModel
from petl_lightning.deploy.programs import export_program
from petl_lightning.flops import vit_flops
from petl_lightning.methods.repadapter import RepAdapter

EXPORT_DIR = Path(tempfile.mkdtemp(prefix="petl_bench_onnx_"))


def ort_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = ["CUDAExecutionProvider"] if torch.cuda.is_available() else []
    return [p for p in wanted if p in available] + ["CPUExecutionProvider"]


class OnnxRuntimeLogits(nn.Module):
    """Images -> logits of an ``.onnx`` program in onnxruntime (host arrays in and out)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the threads PyTorch's rows use
        self.session = ort.InferenceSession(str(path), options, providers=ort_providers())

    def forward(self, x: Tensor) -> Tensor:
        out = self.session.run(None, {"images": x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(out).to(x.device)


class DriverLogits(nn.Module):
    """Images -> logits of Dyn-Adapter's exported stages run by the standalone early-exit driver."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.model = EarlyExitModel(folder, providers=ort_providers(), threads=torch.get_num_threads())

    def forward(self, x: Tensor) -> Tensor:
        logits, _ = self.model(np.ascontiguousarray(x.detach().float().cpu().numpy()))
        return torch.from_numpy(logits).to(x.device)


def _onnx(name: str, module: nn.Module, img_size: int) -> Path:
    example = (torch.randn(2, 3, img_size, img_size),)
    return export_program(module.cpu().eval(), example, EXPORT_DIR / f"{name}.onnx", "onnx")


def entries(model_name: str, img_size: int, num_classes: int) -> list[Entry]:
    """Compiled and ONNX Runtime rows of the backbone, RepAdapter (merged), DyT r=0.5, Dyn-Adapter 0.5."""
    import timm

    if torch.cuda.is_available() and "CUDAExecutionProvider" not in ort_providers():
        ort_note = None  # onnxruntime without CUDA: no fair GPU row
    else:
        ort_note = "onnxruntime " + ("CUDA EP, fp32, host copies" if torch.cuda.is_available() else "CPU EP, fp32")
    common = dict(num_classes=num_classes, model_name=model_name, pretrained=False, img_size=img_size)
    backbone = timm.create_model(model_name, pretrained=False, num_classes=num_classes, img_size=img_size)
    backbone.eval().requires_grad_(False)
    rep = RepAdapter(adapter_dim=8, adapter_groups=2, adapter_scale=1.0, placement="attn_mlp", **common)
    with torch.no_grad():
        for p in rep.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.02)
    merged = rep.eval().merge().requires_grad_(False)
    gflops = vit_flops(rep.vit.shape(), num_classes) / 1e9
    dyt = build_dyt(model_name, img_size, num_classes, adapter_dim=8, skipping={"sites": "mlp", "fixed_keep_rate": 0.5})
    topk = dyt.deploy_form().requires_grad_(False)
    dyt_gflops = dyt.inference_flops() / 1e9
    dyn, merged_vit, calib = build_dyn_adapter(model_name, img_size, num_classes)
    c = calib[0.5]
    dyn.thresholds.copy_(torch.tensor(c["thresholds"]))
    trained = {k: m.parameter_summary()["trainable"] for k, m in (("rep", rep), ("dyt", dyt), ("dyn", dyn))}
    dyn.requires_grad_(False)  # these rows are inference forms: no training step is timed on them
    rows = [
        Entry("Frozen backbone (compiled)", torch.compile(backbone), 0, gflops, "torch.compile (Inductor)"),
        Entry(
            "RepAdapter (merged, compiled)", torch.compile(merged), trained["rep"], gflops, "torch.compile of merge()"
        ),
        Entry(
            "DyT r=0.5 (compiled)",
            torch.compile(topk, fullgraph=True),
            trained["dyt"],
            dyt_gflops,
            "deploy_form() (top-k), fullgraph",
        ),
        Entry(
            "Dyn-Adapter (budget 0.5, compiled)",
            torch.compile(DynamicLogits(dyn, merged_vit, c["thresholds"]).eval(), dynamic=True),
            trained["dyn"],
            c["gflops"],
            "torch.compile(dynamic=True) of infer on the merged blocks",
        ),
    ]
    if ort_note is None:
        return rows
    folder = dyn.export_exits(EXPORT_DIR / "dyn_adapter", format="onnx")
    rows += [
        Entry("Frozen backbone (ONNX Runtime)", OnnxRuntimeLogits(_onnx("backbone", backbone, img_size)), 0, gflops,
              ort_note),
        Entry("RepAdapter (ONNX Runtime)", OnnxRuntimeLogits(_onnx("repadapter", merged, img_size)), trained["rep"],
              gflops, f"{ort_note}; merged"),
        Entry("DyT r=0.5 (ONNX Runtime)", OnnxRuntimeLogits(_onnx("dyt", topk, img_size)), trained["dyt"],
              dyt_gflops, f"{ort_note}; top-k program"),
        Entry("Dyn-Adapter (budget 0.5, ONNX Runtime)", DriverLogits(folder), trained["dyn"], c["gflops"],
              f"{ort_note}; {len(dyn.exit_depths)} stage programs + driver.py"),
    ]  # fmt: skip
    return rows


__all__ = ["DriverLogits", "OnnxRuntimeLogits", "entries"]
