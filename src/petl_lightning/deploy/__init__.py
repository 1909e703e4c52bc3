"""Deployable programs and the files they are written to (``docs/deploy.md``). Nothing here knows a
method: a model implements :class:`~petl_lightning.deploy.protocol.Exportable`.

- :mod:`.programs`: formats (``onnx``, ``torch_export``, ``safetensors``) and the checked export of a
  module as a program with a dynamic batch.
- :mod:`.safetensors`: a merged model's weights with their metadata.
- :mod:`.stages`: an early-exit model as stage programs with a standalone driver (:mod:`.driver`).
"""

from petl_lightning.deploy.programs import FORMATS, ONNX_OPSETS, export_model, export_program
from petl_lightning.deploy.protocol import Exportable

__all__ = ["FORMATS", "ONNX_OPSETS", "Exportable", "export_model", "export_program"]
