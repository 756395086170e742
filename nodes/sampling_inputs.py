"""The sampling widgets the nodes that sample images share (steps, cfg, size, sampler, scheduler).

Saved workflows hold widget values by position, so the list keeps the order the nodes had.
"""
from __future__ import annotations

import comfy.samplers
from .comfy_compat import advanced, io


def sampling_inputs(sampler: str, scheduler: str, steps: int = 20, cfg: float = 7.0,
                    expert: bool = False) -> list[io.Input]:
    """steps, cfg, width, height, sampler_name, scheduler with the given defaults; ``expert``: all
    marked advanced (``comfy_compat.advanced``)."""
    inputs = [
        io.Int.Input("steps", default=steps, min=1, max=1000,
                     tooltip="Sampler steps per image, as in KSampler (15-30 for most samplers)."),
        io.Float.Input("cfg", default=cfg, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="Classifier-free guidance, as in KSampler (5-8 for SD1.x/SDXL)."),
        io.Int.Input("width", default=512, min=64, max=4096, step=8,
                     tooltip="Image width: 512 for SD1.x, 768 SD2.x, 1024 SDXL."),
        io.Int.Input("height", default=512, min=64, max=4096, step=8,
                     tooltip="Image height: 512 for SD1.x, 768 SD2.x, 1024 SDXL."),
        io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS), default=sampler,
                       tooltip="Sampler, as in KSampler."),
        io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default=scheduler,
                       tooltip="Noise schedule, as in KSampler."),
    ]
    return [advanced(i) for i in inputs] if expert else inputs
