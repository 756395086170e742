"""The one place where the pack meets ComfyUI's versioned APIs.

* :data:`io` / :data:`ComfyExtension`: the newest V3 API module that exists and has what the
  nodes use: ``comfy_api.latest`` (today's ComfyUI), else ``comfy_api.v0_0_3``, else
  ``comfy_api.v0_0_2`` (ComfyUI 0.3.64, the oldest supported). :data:`API_MODULE` names it.
* :func:`check_core`: the ModelPatcher methods and ``comfy.lora`` functions the nodes call,
  checked once at import so that an incompatible ComfyUI fails with one sentence in ComfyUI's
  "Cannot import ... module for custom nodes" line, not a traceback in the middle of a run.
* :func:`split_key_patch_entry`: ``ModelPatcher.get_key_patches()`` entries, in the
  ``(weight, convert)`` / ``PatchWeightTuple`` form of 0.3.64 and later and the bare-tensor form
  of older builds; a quantised weight of a newer build comes back dequantised (:func:`plain_weight`).
* :func:`static_patcher` / :func:`static_clip`: private clones the pack may train or
  differentiate through. Newer ComfyUI loads checkpoints as ``ModelPatcherDynamic`` on NVIDIA
  (dynamic VRAM, on by default): weights come from VBAR views, weight functions are rebuilt on
  every load, ``force_full_load`` / ``force_patch_weights`` do not hold. Such a patcher is
  demoted to upstream's own non-dynamic delegate (``get_non_dynamic_delegate``, what upstream
  does for weight hooks and ``torch.compile``: a legacy ``ModelPatcher`` over a second copy of
  the model from the loader's ``cached_patcher_init``, with the same patches); where there is
  none, the node refuses, naming ``--disable-dynamic-vram``. A legacy patcher is cloned as before.
* :func:`advanced`: marks an input as one only experts change. Newer V3 APIs take an ``advanced``
  flag on every input (serialised as ``"advanced": true``; newer frontends hide such widgets behind
  "Show advanced inputs"); 0.3.64's inputs have no such attribute, so the flag goes into the
  input's ``extra_dict``, which its ``as_dict`` merges into the same JSON. Feature-detected on the
  input object, never by version.

The executor and cache shapes (headless runner, tests) are handled in ``headless/executor_compat.py``.
"""
from __future__ import annotations

import importlib

MIN_COMFYUI = "0.3.64"
API_CANDIDATES = ("comfy_api.latest", "comfy_api.v0_0_3", "comfy_api.v0_0_2")
# What the nodes take from the API module (io.X) -- checked before a candidate is accepted.
IO_NAMES = ("ComfyNode", "Schema", "NodeOutput", "Model", "Clip", "Vae", "Image", "Mask", "String",
            "Int", "Float", "Boolean", "Combo", "ClipVision")
PATCHER_METHODS = ("clone", "add_patches", "get_key_patches", "model_state_dict", "get_attachment",
                   "set_attachments", "set_model_attn2_replace", "set_model_attn2_patch", "add_weight_wrapper",
                   "get_model_object")
DYNAMIC_VRAM_FLAG = "--disable-dynamic-vram"
LORA_FUNCTIONS = ("calculate_weight", "load_lora", "model_lora_keys_unet")


class ComfyUIIncompatible(ImportError):
    """This ComfyUI lacks something the pack needs."""


def import_newest_api(candidates=API_CANDIDATES, importer=importlib.import_module):
    """``(module name, module)`` of the first candidate that imports and has ``io`` with every
    name in :data:`IO_NAMES` and ``ComfyExtension``."""
    tried = []
    for name in candidates:
        try:
            mod = importer(name)
        except ImportError as exc:
            tried.append(f"{name}: {exc.__class__.__name__}: {exc}")
            continue
        io_mod = getattr(mod, "io", None)
        missing = [n for n in IO_NAMES if not hasattr(io_mod, n)]
        if not hasattr(mod, "ComfyExtension"):
            missing.append("ComfyExtension")
        if missing:
            tried.append(f"{name}: lacks {', '.join(missing)}")
            continue
        return name, mod
    raise ComfyUIIncompatible(
        f"comfyui-mace needs ComfyUI >= {MIN_COMFYUI} (its V3 node API, comfy_api.latest or "
        f"comfy_api.v0_0_2); this ComfyUI has none that fits ({'; '.join(tried)}). Update ComfyUI.")


def check_core() -> None:
    """Raise :class:`ComfyUIIncompatible` naming what is missing from ``comfy``."""
    problems = []
    try:
        import comfy.lora
        import comfy.model_patcher
    except ImportError as exc:
        raise ComfyUIIncompatible(f"comfyui-mace: cannot import ComfyUI's comfy.lora / "
                                  f"comfy.model_patcher ({exc})") from exc
    patcher = getattr(comfy.model_patcher, "ModelPatcher", None)
    if patcher is None:
        problems.append("comfy.model_patcher.ModelPatcher")
    else:
        problems += [f"ModelPatcher.{m}" for m in PATCHER_METHODS if not callable(getattr(patcher, m, None))]
    problems += [f"comfy.lora.{f}" for f in LORA_FUNCTIONS if not callable(getattr(comfy.lora, f, None))]
    if problems:
        raise ComfyUIIncompatible(
            f"comfyui-mace needs ComfyUI >= {MIN_COMFYUI}: this ComfyUI lacks {', '.join(problems)} "
            f"(MACE edits cross-attention weights through ModelPatcher 'diff' patches). Update "
            f"ComfyUI, or report the ComfyUI version at the pack's issue tracker.")


