"""Deployable forms of the methods and the files they export to (``docs/deploy.md``).

- :mod:`.programs`: formats (``onnx``, ``torch_export``, ``safetensors``), the checked export of a
  module as a program with a dynamic batch, and ``PETLModule.export``.
- :mod:`.dyt_topk`: DyT's static top-k inference form (:class:`DyTTopK`).
- :mod:`.stages`: Dyn-Adapter as stage programs with a standalone early-exit driver (:mod:`.driver`).
"""

from petl_lightning.deploy.dyt_topk import DyTTopK
from petl_lightning.deploy.programs import FORMATS, ONNX_OPSETS, ExportError, export_program

__all__ = ["FORMATS", "ONNX_OPSETS", "DyTTopK", "ExportError", "export_program"]
