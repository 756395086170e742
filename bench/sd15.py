"""The benches' stand-in checkpoint: a random-weight SD1.5-family UNet as a ComfyUI MODEL, and
ComfyUI started (through the test harness) on the device the bench runs on."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SD15_UNET = dict(  # comfy/model_detection.py's SD15 unet config (num_heads from supported_models.SD15)
    use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=320,
    num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1,
    use_spatial_transformer=True, legacy=False, adm_in_channels=None, use_linear_in_transformer=False,
    context_dim=768, num_heads=8, num_head_channels=-1, use_temporal_attention=False,
    use_temporal_resblock=False,
)


def init_comfy(base: str, device: str):
    sys.path.insert(0, str(REPO / "tests"))
    from comfy_harness import init_comfyui  # type: ignore

    h = init_comfyui(base)
    h.require_pack()
    if device == "cuda":  # the harness forces --cpu; switch model_management back to the GPU
        import comfy.model_management as mm

        mm.cpu_state = mm.CPUState.GPU
        mm.vram_state = mm.set_vram_to = mm.VRAMState.HIGH_VRAM
        mm.total_vram = mm.get_total_memory(mm.get_torch_device()) / 2**20
    return h


def build_sd15(seed: int = 0, config: dict | None = None, dtype: torch.dtype = torch.float32):
    """A random-weight SD1.5-family UNet (full size by default) as a ComfyUI MODEL (ModelPatcher)."""
    import comfy.ops
    import comfy.sd
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        unet = UNetModel(dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init,
                         **(config or SD15_UNET))
        shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
        del unet
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for k in sorted(shapes):
        leaf, shape = k.rsplit(".", 1)[-1], shapes[k]
        if leaf == "bias":
            sd[k] = torch.zeros(shape)
        elif leaf == "weight" and len(shape) == 1:  # GroupNorm / LayerNorm
            sd[k] = torch.ones(shape)
        else:
            sd[k] = torch.randn(shape, generator=gen) * 0.02
    n_params = sum(t.numel() for t in sd.values())
    sd = {k: v.to(dtype) for k, v in sd.items()}
    patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": dtype})
    del sd
    if patcher is None or type(patcher.model.model_config).__name__ != "SD15":
        raise RuntimeError(f"ComfyUI did not detect the random UNet as SD15: {patcher and patcher.model.model_config}")
    return patcher, n_params
