"""Tiny random-weight FLUX.1 (dev, schnell) and SD3.5 checkpoints, built in code, that ComfyUI
detects as those families (``supported_models.Flux`` / ``FluxSchnell`` -> ``model_base.Flux``,
``supported_models.SD3`` -> ``model_base.SD3``) and loads with their text encoders.

* SD3.5 (``make_tiny_sd35_checkpoint``): an MMDiT of depth 2 (ComfyUI derives the width from the
  ``x_embedder`` as 64 x depth = 128, heads = depth) with SD3.5's RMS q/k norms, ``context_embedder``
  4096 -> 128 and ``y_embedder`` reading the pooled CLIP-L + CLIP-G; CLIP-L, CLIP-G and T5-XXL in the
  checkpoint (``text_encoders.*``), TAESD-layout 16-channel VAE.  Detection needs no help: every
  width is read from the shapes.  The text encoders are narrow (CLIP-L and CLIP-G 64 wide, 3
  layers: the least for the penultimate layer SD3 reads; T5 one layer, 1 head, d_ff 32) but T5 keeps d_model 4096: ComfyUI's SD3 text encoder pads
  the CLIP features to 4096 and concatenates T5's tokens after them, so 4096 is what
  ``context_embedder`` reads.
* FLUX.1 (``make_tiny_flux_checkpoint``, ``schnell`` = no guidance embedder): one double and one
  single block at hidden 64.  ComfyUI 0.3.64's detection reads the family (dev/schnell) from the
  keys but hard-codes FLUX's widths (hidden 3072, 24 heads, context 4096, rope axes [16, 56, 56]),
  so the file stores its widths under :data:`TINY_DIT_KEY` and :func:`install_tiny_dit_hook`
  hands them to detection for files that carry the key -- as the harness's text-encoder depth hook
  does for the encoders.  T5 is 64 wide here (``txt_in`` reads 64), CLIP-L 64 (``vector_in`` reads 64).

The text encoders' config overrides travel in the file as the harness's ``TINY_TE_KEY``, so
``comfy_harness.load_tiny_checkpoint`` and the executor's loader (depth hook) build them at that size.
"""
from __future__ import annotations

import json
from pathlib import Path

import comfy_harness as ch

TINY_DIT_KEY = "mace_tiny_dit_config"
"""Safetensors metadata: JSON of the detected config entries a tiny FLUX file overrides."""

FLUX_DIT = dict(hidden_size=64, num_heads=2, axes_dim=[8, 12, 12], context_in_dim=64)
FLUX_CONFIG = dict(image_model="flux", in_channels=16, patch_size=2, out_channels=16, vec_in_dim=64,
                   mlp_ratio=4.0, depth=1, depth_single_blocks=1, theta=10000, qkv_bias=True, **FLUX_DIT)
SD35_CONFIG = dict(in_channels=16, out_channels=16, patch_size=2, depth=2, adm_in_channels=128,
                   pos_embed_max_size=16, num_patches=256, qk_norm="rms", pos_embed_scaling_factor=None,
                   context_embedder_config={"target": "torch.nn.Linear",
                                            "params": {"in_features": 4096, "out_features": 128}})
CLIP_TINY = {"hidden_size": 64, "intermediate_size": 64, "num_attention_heads": 2, "projection_dim": 64}
T5_FLUX = {"d_model": 64, "num_layers": 1, "num_heads": 2, "d_kv": 32, "d_ff": 64}
T5_SD3 = {"d_model": 4096, "num_layers": 1, "num_heads": 1, "d_kv": 64, "d_ff": 32}


def install_tiny_dit_hook() -> None:
    """Make ComfyUI's detection use the widths a tiny FLUX file records (no effect on other files)."""
    import comfy.model_detection as md

    real = md.detect_unet_config
    if getattr(real, "_mace_tiny_dit", False):
        return

    def detect_unet_config(state_dict, key_prefix, metadata=None):
        config = real(state_dict, key_prefix, metadata=metadata)
        if config is not None and metadata and TINY_DIT_KEY in metadata:
            config.update(json.loads(metadata[TINY_DIT_KEY]))
        return config

    detect_unet_config._mace_tiny_dit = True
    md.detect_unet_config = detect_unet_config


