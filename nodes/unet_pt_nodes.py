"""Nodes ``MACE Save UNet .pt (diffusers)`` and ``MACE Load UNet .pt as Erasure``: the eval-learn /
eval-unlearn harness's ``save_path`` / ``load_path`` files (see ``unet_pt.py``).

Paths follow the pack's policy (``paths``): the save writes only inside ComfyUI's output folder
(.pt/.pth/.bin, with its ``<stem>.safetensors`` companion, which is never the target), the load
reads only from the input, output or loras folders; names are relative, with no '..' or '~'.
"""
from __future__ import annotations

import json
import os

from .comfy_compat import io

from ..mace_ops.erasure_file import save_erasure
from .comfy_model import get_record
from .paths import resolve_pt_read, resolve_pt_write
from .unet_pt import DTYPES, load_unet_pt, save_unet_pt
from .validation import check_inputs


class MaceSaveUNetPt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MaceSaveUNetPt",
            display_name="MACE Save UNet .pt (diffusers keys)",
            category="MACE",
            description="Writes the whole UNet (erasure baked in) as torch.save(unet.state_dict()) with diffusers "
            "key names, and next to it <name>.safetensors, the MACE erasure file (K/V deltas) for LoRA loaders. "
            "Use it to hand an erased SD1.x/SD2.x UNet to the eval-learn/eval-unlearn harness (its load_path).",
            inputs=[
                io.Model.Input("model", tooltip="The erased model (any MACE K/V erasure)."),
                io.String.Input("path", default="mace_unet.pt",
                                tooltip="Relative to ComfyUI's output folder (.pt, .pth or .bin); <stem>.safetensors "
                                "is written next to it."),
                io.Combo.Input("dtype", options=list(DTYPES), default="fp32",
                               tooltip="Precision of the stored UNet: fp32 (exact, what the harness expects) or "
                               "smaller."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="The .pt file written.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, path, dtype) -> io.NodeOutput:
        check_inputs(cls, locals())
        target, side = resolve_pt_write(path)
        record = get_record(model)
        texts = []
        if record is not None and record.deltas:  # our erasure file next to it: <stem>.safetensors, first
            save_erasure(side, record.deltas, record.base_fingerprint, {"stages": list(record.stages)},
                         "fp16" if dtype == "fp16" else "fp32")
            texts.append(side)
        try:
            written = save_unet_pt(model, target, dtype)
        except BaseException:
            if texts:  # no companion without its .pt
                os.remove(side)
            raise
        return io.NodeOutput(written, ui={"text": [written] + texts})


class MaceLoadUNetPt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MaceLoadUNetPt",
            display_name="MACE Load UNet .pt as Erasure",
            category="MACE",
            description="Reads a diffusers-key UNet state dict (the harness's save_path file) with "
            "torch.load(weights_only=True), checks it against this base model and applies its cross-attention "
            "K/V as an erasure, refusing (naming them) when other weights differ. Use it to bring a UNet erased "
            "elsewhere (e.g. by the eval-unlearn harness) into ComfyUI and save it as a small erasure file.",
            inputs=[
                io.Model.Input("model", tooltip="The base model the UNet file was erased from."),
                io.String.Input("path", default="mace_unet.pt",
                                tooltip="Relative to ComfyUI's input, output or loras folder (.pt, .pth or .bin)."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with the file's K/V as an erasure."),
                     io.String.Output(display_name="info", tooltip="Which weights the file changed.")],
        )

    @classmethod
    def execute(cls, model, path) -> io.NodeOutput:
        check_inputs(cls, locals())
        out, info = load_unet_pt(model, resolve_pt_read(path), path.strip())
        return io.NodeOutput(out, json.dumps(info))
