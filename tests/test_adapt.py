"""``adapt(model, config)``: every method on a plain timm ViT as a plain module (no Lightning in its
code path), merges that load strictly into timm, the same logits as the LightningModules, the model
left as it was, one-line errors, and the README's example."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from petl_lightning import (
    ARCConfig,
    ConfigError,
    DynAdapter,
    DynAdapterConfig,
    DyT,
    DyTConfig,
    ExitConfig,
    ModelNameError,
    RepAdapterConfig,
    adapt,
)
from petl_lightning.adapted import AdaptedViT

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(model_name="vit_tiny_patch16_224", pretrained=False, img_size=32, model_kwargs={"depth": 3})

# Runs with Lightning made unimportable: adapt() and every config must not need it.
NO_LIGHTNING = r"""
import sys
for name in ("lightning", "pytorch_lightning", "lightning.pytorch", "lightning.fabric"):
    sys.modules[name] = None
import timm, torch
from petl_lightning import (adapt, AdapterConfig, ARCConfig, DynAdapterConfig, DyTConfig, ExitConfig, LoRAConfig,
                            RepAdapterConfig, TokenSkipping)

torch.manual_seed(0)
vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7, img_size=32, depth=2).eval()
x = torch.randn(3, 3, 32, 32)
for config in (RepAdapterConfig(), ARCConfig(adapter_dim=8), LoRAConfig(placement="attn_mlp"), AdapterConfig()):
    adapted = adapt(vit, config).eval()
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.05)
        logits = adapted(x)  # the timm model's own head: this timm model was made with 7 classes
        assert logits.shape == (3, 7) and adapted.forward_features(x).shape == (3, 5, 192)
        if not isinstance(config, AdapterConfig):
            merged = adapted.merge()
            fresh = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7, img_size=32, depth=2)
            fresh.load_state_dict(merged.state_dict(), strict=True)
            err = (fresh.eval()(x) - logits).abs().max().item()
            assert err <= 1e-4, (type(config).__name__, err)
            print(type(config).__name__, "merged", f"{err:.1e}")
dyt = adapt(vit, DyTConfig(skipping=TokenSkipping(fixed_keep_rate=0.5))).eval()
with torch.no_grad():
    run = dyt.run(x)
assert run.features.shape == (3, 192) and bool((run.kept == 2).all())  # half of the 4 patches, every block
exits = adapt(vit, DynAdapterConfig(num_classes=5, exits=ExitConfig(blocks=[1]))).eval()
with torch.no_grad():
    assert exits(x).shape == (3, 5) and exits.infer(x).exit_index.tolist() == [1, 1, 1]
assert not [m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning") and sys.modules[m]]
print("ok")
"""


def test_every_config_adapts_a_plain_timm_vit_without_lightning() -> None:
    """RepAdapter, ARC, LoRA, the bottleneck adapter, DyT and Dyn-Adapter on a timm ViT made by
    ``timm.create_model`` (its own head kept), in a process where Lightning cannot be imported; the
    foldable ones merge into a timm model that loads strictly into a fresh one with equal logits."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", NO_LIGHTNING], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == "ok"
    assert proc.stdout.count("merged") == 3, proc.stdout


@pytest.mark.parametrize("config", [RepAdapterConfig(adapter_scale=0.5), ARCConfig(adapter_dim=8)])
def test_merge_loads_strictly_into_a_fresh_timm_model(config) -> None:
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=32, depth=2)
    adapted = adapt(vit, config)
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.05)
    adapted.eval()
    x = torch.randn(2, 3, 32, 32)
    fresh = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=32, depth=2).eval()
    fresh.load_state_dict(adapted.merge().state_dict(), strict=True)
    with torch.no_grad():
        want = adapted(x)
        assert (want - fresh(x)).abs().max().item() <= 1e-4
        assert (want - vit.eval()(x)).abs().max().item() > 1e-2  # the adapters change the function


def test_adapt_shares_and_freezes_the_model_and_changes_none_of_its_modules() -> None:
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, depth=2)
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    qkv = vit.blocks[0].attn.qkv
    adapted = adapt(vit, RepAdapterConfig())
    assert vit.blocks[0].attn.qkv is qkv and type(qkv) is torch.nn.Linear  # no surgery on the given model
    assert adapted.blocks[0].attn.qkv.base_layer is qkv  # its weights are shared, not copied
    assert not any(p.requires_grad for p in vit.parameters())
    assert all(torch.equal(v, vit.state_dict()[k]) for k, v in before.items())
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("blocks.") and ".base_layer." not in n for n in trainable)


