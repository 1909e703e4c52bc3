"""ARC: shared bases, per-layer coefficients, the official initialisation, parameter counts, every
tensor trained (the official VTAB script trains only the head), and real training on DTD-10."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import method_vs_linear_probe_dtd10
from petl_lightning.backbone import FrozenViT
from petl_lightning.errors import PETLError
from petl_lightning.methods.arc import ARC
from petl_lightning.methods.arc.layer import ARCBasis, ARCLinear

TINY = dict(model_name="vit_tiny_patch16_224", pretrained=False, img_size=32, model_kwargs={"depth": 2})


# -- the layer -------------------------------------------------------------------------------------
def test_layer_formula_and_dropout_on_the_bottleneck() -> None:
    torch.manual_seed(0)
    basis = ARCBasis(32, 6)
    layer = ARCLinear(nn.Linear(32, 20), basis, xavier_coeff=True)
    nn.init.normal_(layer.bias)
    x = torch.randn(5, 32)
    u, c = basis.weight, layer.coeff
    layer.eval()
    expected = x @ (torch.eye(32) + u @ torch.diag(c) @ u.T) + layer.bias  # symmetric update
    assert (layer.adapt_input(x) - expected).abs().max().item() < 1e-5
    assert (layer(x) - layer.base_layer(expected)).abs().max().item() < 1e-5  # the frozen Linear on A(x)
    layer.dropout.p = 1.0  # dropout on the r-dim bottleneck: with p=1 only x + b is left
    layer.train()
    assert (layer.adapt_input(x) - (x + layer.bias)).abs().max().item() < 1e-6
    with pytest.raises(PETLError, match="basis of width"):
        ARCLinear(nn.Linear(31, 20), basis)


def test_official_initialisation() -> None:
    torch.manual_seed(0)
    m = ARC(num_classes=5, **TINY)
    dim, r = 192, 50
    for basis in (m.vit.shared.basis_attn.weight, m.vit.shared.basis_mlp.weight):  # xavier-uniform (dim, r)
        bound = math.sqrt(6 / (dim + r))
        assert basis.shape == (dim, r) and 0.9 * bound < basis.abs().max() <= bound
    c_bound = math.sqrt(6 / (1 + r))  # xavier on a (1, r) tensor
    for blk in m.vit.blocks:
        assert not blk.attn.qkv.coeff.any() and not blk.attn.qkv.bias.any()
        assert not blk.mlp.fc1.bias.any()
        c = blk.mlp.fc1.coeff
        assert c.abs().max() <= c_bound and c.abs().max() > 0.5 * c_bound
        assert blk.attn.qkv.dropout.p == blk.mlp.fc1.dropout.p == 0.1
    assert not m.head.weight.any() and not m.head.bias.any()  # zero head
    x = torch.randn(2, 3, 32, 32)
    m.eval()
    frozen = FrozenViT(**TINY).eval()
    frozen.vit.load_state_dict(m.vit.vit.state_dict())
    with torch.no_grad():
        # official init: the MLP adapter is not the identity; all-zero coefficients start as the backbone
        assert (m.vit(x) - frozen(x)).abs().max() > 1e-3
        z = ARC(num_classes=5, coeff_init="zeros", **TINY).eval()
        frozen.vit.load_state_dict(z.vit.vit.state_dict())
        assert torch.equal(z.vit(x), frozen(x))


def test_bases_are_shared_and_stored_once() -> None:
    m = ARC(num_classes=5, **TINY)
    for blk in m.vit.blocks:
        assert blk.attn.qkv.basis is m.vit.shared.basis_attn
        assert blk.mlp.fc1.basis is m.vit.shared.basis_mlp
    keys = m.trainable_state_keys()
    assert sorted(k for k in keys if "basis" in k) == [
        "model.vit.shared.basis_attn.weight",
        "model.vit.shared.basis_mlp.weight",
    ]
    assert len(keys) == 2 + 2 * 2 * 2 + 2  # bases, (coeff, bias) x 2 branches x 2 blocks, head
    att = ARC(num_classes=5, placement="attn", **TINY)
    assert list(att.vit.shared) == ["basis_attn"]
    assert all(type(b.mlp.fc1) is nn.Linear and isinstance(b.attn.qkv, ARCLinear) for b in att.vit.blocks)
    with pytest.raises(PETLError, match="placement"):
        ARC(num_classes=5, placement="arc_mlp", **TINY)


# -- parameter counts (ViT-B/16, spec section 3.3) -------------------------------------------------
@pytest.mark.parametrize("placement, expected", [("attn_mlp", 96_432), ("attn", 48_216)])
def test_vit_b16_parameter_counts(placement: str, expected: int) -> None:
    m = ARC(num_classes=100, model_name="vit_base_patch16_224", pretrained=False, placement=placement)
    s = m.parameter_summary()
    assert s["trainable"] == expected + 768 * 100 + 100
    assert expected == (2 if placement == "attn_mlp" else 1) * (768 * 50 + 12 * (50 + 768))
    assert not any(p.requires_grad for p in m.vit.vit.parameters())


# -- every ARC tensor is trained -------------------------------------------------------------------
def test_every_arc_parameter_gets_gradient_and_changes() -> None:
    """The official VTAB script's freeze filter leaves every ARC tensor frozen (head-only training).
    Here each trainable tensor is an ARC tensor or the head, and all of them move under Lightning.

    With the official zero head and zero attention coefficients the gradient reaches the tensors in
    order: step 1 only the head; step 2 everything but ``U_attn`` (its gradient is scaled by
    ``c_attn``); step 3 everything.
    """
    torch.manual_seed(0)
    m = ARC(num_classes=4, lr=1e-2, weight_decay=0.0, warmup_epochs=0, **TINY)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    expected = {
        "model.vit.shared.basis_attn.weight",
        "model.vit.shared.basis_mlp.weight",
        "model.head.weight",
        "model.head.bias",
    } | {f"model.vit.blocks.{i}.{a}.{t}" for i in range(2) for a in ("attn.qkv", "mlp.fc1") for t in ("coeff", "bias")}
    assert trainable == expected
    initial = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}

    nonzero_grads: list[set[str]] = []

    class Recorder(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            nonzero_grads.append(
                {n for n, p in pl_module.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
            )

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 4, (8,), generator=g))
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        callbacks=[Recorder()],
    )
    trainer.fit(m, DataLoader(data, batch_size=8))
    assert nonzero_grads[0] == {"model.head.weight", "model.head.bias"}
    assert nonzero_grads[1] == expected - {"model.vit.shared.basis_attn.weight"}
    assert nonzero_grads[2] == expected
    unchanged = [n for n, p in m.named_parameters() if p.requires_grad and torch.equal(p.detach(), initial[n])]
    assert unchanged == []


# -- real data -------------------------------------------------------------------------------------
@pytest.mark.timeout(1800)  # about 1.5 min on 2 idle cores; a busy shared machine can take 5x that
@pytest.mark.slow
def test_dtd10_beats_linear_probe(vits_weights, dtd10_datamodule_factory) -> None:
    """Real DTD-10 images and real ViT-S weights: ARC beats the linear probe trained the same way
    (56 px, 1 epoch: ``conftest.DTD10_SHORT``)."""
    acc, lp_acc = method_vs_linear_probe_dtd10(ARC, vits_weights, dtd10_datamodule_factory)
    print(f"\nDTD-10 test accuracy (ViT-S, 56 px, 1 epoch): ARC {acc:.4f} vs LinearProbe {lp_acc:.4f}")
    assert acc > lp_acc + 0.02
