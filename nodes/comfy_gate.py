"""Adapter: an ACE-style gated erasure (``mace_ops.ace``) on a ComfyUI MODEL, saved and loaded.

A gate is not a weight patch: it goes onto a ``clone()`` as an ``attn2_patch``
(``ModelPatcher.set_model_attn2_patch``), which ComfyUI runs on the context of every
cross-attention, the unconditional one included. Like the weight edits' ``ErasureRecord``
(``comfy_model``), a ``GateRecord`` attachment carries the gate, the base fingerprint and the
settings, so ``MACE Save Erasure`` can write it; attachments follow ``clone()``, so later MACE
nodes keep it. One gate per model: a second ACE node on a gated model is refused (put every
concept in one node). The file (``save_gated_erasure``'s format) holds the gate and, as ``.diff``
keys, the model's weight-edit record when it has one (e.g. a CFR node before or after): that part
is all the stock LoRA loader applies.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..mace_ops.ace import GatedErasure, attn2_patch, load_gated_file, save_gated_erasure
from ..mace_ops.erasure_file import DTYPES, ErasureFile, base_fingerprint_of, check_fits, mismatch, weights_fingerprint
from .comfy_model import apply_erasure, check_editable, effective_weights, get_record, kv_keys
from .comfy_text_entry import entry_keys

GATE_ATTACHMENT = "mace_gate"


@dataclass(frozen=True)
class GateRecord:
    erasure: GatedErasure
    base_fingerprint: str
    info: dict = field(default_factory=dict)


def get_gate(model) -> GateRecord | None:
    return model.get_attachment(GATE_ATTACHMENT)


def base_fingerprint(model, base_weights) -> str:
    """The fingerprint of the model's base: its weight-edit record's, else of the current K/V weights."""
    record = get_record(model)
    return record.base_fingerprint if record is not None else weights_fingerprint(base_weights)


def check_gate_fits(erasure: GatedErasure, base_weights, where: str) -> None:
    widths = {int(w.shape[1]) for k, w in base_weights.items() if k.endswith("to_k.weight")}
    d = int(erasure.bases.shape[1])
    if widths and d not in widths:
        raise ValueError(f"{where}: the gate reads {d}-wide text features, this model's cross-attention reads "
                         f"{sorted(widths)}; it was made for another architecture")


def apply_gate(model, record: GateRecord):
    """A clone of ``model`` with the gate as an attn2 patch and the record attached (model untouched)."""
    if get_gate(model) is not None:
        raise ValueError("model: already carries an ACE gate; erase every concept in one MACE Gated Erasure "
                         "(ACE) node (or start from the model without the gate)")
    out = model.clone()
    out.set_model_attn2_patch(attn2_patch(record.erasure))
    out.set_attachments(GATE_ATTACHMENT, record)
    return out


def save_gate(path: str, model, gate: GateRecord, dtype: str) -> None:
    """The gate plus the model's weight-edit record (``.diff``, the stock-loader part) in one file."""
    record = get_record(model)
    fallback = dict(record.deltas) if record is not None else {}
    info = {"stages": list(record.stages) if record is not None else [], "gate": gate.info}
    fingerprint = record.base_fingerprint if record is not None else gate.base_fingerprint
    save_gated_erasure(path, gate.erasure, fingerprint, info, fallback, DTYPES[dtype])


def is_gate_file(path: str) -> bool:
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("mace.format", "").startswith("gate-")
    except Exception:  # not readable: the regular loader reports it with its own message
        return False


def load_gate(model, path: str, name: str, strength: float, allow_other_base: bool):
    """(model clone with the file's fallback deltas and gate, info JSON) after the base checks."""
    if strength != 1.0:
        raise ValueError(f"strength: {name} is a gated (ACE) erasure, which loads at strength 1 only; set "
                         "strength to 1")
    erasure, fallback, metadata = load_gated_file(path)
    check_editable(fallback, entry_keys(model), name)
    base = effective_weights(model, sorted(set(kv_keys(model)) | set(fallback)))  # K/V + e.g. SDXL's pooled layer
    check_fits(fallback, base, name)
    check_gate_fits(erasure, base, name)
    fingerprint = base_fingerprint_of(metadata)
    if not allow_other_base:
        reason = mismatch(fingerprint, base)
        if reason is not None:
            raise ValueError(f"{name}: made for a different base model ({reason}); load it onto the checkpoint it "
                             "was made from (any dtype), or set allow_other_base to apply it anyway")
    info = ErasureFile({}, metadata).info
    out = model
    if fallback:
        out = apply_erasure(model, {k: v.float() for k, v in fallback.items()}, base,
                            {"method": "load", "file": name, "strength": strength, "source": info})
    gate_info = info.get("gate") if isinstance(info.get("gate"), dict) else {}
    out = apply_gate(out, GateRecord(erasure, fingerprint or weights_fingerprint(base), gate_info))
    return out, json.dumps(info, indent=1, sort_keys=True)

