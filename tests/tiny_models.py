"""Test helper: the tiny SD1.5-layout checkpoint with a 1-layer CLIP, generated and loaded in one call."""
from __future__ import annotations

import torch

from comfy_harness import load_tiny_checkpoint, make_tiny_sd15_checkpoint


def tiny_sd15_clip1(tmp_path_factory, name: str):
    """(model, clip, vae) of a fresh tiny SD1.5 checkpoint (1-layer CLIP, seed 0) in a tmp folder ``name``,
    loaded as the executor does (inside ``torch.inference_mode()``)."""
    path = make_tiny_sd15_checkpoint(tmp_path_factory.mktemp(name) / f"{name}.safetensors", clip_layers=1, seed=0)
    with torch.inference_mode():
        return load_tiny_checkpoint(path, clip_layers=1)
