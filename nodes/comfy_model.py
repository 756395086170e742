"""Adapter: read a ComfyUI MODEL's cross-attention K/V weights and apply MACE edits as patches.

Weights are read as the model currently computes them (original + any patches already on it),
in float32, without touching the shared module. Edits go onto a ``clone()`` as ``diff`` patches,
and an ``ErasureRecord`` attachment carries the accumulated deltas and the base fingerprint so
the save node can write exactly what was erased.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

import comfy.lora
import comfy.model_management

from ..mace_ops.erasure_file import check_fits, weights_fingerprint
from .comfy_compat import split_key_patch_entry
from ..mace_ops.interfaces import KVWeights
from ..mace_ops.validation import check_number, require_finite

ATTACHMENT = "mace_erasure"
PREFIX = "diffusion_model."
KV_PATTERN = re.compile(r"\.attn2\.to_[kv]\.weight$")


@dataclass(frozen=True)
class ErasureRecord:
    deltas: KVWeights  # float32, CPU, keyed by BaseModel state-dict key
    base_fingerprint: str
    stages: tuple = field(default_factory=tuple)  # one info dict per MACE stage applied


SUPPORTED_FAMILIES = "SD1.x, SD2.x and the SDXL family (SDXL, Pony, Illustrious, NoobAI)"


def model_family(model) -> str:
    """ComfyUI's name for the loaded model's family (its supported-model config class), or 'unknown'."""
    inner = getattr(model, "model", None)
    config = getattr(inner, "model_config", None)
    return type(config).__name__ if config is not None else type(inner).__name__ if inner is not None else "unknown"


def kv_keys(model, field: str = "model") -> list[str]:
    keys = [k for k in model.model_state_dict(PREFIX) if KV_PATTERN.search(k)]
    if not keys:
        from .comfy_text_entry import TEXT_ENTRY_FAMILIES, refusal_hint

        hint = refusal_hint(model) or (f"; MACE Refine Cross-Attention (CFR) and Save/Load Erasure also edit "
                                       f"{TEXT_ENTRY_FAMILIES} (through their text-entry projection)")
        raise ValueError(
            f"{field}: this is a {model_family(model)} model, which has no cross-attention (attn2) to_k/to_v "
            f"weights for this MACE node to edit; it supports UNet models with text cross-attention: "
            f"{SUPPORTED_FAMILIES}{hint}"
        )
    return sorted(keys)


def require_supported(model, field: str = "model") -> None:
    """Refuse (ValueError naming the family and the supported ones) a MODEL MACE cannot edit."""
    if not hasattr(model, "model_state_dict"):
        raise ValueError(f"{field}: expected a MODEL (from a checkpoint loader), got {type(model).__name__}")
    kv_keys(model, field)


POOLED_KEY = PREFIX + "label_emb.0.0.weight"
"""The first layer reading SDXL's ``y`` = [pooled text (1280), 6 size embeddings (6 x 256)]."""
SIZE_EMBEDDING_WIDTH = 6 * 256


def check_editable(keys, allowed, where: str) -> None:
    """ValueError when a file would change a model weight outside ``allowed`` (the weights MACE edits on
    this model: ``comfy_text_entry.entry_keys``), whatever ``allow_other_base`` says."""
    other = sorted(set(keys) - set(allowed))
    if other:
        raise ValueError(f"{where}: changes {len(other)} model weight(s) MACE never edits (e.g. {other[0]}); only "
                         "the weights reading the prompt (cross-attention K/V, a text-entry projection, the "
                         "pooled-text layer) are applied. Load other LoRAs with the stock LoraLoader")


def pooled_text_width(model) -> int | None:
    """Width of the pooled text embedding the UNet reads through :data:`POOLED_KEY` (the SDXL
    family: 1280), or None for models that read no pooled text (SD1.x, SD2.x)."""
    import comfy.model_base

    inner = getattr(model, "model", None)
    if not isinstance(inner, comfy.model_base.SDXL) or POOLED_KEY not in model.model_state_dict(PREFIX):
        return None
    return int(inner.adm_channels) - SIZE_EMBEDDING_WIDTH


def effective_kv_weights(model) -> KVWeights:
    """Current K/V weights (original + existing patches) in float32 on CPU; the model is not modified."""
    return effective_weights(model, kv_keys(model))


def effective_weights(model, keys, prefix: str = PREFIX) -> KVWeights:
    """Current weights (original + patches) of ``keys`` that the model has, float32, CPU. ``model``:
    any ModelPatcher (a CLIP's ``patcher`` too, with the prefix of its keys)."""
    entries = model.get_key_patches(prefix)
    out = {}
    for key in [k for k in keys if k in entries]:
        weight, convert, patches = split_key_patch_entry(entries[key])
        w = comfy.model_management.cast_to_device(weight, torch.device("cpu"), torch.float32, copy=True)
        w = convert(w, inplace=True)
        if patches:
            w = comfy.lora.calculate_weight(patches, w, key)
        out[key] = w.detach().to(torch.float32)
    return out


def get_record(model) -> ErasureRecord | None:
    return model.get_attachment(ATTACHMENT)


def extended_record(model, deltas: KVWeights, base_weights: KVWeights, info: dict) -> ErasureRecord:
    """``model``'s MACE record with ``deltas`` added and ``info`` appended (a new record when it has none;
    the base fingerprint is then taken from ``base_weights``)."""
    previous = get_record(model)
    if previous is None:
        return ErasureRecord(dict(deltas), weights_fingerprint({k: base_weights[k] for k in deltas}), (info,))
    merged = dict(previous.deltas)
    for k, d in deltas.items():
        merged[k] = merged[k] + d if k in merged else d
    return ErasureRecord(merged, previous.base_fingerprint, previous.stages + (info,))


def apply_erasure(model, deltas: KVWeights, base_weights: KVWeights, info: dict, strength: float = 1.0):
    """A clone of ``model`` with ``deltas`` added as diff patches and the record extended.

    Non-finite deltas or strength are refused: nothing NaN is ever applied to a model."""
    check_number(strength, "strength", None, None)
    require_finite(deltas, "apply erasure", "the edit holds NaN/inf; nothing was applied")
    check_fits(deltas, base_weights, "model")  # names and shapes, whatever the source of the deltas
    out = model.clone()
    patches = {k: ("diff", (d.to(torch.float32),)) for k, d in deltas.items()}
    accepted = set(out.add_patches(patches, strength))
    missing = sorted(set(deltas) - accepted)
    if missing:
        raise ValueError(f"model: {len(missing)} weight(s) to patch are missing, e.g. {missing[0]}")
    scaled = {k: (strength * d).to(torch.float32) for k, d in deltas.items()}
    out.set_attachments(ATTACHMENT, extended_record(model, scaled, base_weights, info))
    return out
