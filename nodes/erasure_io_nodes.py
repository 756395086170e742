"""Nodes ``MACE Save Erasure`` and ``MACE Load Erasure``: the erasure as a shareable patch file.

A file holds the MODEL's K/V edits (``diffusion_model.….diff``) and/or a compiled text gate's CLIP
edits (``text_encoders.….diff`` / ``.diff_b``): the stock LoraLoader applies both parts (strength_model,
strength_clip), LoraLoaderModelOnly only the first. ``mace.base_model`` fingerprints the model part's
base weights, ``mace.base_text_encoder`` the CLIP part's.
"""
from __future__ import annotations

import json

import folder_paths
from .comfy_compat import io

from ..mace_ops.erasure_file import ErasureFile, base_fingerprint_of, check_base, load_erasure, mismatch, save_erasure
from .comfy_gate import get_gate, is_gate_file, load_gate, save_gate
from .comfy_model import apply_erasure, check_editable, effective_weights, get_record
from .comfy_text_entry import entry_keys
from .comfy_text_site import (apply_text_gate, check_text_editable, file_deltas, get_text_gate, split_file_deltas,
                              text_base)
from .paths import resolve_lora_file, save_file_path
from .validation import check_inputs


class MaceSaveErasure(io.ComfyNode):
    EDITS_TEXT_ENTRY = True  # also FLUX.1 / SD3 models (their text-entry projection's edit)

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MaceSaveErasure",
            display_name="MACE Save Erasure",
            category="MACE",
            description="Writes only the weights a MACE erasure changed (K/V or text-entry projection, and the "
            "CLIP's MLP for a compiled text gate) as a small .safetensors patch that the stock LoraLoader loads "
            "(an ACE gate as a gate file for MACE Load Erasure). Use it to keep or share an erasure; to bake a full "
            "checkpoint instead, use the stock CheckpointSave node.",
            inputs=[
                io.Model.Input("model", optional=True, tooltip="A model that went through MACE nodes (optional when "
                               "clip carries a text gate)."),
                io.String.Input("filename_prefix", default="loras/mace_erasure",
                                tooltip="Relative to ComfyUI's output folder; 'loras/...' shows up in LoRA loaders."),
                io.Combo.Input("dtype", options=["fp16", "bf16", "fp32"], default="fp16",
                               tooltip="Precision of the stored weights: fp16 (half the size, what LoRA files use), "
                               "bf16, or fp32 (exact)."),
                io.Clip.Input("clip", optional=True, tooltip="A CLIP from MACE Text Gate (compiled): its MLP edits "
                              "go into the same file."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="The file written.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model=None, filename_prefix="loras/mace_erasure", dtype="fp16", clip=None) -> io.NodeOutput:
        check_inputs(cls, locals())
        record = get_record(model) if model is not None else None
        gate = get_gate(model) if model is not None else None
        text = get_text_gate(clip) if clip is not None else None
        if clip is not None and text is None:
            raise ValueError("clip: carries no compiled text gate; connect the CLIP output of MACE Text Gate "
                             "(compiled), or disconnect clip")
        if record is None and gate is None and text is None:
            raise ValueError("model: carries no MACE erasure; connect the MODEL output of a MACE node, "
                             "or the CLIP output of MACE Text Gate (compiled) to clip")
        if gate is not None and text is not None:
            raise ValueError("clip: an ACE gate file cannot also hold a text gate; save them with two MACE Save "
                             "Erasure nodes (one with model only, one with clip only)")
        path = save_file_path(filename_prefix)
        if gate is not None:  # an ACE gate: gate + the record's deltas as the stock-loader part
            save_gate(path, model, gate, dtype)
            return io.NodeOutput(path, ui={"text": [path]})
        deltas = dict(record.deltas) if record is not None else {}
        info = {"stages": list(record.stages) if record is not None else []}
        if text is not None:
            deltas.update(file_deltas(text))
            info.update({"text_gate": text.info, "base_text_encoder": text.base_fingerprint})
        fingerprint = record.base_fingerprint if record is not None else ""
        save_erasure(path, deltas, fingerprint, info, dtype)
        return io.NodeOutput(path, ui={"text": [path]})


def check_model_base(model, name: str, part: ErasureFile, base, allow_other_base: bool) -> None:
    """``check_base``, except that a model which already carries MACE edits is compared by its base
    (current weights minus the recorded deltas): a file made for that base stacks on the edits. The
    same file loaded a second time is refused as such (not as "a different base model")."""
    record = get_record(model)
    if record is not None and any(isinstance(s, dict) and s.get("method") == "load" and s.get("file") == name
                                  for s in record.stages):
        raise ValueError(f"erasure_name: {name} is already applied to this model (by an earlier MACE Load Erasure); "
                         "loading it again would apply it twice. Remove one of the two Load nodes (or raise strength)")
    try:
        check_base(part, base, name, allow_other_base)
    except ValueError as err:
        if record is None or "different base model" not in str(err):
            raise
        original = {k: base[k] - record.deltas[k] if k in record.deltas else base[k] for k in part.deltas}
        if mismatch(base_fingerprint_of(part.metadata), original) is not None:
            raise


class MaceLoadErasure(io.ComfyNode):
    EDITS_TEXT_ENTRY = True

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MaceLoadErasure",
            display_name="MACE Load Erasure",
            category="MACE",
            description="Applies a MACE erasure file (from MACE Save Erasure, in a loras folder) to a model, and "
            "for a compiled text gate's part to the connected CLIP, after checking it was made for this base "
            "model. Use it to apply a shared erasure, or an ACE gate file, which the stock LoraLoader cannot "
            "apply.",
            inputs=[
                io.Model.Input("model", tooltip="The base model the erasure was made for."),
                io.Combo.Input("erasure_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="The erasure file, from ComfyUI's loras folders."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="Scales the edit: 1 = as made, 0 = none; 0.5-1.5 (a text gate loads at 1 "
                               "only)."),
                io.Boolean.Input("allow_other_base", default=False,
                                 tooltip="Apply even if the file was made for a different base model (e.g. a "
                                 "fine-tune of it); off = refuse."),
                io.Clip.Input("clip", optional=True, tooltip="Needed when the file holds a compiled text gate (it edits "
                              "the CLIP); use the CLIP output for sampling then."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with the erasure applied."),
                     io.String.Output(display_name="info", tooltip="What the file says it erased, and how."),
                     io.Clip.Output(display_name="clip", tooltip="The CLIP, with a text gate's part applied if the "
                                    "file has one: use it for sampling.")],
        )

    @classmethod
    def execute(cls, model, erasure_name, strength, allow_other_base, clip=None) -> io.NodeOutput:
        check_inputs(cls, locals())
        path = resolve_lora_file(erasure_name)  # symlinks leading out of the loras folders are refused
        if is_gate_file(path):  # an ACE gate file: gate (attn2 patch) + its fallback deltas
            return io.NodeOutput(*load_gate(model, path, erasure_name, strength, allow_other_base), clip)
        erasure = load_erasure(path)
        model_part, text_part = split_file_deltas(erasure.deltas)
        check_editable(model_part, entry_keys(model), erasure_name)  # what MACE edits only, allow_other_base or not
        check_text_editable(text_part, erasure_name)
        info = {"method": "load", "file": erasure_name, "strength": strength, "source": erasure.info}
        out_clip = clip
        if text_part:
            if clip is None:
                raise ValueError(f"clip: {erasure_name} holds a compiled text gate (CLIP edits); connect the CLIP "
                                 "and sample with this node's CLIP output (or load the file with the stock LoraLoader)")
            if strength != 1.0:  # scaled, its units mix with the ones they replaced: another gate, not a weaker one
                raise ValueError(f"strength: {erasure_name} holds a compiled text gate, which loads at strength 1 "
                                 "only (its units' thresholds scale with it); set strength to 1")
            base = text_base(clip, sorted(text_part))
            check_base(ErasureFile(text_part, {"mace.base_model": erasure.metadata.get("mace.base_text_encoder", "")}),
                       base, f"{erasure_name} (text encoder part)", allow_other_base)
            out_clip = apply_text_gate(clip, text_part, base, info)
        out = model
        if model_part:
            base = effective_weights(model, sorted(set(entry_keys(model)) | set(model_part)))  # K/V or text entry + pooled
            check_model_base(model, erasure_name, ErasureFile(model_part, erasure.metadata), base, allow_other_base)
            out = apply_erasure(model, {k: v.float() for k, v in model_part.items()}, base, info, strength)
        return io.NodeOutput(out, json.dumps(erasure.info, indent=1, sort_keys=True), out_clip)
