"""Many tasks over one frozen backbone: :class:`MultiTaskModel` runs a batch that mixes tasks.

    from petl_lightning.tasks.multitask import MultiTaskModel

    model = MultiTaskModel.from_checkpoints({"cifar": "cifar/last.ckpt", "dtd": "dtd/last.ckpt"})
    logits = model(images, ["cifar", "dtd", "dtd"])     # one row per image, its own task's classes

The tasks' classifiers (one method, one backbone) are combined into one: the frozen backbone is held
once, and every trained layer (adapters, DyT's dispatchers, heads, early exits) becomes a routed layer
that applies each image's own task's layer to that image's rows (:mod:`.routing`). Each frozen layer
runs once on the whole mixed batch; DyT gathers the kept tokens of the whole batch as it does for
one task, and Dyn-Adapter removes the images that left from the batch after each exit, each by its
own task's thresholds. A batch's outputs equal each image's own single-task classifier's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple, cast

import torch
from torch import Tensor, nn

from petl_lightning.adapted import AdaptedViT, ViTClassifier
from petl_lightning.errors import CheckpointError, ConfigError
from petl_lightning.layers.adapter import Adapter, MoEAdapter
from petl_lightning.layers.dispatcher import TokenDispatcher
from petl_lightning.layers.exits import ExitHead
from petl_lightning.layers.wrapper import AdaptedLinear
from petl_lightning.methods.dyn_adapter import thresholds as th
from petl_lightning.methods.dyn_adapter.adapted import EarlyExitViT
from petl_lightning.stats import keep_share
from petl_lightning.tasks.checkpoints import load_trained
from petl_lightning.tasks.multitask.routing import (
    MultiTaskLinear,
    RoutedAdapter,
    RoutedDispatcher,
    RoutedModules,
    Router,
    TaskRoute,
)


class MultiTaskOutput(NamedTuple):
    """One mixed batch's inference, per image."""

    logits: Tensor  # (B, K_max): each row's own task's logits, padded with -inf past its class count
    task_index: Tensor  # (B,) long
    num_classes: Tensor  # (B,) long: the class count of each row's task
    exit_index: Tensor | None  # (B,) long, early-exit models; None: every image ran the whole model
    kept: Tensor  # (B, depth) patch tokens the skippable sub-blocks processed (0 where none are)
    offered: Tensor  # (B, depth) patch tokens offered to them

    def rows(self) -> list[Tensor]:
        """Each image's logits over its own task's classes."""
        return [row[:k] for row, k in zip(self.logits, self.num_classes.tolist())]

    def confidence(self) -> Tensor:
        """Each image's largest class probability over its own task's classes (B,)."""
        return self.logits.float().softmax(dim=-1).amax(dim=-1)

    def keep_rate(self) -> Tensor:
        """Share of the offered patch tokens each image kept (B,); 1 where nothing is skippable."""
        return keep_share(self.kept, self.offered)


def routed_layer(name: str, layers: list[nn.Module], router: Router, batched: bool) -> nn.Module | None:
    """The routed form of the tasks' layers at ``name``, or None where the layer is not trained per task."""
    first = layers[0]
    if isinstance(first, AdaptedLinear):
        base = cast(nn.Linear, first.base_layer)
        return MultiTaskLinear(base, cast(list[AdaptedLinear], layers), router, batched)
    if isinstance(first, TokenDispatcher):
        return RoutedDispatcher(layers, router)
    if isinstance(first, (Adapter, MoEAdapter)):
        return RoutedAdapter(layers, router)
    if isinstance(first, ExitHead) or name == "head":
        return RoutedModules(layers, router, pad=-math.inf)
    return None


def check_same_backbone(names: Sequence[str], classifiers: Sequence[ViTClassifier]) -> None:
    """Refuse in one line tasks whose frozen backbones differ (model, image size or weights)."""
    first = classifiers[0].vit.vit.state_dict()
    for name, clf in zip(names[1:], classifiers[1:]):
        own = clf.vit.vit.state_dict()
        why = None
        if clf.vit.img_size != classifiers[0].vit.img_size:
            why = f"image size {clf.vit.img_size} vs {classifiers[0].vit.img_size}"
        elif own.keys() != first.keys() or any(own[k].shape != v.shape for k, v in first.items()):
            why = "another model"
        elif any(not torch.equal(own[k], v) for k, v in first.items()):
            why = "other weights"
        if why:
            raise CheckpointError(
                f"Task {name!r} has another backbone than task {names[0]!r} ({why}); the tasks of one multi-task "
                f"model share one frozen backbone: train them from the same model, weights and image size."
            )


