"""``torch.compile`` of every method's inference (and of the training step of RepAdapter, ARC and
DyT), and the host-sync budget of the fast paths on a GPU.

The quick tests trace with Dynamo and AOTAutograd (``backend="aot_eager"``: graphs, breaks, guards and
functionalisation as Inductor sees them, without its C++ code generation, which takes minutes on
two CPU cores); the slow ones compile with Inductor.
"""

from __future__ import annotations

import re
import warnings
from collections import defaultdict
from typing import Any

import pytest
import torch
from torch import nn

from petl_lightning.methods.arc import ARC
from petl_lightning.methods.dyn_adapter import DynAdapter
from petl_lightning.methods.dyt import DyT
from petl_lightning.methods.repadapter import RepAdapter

TOL = 1e-4
TINY: dict[str, Any] = dict(model_name="vit_tiny_patch16_224", pretrained=False, img_size=32, model_kwargs={"depth": 4})
DYT = dict(TINY, img_size=48, model_kwargs={"depth": 2, "patch_size": 8})  # 36 patches: room to skip


def randomize(module: nn.Module, std: float = 0.05) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "dispatchers" in name or "head" in name else std))
    return module


def build(method: str, **kwargs: Any) -> nn.Module:
    torch.manual_seed(0)
    if method == "repadapter":
        m: nn.Module = RepAdapter(num_classes=5, **TINY, **kwargs)
    elif method == "arc":
        m = ARC(num_classes=5, **TINY, **kwargs)
    elif method == "dyt":
        m = DyT(num_classes=5, skipping={"fixed_keep_rate": 0.5, **kwargs}, **DYT)
    else:
        m = DynAdapter(num_classes=5, exits={"blocks": [1, 2, 3]}, **TINY, **kwargs)
    randomize(m)
    m.eval()
    if method == "dyn_adapter":  # images leave at exits 0 and 2 (about 40% and 30%), none at exit 1
        with torch.no_grad():
            conf = torch.stack([m.model.confidence(lg) for lg in m.forward_exits(images(64, method))], dim=1)
        m.thresholds.copy_(
            torch.stack([conf[:, 0].quantile(0.6), torch.tensor(float("inf")), conf[:, 2].quantile(0.5)])
        )
    return m


def images(batch: int, method: str) -> torch.Tensor:
    size = 48 if method == "dyt" else 32
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()


@pytest.mark.parametrize("method", ["repadapter", "arc", "dyt"])
def test_static_shape_inference_compiles_as_one_graph(method: str) -> None:
    """RepAdapter, ARC (unmerged) and DyT's gather path at a fixed keep rate: fullgraph=True."""
    m = build(method)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        x = images(3, method)
        assert (compiled(x) - m(x)).abs().max().item() < TOL


def test_dyt_deploy_form_compiles_with_a_dynamic_batch() -> None:
    form = build("dyt").deploy_form()
    compiled = torch.compile(form, fullgraph=True, dynamic=True, backend="aot_eager")
    with torch.no_grad():
        for batch in (2, 7):
            x = images(batch, "dyt")
            assert (compiled(x) - form(x)).abs().max().item() < TOL


def test_dyt_threshold_rule_compiles_with_dynamic_output_shapes() -> None:
    """The threshold rule gathers a data-dependent number of rows (nonzero); with Dynamo's
    ``capture_dynamic_output_shape_ops`` it is one graph too (placement ``mlp``)."""
    m = build("dyt", fixed_keep_rate=None)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True):
        compiled = torch.compile(m, fullgraph=True, dynamic=True, backend="aot_eager")
        with torch.no_grad():
            x = images(4, "dyt")
            assert (compiled(x) - m(x)).abs().max().item() < TOL


