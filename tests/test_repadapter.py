"""RepAdapter: the layer as specified, the official scale table, parameter counts, the scale that
checkpoints carry into merges, and real training on DTD-10 against the linear probe."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import method_vs_linear_probe_dtd10
from petl_lightning.data.vtab import VTAB_TASKS
from petl_lightning.errors import PETLError
from petl_lightning.methods.repadapter import REPADAPTER_SCALES, RepAdapter
from petl_lightning.methods.repadapter.layer import GroupedLinear, RepAdapterLinear

TINY = dict(model_name="vit_tiny_patch16_224", pretrained=False, img_size=32, model_kwargs={"depth": 2})


# -- the layer -------------------------------------------------------------------------------------
def test_layer_starts_as_identity_with_official_init() -> None:
    torch.manual_seed(0)
    base = nn.Linear(768, 3 * 768)
    layer = RepAdapterLinear(base, adapter_dim=8, groups=2, scale=10.0).train()
    x = torch.randn(2, 5, 768)
    assert torch.equal(layer.adapt_input(x), x) and torch.equal(layer(x), base(x))
    assert layer.base_layer is base  # wrapped, not copied
    bound = math.sqrt(6 / (768 + 8))  # xavier-uniform, gain 1
    w = layer.down.weight
    assert w.shape == (8, 768) and w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    for t in (layer.down.bias, layer.up.weight, layer.up.bias):
        assert not t.any()
    assert layer.up.weight.shape == (768, 4)  # the Conv1d(8, 768, 1, groups=2) weight, squeezed
    assert isinstance(layer.dropout, nn.Dropout) and layer.dropout.p == 0.1


def test_grouped_up_projection_equals_grouped_conv1d() -> None:
    torch.manual_seed(0)
    up = GroupedLinear(8, 64, groups=2)
    nn.init.normal_(up.weight)
    nn.init.normal_(up.bias)
    conv = nn.Conv1d(8, 64, kernel_size=1, groups=2)
    with torch.no_grad():
        conv.weight.copy_(up.weight.unsqueeze(-1))
        conv.bias.copy_(up.bias)
    h = torch.randn(3, 11, 8)
    assert (up(h) - conv(h.transpose(1, 2)).transpose(1, 2)).abs().max().item() < 1e-5
    dense = up.dense_weight()
    assert not dense[:32, 4:].any() and not dense[32:, :4].any()  # block-diagonal
    with pytest.raises(PETLError, match="divisible"):
        GroupedLinear(8, 64, groups=3)


def test_scale_multiplies_the_whole_branch_biases_included() -> None:
    torch.manual_seed(0)
    layer = RepAdapterLinear(nn.Linear(32, 16), adapter_dim=4, groups=2, scale=0.5).eval()
    for p in layer.parameters():
        nn.init.normal_(p)
    x = torch.randn(6, 32)
    h = x @ layer.down.weight.T + layer.down.bias
    expected = x + 0.5 * (h @ layer.up.dense_weight().T + layer.up.bias)
    assert (layer.adapt_input(x) - expected).abs().max().item() < 1e-5
    assert (layer(x) - layer.base_layer(expected)).abs().max().item() < 1e-5  # the frozen Linear on A(x)
    layer.dropout.p = 1.0  # dropout sits on the hidden: with p=1 only the up bias is left
    layer.train()
    assert (layer.adapt_input(x) - (x + 0.5 * layer.up.bias)).abs().max().item() < 1e-6


# -- scale table -----------------------------------------------------------------------------------
def test_official_scale_table() -> None:
    for placement in ("attn_mlp", "attn"):
        assert set(REPADAPTER_SCALES[placement]) == set(VTAB_TASKS)
        assert set(REPADAPTER_SCALES[placement].values()) <= {0.1, 0.5, 1, 5, 10}
    scale = {t: RepAdapter.task_overrides(t, {})["adapter_scale"] for t in VTAB_TASKS}
    assert [scale[t] for t in ("cifar", "caltech101", "svhn", "smallnorb_azi", "kitti")] == [0.1, 5, 10, 10, 5]
    attn = {
        t: RepAdapter.task_overrides(t, {"placement": "attn"})["adapter_scale"] for t in ("dtd", "resisc45", "eurosat")
    }
    assert list(attn.values()) == [0.1, 0.1, 5]
    assert RepAdapter.task_overrides("cifar100", {}) == {}  # outside the table: nothing to override
    m = RepAdapter(num_classes=4, adapter_scale=10.0, **TINY)
    assert m.scale == 10 and len(m.adapters()) == 4 and all(float(a.scale) == 10 for a in m.adapters())
    with pytest.raises(PETLError, match="placement"):
        RepAdapter(num_classes=4, placement="repmlp", **TINY)


def test_cli_fills_the_task_scale_before_building(tmp_path) -> None:
    """The CLI applies ``task_overrides`` to an unset ``adapter_scale``: the saved hyper-parameters
    (and a W&B config) show the scale that is trained (svhn: 10), not ``null``; a given one wins."""
    from PIL import Image

    from petl_lightning.cli import PETLCLI

    task = tmp_path / "vtab" / "svhn"
    (task / "images").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(task / "images" / "a.png")
    for name in ("train800val200", "test"):
        (task / f"{name}.txt").write_text("images/a.png 0\n")
    args = [
        "-c",
        str(Path(__file__).parents[1] / "recipes" / "repadapter.yaml"),
        f"--data.init_args.root={task.parent}",
        "--data.init_args.task=svhn",
        "--model.init_args.pretrained=false",
        "--model.init_args.model_name=vit_tiny_patch16_224",
        "--data.init_args.img_size=32",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
    ]
    cli = PETLCLI(args=args, run=False)
    assert cli.model.hparams.adapter_scale == 10.0 == cli.model.scale
    assert PETLCLI(args=[*args, "--model.init_args.adapter_scale=0.5"], run=False).model.scale == 0.5


# -- parameter counts (ViT-B/16, spec section 2.4) -------------------------------------------------
@pytest.mark.parametrize(
    "placement, with_bias, weights_only", [("attn_mlp", 239_808, 221_184), ("attn", 119_904, 110_592)]
)
def test_vit_b16_parameter_counts(placement: str, with_bias: int, weights_only: int) -> None:
    m = RepAdapter(num_classes=100, model_name="vit_base_patch16_224", pretrained=False, placement=placement)
    adapter = [(n, p) for n, p in m.named_parameters() if p.requires_grad and not n.startswith("model.head.")]
    assert sum(p.numel() for _, p in adapter) == with_bias
    assert sum(p.numel() for _, p in adapter if p.ndim == 2) == weights_only
    assert m.parameter_summary()["trainable"] == with_bias + 768 * 100 + 100
    assert not any(p.requires_grad for p in m.vit.vit.parameters())  # the frozen timm model


# -- the trained scale travels with the checkpoint -------------------------------------------------
class _RandomTask(L.LightningDataModule):
    """Random images under a VTAB task name (the model reads ``task`` to pick its scale)."""

    def __init__(self, task: str) -> None:
        super().__init__()
        self.task = task
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 4, (16,), generator=g))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=8)


def test_scale_from_datamodule_is_saved_and_used_by_merge(tmp_path) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "tiny_backbone.safetensors"  # the backbone's source, rebuilt on load
    save_file(timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, depth=2).state_dict(), str(weights))
    model = RepAdapter(
        num_classes=4, lr=1e-2, warmup_epochs=0, **{**TINY, "pretrained": True, "checkpoint_path": str(weights)}
    )
    assert model.scale == 1.0
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=_RandomTask("svhn"))
    assert model.scale == 10.0
    ckpt = tmp_path / "ra.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    assert not any(k.startswith("model.vit.vit.") or "base_layer" in k for k in saved)  # adapter-only checkpoint
    assert float(saved["model.vit.blocks.0.attn.qkv.scale"]) == 10.0
    restored = RepAdapter.load_from_checkpoint(ckpt).eval()
    assert restored.hparams.adapter_scale == 10.0 == restored.scale  # the official test.py would use 1
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        assert (restored(x) - want).abs().max().item() < 1e-6
        assert (restored.merge()(x) - want).abs().max().item() < 1e-4


# -- real data -------------------------------------------------------------------------------------
@pytest.mark.timeout(1800)  # about 1.5 min on 2 idle cores; a busy shared machine can take 5x that
@pytest.mark.slow
def test_dtd10_beats_linear_probe(vits_weights, dtd10_datamodule_factory) -> None:
    """Real DTD-10 images and real ViT-S weights: RepAdapter beats the linear probe trained the same way
    (56 px, 1 epoch: ``conftest.DTD10_SHORT``)."""
    acc, lp_acc = method_vs_linear_probe_dtd10(RepAdapter, vits_weights, dtd10_datamodule_factory, adapter_scale=1.0)
    print(f"\nDTD-10 test accuracy (ViT-S, 56 px, 1 epoch): RepAdapter {acc:.4f} vs LinearProbe {lp_acc:.4f}")
    assert acc > lp_acc + 0.02