def check_same_structure(names: Sequence[str], classifiers: Sequence[ViTClassifier]) -> None:
    """Refuse in one line tasks whose models are built differently (method, placement, exits, skipping)."""

    def structure(clf: ViTClassifier) -> list[Any]:
        out: list[Any] = [(n, type(m).__name__) for n, m in clf.named_modules()]
        if isinstance(clf, EarlyExitViT):
            out.append(("exit_depths", clf.exit_depths))
        skipping = getattr(clf.vit, "skipping", None)
        if skipping is not None:
            out.append(("skipping", asdict(replace(skipping, threshold=0.5))))
        return out

    first = structure(classifiers[0])
    for name, clf in zip(names[1:], classifiers[1:]):
        if type(clf) is not type(classifiers[0]) or structure(clf) != first:
            raise CheckpointError(
                f"Task {name!r} was trained with another method or configuration than task {names[0]!r}; a "
                f"multi-task model combines tasks of one method with the same adapter placement, exits and "
                f"token skipping."
            )


class MultiTaskModel(nn.Module):
    """Several tasks' classifiers of one method over one frozen backbone, run on batches that mix tasks.

    Args:
        tasks: task name -> its trained classifier (a module's ``.model``: a
            :class:`~petl_lightning.adapted.ViTClassifier` or Dyn-Adapter's early-exit classifier),
            all of one method over the same backbone. The first task's classifier becomes the shared
            model (its layers are replaced by routed ones); the others' frozen backbones are dropped.
        adapters: how RepAdapter's, ARC's and LoRA's adapters run on a mixed batch: ``"batched"`` (each
            image's low-rank factors gathered, two batched matmuls per layer) or ``"grouped"`` (each
            task's adapter on its images). Both equal the single-task modules; ``benchmarks/multitask.py``
            compares their speed.
    """

    exit_thresholds: Tensor
    class_counts: Tensor
    #: Each task's input normalisation ({"mean": [...], "std": [...]}) from its checkpoint (None: unknown).
    input_normalization: dict[str, dict[str, list[float]] | None]

    def __init__(self, tasks: Mapping[str, ViTClassifier], adapters: Literal["batched", "grouped"] = "batched") -> None:
        super().__init__()
        names, classifiers = list(tasks), list(tasks.values())
        if not names:
            raise ConfigError("A multi-task model needs at least one task.")
        if adapters not in ("batched", "grouped"):
            raise ConfigError(f"adapters must be 'batched' or 'grouped', got {adapters!r}.")
        trained = [{id(p) for p in c.parameters() if p.requires_grad} for c in classifiers]
        batched = adapters == "batched"
        if any(p.requires_grad for p in classifiers[0].vit.vit.parameters()):
            raise ConfigError("This method trains the backbone itself, so tasks cannot share it; use a PETL method.")
        check_same_backbone(names, classifiers)
        check_same_structure(names, classifiers)
        self.task_names = names
        self.input_normalization = dict.fromkeys(names)
        self.router = Router()
        self.register_buffer("class_counts", torch.tensor([c.num_classes for c in classifiers]), persistent=False)
        model = classifiers[0]
        routes: list[tuple[str, nn.Module]] = []  # found first, so a refusal leaves the classifiers as they were
        for name, _ in model.named_modules():
            if name and not any(name.startswith(f"{r}.") for r, _ in routes):
                routed = routed_layer(name, [c.get_submodule(name) for c in classifiers], self.router, batched)
                if routed is not None:
                    routes.append((name, routed))
        covered = {id(p) for _, routed in routes for p in routed.parameters()}
        lost = [n for n, ids in zip(names, trained) if not ids <= covered]
        if lost:
            raise ConfigError(
                f"{type(model).__name__} has trained layers a multi-task model cannot route (task {lost[0]!r})."
            )
        for name, routed in routes:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, routed)
        self.model = model
        if isinstance(model, EarlyExitViT):
            self.confidence_rules = [cast(EarlyExitViT, c).confidence_rule for c in classifiers]
            thresholds = torch.stack([cast(EarlyExitViT, c).thresholds for c in classifiers])
            self.register_buffer("exit_thresholds", thresholds)

    @classmethod
    def from_checkpoints(
        cls,
        checkpoints: Mapping[str, str | Path],
        weights: str | None = None,
        adapters: Literal["batched", "grouped"] = "batched",
    ) -> MultiTaskModel:
        """The tasks' classifiers rebuilt from their ``.ckpt`` files (``weights``: the backbone file's
        new place), in eval mode on the CPU. Checkpoints of another method, backbone or image size are
        refused in one line."""
        if not checkpoints:
            raise ConfigError("A multi-task model needs at least one task's checkpoint.")
        modules = {name: load_trained(path, weights) for name, path in checkpoints.items()}
        methods = {name: type(m).__name__ for name, m in modules.items()}
        first = next(iter(methods))
        for name, method in methods.items():
            if method != methods[first]:
                raise CheckpointError(
                    f"Task {name!r} ({checkpoints[name]}) was trained by {method}, task {first!r} by "
                    f"{methods[first]}; a multi-task model combines checkpoints of one method."
                )
        model = cls({name: m.model for name, m in modules.items()}, adapters)
        model.input_normalization = {name: m.input_normalization for name, m in modules.items()}
        return model.eval()

    # -- sizes -----------------------------------------------------------------------------------
    @property
    def vit(self) -> AdaptedViT:
        return self.model.vit

    @property
    def exit_depths(self) -> list[int]:
        """The blocks after which images may leave (Dyn-Adapter's exits; else the last block only)."""
        return list(getattr(self.model, "exit_depths", [self.vit.depth]))

    @property
    def num_classes(self) -> dict[str, int]:
        return dict(zip(self.task_names, self.class_counts.tolist()))

    # -- forward ---------------------------------------------------------------------------------
    def task_index(self, task_ids: Sequence[str] | Tensor, batch: int) -> Tensor:
        """Task indices (B,) from task names or indices; unknown ones are refused in one line."""
        if isinstance(task_ids, Tensor):
            index = task_ids.long().flatten()
            bad = index[(index < 0) | (index >= len(self.task_names))]
            if bad.numel():
                raise ConfigError(
                    f"Task index {int(bad[0])} is out of range: this model has {len(self.task_names)} tasks."
                )
        else:
            known = {n: i for i, n in enumerate(self.task_names)}
            unknown = [t for t in task_ids if t not in known]
            if unknown:
                raise ConfigError(f"Unknown task {unknown[0]!r}; this model has {', '.join(self.task_names)}.")
            index = torch.tensor([known[t] for t in task_ids], dtype=torch.long)
        if index.numel() != batch:
            raise ConfigError(f"{index.numel()} task ids for {batch} images; give one task per image.")
        return index.to(self.class_counts.device)

    def forward(self, images: Tensor, task_ids: Sequence[str] | Tensor) -> Tensor | list[Tensor]:
        """Logits per image over its own task's classes: a (B, K) tensor when every task has K classes,
        else a list of B rows."""
        out = self.infer(images, task_ids)
        return out.logits if bool((self.class_counts == self.class_counts[0]).all()) else out.rows()

    def infer(self, images: Tensor, task_ids: Sequence[str] | Tensor) -> MultiTaskOutput:
        """Logits and what executed per image (exit, kept tokens), each image by its own task."""
        task = self.task_index(task_ids, images.shape[0])
        route = TaskRoute(task)
        if isinstance(self.model, EarlyExitViT):
            return self.infer_exits(images, route)
        with self.router.use(route):
            run = self.vit.run(images)
            logits = self.model.head(run.features)
        kept = run.kept.sum(-1)
        offered = torch.full_like(kept, float(self.vit.num_patches * self.vit.sites))
        return MultiTaskOutput(logits, task, self.class_counts[task], None, kept, offered)

    def infer_exits(self, images: Tensor, route: TaskRoute) -> MultiTaskOutput:
        """Early exit over a mixed batch: after each exit the images whose confidence (their task's rule,
        over their task's classes) clears their task's threshold leave the batch."""
        model, vit, task = cast(EarlyExitViT, self.model), self.vit, route.task
        b, last = images.shape[0], model.num_exits - 1
        tokens, remaining = vit.embed(images), torch.arange(b, device=images.device)
        exit_index = torch.full((b,), last, dtype=torch.long, device=images.device)
        kept = torch.zeros(b, vit.depth, device=images.device)
        out: Tensor | None = None
        start = 0
        for k, end in enumerate(model.exit_depths):
            with self.router.use(route):
                run = vit.forward_blocks(tokens, start, end)
                kept[remaining, start:end] = run.kept.sum(-1)
                tokens, start = run.tokens, end
                thresholds = self.exit_thresholds[route.task, k] if k < last else None
                if thresholds is not None and not bool(torch.isfinite(thresholds).any()):
                    continue
                logits = model.exit_logits(k, tokens)
            width = int(self.class_counts.max())
            out = logits.new_full((b, width), -math.inf) if out is None else out
            if thresholds is None:
                out[remaining, : logits.shape[1]] = logits
                break
            done = self.confidence(logits, route) >= thresholds
            n_stay = done.numel() - int(done.sum())
            if n_stay == done.numel():
                continue
            order = torch.sort(done.to(torch.uint8), stable=True).indices  # staying first, each part in order
            stay, leave = order[:n_stay], order[n_stay:]
            out[remaining[leave], : logits.shape[1]] = logits[leave]
            exit_index.index_fill_(0, remaining[leave], k)
            if n_stay == 0:
                break
            tokens, remaining, route = tokens.index_select(0, stay), remaining.index_select(0, stay), route.select(stay)
        assert out is not None
        offered = model.offered(exit_index)
        return MultiTaskOutput(out, task, self.class_counts[task], exit_index, kept, offered)

    def confidence(self, logits: Tensor, route: TaskRoute) -> Tensor:
        """Each row's confidence (B,) by its task's rule over its task's classes."""
        counts = self.class_counts.tolist()
        fns = [
            lambda lg, k=counts[t], rule=self.confidence_rules[t]: th.confidence(lg[:, :k], rule)
            for t in range(len(self.task_names))
        ]
        return route.apply(logits, fns)


__all__ = ["MultiTaskModel", "MultiTaskOutput"]
