"""The segmenter in process: merge parity and ONNX export, DyT's gathered = masked dense path, executed
FLOPs against FlopCounterMode, sliding-window and whole-image inference, metrics, schedule, refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from petl_lightning import (
    ARCConfig,
    DynAdapterConfig,
    DyTConfig,
    LoRAConfig,
    RepAdapterConfig,
    Segmenter,
    TokenSkipping,
)
from petl_lightning.errors import ConfigError, MergeError
from petl_lightning.methods.adapter.config import AdapterConfig
from petl_lightning.tasks.segmentation.inference import slide_inference, whole_inference, window_starts
from petl_lightning.tasks.segmentation.metrics import SegmentationMetrics
from petl_lightning.tasks.segmentation.module import warmup_decay

TINY = dict(model_name="vit_tiny_patch16_224", pretrained=False, img_size=32, model_kwargs={"depth": 4})
FOLDABLE = {"repadapter": RepAdapterConfig(adapter_dim=4), "arc": ARCConfig(), "lora": LoRAConfig()}


def randomized(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random trainable tensors and BatchNorm statistics, so that nothing cancels by accident (at
    initialisation the adapters are the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "dispatchers" in name else 0.05))
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return module.eval()


def segmenter(method: object = None, head: str = "upernet", **kwargs: object) -> Segmenter:
    torch.manual_seed(0)
    return randomized(Segmenter(num_classes=5, method=method, head=head, head_channels=16, **TINY, **kwargs))  # type: ignore[return-value]


def images(batch: int = 2, size: int = 32, seed: int = 1) -> Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(FOLDABLE))
def test_merged_segmenter_equals_unmerged_and_exports_to_onnx(name: str, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    seg = segmenter(FOLDABLE[name])
    merged = seg.merge()
    assert {type(b).__name__ for b in merged.vit.blocks} == {"Block"}  # plain timm blocks, adapters folded
    x = images(3)
    with torch.no_grad():
        expected = seg(x)
        assert expected.shape == (3, 5, 32, 32)
        assert float((merged(x) - expected).abs().max()) <= 1e-4
        assert float(expected.std()) > 1e-3  # the comparison is not between two constants
    path = seg.export(tmp_path / f"{name}.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 4):  # a dynamic batch
        x = images(batch, seed=batch)
        got = session.run(None, {"images": x.numpy()})[0]
        with torch.no_grad():
            assert np.abs(got - seg(x).numpy()).max() <= 1e-4
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["num_classes"] == "5" and meta["head"] == "upernet"


def test_an_adapter_that_cannot_fold_says_so() -> None:
    with pytest.raises(MergeError):
        segmenter(AdapterConfig(adapter_dim=4)).merge()


@pytest.mark.parametrize("fused", [True, False])
def test_dyt_dense_gathered_equals_masked(fused: bool) -> None:
    seg = segmenter(DyTConfig(adapter_dim=4, skipping=TokenSkipping(threshold=0.5)))
    seg.vit.set_fused_attn(fused)
    x = images(4)
    with torch.no_grad():
        gathered = seg.model.run(x)
        seg.vit.skipping.inference = "mask"  # type: ignore[attr-defined]
        masked = seg.model.run(x)
    assert torch.equal(gathered.kept, masked.kept)
    share = float(gathered.kept.mean()) / seg.vit.num_patches
    assert 0.1 < share < 0.9  # some tokens skip, some do not: the comparison means something
    assert float((gathered.logits - masked.logits).abs().max()) <= 1e-5


@pytest.mark.parametrize("method", ["frozen", "repadapter", "dyt"])
@pytest.mark.parametrize("head", ["upernet", "linear"])
def test_executed_flops_equal_flop_counter(method: str, head: str) -> None:
    config = {"frozen": None, "repadapter": RepAdapterConfig(adapter_dim=4), "dyt": DyTConfig(adapter_dim=4)}[method]
    seg = segmenter(config, head)
    seg.vit.set_fused_attn(False)  # explicit matmuls, which the counter sees
    x = images(4)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run = seg.model.run(x)
    analytic = seg.model.executed_flops(run.kept, norm=False).sum()
    assert float(analytic) == counter.get_total_flops() / 2
    if method == "dyt":  # images kept different numbers of tokens, and the count followed them
        per_image = seg.model.executed_flops(run.kept, norm=False)
        assert len(set(per_image.tolist())) > 1
        assert float(per_image.max()) < seg.model.full_flops(norm=False)


def test_inference_stats_count_every_window_and_the_head() -> None:
    seg = segmenter(RepAdapterConfig(adapter_dim=4), stride=16)
    x = images(2, size=48)  # 2 x 2 windows of 32 every 16 pixels
    with torch.no_grad():
        out = seg.infer(x)
    assert out.logits.shape == (2, 5, 48, 48)
    assert window_starts(48, 32, 16) == [0, 16]
    assert torch.allclose(out.flops, torch.full((2,), 4.0 * seg.model.full_flops(merged=True), dtype=torch.float64))
    assert torch.equal(out.keep_rate(), torch.ones(2, dtype=torch.float64))


def test_slide_on_one_crop_equals_whole_and_averages_overlaps() -> None:
    seg = segmenter(RepAdapterConfig(adapter_dim=4))
    x = images(2)
    with torch.no_grad():
        whole = whole_inference(seg.model, x, 32)
        assert torch.equal(slide_inference(seg.model, x, 32, 21), whole)
        assert torch.equal(whole, seg.model(x))
        big = images(1, size=40)
        slid = slide_inference(seg.model, big, 32, 8)  # windows at 0 and 8 on each side
        manual = torch.zeros(1, 5, 40, 40)
        count = torch.zeros(1, 1, 40, 40)
        for y0 in (0, 8):
            for x0 in (0, 8):
                manual[..., y0 : y0 + 32, x0 : x0 + 32] += seg.model(big[..., y0 : y0 + 32, x0 : x0 + 32])
                count[..., y0 : y0 + 32, x0 : x0 + 32] += 1
        assert torch.allclose(slid, manual / count, atol=1e-6)
        small = images(1, size=20)  # smaller than a window: zero-padded, then cropped back
        padded = torch.nn.functional.pad(small, (0, 12, 0, 12))
        assert torch.allclose(slide_inference(seg.model, small, 32, 21), seg.model(padded)[..., :20, :20], atol=1e-6)


def test_metrics_follow_the_benchmark_definition() -> None:
    metric = SegmentationMetrics(4, ignore_index=255)
    target = torch.tensor([[0, 0, 1, 1, 2, 255]])
    preds = torch.tensor([[0, 1, 1, 1, 3, 0]])
    metric.update(preds, target)
    out = metric.compute()
    # class 0: hit 1, union 2; class 1: hits 2, union 3; class 2: 0 of 1; class 3: predicted only -> 0
    assert torch.allclose(out["IoU"], torch.tensor([0.5, 2 / 3, 0.0, 0.0], dtype=torch.float64))
    assert math.isclose(float(out["mIoU"]), (0.5 + 2 / 3) / 4)
    assert torch.allclose(out["Acc"][:3], torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64))
    assert math.isnan(float(out["Acc"][3]))  # no pixel of class 3: no accuracy, left out of mAcc
    assert math.isclose(float(out["mAcc"]), 0.5)
    assert math.isclose(float(out["aAcc"]), 3 / 5)  # the ignored pixel counts nowhere
    logits = torch.nn.functional.one_hot(preds, 4).permute(0, 2, 1).float().unsqueeze(-1)  # (1, 4, 6, 1)
    metric.reset()
    metric.update(logits, target.unsqueeze(-1))
    assert torch.allclose(metric.compute()["IoU"], out["IoU"])


def test_schedule_warms_up_then_decays() -> None:
    assert warmup_decay(0, 10, 110, 1e-6, 0.0, "poly", 1.0) == pytest.approx(1e-6)
    assert warmup_decay(5, 10, 110, 0.0, 0.0, "poly", 1.0) == pytest.approx(0.5)
    assert warmup_decay(60, 10, 110, 0.0, 0.0, "poly", 1.0) == pytest.approx(0.5)
    assert warmup_decay(60, 10, 110, 0.0, 0.0, "poly", 0.9) == pytest.approx(0.5**0.9)
    assert warmup_decay(60, 10, 110, 0.0, 0.1, "cosine", 1.0) == pytest.approx(0.1 + 0.9 * 0.5)
    assert warmup_decay(110, 10, 110, 0.0, 0.0, "poly", 1.0) == 0.0


def test_head_gets_its_own_learning_rate_and_biases_no_decay() -> None:
    seg = segmenter(RepAdapterConfig(adapter_dim=4), lr=1e-3, head_lr_scale=10.0, weight_decay=0.05)
    groups = seg.parameter_groups()
    names = {id(p): n for n, p in seg.named_parameters()}
    for g in groups:
        for p in g["params"]:
            assert g["lr"] == (1e-2 if names[id(p)].startswith("model.head.") else 1e-3)
            assert g["weight_decay"] == (0.05 if p.ndim > 1 else 0.0)
    trainable = {id(p) for p in seg.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trainable


def test_dyt_training_loss_has_the_token_skipping_terms_and_gradients() -> None:
    seg = segmenter(DyTConfig(adapter_dim=4)).train()
    y = torch.randint(0, 5, (2, 32, 32))
    y[:, :4] = 255
    loss, terms = seg.training_loss(images(2), y)
    assert set(terms) == {"loss_seg", "loss_rate", "loss_complete_cls", "loss_distill", "keep_rate"}
    loss.backward()
    dispatch = [p for n, p in seg.named_parameters() if "dispatchers" in n]
    assert dispatch and all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in dispatch)


def test_checkpoint_hparams_rebuild_the_same_segmenter() -> None:
    seg = segmenter(DyTConfig(adapter_dim=4, skipping=TokenSkipping(target_rate=0.7)), head="linear")
    stored = dict(seg.hparams)
    assert stored["method"]["class_path"].endswith("DyTConfig")
    assert stored["method"]["init_args"]["skipping"]["target_rate"] == 0.7  # plain values
    again = Segmenter(**stored)
    assert again.vit.skipping.target_rate == 0.7  # type: ignore[attr-defined]
    assert again.model.levels == (4,)


def test_bad_settings_fail_in_one_line() -> None:
    cases = [
        (dict(method=DynAdapterConfig()), "early exits"),
        (dict(levels=[2, 4]), "four blocks"),
        (dict(levels=[4, 3, 2, 1]), "increasing"),
        (dict(head="fcn"), "Unknown head"),
        (dict(method={"class_path": "petl_lightning.Nope"}), "method's config"),
    ]
    for kwargs, words in cases:
        with pytest.raises(ConfigError, match=words) as err:
            Segmenter(num_classes=5, **TINY, **kwargs)  # type: ignore[arg-type]
        assert "\n" not in str(err.value)


def test_dyt_threshold_calibrates_to_the_target_keep_rate() -> None:
    seg = segmenter(DyTConfig(adapter_dim=4, skipping=TokenSkipping(target_rate=0.6)))
    x = images(8)
    result = seg.vit.calibrate_keep_rate([x], iters=14)  # type: ignore[operator]
    assert result["keep_rate"] == pytest.approx(0.6, abs=0.03)
    with torch.no_grad():
        kept = seg.model.run(x).kept
    assert float(kept.mean()) / seg.vit.num_patches == pytest.approx(result["keep_rate"], abs=1e-6)


def test_dyt_agreement_calibration_counts_pixels() -> None:
    from petl_lightning.methods.dyt.calibration import calibrate_agreement

    seg = segmenter(DyTConfig(adapter_dim=4))
    x = images(4)
    with torch.no_grad():
        complete = seg.model.complete_logits(x).argmax(1)
    result = calibrate_agreement(seg.model, [x], 0.9, 0.5, iters=8)
    assert result["agreement"] >= 0.9 and result["threshold"] <= 0.5
    with torch.no_grad():
        out = seg.model.infer(x)
    share = float((out.logits.argmax(1) == complete).double().mean())
    assert share == pytest.approx(result["agreement"], abs=1e-9)  # the share of pixels, as measured
    assert float(out.keep_rate().mean()) == pytest.approx(result["keep_rate"], abs=1e-9)
    assert calibrate_agreement(seg.model, [x], 1.0, 0.5, iters=8)["agreement"] == 1.0


def test_dyt_segmenter_exports_its_top_k_form(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    seg = segmenter(DyTConfig(adapter_dim=4))
    form = seg.deploy_form(keep_rate=0.5)
    x = images(3)
    with torch.no_grad():
        kept = form.run(x).kept  # type: ignore[operator]
    assert torch.equal(kept, torch.full_like(kept, 2.0))  # top half of the 4 patch tokens, every block
    path = seg.export(tmp_path / "dyt.onnx", keep_rate=0.5)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - form(x).numpy()).max() <= 1e-4
    with pytest.raises(ConfigError, match="keep_rate"):
        seg.export(tmp_path / "none.onnx")  # DyT exports a fixed keep rate
    assert not (tmp_path / "none.onnx").exists()
