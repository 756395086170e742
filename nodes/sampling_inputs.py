"""The sampling widgets the nodes that sample images share (steps, cfg, size, sampler, scheduler).

Saved workflows hold widget values by position, so the list keeps the order the nodes had.
"""
from __future__ import annotations

import comfy.samplers
from .comfy_compat import io


def sampling_inputs(sampler: str, scheduler: str) -> list[io.Input]:
    """steps, cfg, width, height, sampler_name, scheduler with the given defaults."""
    return [
        io.Int.Input("steps", default=20, min=1, max=1000),
        io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01),
        io.Int.Input("width", default=512, min=64, max=4096, step=8),
        io.Int.Input("height", default=512, min=64, max=4096, step=8),
        io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS), default=sampler),
        io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default=scheduler),
    ]
