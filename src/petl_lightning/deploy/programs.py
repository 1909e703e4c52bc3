"""Write a module as a deployable program: ONNX (``torch.onnx``'s exporter) or a ``torch.export``
program (``.pt2``), with a dynamic batch dimension and the model's metadata.

Both formats start from ``torch.export`` (the ONNX exporter runs it too), so what exports to one
exports to the other. The batch dimension is dynamic (any size from 1); every other size is fixed by
the example. The written file is checked before it is put in place: the program (loaded back from
the ``.pt2``, or the ``.onnx`` in onnxruntime) must give the module's outputs within ``atol`` on a
batch of another size than the example's. Nothing is written unless the export completes.

Reading the files without petl_lightning (``docs/deploy.md``)::

    session = onnxruntime.InferenceSession("model.onnx")              # metadata: session.get_modelmeta()
    logits = session.run(None, {"images": images_numpy})[0]
    program = torch.export.load("model.pt2")                          # metadata: extra_files, below
    logits = program.module()(images)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from petl_lightning.deploy.protocol import Exportable
from petl_lightning.deploy.safetensors import export_safetensors
from petl_lightning.errors import ConfigError, ExportError, require

#: Export formats and the file suffix each one writes.
FORMATS = ("onnx", "torch_export", "safetensors")
SUFFIXES = {"onnx": ".onnx", "torch_export": ".pt2", "safetensors": ".safetensors"}
#: ONNX opsets this exporter writes: torch.onnx implements 18 and later (an older opset would be a
#: lossy conversion of an opset-18 graph); onnxruntime 1.19+ runs up to 23.
ONNX_OPSETS = range(18, 24)
#: The name of the metadata file inside a ``.pt2`` archive (``torch.export.load(..., extra_files=)``).
PT2_METADATA = "petl_metadata.json"


def resolve_format(path: str | Path, fmt: str | None) -> str:
    """The export format of ``path``: ``fmt`` if given (it must fit the suffix), else from the suffix."""
    suffix = Path(path).suffix
    if fmt is None:
        by_suffix = {s: f for f, s in SUFFIXES.items()}
        if suffix not in by_suffix:
            raise ConfigError(
                f"Cannot tell the export format of {str(path)!r}; end it in "
                f"{', '.join(SUFFIXES.values())} or pass a format ({', '.join(FORMATS)})."
            )
        return by_suffix[suffix]
    if fmt not in FORMATS:
        raise ConfigError(f"Unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    if suffix != SUFFIXES[fmt]:
        raise ConfigError(f"The {fmt} format writes {SUFFIXES[fmt]} files; got {str(path)!r}.")
    return fmt


def check_exporter(fmt: str, opset: int | None) -> None:
    """Fail fast, in one line, on an opset that does not fit or a missing optional dependency."""
    if opset is not None and (fmt != "onnx" or opset not in ONNX_OPSETS):
        if fmt != "onnx":
            raise ConfigError(f"An opset is an ONNX option; the {fmt} format takes none.")
        raise ConfigError(
            f"ONNX opset {opset} is not supported; choose {ONNX_OPSETS.start}-{ONNX_OPSETS.stop - 1} "
            f"(torch.onnx writes opset 18 and later)."
        )
    if fmt == "onnx":
        for module in ("onnx", "onnxscript", "onnxruntime"):
            require(module, "export")


def batch_dynamic(inputs: Sequence[Tensor]) -> tuple[dict[int, Any], ...]:
    """``dynamic_shapes`` with dimension 0 of every input the one dynamic batch size (1 and up)."""
    batch = torch.export.Dim("batch", min=1)
    return tuple({0: batch} for _ in inputs)


def _outputs(out: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [out] if isinstance(out, Tensor) else list(out)


def _check_close(expected: list[Tensor], got: list[Any], atol: float, what: str) -> None:
    for i, (e, g) in enumerate(zip(expected, got)):
        diff = float((torch.as_tensor(g, dtype=e.dtype) - e).abs().max()) if e.numel() else 0.0
        if not diff <= atol:  # also catches NaN
            raise ExportError(f"The exported {what} differs from the module by {diff:.3g} (output {i}).")


def export_program(
    module: nn.Module,
    example: tuple[Tensor, ...],
    path: str | Path,
    fmt: str,
    opset: int | None = None,
    input_names: Sequence[str] = ("images",),
    output_names: Sequence[str] = ("logits",),
    metadata: dict[str, Any] | None = None,
    atol: float = 1e-4,
) -> Path:
    """Export ``module`` (eval mode, no gradients; traced with ``example``, batch dimension dynamic)
    to ``path`` as ``fmt`` (``"onnx"`` or ``"torch_export"``) with ``metadata`` (JSON values), check
    the file against the module on a batch one larger than the example's, and return the path."""
    if fmt not in ("onnx", "torch_export"):
        raise ConfigError(f"export_program writes onnx or torch_export programs, not {fmt!r}.")
    check_exporter(fmt, opset)
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.stem}.{os.getpid()}.tmp{p.suffix}")
    module = module.eval()
    check_input = tuple(torch.cat([t, t[:1]]) for t in example)
    meta = json.dumps(metadata or {})
    try:
        with torch.no_grad():
            expected = _outputs(module(*check_input))
            if fmt == "torch_export":
                program = torch.export.export(module, example, dynamic_shapes=batch_dynamic(example))
                torch.export.save(program, tmp, extra_files={PT2_METADATA: meta})
                got = _outputs(torch.export.load(tmp).module()(*check_input))
            else:
                got = _export_onnx(module, example, tmp, opset, input_names, output_names, metadata or {}, check_input)
        _check_close(expected, got, atol, f"{fmt} program {p.name}")
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