def _random(shapes: dict, gen, torch) -> dict:
    out = {}
    for k in sorted(shapes):
        if k.endswith("logit_scale"):
            out[k] = torch.tensor(4.6055)
        elif k.endswith("position_ids"):
            out[k] = torch.arange(77).expand(1, -1).clone()
        elif k.endswith(".scale") and len(shapes[k]) == 1:  # RMSNorm
            out[k] = torch.ones(shapes[k])
        else:
            out[k] = ch._init_fp16(k, shapes[k], gen, torch)
    return out


def _text_encoder_shapes(clip_class, options: dict, torch) -> dict:
    with torch.device("meta"):
        model = clip_class(device="meta", dtype=torch.float32, model_options=options)
        return {"text_encoders." + k: tuple(v.shape) for k, v in model.state_dict().items()}


def _write(path, sd: dict, family: str, te: dict, extra_meta: dict) -> Path:
    import torch
    from safetensors.torch import save_file

    sd = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"format": "pt", "mace_tiny_family": family,
                                       ch.TINY_TE_KEY: json.dumps(te), **extra_meta})
    return path


def _taesd_shapes(prefix: str, torch) -> dict:
    import comfy.taesd.taesd

    with torch.device("meta"):
        return {prefix + k: tuple(v.shape) for k, v in comfy.taesd.taesd.TAESD(latent_channels=16).state_dict().items()}


def make_tiny_flux_checkpoint(path, schnell: bool = False, seed: int = 0) -> Path:
    """FLUX.1-dev layout (guidance embedder) or, with ``schnell``, FLUX.1-schnell's."""
    ch.get_harness()
    import torch

    import comfy.ops
    from comfy.ldm.flux.model import Flux
    from comfy.text_encoders.flux import flux_clip

    te = {"clip_l": dict(CLIP_TINY, num_hidden_layers=2), "t5xxl": dict(T5_FLUX)}
    options = {f"{k}_model_config": v for k, v in te.items()}
    shapes = {}
    with torch.device("meta"):
        cfg = dict(FLUX_CONFIG, guidance_embed=not schnell)
        net = Flux(dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init, **cfg)
        shapes.update({"model.diffusion_model." + k: tuple(v.shape) for k, v in net.state_dict().items()})
    shapes.update(_taesd_shapes("vae.", torch))
    shapes.update(_text_encoder_shapes(flux_clip(dtype_t5=torch.float16), options, torch))
    sd = _random(shapes, torch.Generator().manual_seed(int(seed)), torch)
    return _write(path, sd, "flux_schnell" if schnell else "flux_dev", te, {TINY_DIT_KEY: json.dumps(FLUX_DIT)})


def make_tiny_sd35_checkpoint(path, seed: int = 0) -> Path:
    """SD3.5 layout (MMDiT with RMS q/k norms), CLIP-L + CLIP-G + T5-XXL."""
    ch.get_harness()
    import torch

    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
    from comfy.text_encoders.sd3_clip import sd3_clip

    te = {"clip_l": dict(CLIP_TINY, num_hidden_layers=3), "clip_g": dict(CLIP_TINY, num_hidden_layers=3),
          "t5xxl": dict(T5_SD3)}
    options = {f"{k}_model_config": v for k, v in te.items()}
    shapes = {}
    with torch.device("meta"):
        net = MMDiT(dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init,
                    **SD35_CONFIG)
        shapes.update({"model.diffusion_model." + k: tuple(v.shape) for k, v in net.state_dict().items()})
    shapes.update(_taesd_shapes("first_stage_model.", torch))
    shapes.update(_text_encoder_shapes(sd3_clip(dtype_t5=torch.float16), options, torch))
    sd = _random(shapes, torch.Generator().manual_seed(int(seed)), torch)
    return _write(path, sd, "sd35", te, {})
