"""Callbacks: statistics loggers that only read ``inference_stats()``, Dyn-Adapter's accuracy-vs-GFLOPs
curve, test accuracy over epochs for the selection rules, the checkpoint and prediction-CSV defaults
of the CLI, an image-batch throughput monitor, and the segmentation W&B panel."""

from petl_lightning.callbacks.checkpoint import AtomicCheckpointIO, PETLCheckpoint
from petl_lightning.callbacks.curve import ExitCurveLogger
from petl_lightning.callbacks.panel import SegmentationPanel
from petl_lightning.callbacks.predictions import PredictionWriter
from petl_lightning.callbacks.selection import TestAccuracyTracker
from petl_lightning.callbacks.stats import ExitRateLogger, FlopsLogger, InferenceStatsCallback, read_inference_stats
from petl_lightning.callbacks.throughput import ImageThroughputMonitor, images_in_batch

__all__ = [
    "AtomicCheckpointIO",
    "ExitCurveLogger",
    "ExitRateLogger",
    "FlopsLogger",
    "ImageThroughputMonitor",
    "InferenceStatsCallback",
    "PETLCheckpoint",
    "PredictionWriter",
    "SegmentationPanel",
    "TestAccuracyTracker",
    "images_in_batch",
    "read_inference_stats",
]
