"""Interop with the eval-learn / eval-unlearn harness: a full UNet state dict in diffusers key names.

The harness's "mace" technique saves and loads ``torch.save(unet.state_dict())`` of a diffusers
``UNet2DConditionModel`` (``save_path`` / ``load_path``). Here:

* ``unet_pt_state_dict(model)``: every UNet weight of a ComfyUI MODEL as the model currently
  computes it (patches such as a MACE erasure baked in), renamed to diffusers keys with
  ComfyUI's own mapping ``comfy.utils.unet_to_diffusers(unet_config)``; ``save_unet_pt`` writes
  it with ``torch.save`` via a temporary file and a rename.
* ``load_unet_pt(model, path)`` reads such a file with ``torch.load(weights_only=True)`` (never
  full unpickling), checks that its keys and shapes are exactly the base model's UNet, that every
  weight other than the cross-attention K/V equals the base model's (else it refuses, naming the
  keys: the file is not a K/V erasure of this base model), and applies the K/V as an erasure:
  ``set`` patches on a clone (bit-exact K/V) plus the MACE record (deltas = file - base), so
  MACE Save Erasure writes the same change as a LoRA-loader file.
"""
from __future__ import annotations

import os
import tempfile

import torch

import comfy.lora
import comfy.model_management
import comfy.utils

from ..mace_ops.validation import require_file_values
from .comfy_model import ATTACHMENT, KV_PATTERN, PREFIX, effective_kv_weights, extended_record

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def diffusers_key_map(model) -> dict[str, str]:
    """ComfyUI UNet key (without ``diffusion_model.``) -> diffusers key, from ComfyUI's own table."""
    unet_config = model.model.model_config.unet_config
    to_comfy = comfy.utils.unet_to_diffusers(unet_config)
    if not to_comfy:
        raise ValueError("model: ComfyUI has no diffusers key mapping for this architecture (a UNet with "
                         "num_res_blocks is needed, e.g. SD1.x/SD2.x/SDXL)")
    own = set(model.model_state_dict(PREFIX))
    mapping = {}
    for diffusers_key, comfy_key in to_comfy.items():
        if PREFIX + comfy_key in own:
            mapping[comfy_key] = diffusers_key
    missing = sorted(k[len(PREFIX):] for k in own if k[len(PREFIX):] not in mapping)
    if missing:
        raise ValueError(f"model: {len(missing)} UNet weight(s) have no diffusers name in ComfyUI's mapping "
                         f"(e.g. {', '.join(missing[:3])})")
    return mapping


def _effective(entries, key: str) -> torch.Tensor:
    (weight, convert), *patches = entries[key]
    w = comfy.model_management.cast_to_device(weight, torch.device("cpu"), torch.float32, copy=True)
    w = convert(w, inplace=True)
    if patches:
        w = comfy.lora.calculate_weight(patches, w, key)
    return w


def unet_pt_state_dict(model, dtype: str = "fp32") -> dict[str, torch.Tensor]:
    """The UNet as the model computes it, in diffusers key names, on CPU in ``dtype``."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: unknown {dtype!r}; choose one of {sorted(DTYPES)}")
    mapping = diffusers_key_map(model)
    entries = model.get_key_patches(PREFIX)
    return {mapping[k[len(PREFIX):]]: _effective(entries, k).to(DTYPES[dtype]).contiguous()
            for k in sorted(entries) if k[len(PREFIX):] in mapping}


def save_unet_pt(model, path: str, dtype: str = "fp32") -> str:
    """``torch.save`` the diffusers-key UNet state dict to ``path`` (temporary file + rename)."""
    sd = unet_pt_state_dict(model, dtype)
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".mace-", suffix=".tmp", dir=folder)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        torch.save(sd, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def read_unet_pt(path: str, name: str | None = None) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` of a flat ``{str: Tensor}`` state dict; ValueError otherwise.
    Messages name the file by ``name`` (the user's own text; default its base name), never by the
    server path (and torch's own error text, which may quote it, is left out)."""
    name = name or os.path.basename(path)
    if not os.path.isfile(path):
        raise ValueError(f"path: {name!r} not found")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for anything beyond tensors and containers
        raise ValueError(f"path: {name!r} is not a weights-only torch file ({type(exc).__name__}); only plain "
                         "state dicts are read, never arbitrary pickles") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise ValueError(f"path: {name!r} is not a flat state dict of tensors (torch.save(unet.state_dict()))")
    return sd


def _names(keys, n: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def check_unet_pt(model, sd: dict[str, torch.Tensor], path: str = "load_path", rtol: float = 1e-3,
                  atol: float = 1e-5) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Validate a diffusers-key UNet state dict against ``model``; returns (base K/V, file K/V) by
    ComfyUI key (``diffusion_model.…``), float32. Weights other than K/V must equal the base model's
    within fp16 rounding (``rtol``/``atol``), else ValueError naming them."""
    mapping = diffusers_key_map(model)
    expected = {d: c for c, d in mapping.items()}
    missing, unexpected = set(expected) - set(sd), set(sd) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_names(unexpected)}")
        raise ValueError(f"{path}: not a diffusers UNet state dict of this base model; " + "; ".join(parts))
    entries = model.get_key_patches(PREFIX)
    base_kv, file_kv, differ, shapes = {}, {}, [], []
    for d, c in expected.items():
        key = PREFIX + c
        weight = entries[key][0][0]
        if tuple(sd[d].shape) != tuple(weight.shape):
            shapes.append(f"{d} {tuple(sd[d].shape)} vs model {tuple(weight.shape)}")
            continue
        if KV_PATTERN.search(key):
            file_kv[key] = sd[d].to(torch.float32)
            continue
        base = _effective(entries, key)
        if not torch.allclose(sd[d].to(torch.float32), base, rtol=rtol, atol=atol):
            differ.append(d)
    if shapes:
        raise ValueError(f"{path}: {len(shapes)} shape(s) differ from the base model: {_names(shapes, 3)}")
    if differ:
        raise ValueError(f"{path}: {len(differ)} weight(s) other than the cross-attention K/V differ from the base "
                         f"model, so this is not a MACE/K-V erasure of it (or another base checkpoint): "
                         f"{_names(differ)}")
    base_kv = effective_kv_weights(model)
    return base_kv, file_kv


def load_unet_pt(model, path: str, name: str | None = None):
    """A clone of ``model`` with the file's K/V applied as an erasure (bit-exact ``set`` patches) and
    the MACE record extended; returns (model, info). ``name``: the file as the user gave it (messages)."""
    name = name or os.path.basename(path)
    sd = read_unet_pt(path, name)
    base_kv, file_kv = check_unet_pt(model, sd, f"path {name!r}")
    require_file_values(file_kv, f"path {name!r}", "the file is damaged or comes from a broken run; nothing was "
                        "applied")
    deltas = {k: file_kv[k] - base_kv[k] for k in file_kv}
    changed = sorted(k for k, d in deltas.items() if bool(d.any()))
    out = model.clone()
    accepted = set(out.add_patches({k: ("set", (file_kv[k],)) for k in changed}, 1.0))
    if set(changed) - accepted:
        raise ValueError(f"model: could not patch {_names(set(changed) - accepted)}")
    info = {"method": "load_unet_pt", "file": os.path.basename(name), "changed": len(changed)}
    out.set_attachments(ATTACHMENT, extended_record(model, {k: deltas[k] for k in changed}, base_kv, info))
    return out, info
