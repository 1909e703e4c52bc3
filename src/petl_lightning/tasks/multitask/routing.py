"""Routing a batch that mixes tasks: which rows belong to which task, and the modules that apply each
row's own task's trained layer.

timm's ``Block.forward`` hands its Linears the tokens only, so the multi-task model tells its routed
layers the batch's :class:`TaskRoute` for the duration of one call (``with router.use(route):``, as
PEFT's mixed-batch inference passes ``adapter_names`` by forward hooks); called outside such a block a
routed layer raises instead of guessing. Every routed layer splits the rows of its input (dim 0) by
task, runs each task's own module on its rows and puts the results back in order; the frozen
layers run once on the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import cast

import torch
from torch import Tensor, nn

from petl_lightning.errors import ConfigError
from petl_lightning.layers.dispatcher import TokenDispatcher
from petl_lightning.layers.wrapper import AdaptedLinear, AdapterLayer, LowRank


class TaskRoute:
    """The task of each row of a batch (``task``, (B,) long) and its groups: ``(task, rows)`` per task present."""

    def __init__(self, task: Tensor) -> None:
        self.task = task
        present = torch.unique(task).tolist()
        self.groups = [(int(t), (task == t).nonzero().squeeze(1)) for t in present]

    def select(self, rows: Tensor) -> TaskRoute:
        """The route of the batch made of ``rows`` of this one."""
        return TaskRoute(self.task.index_select(0, rows))

    def apply(self, x: Tensor, fns: Sequence[Callable[[Tensor], Tensor]], pad: float | None = None) -> Tensor:
        """``fns[task](rows of x)`` for each task's rows, in the rows' order. Outputs whose last size
        differs between tasks (heads of different class counts) are padded with ``pad``."""
        if len(self.groups) == 1:
            return fns[self.groups[0][0]](x)
        parts = [fns[t](x.index_select(0, rows)) for t, rows in self.groups]
        width = max(p.shape[-1] for p in parts)
        if parts[0].dim() > 1 and any(p.shape[-1] != width for p in parts):
            if pad is None:
                raise ConfigError("The tasks' layers return different sizes; they cannot share a batch.")
            parts = [torch.nn.functional.pad(p, (0, width - p.shape[-1]), value=pad) for p in parts]
        out = parts[0].new_empty(x.shape[0], *parts[0].shape[1:])
        for (_, rows), part in zip(self.groups, parts):
            out.index_copy_(0, rows, part)
        return out


class Router:
    """The route of the batch being run, shared by a multi-task model's routed layers."""

    def __init__(self) -> None:
        self.route: TaskRoute | None = None

    @contextmanager
    def use(self, route: TaskRoute) -> Iterator[TaskRoute]:
        """Route the calls inside the ``with`` block by ``route``."""
        previous, self.route = self.route, route
        try:
            yield route
        finally:
            self.route = previous

    def current(self) -> TaskRoute:
        if self.route is None:
            raise ConfigError("A multi-task layer ran outside MultiTaskModel.forward/infer, so it has no task per row.")
        return self.route


class RoutedModules(nn.Module):
    """One module per task (same kind, e.g. each task's head or adapter); ``forward(x)`` applies each
    row's task's module. Outputs of different last sizes are padded with ``pad`` (``-inf`` for logits)."""

    def __init__(self, modules: Sequence[nn.Module], router: Router, pad: float | None = None) -> None:
        super().__init__()
        self.tasks = nn.ModuleList(modules)
        self.router, self.pad = router, pad

    def forward(self, x: Tensor) -> Tensor:
        return self.router.current().apply(x, list(self.tasks), self.pad)


