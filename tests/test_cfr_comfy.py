"""Integration: the CFR workflow in real ComfyUI, its erasure file, and the stock LoRA loader.

Runs workflows/erase_style_cfr.json (UI format, converted like the frontend would queue it) on
a tiny random-weight SD1.5-layout checkpoint: load -> CFR -> save erasure + sample. Then loads
the saved file with the stock LoraLoaderModelOnly, samples again, and checks the patched K/V
weights equal the CFR result while the loader's own model stays untouched.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comfy_harness import REPO_ROOT, ui_workflow_to_api

pytestmark = pytest.mark.integration
WORKFLOW = REPO_ROOT / "workflows" / "erase_style_cfr.json"


def node_id(api: dict, class_type: str) -> str:
    ids = [k for k, v in api.items() if v["class_type"] == class_type]
    assert len(ids) == 1, f"expected one {class_type}, found {ids}"
    return ids[0]


@pytest.fixture(scope="module")
def cfr_run(comfy, tiny_ckpt):
    comfy.require_pack()
    api = ui_workflow_to_api(WORKFLOW)
    api[node_id(api, "CheckpointLoaderSimple")]["inputs"]["ckpt_name"] = Path(tiny_ckpt).name
    cfr = node_id(api, "MaceRefineCrossAttention")
    api[cfr]["inputs"]["preserve"] = "claude monet"  # keep the 12-layer CLIP workload small
    api[cfr]["inputs"]["builtin_preserve"] = False
    save = node_id(api, "MaceSaveErasure")
    api[save]["inputs"]["dtype"] = "fp32"
    api[save]["inputs"]["filename_prefix"] = "loras/mace_test_erasure"
    api[node_id(api, "KSampler")]["inputs"].update(steps=2)
    api[node_id(api, "EmptyLatentImage")]["inputs"].update(width=64, height=64)
    history, messages = comfy.run_workflow(api)
    return api, history, messages, comfy.last_executor


def test_workflow_runs_and_reports_progress(cfr_run, comfy):
    api, history, messages, _ = cfr_run
    assert history["status"] == "success"
    cfr = node_id(api, "MaceRefineCrossAttention")
    progress = [d for e, d in messages if e == "progress" and d.get("node") == cfr]
    assert progress and progress[-1]["value"] == progress[-1]["max"]
    images = history["outputs"][node_id(api, "SaveImage")]["images"]
    assert images and (comfy.output_dir / images[0]["subfolder"] / images[0]["filename"]).is_file()


def test_erasure_file_matches_cfr_and_loads_with_stock_loader(cfr_run, comfy, tiny_ckpt):
    import comfy.model_management as mm

    from_module = comfy.pack_module
    api, history, _, executor = cfr_run
    path = Path(history["outputs"][node_id(api, "MaceSaveErasure")]["text"][0])
    assert path.is_file() and path.parent == comfy.output_dir / "loras"
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]

    base_model = comfy.node_output(node_id(api, "CheckpointLoaderSimple"), 0, executor)
    clip = comfy.node_output(node_id(api, "CheckpointLoaderSimple"), 1, executor)
    erased = comfy.node_output(node_id(api, "MaceRefineCrossAttention"), 0, executor)

    # recompute CFR directly through mace_ops with the pack's adapters: same deltas
    cm = from_module.nodes.comfy_model
    cfr_node = from_module.nodes.cfr_node
    enc = from_module.nodes.comfy_text_encoder.ComfyTextEncoder(clip)
    ops = from_module.mace_ops
    inputs = api[node_id(api, "MaceRefineCrossAttention")]["inputs"]
    templates = ops.templates.templates_for(inputs["concept_type"])
    base = cm.effective_kv_weights(base_model)
    assert len(base) == 8  # the tiny UNet has 4 attn2 layers
    res = ops.cfr.refine_cross_attention(
        enc, base, ops.concepts.parse_concepts(inputs["concepts"]), templates, inputs["anchor"],
        cfr_node.preserve_prompts(inputs["preserve"], templates, False),
        ops.cfr.CFRConfig(inputs["lambda_"], inputs["preserve_scale"], inputs.get("erase_concept_tokens", True),
                          inputs.get("relative_lambda", False)),
        prior=from_module.nodes.prior_input.prior_for(enc, inputs.get("prior_weight", 1.0)))
    record = cm.get_record(erased)
    for k, d in res.deltas.items():
        assert torch.equal(record.deltas[k], d)
        assert float(d.norm()) > 1e-4 * float(base[k].norm())

    saved = load_file(str(path))
    assert sorted(saved) == sorted(k[: -len(".weight")] + ".diff" for k in res.deltas)

    # stock loader: load the file by name from the loras folder, sample, read the patched weights
    comfy.add_model_dir("loras", path.parent)
    nodes = comfy.nodes
    (lora_model,) = nodes.LoraLoaderModelOnly().load_lora_model_only(base_model, path.name, 1.0)
    mm.load_models_gpu([lora_model], force_patch_weights=True)
    patched = {k: v.detach().float().cpu().clone() for k, v in lora_model.model.state_dict().items() if k in base}
    mm.unload_all_models()
    for k, w in res.weights.items():
        assert torch.equal(patched[k], w), k

    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": Path(tiny_ckpt).name}},
        "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": path.name,
                                                               "strength_model": 1.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a painting by van gogh", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 1, "steps": 2, "cfg": 7.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }
    history2, _ = comfy.run_workflow(prompt)
    assert history2["status"] == "success"
    image = comfy.node_output("6", 0)
    assert torch.isfinite(image).all()

    # the shared model the loader produced was never modified
    ckpt = load_file(str(tiny_ckpt))
    for k in base:
        file_w = ckpt["model." + k]
        live = base_model.model.state_dict()[k]
        assert torch.equal(live.to(file_w.dtype).cpu(), file_w), k


def test_load_erasure_node_checks_base(cfr_run, comfy):
    api, history, _, executor = cfr_run
    path = Path(history["outputs"][node_id(api, "MaceSaveErasure")]["text"][0])
    comfy.add_model_dir("loras", path.parent)
    pack = comfy.pack_module
    base_model = comfy.node_output(node_id(api, "CheckpointLoaderSimple"), 0, executor)
    node = pack.nodes.erasure_io_nodes.MaceLoadErasure
    out = node.execute(base_model, path.name, 1.0, False)
    loaded = out.result[0]
    cm = pack.nodes.comfy_model
    erased = comfy.node_output(node_id(api, "MaceRefineCrossAttention"), 0, executor)
    for k, d in cm.get_record(erased).deltas.items():
        assert torch.equal(cm.get_record(loaded).deltas[k], d)
    other = base_model.clone()
    key = sorted(cm.get_record(erased).deltas)[0]
    other.add_patches({key: ("diff", (torch.full_like(cm.get_record(erased).deltas[key], 0.05),))})
    with pytest.raises(ValueError, match="different base model"):
        node.execute(other, path.name, 1.0, False)
    node.execute(other, path.name, 1.0, True)  # explicitly allowed
    assert os.path.isfile(path)