def test_adapt_errors_are_one_line() -> None:
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, depth=2)
    with pytest.raises(ConfigError, match="takes a method's config") as err:
        adapt(vit, {"adapter_dim": 8})  # type: ignore[arg-type]
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="not an already adapted AdaptedViT"):
        adapt(adapt(vit, RepAdapterConfig()), RepAdapterConfig())
    with pytest.raises(ModelNameError, match="not a timm VisionTransformer"):
        adapt(torch.nn.Linear(4, 4), RepAdapterConfig())
    with pytest.raises(ConfigError, match="Unknown RepAdapter placement"):
        RepAdapterConfig(placement="ffn")  # type: ignore[arg-type]


def randomized(module: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.5 if "dispatchers" in name else 0.05)
    return module.eval()


def transplant(source_state: dict[str, torch.Tensor], prefix: str, target: torch.nn.Module) -> None:
    """Load the LightningModule's trainable tensors under ``prefix`` into ``target``, strictly for them."""
    state = {k.removeprefix(prefix): v for k, v in source_state.items() if k.startswith(prefix)}
    missing, unexpected = target.load_state_dict(state, strict=False)
    frozen = {id(t) for t in target.state_dict(keep_vars=True).values() if not t.requires_grad}
    own = target.state_dict(keep_vars=True)
    assert not unexpected and all(id(own[k]) in frozen for k in missing), (missing, unexpected)


def test_dyt_adapted_module_gives_the_lightning_modules_logits() -> None:
    m = randomized(DyT(num_classes=5, **TINY))
    adapted = adapt(m.vit.vit, DyTConfig(adapter_scale=m.hparams.adapter_scale)).eval()
    keys = m.trainable_state_keys()
    transplant({k: v for k, v in m.state_dict().items() if k in keys}, "model.vit.", adapted)
    head = torch.nn.Linear(adapted.dim, 5)
    head.load_state_dict(m.head.state_dict())
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        run = adapted.run(x)
        assert (head(run.features) - m(x)).abs().max().item() <= 1e-6
        assert torch.equal(run.kept, m.vit.run(x).kept)
        assert 0.0 < float(run.kept.mean()) / adapted.num_patches < 1.0  # the dispatchers really skip


def test_dyn_adapter_adapted_module_gives_the_lightning_modules_logits() -> None:
    m = randomized(DynAdapter(num_classes=5, exits={"blocks": [1, 2]}, calibration={"budget": None}, **TINY))
    config = DynAdapterConfig(num_classes=5, base=RepAdapterConfig(), exits=ExitConfig(blocks=[1, 2]))
    adapted = adapt(m.vit.vit, config).eval()
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():  # thresholds between two middle confidences of each early exit: images leave everywhere
        conf = m.model.confidence(m.forward_exits(x))[:-1].sort(dim=1).values
        m.thresholds.copy_(conf[:, 7:9].mean(dim=1))
    keys = m.trainable_state_keys()
    transplant({k: v for k, v in m.state_dict().items() if k in keys}, "model.", adapted)
    with torch.no_grad():
        ours, theirs = adapted.infer(x), m.infer(x)
        assert (ours.logits - m(x)).abs().max().item() <= 1e-6
        assert torch.equal(ours.exit_index, theirs.exit_index) and len(set(ours.exit_index.tolist())) > 1


def test_frozen_vit_is_the_adapted_vit_with_no_adaptation() -> None:
    from petl_lightning import FrozenViT

    frozen = FrozenViT("vit_tiny_patch16_224", pretrained=False, img_size=32, model_kwargs={"depth": 2}).eval()
    assert isinstance(frozen, AdaptedViT) and not any(p.requires_grad for p in frozen.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), frozen.vit(x))
        torch.testing.assert_close(adapt(frozen, RepAdapterConfig()).eval()(x), frozen.vit(x))  # fresh: identity


def test_readme_example_runs() -> None:
    """The README's Python block, offline: ``pretrained=True`` becomes ``pretrained=False``."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## In Python: `adapt\(\)`\n\n```python\n(.*?)```", text, re.S)
    assert block is not None
    code = block.group(1).replace("pretrained=True", "pretrained=False")
    assert len(code.strip().splitlines()) <= 10
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the documented example itself
    assert namespace["logits"].shape == (2, 10)  # type: ignore[attr-defined]