def _export_onnx(
    module: nn.Module,
    example: tuple[Tensor, ...],
    tmp: Path,
    opset: int | None,
    input_names: Sequence[str],
    output_names: Sequence[str],
    metadata: dict[str, Any],
    check_input: tuple[Tensor, ...],
) -> list[Any]:
    """``torch.onnx.export`` (the torch.export-based exporter) to ``tmp``; the outputs of ``check_input``
    in onnxruntime."""
    import onnxruntime as ort

    program = torch.onnx.export(
        module,
        example,
        input_names=list(input_names),
        output_names=list(output_names),
        opset_version=opset,
        dynamic_shapes=batch_dynamic(example),
        dynamo=True,
        verbose=False,
    )
    if program is None:  # pragma: no cover - the dynamo exporter always returns its program
        raise ExportError("torch.onnx.export returned no program.")
    program.model.metadata_props.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    program.save(str(tmp))
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    return list(session.run(None, {n: t.numpy() for n, t in zip(input_names, check_input)}))


def export_model(
    model: Exportable,
    path: str | Path,
    fmt: str | None = None,
    opset: int | None = None,
    keep_rate: float | None = None,
) -> Path:
    """``model.export(...)`` of every method: ``safetensors``: the merged timm model's weights;
    ``onnx`` / ``torch_export``: a program of ``model.deploy_form(keep_rate)`` traced on the CPU in
    fp32. Either way with ``model.export_metadata(keep_rate)``."""
    fmt = resolve_format(path, fmt)
    check_exporter(fmt, opset)
    if fmt == "safetensors":
        if keep_rate is not None:
            raise ConfigError("keep_rate applies to the onnx and torch_export formats (DyT's top-k programs).")
        return export_safetensors(model.merge(), path, model.export_metadata())
    form = model.deploy_form(keep_rate).to("cpu", torch.float32)
    example = (model.example_input().cpu(),)
    return export_program(form, example, path, fmt, opset, metadata=model.export_metadata(keep_rate))


__all__ = [
    "FORMATS",
    "ONNX_OPSETS",
    "PT2_METADATA",
    "SUFFIXES",
    "batch_dynamic",
    "check_exporter",
    "export_model",
    "export_program",
    "resolve_format",
]