class MultiTaskLinear(nn.Module):
    """A frozen ``nn.Linear`` (``base_layer``, run once on the whole batch) with each task's
    :class:`~petl_lightning.layers.wrapper.AdaptedLinear`: RepAdapter's and ARC's change the rows'
    input, LoRA's add to their output, each row by its own task's adapter.

    Args:
        base_layer: the frozen Linear every task wraps.
        layers: each task's adapter around it (same kind).
        router: gives the batch's route during a call.
        batched: apply the adapters as one batched matmul pair over the batch, each row with its task's
            low-rank factors gathered (:meth:`~petl_lightning.layers.wrapper.AdaptedLinear.factors`,
            snapshotted here: the model is for inference); False, or tasks of different adapter
            shapes: each task's adapter on its own rows.
    """

    stacked_P: Tensor  # (tasks, in, r): each task's factors, stacked (batched mode)
    stacked_p: Tensor
    stacked_Q: Tensor
    stacked_q: Tensor

    def __init__(
        self, base_layer: nn.Linear, layers: Sequence[AdaptedLinear], router: Router, batched: bool = True
    ) -> None:
        super().__init__()
        self.base_layer, self.router = base_layer, router
        for layer in layers:
            layer.base_layer = base_layer  # the tasks' copies of the frozen Linear are dropped
        self.tasks = nn.ModuleList(layers)
        kind = type(layers[0])
        self.changes_input = kind.adapt_input is not AdaptedLinear.adapt_input
        self.updates_output = kind.output_update is not AdaptedLinear.output_update
        try:
            with torch.no_grad():
                factors = [layer.factors() for layer in layers]
        except NotImplementedError:  # an adapter kind without low-rank factors
            factors = []
        shapes = {tuple(tuple(t.shape) for t in f) for f in factors}
        self.batched = batched and len(shapes) == 1
        if self.batched:
            for name, parts in zip(LowRank._fields, zip(*factors)):
                self.register_buffer(f"stacked_{name}", torch.stack([t.detach() for t in parts]), persistent=False)

    def update(self, x: Tensor, route: TaskRoute) -> Tensor:
        """Each row's ``(x @ P + p) @ Q + q`` with its task's factors, in two batched matmuls."""
        t = route.task
        u = torch.baddbmm(self.stacked_p[t].unsqueeze(1), x, self.stacked_P[t])
        return torch.baddbmm(self.stacked_q[t].unsqueeze(1), u, self.stacked_Q[t])

    def forward(self, x: Tensor) -> Tensor:
        route = self.router.current()
        batched = self.batched and x.dim() == 3
        layers = [cast(AdaptedLinear, m) for m in self.tasks]
        h = x
        if self.changes_input:
            h = x + self.update(x, route) if batched else route.apply(x, [m.adapt_input for m in layers])
        y = cast(Tensor, self.base_layer(h))
        if self.updates_output:
            fns = [cast(Callable[[Tensor], Tensor], m.output_update) for m in layers]
            y = y + (self.update(x, route) if batched else route.apply(x, fns))
        return y


class RoutedAdapter(RoutedModules):
    """Each task's parallel adapter (DyT's, the bottleneck adapter's); its cost is the first task's
    (the tasks' adapters have the same shape)."""

    def flops(self, n_tokens: int) -> int:
        return cast(AdapterLayer, self.tasks[0]).flops(n_tokens)


class RoutedDispatcher(RoutedModules):
    """Each task's DyT :class:`~petl_lightning.layers.dispatcher.TokenDispatcher` with the interface
    DyT's block reads: each row's logits and its task's threshold."""

    def dispatchers(self) -> list[TokenDispatcher]:
        return [cast(TokenDispatcher, d) for d in self.tasks]

    def logits(self, tokens: Tensor) -> Tensor:
        return self.router.current().apply(tokens, [d.logits for d in self.dispatchers()])

    def patch_logits(self, tokens: Tensor, num_prefix_tokens: int, class_attention: Tensor | None = None) -> Tensor:
        """Each row's patch-token logits from its task's dispatcher (no class-attention prior here)."""
        if class_attention is not None or any(d.prior_weight is not None for d in self.dispatchers()):
            raise ConfigError(
                "Serving several DyT tasks from one backbone does not support skipping.class_attention_prior; "
                "train those tasks with class_attention_prior: null."
            )
        return self.logits(tokens)[:, num_prefix_tokens:]

    @property
    def logit_threshold(self) -> Tensor:
        """Each row's task's threshold (B, 1), in logit space."""
        per_task = torch.stack([d.logit_threshold for d in self.dispatchers()])
        return per_task[self.router.current().task].unsqueeze(1)

    def keep(self, logits: Tensor) -> Tensor:
        return logits > self.logit_threshold

    @property
    def threshold(self) -> float:
        return self.dispatchers()[0].threshold

    def flops(self, n_tokens: int) -> int:
        return self.dispatchers()[0].flops(n_tokens)


__all__ = ["MultiTaskLinear", "RoutedAdapter", "RoutedDispatcher", "RoutedModules", "Router", "TaskRoute"]
