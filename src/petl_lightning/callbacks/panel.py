"""``SegmentationPanel``: a W&B panel of images with their true and predicted class maps."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor


class SegmentationPanel(Callback):
    """At each validation epoch, the first ``num_images`` images of the first batch go to every
    ``WandbLogger`` as ``val/segmentation``: the image (un-normalised) with two overlays, the truth and
    the prediction, named by class (W&B's mask overlays). Without a W&B logger it does nothing.

    Args:
        num_images: images per panel.
    """

    def __init__(self, num_images: int = 4) -> None:
        self.num_images = num_images

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        from lightning.pytorch.loggers import WandbLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if batch_idx != 0 or dataloader_idx != 0 or not loggers or trainer.sanity_checking:
            return
        x, y = batch
        n = min(self.num_images, x.shape[0])
        preds = outputs["logits"][:n].argmax(1).to("cpu")
        images = self.unnormalize(x[:n].float().to("cpu"), getattr(pl_module, "input_normalization", None))
        names = list(getattr(pl_module, "class_names", []))
        labels = {i: name for i, name in enumerate(names)} | {255: "ignore"}
        masks = [
            {
                "truth": {"mask_data": y[i].to("cpu").numpy(), "class_labels": labels},
                "prediction": {"mask_data": preds[i].numpy(), "class_labels": labels},
            }
            for i in range(n)
        ]
        for logger in loggers:
            logger.log_image("val/segmentation", list(images.numpy()), step=trainer.global_step, masks=masks)

    @staticmethod
    def unnormalize(x: Tensor, normalization: dict[str, list[float]] | None) -> Tensor:
        """Images back to uint8 (B, H, W, C) from the data's mean and std."""
        if normalization:
            mean = torch.tensor(normalization["mean"]).view(1, -1, 1, 1)
            std = torch.tensor(normalization["std"]).view(1, -1, 1, 1)
            x = x * std + mean
        return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


__all__ = ["SegmentationPanel"]
