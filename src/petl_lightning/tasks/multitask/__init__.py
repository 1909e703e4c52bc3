"""Many tasks over one frozen backbone: mixed-batch inference (:class:`MultiTaskModel`)."""

from petl_lightning.tasks.multitask.model import MultiTaskModel, MultiTaskOutput

__all__ = ["MultiTaskModel", "MultiTaskOutput"]
