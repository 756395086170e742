"""The LoRA stage with dynamic VRAM on and off: the same LoRA deltas, or a row that says why not.

Newer ComfyUI loads checkpoints as ``ModelPatcherDynamic`` on NVIDIA (dynamic VRAM, on by
default); the pack trains through a legacy private copy (``nodes.comfy_compat.static_patcher``,
upstream's ``get_non_dynamic_delegate``). This leg trains one concept's LoRA from the same seed on
the same random SD1.5 UNet file, loaded once with the legacy patcher and once dynamic (enabled as
upstream's ``main.py`` does: ``comfy_aimdo.control.init_devices``, ``CoreModelPatcher =
ModelPatcherDynamic``, ``memory_management.aimdo_enabled``), for both training paths, and reports
the largest difference of the deltas ``up @ down`` relative to their size (expected: float noise,
< 1e-3) and of the losses. On a ComfyUI without dynamic VRAM (0.3.64), or without CUDA, the rows
say so: the leg is ready for the first GPU run on a current ComfyUI.

    bash bench/gpu_suite.sh --sections dynamic
"""
from __future__ import annotations

import os
import tempfile

import torch


def enable_dynamic_vram() -> str | None:
    """Switch this process's loaders to dynamic VRAM; None, or why it cannot be done here."""
    import comfy.model_management as mm
    import comfy.model_patcher as mp

    dynamic = getattr(mp, "ModelPatcherDynamic", None)
    if dynamic is None:
        return "this ComfyUI has no dynamic VRAM (no ModelPatcherDynamic)"
    if not torch.cuda.is_available():
        return "dynamic VRAM needs CUDA"
    import comfy.memory_management as mem
    try:
        import comfy_aimdo.control as aimdo
        devices = list(mm.get_all_torch_devices())
        try:
            ok = aimdo.init_devices((d.index, 0) for d in devices)
        except TypeError:  # older comfy-aimdo protocol
            ok = aimdo.init_devices(d.index for d in devices)
    except Exception as err:  # noqa: BLE001 - a row, not a crash
        return f"comfy_aimdo did not initialise: {err}"
    if not ok:
        return "comfy_aimdo found no device"
    mp.CoreModelPatcher = dynamic
    mem.aimdo_enabled = True
    return None


def _load(path: str, dynamic: bool):
    import comfy.model_patcher as mp
    import comfy.sd

    keep = getattr(mp, "CoreModelPatcher", None)  # absent before dynamic VRAM: every load is legacy
    if keep is not None and not dynamic:
        mp.CoreModelPatcher = mp.ModelPatcher
    try:
        with torch.inference_mode():
            return comfy.sd.load_diffusion_model(path)
    finally:
        if keep is not None:
            mp.CoreModelPatcher = keep


def _train(h, patcher, path: str, scale, latents, concept, templates, pool: int):
    ops, nodes = h.pack_module.mace_ops, h.pack_module.nodes
    from bench.common import HashTextEncoder

    cfg = ops.lora_train.LoraTrainConfig(steps=scale.steps, lr=1e-4, use_masks=False, path=path, seed=0,
                                         query_samples=pool)
    den = nodes.comfy_denoiser.ComfyDenoiser(patcher, backward=path == "full")
    try:
        out = ops.lora_train.train_concept_lora(den, HashTextEncoder(), concept, templates, latents, None, cfg)
    finally:
        den.release()
    deltas = {k: (out.lora.up[k] @ out.lora.down[k]).detach().float().cpu() for k in out.lora.names}
    return deltas, out.losses


def dynamic_rows(h, scale, device: str, latents, pool: int, unet_config: dict | None = None,
                 enable=enable_dynamic_vram) -> list[dict]:
    """Rows of the dynamic-VRAM leg (see the module docstring). ``unet_config``: the random UNet's
    layout (None: full SD1.5); ``enable``: what turns dynamic VRAM on (a test passes a no-op, so
    that both runs are legacy and must agree exactly)."""
    import comfy.model_management as mm
    from safetensors.torch import save_file

    from bench.train import build_sd15

    why = enable() if device == "cuda" or enable is not enable_dynamic_vram else "dynamic VRAM needs CUDA"
    if why is not None:
        return [{"section": "dynamic", "case": "-", "method": "-", "note": f"skipped: {why}"}]
    ops = h.pack_module.mace_ops
    concept = ops.concepts.Concept(("ship",), "ground", 1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mace-dynamic-") as tmp:
        file = os.path.join(tmp, "unet.safetensors")
        with torch.inference_mode():
            patcher, _ = build_sd15(0, unet_config, torch.float16 if device == "cuda" else torch.float32)
            save_file({k: v.contiguous() for k, v in patcher.model.diffusion_model.state_dict().items()}, file)
        del patcher
        for path in ("cached_queries", "full"):
            got = {}
            for dynamic in (False, True):
                try:
                    model = _load(file, dynamic)
                    got[dynamic] = _train(h, model, path, scale, latents, concept, scale.template_list(), pool)
                except Exception as err:  # noqa: BLE001
                    rows.append({"section": "dynamic", "case": path, "method": "on" if dynamic else "off",
                                 "note": f"failed: {type(err).__name__}: {err}"[:200]})
                finally:
                    mm.unload_all_models()
            if len(got) == 2:
                (d_off, l_off), (d_on, l_on) = got[False], got[True]
                rel = max(float((d_on[k] - d_off[k]).abs().max()) / max(float(d_off[k].abs().max()), 1e-12)
                          for k in d_off)
                rows.append({"section": "dynamic", "case": path, "method": "on vs off",
                             "delta_rel_max": rel, "loss_abs_max": max(abs(a - b) for a, b in zip(l_on, l_off)),
                             "note": "same within float noise" if rel < 1e-3 else "DIFFERENT: check R1b"})
    return rows
