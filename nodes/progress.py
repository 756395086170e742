"""Progress reporting for MACE nodes: a ComfyUI ProgressBar that is also an interrupt point."""
from __future__ import annotations

import comfy.model_management
import comfy.utils


class NodeProgress:
    """``callback(done, total)`` for mace_ops; raises InterruptProcessingException on /interrupt."""

    def __init__(self, total: int):
        self.bar = comfy.utils.ProgressBar(total)
        self.total = total

    def __call__(self, done: int, total: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.bar.update_absolute(round(done * self.total / max(total, 1)), self.total)
