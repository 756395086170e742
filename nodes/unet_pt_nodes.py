"""Nodes ``MACE Save UNet .pt (diffusers)`` and ``MACE Load UNet .pt as Erasure``: the eval-learn /
eval-unlearn harness's ``save_path`` / ``load_path`` files (see ``unet_pt.py``)."""
from __future__ import annotations

import json
import os

import folder_paths
from .comfy_compat import io

from ..mace_ops.erasure_file import save_erasure
from .comfy_model import get_record
from .unet_pt import DTYPES, load_unet_pt, save_unet_pt
from .validation import check_inputs


def resolve(path: str, must_exist: bool = False) -> str:
    """Absolute paths as given; relative ones under ComfyUI's output folder (for loading: also as
    given relative to the working directory when that file exists)."""
    path = os.path.expanduser(path.strip())
    if not path:
        raise ValueError("path: empty; give a .pt file path")
    if os.path.isabs(path):
        return path
    if must_exist and os.path.isfile(path):
        return os.path.abspath(path)
    return os.path.join(folder_paths.get_output_directory(), path)


class MaceSaveUNetPt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MaceSaveUNetPt",
            display_name="MACE Save UNet .pt (diffusers keys)",
            category="MACE",
            description="Writes the whole UNet (erasure baked in) as torch.save(unet.state_dict()) with diffusers "
            "key names, what the eval-learn/eval-unlearn harness's load_path reads, and next to it "
            "<name>.safetensors, the MACE erasure file (K/V deltas) for LoRA loaders.",
            inputs=[
                io.Model.Input("model"),
                io.String.Input("path", default="mace_unet.pt",
                                tooltip="Absolute, or relative to ComfyUI's output folder."),
                io.Combo.Input("dtype", options=list(DTYPES), default="fp32"),
            ],
            outputs=[io.String.Output(display_name="path")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, path, dtype) -> io.NodeOutput:
        check_inputs(cls, locals())
        written = save_unet_pt(model, resolve(path), dtype)
        texts = [written]
        record = get_record(model)
        if record is not None and record.deltas:  # our erasure file next to it: <stem>.safetensors
            side = os.path.splitext(written)[0] + ".safetensors"
            save_erasure(side, record.deltas, record.base_fingerprint, {"stages": list(record.stages)},
                         "fp16" if dtype == "fp16" else "fp32")
            texts.append(side)
        return io.NodeOutput(written, ui={"text": texts})


class MaceLoadUNetPt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MaceLoadUNetPt",
            display_name="MACE Load UNet .pt as Erasure",
            category="MACE",
            description="Reads a diffusers-key UNet state dict (the harness's save_path file) with "
            "torch.load(weights_only=True), checks it against this base model and applies its cross-attention "
            "K/V as an erasure; refuses (naming them) when other weights differ.",
            inputs=[
                io.Model.Input("model"),
                io.String.Input("path", default="mace_unet.pt",
                                tooltip="Absolute, or relative to the working directory or ComfyUI's output folder."),
            ],
            outputs=[io.Model.Output(display_name="model"), io.String.Output(display_name="info")],
        )

    @classmethod
    def execute(cls, model, path) -> io.NodeOutput:
        check_inputs(cls, locals())
        out, info = load_unet_pt(model, resolve(path, must_exist=True))
        return io.NodeOutput(out, json.dumps(info))
