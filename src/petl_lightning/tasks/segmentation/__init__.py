"""Semantic segmentation over an adapted ViT: the :class:`Segmenter` LightningModule, its plain
:class:`SegmentationModel`, UperNet and linear decode heads, whole-image and sliding-window inference
and the mIoU metrics (``docs/segmentation.md``)."""

from petl_lightning.tasks.segmentation.heads import LinearHead, PyramidNeck, UperNetHead
from petl_lightning.tasks.segmentation.inference import slide_inference, whole_inference
from petl_lightning.tasks.segmentation.metrics import SegmentationMetrics
from petl_lightning.tasks.segmentation.model import DenseRun, SegmentationModel
from petl_lightning.tasks.segmentation.module import Segmenter

__all__ = [
    "DenseRun",
    "LinearHead",
    "PyramidNeck",
    "SegmentationMetrics",
    "SegmentationModel",
    "Segmenter",
    "UperNetHead",
    "slide_inference",
    "whole_inference",
]