def test_dyn_adapter_batch_shrinking_compiles_with_breaks_only_between_blocks() -> None:
    """dynamic=True: one graph per stretch between the host reads (thresholds, each smaller batch's
    size), every block inside one graph; a second batch size reuses or adds graphs and still agrees."""
    m = build("dyn_adapter")
    graphs: list[torch.fx.GraphModule] = []

    def recording(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(m, dynamic=True, backend=recording)
    with torch.no_grad():
        x = images(12, "dyn_adapter")
        exits = m.infer(x).exit_index.bincount(minlength=4)
        assert exits[0] > 0 and exits[1] == 0 and exits[2] > 0 and exits[3] > 0  # the batch shrinks, twice
        assert (compiled(x) - m(x)).abs().max().item() < TOL
        graphs_of_block: dict[str, set[int]] = defaultdict(set)
        for i, graph in enumerate(graphs):
            for node in graph.graph.nodes:
                for path, _ in (node.meta.get("nn_module_stack") or {}).values():
                    found = re.search(r"blocks\.(\d+)$", path)
                    if found:
                        graphs_of_block[found.group(1)].add(i)
        assert sorted(graphs_of_block) == ["0", "1", "2", "3"]
        assert all(len(g) == 1 for g in graphs_of_block.values()), graphs_of_block  # no break inside a block
        assert len(graphs) > 1  # breaks where the host reads a value
        x = images(9, "dyn_adapter")
        assert (compiled(x) - m(x)).abs().max().item() < TOL


@pytest.mark.slow
@pytest.mark.parametrize("method", ["repadapter", "arc", "dyt", "dyn_adapter"])
def test_inductor_inference_equals_eager(method: str) -> None:
    m = build(method)
    compiled = torch.compile(m, dynamic=method == "dyn_adapter", fullgraph=method != "dyn_adapter")
    with torch.no_grad():
        x = images(6, method)
        assert (compiled(x) - m(x)).abs().max().item() < TOL


@pytest.mark.slow
@pytest.mark.parametrize("method", ["repadapter", "arc", "dyt"])
def test_inductor_training_step_equals_eager(method: str) -> None:
    """Loss and adapter gradients of one training step (DyT: Gumbel masks, both forwards, KL and
    rate terms); ``fallback_random`` makes Inductor draw the same random numbers as eager."""
    m = build(method)
    m.train()
    x, y = images(4, method), torch.tensor([0, 1, 2, 3])

    def step(fn: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        m.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        loss = fn(x, y)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters() if p.requires_grad and p.grad is not None]

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return m.training_loss(x, y)[0]

    eager_loss, eager_grads = step(loss_fn)
    with torch._inductor.config.patch(fallback_random=True):
        compiled_loss, compiled_grads = step(torch.compile(loss_fn, fullgraph=True))
    assert abs(float(compiled_loss - eager_loss)) < TOL
    assert len(compiled_grads) == len(eager_grads) > 0
    assert max(float((a - b).abs().max()) for a, b in zip(compiled_grads, eager_grads)) < 1e-3


# -- host syncs on a GPU (skipped on CPU) ------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.set_sync_debug_mode)")


@cuda
@pytest.mark.parametrize("method", ["repadapter", "arc", "dyt", "dyt_topk"])
def test_fast_inference_paths_never_sync(method: str) -> None:
    """RepAdapter, ARC and DyT's gathered top-k path (the module's eval forward, and its deploy form)."""
    m = build(method.removesuffix("_topk")).cuda()
    fn = m.deploy_form() if method == "dyt_topk" else m
    x = images(8, method.removesuffix("_topk")).cuda()
    with torch.no_grad():
        fn(x)  # warm-up: lazy CUDA initialisation may synchronise
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@cuda
def test_dyn_adapter_syncs_once_per_evaluated_exit() -> None:
    """Batch shrinking needs each smaller batch's size on the host: one sync per evaluated early
    exit (2 here: exit 1 takes no image), plus one read of the thresholds."""
    m = build("dyn_adapter").cuda()
    x = images(16, "dyn_adapter").cuda()
    with torch.no_grad():
        m.infer(x)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                m.infer(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 3, [str(w.message) for w in syncs]
