"""What a module implements to be exported (``deploy/`` reads nothing else of it)."""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor, nn


class Exportable(Protocol):
    """A trained model that writes its deployable form: every method's LightningModule."""

    def export_metadata(self, keep_rate: float | None = None) -> dict[str, Any]:
        """What a deployment needs to rebuild and feed the program without petl_lightning."""
        ...

    def example_input(self, batch: int = 2) -> Tensor:
        """Random images of the size the model takes (what programs are traced with)."""
        ...

    def merge(self) -> nn.Module:
        """The plain timm model with every adapter folded in (what ``.safetensors`` holds)."""
        ...

    def deploy_form(self, keep_rate: float | None = None) -> nn.Module:
        """Images to logits as a deployment runs them (what ONNX / ``torch.export`` programs trace)."""
        ...


__all__ = ["Exportable"]
