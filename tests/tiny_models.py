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


def tiny_clip_vision(folder, projection_dim: int = 768, seed: int = 0):
    """A random-weight CLIP vision model (``comfy.clip_vision.ClipVisionModel``, as the stock Load CLIP
    Vision node returns): hidden 32, 2 layers, 32 px images in 8 px patches, image embeddings
    ``projection_dim`` wide (768 = CLIP ViT-L/14's, the SD1.x text tower's width). Weights as the tiny
    checkpoints': N(0, 0.02), norm weights 1, biases 0."""
    import json
    from pathlib import Path

    import comfy.clip_vision
    from comfy_harness import _init_tensor

    config = {"hidden_act": "quick_gelu", "hidden_size": 32, "image_size": 32, "intermediate_size": 64,
              "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": 2,
              "num_channels": 3, "num_hidden_layers": 2, "patch_size": 8, "projection_dim": int(projection_dim)}
    path = Path(folder) / f"tiny_clip_vision_{projection_dim}.json"
    path.write_text(json.dumps(config))
    model = comfy.clip_vision.ClipVisionModel(str(path))
    gen = torch.Generator().manual_seed(int(seed))
    sd = {k: _init_tensor(k, tuple(v.shape), gen, torch) for k, v in sorted(model.get_sd().items())}
    missing, unexpected = model.load_sd(sd)
    assert not missing and not unexpected, (missing, unexpected)
    return model
