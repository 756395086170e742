"""Nodes ``MACE Save Erasure`` and ``MACE Load Erasure``: the erasure as a shareable patch file."""
from __future__ import annotations

import json
import os

import folder_paths
from .comfy_compat import io

from ..mace_ops.erasure_file import check_base, load_erasure, save_erasure
from .comfy_gate import get_gate, is_gate_file, load_gate, save_gate
from .comfy_model import apply_erasure, effective_weights, get_record, kv_keys
from .validation import check_inputs


class MaceSaveErasure(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MaceSaveErasure",
            display_name="MACE Save Erasure",
            category="MACE",
            description="Writes only the changed K/V weights as a small .safetensors patch that the stock "
            "LoraLoaderModelOnly loads. To bake a full checkpoint instead, use the stock CheckpointSave node.",
            inputs=[
                io.Model.Input("model", tooltip="A model that went through MACE nodes."),
                io.String.Input("filename_prefix", default="loras/mace_erasure",
                                tooltip="Relative to ComfyUI's output folder; 'loras/...' shows up in LoRA loaders."),
                io.Combo.Input("dtype", options=["fp16", "bf16", "fp32"], default="fp16"),
            ],
            outputs=[io.String.Output(display_name="path")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, filename_prefix, dtype) -> io.NodeOutput:
        check_inputs(cls, locals())
        record = get_record(model)
        if record is None and get_gate(model) is None:
            raise ValueError("model: carries no MACE erasure; connect the MODEL output of a MACE node")
        folder, name, counter, _sub, _prefix = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory())
        path = os.path.join(folder, f"{name}_{counter:05}_.safetensors")
        if get_gate(model) is not None:  # an ACE gate: gate + the record's deltas as the stock-loader part
            save_gate(path, model, get_gate(model), dtype)
            return io.NodeOutput(path, ui={"text": [path]})
        info = {"stages": list(record.stages)}
        save_erasure(path, record.deltas, record.base_fingerprint, info, dtype)
        return io.NodeOutput(path, ui={"text": [path]})


class MaceLoadErasure(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MaceLoadErasure",
            display_name="MACE Load Erasure",
            category="MACE",
            description="Applies a MACE erasure file to a model after checking it was made for this base model.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("erasure_name", options=folder_paths.get_filename_list("loras")),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05),
                io.Boolean.Input("allow_other_base", default=False,
                                 tooltip="Apply even if the file was made for a different base model."),
            ],
            outputs=[io.Model.Output(display_name="model"), io.String.Output(display_name="info")],
        )

    @classmethod
    def execute(cls, model, erasure_name, strength, allow_other_base) -> io.NodeOutput:
        check_inputs(cls, locals())
        path = folder_paths.get_full_path("loras", erasure_name)
        if path is None:
            raise ValueError(f"erasure_name: {erasure_name!r} not found in the loras folders; refresh the list (R)")
        if is_gate_file(path):  # an ACE gate file: gate (attn2 patch) + its fallback deltas
            return io.NodeOutput(*load_gate(model, path, erasure_name, strength, allow_other_base))
        erasure = load_erasure(path)
        base = effective_weights(model, sorted(set(kv_keys(model)) | set(erasure.deltas)))  # K/V + e.g. SDXL's pooled layer
        check_base(erasure, base, erasure_name, allow_other_base)  # keys and shapes always, base unless allowed
        deltas = {k: v.float() for k, v in erasure.deltas.items()}
        info = {"method": "load", "file": erasure_name, "strength": strength, "source": erasure.info}
        out = apply_erasure(model, deltas, base, info, strength)
        return io.NodeOutput(out, json.dumps(erasure.info, indent=1, sort_keys=True))
