"""The LitServe API of the multi-task server: requests of different tasks batched together and run
by one :class:`~petl_lightning.tasks.multitask.MultiTaskModel`."""

from __future__ import annotations

from typing import Any

import torch

from petl_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD, petl_transform
from petl_lightning.errors import require
from petl_lightning.serve.requests import BadRequest, ImageRequest, read_request
from petl_lightning.tasks.multitask import MultiTaskModel, MultiTaskOutput

ls = require("litserve", "serve")


def task_transform(img_size: int, normalization: dict[str, list[float]] | None) -> Any:
    """A task's evaluation transform: the square bicubic resize and the normalisation it was trained
    with (ImageNet's where its checkpoint has none)."""
    norm = normalization or {}
    return petl_transform(img_size, norm.get("mean", IMAGENET_MEAN), norm.get("std", IMAGENET_STD))


class MultiTaskAPI(ls.LitAPI):  # type: ignore[name-defined]
    """Answers ``POST /predict`` (a task and an image) with the class, its probability and, for dynamic
    methods, the block the image left at (Dyn-Adapter) or the share of patch tokens it kept (DyT).

    Args:
        model: the tasks (loaded once in the launching process, so a bad checkpoint is refused there).
        max_batch_size / batch_timeout: LitServe's dynamic batching: requests of any tasks arriving
            within ``batch_timeout`` seconds run as one mixed batch of at most ``max_batch_size``.
    """

    def __init__(self, model: MultiTaskModel, max_batch_size: int = 16, batch_timeout: float = 0.01) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.model = model
        self.transforms = {
            name: task_transform(model.vit.img_size, model.input_normalization.get(name)) for name in model.task_names
        }

    def setup(self, device: str) -> None:
        self.device = torch.device(device)
        self.model = self.model.to(self.device).eval()

    # No annotations on ``request`` and on encode_response's result: LitServe reads them to choose the
    # endpoint's request and response types (none: the raw JSON object or form, any response).
    def decode_request(self, request):  # noqa: ANN001, ANN201
        return read_request(request, self.transforms)

    def batch(self, inputs: list[Any]) -> list[Any]:
        return inputs

    def unbatch(self, output: list[Any]) -> list[Any]:
        return output

    @torch.inference_mode()
    def predict(self, inputs: Any) -> Any:
        """Answers for a list of decoded requests (a single one when LitServe does not batch)."""
        items = inputs if isinstance(inputs, list) else [inputs]
        good = [i for i, r in enumerate(items) if isinstance(r, ImageRequest)]
        answers: list[Any] = list(items)
        if good:
            reqs = [items[i] for i in good]
            x = torch.stack([self.transforms[r.task](r.image) for r in reqs]).to(self.device)
            replies = self.replies(self.model.infer(x, [r.task for r in reqs]))
            for i, reply in zip(good, replies):
                answers[i] = reply
        return answers if isinstance(inputs, list) else answers[0]

    def replies(self, out: MultiTaskOutput) -> list[dict[str, Any]]:
        """One reply per row of a batch's output."""
        classes, confidence, keep = out.logits.argmax(-1).tolist(), out.confidence().tolist(), out.keep_rate().tolist()
        exits = None if out.exit_index is None else out.exit_index.tolist()
        replies = []
        for row, task in enumerate(out.task_index.tolist()):
            reply: dict[str, Any] = {
                "task": self.model.task_names[task],
                "class": classes[row],
                "confidence": confidence[row],
            }
            if exits is not None:
                reply["exit_block"] = self.model.exit_depths[exits[row]]
            if self.model.vit.sites:
                reply["keep_rate"] = keep[row]
            replies.append(reply)
        return replies

    def encode_response(self, output):  # noqa: ANN001, ANN201
        if isinstance(output, BadRequest):  # a response of its own, so requests batched with it still succeed
            from fastapi.responses import JSONResponse

            return JSONResponse(status_code=400, content={"detail": output.message})
        return output


__all__ = ["MultiTaskAPI"]
