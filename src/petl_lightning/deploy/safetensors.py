"""A merged model's weights as ``.safetensors`` with the metadata a deployment needs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from petl_lightning.errors import ConfigError


def export_safetensors(model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Save ``model.state_dict()`` (contiguous CPU tensors) as ``.safetensors`` with ``metadata``
    (values stored as JSON strings: model name, image size, classes, normalisation, ...), written to
    a temporary file and renamed, so an interrupted export never leaves half a file.

    A merged model saved this way loads back with ``timm.create_model(meta["model_name"],
    num_classes=int(meta["num_classes"]), img_size=int(meta["img_size"]), checkpoint_path=path)``.
    """
    from safetensors.torch import save_file

    p = Path(path).expanduser()
    if p.suffix != ".safetensors":
        raise ConfigError(f"Export path {str(p)!r} must end in .safetensors.")
    p.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=meta)
    os.replace(tmp, p)
    return p


__all__ = ["export_safetensors"]