def advanced(inp):
    """``inp`` marked advanced (see the module docstring); returns ``inp`` for use inside a list."""
    if "advanced" in vars(inp):  # newer V3 API: Input(..., advanced=None) sets the attribute
        inp.advanced = True
    else:  # 0.3.64: no such field; as_dict() merges extra_dict into the input's options
        extra = getattr(inp, "extra_dict", None)
        if extra is None:
            extra = inp.extra_dict = {}
        extra["advanced"] = True
    return inp


def is_advanced(inp) -> bool:
    """Whether ``inp`` was marked by :func:`advanced` (either form)."""
    return bool(getattr(inp, "advanced", None) or (getattr(inp, "extra_dict", None) or {}).get("advanced"))


def plain_weight(weight):
    """A weight as a plain tensor: newer ComfyUI's quantised weights (``comfy.quant_ops.QuantizedTensor``:
    fp8-scaled, nvfp4, mxfp8, int8 "mixed ops" checkpoints) dequantised; anything else unchanged
    (0.3.64 has no ``comfy.quant_ops``)."""
    try:
        from comfy.quant_ops import QuantizedTensor
    except ImportError:
        return weight
    return weight.dequantize() if isinstance(weight, QuantizedTensor) else weight


def split_key_patch_entry(entry):
    """``(weight, convert, patches)`` from one ``get_key_patches()`` value."""
    first, *patches = entry
    if isinstance(first, tuple):  # (weight, convert_func) or PatchWeightTuple
        weight, convert = first[0], first[1]
    else:  # older ComfyUI: the bare weight tensor
        weight, convert = first, None
    if convert is None:
        def convert(a, **_kw):
            return a
    return plain_weight(weight), convert, patches


class DynamicVramUnsupported(ValueError):
    """A dynamic-VRAM model that the pack cannot demote to a private legacy patcher."""


def is_dynamic(patcher) -> bool:
    """Whether ``patcher`` is a dynamic-VRAM patcher (``ModelPatcherDynamic``); False on 0.3.64."""
    probe = getattr(patcher, "is_dynamic", None)
    return bool(probe()) if callable(probe) else False


def static_patcher(patcher, field: str = "model"):
    """A private clone of ``patcher`` that holds weight wrappers and autograd: ``clone()`` of a
    legacy patcher; a dynamic one's non-dynamic delegate (same patches, own weights), or
    :class:`DynamicVramUnsupported` naming ``field`` and the flag that avoids it."""
    if not is_dynamic(patcher):
        return patcher.clone()
    delegate = getattr(patcher, "get_non_dynamic_delegate", None)
    reason = "this ComfyUI offers no non-dynamic delegate"
    if callable(delegate):
        try:
            out = delegate()
        except RuntimeError as exc:  # e.g. "cached_patcher_init is not initialized"
            reason = str(exc)
        else:
            if not is_dynamic(out):
                return out
            reason = "its delegate is dynamic too"
    raise DynamicVramUnsupported(
        f"{field}: this model is loaded with dynamic VRAM and MACE cannot make a private copy to train or "
        f"differentiate through ({reason}). Load it with a core loader (Load Checkpoint, Load Diffusion Model, "
        f"Load CLIP), or restart ComfyUI with {DYNAMIC_VRAM_FLAG}.")


def static_clip(clip, field: str = "clip"):
    """``clip`` itself when its patcher is a legacy one; else a clone whose patcher is
    :func:`static_patcher`'s delegate and whose ``cond_stage_model`` is that delegate's model
    (``CLIP.clone`` would keep the dynamic one)."""
    if not is_dynamic(getattr(clip, "patcher", None)):
        return clip
    out = clip.clone()
    out.patcher = static_patcher(clip.patcher, field)
    out.cond_stage_model = out.patcher.model
    return out


def private_user_directory(name: str, folder_paths_module=None) -> str:
    """A folder for the pack's own data that ComfyUI's HTTP routes never serve:
    ``folder_paths.get_system_user_directory(name)`` (``<user>/__name``) where it exists, else
    ``<user>/name`` (0.3.64, whose /userdata routes serve only per-user folders)."""
    if folder_paths_module is None:
        import folder_paths as folder_paths_module
    system = getattr(folder_paths_module, "get_system_user_directory", None)
    if callable(system):
        return system(name)
    import os
    return os.path.join(folder_paths_module.get_user_directory(), name)


API_MODULE, _api = import_newest_api()
io = _api.io
ComfyExtension = _api.ComfyExtension
