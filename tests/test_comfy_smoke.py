"""Smoke tests of the in-process ComfyUI harness (marker: integration).

They need a ComfyUI checkout ($COMFYUI_PATH or ~/ComfyUI) and are skipped without one.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

import comfy_harness as ch

# Every test here uses the `comfy` fixture, so conftest marks it `integration` (and skips it,
# folded into one summary line per file, when no ComfyUI checkout is found).

REPO = Path(__file__).resolve().parents[1]


def test_harness_is_isolated(comfy):
    fp = comfy.folder_paths
    base = str(comfy.base_dir)
    for d in (fp.get_output_directory(), fp.get_temp_directory(), fp.get_input_directory(),
              fp.get_user_directory()):
        assert d.startswith(base), d
    assert fp.get_folder_paths("custom_nodes") == [str(comfy.custom_nodes_dir)]
    assert all(p.startswith(base) for p in fp.get_folder_paths("loras"))
    import comfy.model_management as mm

    assert mm.get_torch_device().type == "cpu"


def test_comfy_api_v0_0_2_imports(comfy):
    from comfy_api.v0_0_2 import ComfyExtension, io  # noqa: F401

    assert hasattr(io, "ComfyNode") and hasattr(io, "Schema")


def test_pack_loads(comfy):
    if not (REPO / "__init__.py").is_file():
        pytest.skip("repo __init__.py (the pack entry point) does not exist yet")
    comfy.require_pack()
    assert comfy.pack_node_ids, "the pack registered no nodes"


def test_stock_t2i_on_tiny_checkpoint(comfy, tiny_ckpt):
    import torch

    prompt = ch.stock_t2i_prompt(tiny_ckpt.name, width=64, height=64, steps=2, cfg=7.0,
                                 sampler="euler", save=True, prefix="smoke")
    history, messages = comfy.run_workflow(prompt)
    assert history["status"] == "success"
    events = [e for e, _ in messages]
    assert "execution_success" in events
    assert any(e == "progress" and d.get("node") == "5" for e, d in messages), \
        "KSampler progress was not reported through the progress hook"

    image = comfy.node_output("6")
    assert tuple(image.shape) == (1, 64, 64, 3)
    assert torch.isfinite(image).all()

    saved = history["outputs"]["7"]["images"][0]
    path = comfy.output_dir / saved["subfolder"] / saved["filename"]
    assert path.is_file() and str(path).startswith(str(comfy.base_dir))


def test_validation_errors_are_reported(comfy, tiny_ckpt):
    prompt = ch.stock_t2i_prompt("no_such_model.safetensors")
    with pytest.raises(AssertionError, match="value_not_in_list"):
        comfy.run_workflow(prompt)


# ---------------------------------------------------------------- UI-format workflow converter

def _ui_stock_graph(ckpt_name: str) -> dict:
    """The stock t2i graph as the frontend saves it (hand-written, litegraph format)."""
    def node(nid, typ, inputs, outputs, widgets, mode=0):
        return {"id": nid, "type": typ, "mode": mode, "inputs": inputs, "outputs": outputs,
                "widgets_values": widgets, "pos": [0, 0], "size": [200, 100], "flags": {},
                "order": nid, "properties": {"Node name for S&R": typ}}

    def sock(name, typ, link):
        return {"name": name, "type": typ, "link": link}

    def out(name, typ, links):
        return {"name": name, "type": typ, "links": links}

    nodes = [
        node(1, "CheckpointLoaderSimple", [],
             [out("MODEL", "MODEL", [1]), out("CLIP", "CLIP", [2, 3]), out("VAE", "VAE", [8])],
             [ckpt_name]),
        node(2, "CLIPTextEncode", [sock("clip", "CLIP", 2)],
             [out("CONDITIONING", "CONDITIONING", [4])], ["a photo of a cat"]),
        node(3, "CLIPTextEncode", [sock("clip", "CLIP", 3)],
             [out("CONDITIONING", "CONDITIONING", [5])], [""]),
        node(4, "EmptyLatentImage", [], [out("LATENT", "LATENT", [6])], [64, 64, 1]),
        node(5, "KSampler",
             [sock("model", "MODEL", 1), sock("positive", "CONDITIONING", 4),
              sock("negative", "CONDITIONING", 5), sock("latent_image", "LATENT", 6)],
             [out("LATENT", "LATENT", [7])],
             [0, "randomize", 2, 7.0, "euler", "normal", 1.0]),
        node(6, "VAEDecode", [sock("samples", "LATENT", 7), sock("vae", "VAE", 8)],
             [out("IMAGE", "IMAGE", [9])], []),
        node(7, "PreviewImage", [sock("images", "IMAGE", 9)], [], []),
        {"id": 8, "type": "Note", "mode": 0, "inputs": [], "outputs": [],
         "widgets_values": ["frontend-only note"]},
    ]
    links = [[1, 1, 0, 5, 0, "MODEL"], [2, 1, 1, 2, 0, "CLIP"], [3, 1, 1, 3, 0, "CLIP"],
             [4, 2, 0, 5, 1, "CONDITIONING"], [5, 3, 0, 5, 2, "CONDITIONING"],
             [6, 4, 0, 5, 3, "LATENT"], [7, 5, 0, 6, 0, "LATENT"], [8, 1, 2, 6, 1, "VAE"],
             [9, 6, 0, 7, 0, "IMAGE"]]
    return {"last_node_id": 8, "last_link_id": 9, "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def test_ui_workflow_to_api_matches_stock_prompt(comfy):
    ui = _ui_stock_graph("x.safetensors")
    assert ch.check_ui_workflow(ui) == []
    api = ch.ui_workflow_to_api(json.loads(json.dumps(ui)))
    want = ch.stock_t2i_prompt("x.safetensors")
    assert api == want


def test_ui_workflow_object_info_form(comfy):
    """The converter also accepts /object_info-style JSON instead of node classes."""
    import server

    classes = comfy.node_classes()
    info = {}
    for name in ("CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler",
                 "VAEDecode", "PreviewImage"):
        cls = classes[name]
        it = cls.INPUT_TYPES()
        info[name] = {"input": {k: it.get(k, {}) for k in ("required", "optional")},
                      "input_order": {k: list(it.get(k, {})) for k in ("required", "optional")},
                      "output": list(cls.RETURN_TYPES)}
    assert server  # imported by the harness
    api = ch.ui_workflow_to_api(_ui_stock_graph("x.safetensors"), info)
    assert api == ch.stock_t2i_prompt("x.safetensors")


def test_check_ui_workflow_reports_problems(comfy):
    ui = _ui_stock_graph("x.safetensors")
    bad = copy.deepcopy(ui)
    bad["nodes"][1]["type"] = "NoSuchNode"                  # unknown type
    bad["links"][5][5] = "IMAGE"                            # LATENT link declared as IMAGE
    bad["nodes"][4]["widgets_values"] = [0, 2, 7.0, "euler", "normal", 1.0]  # lost control value
    problems = ch.check_ui_workflow(bad)
    text = "\n".join(problems)
    assert "unknown node type 'NoSuchNode'" in text
    assert "link 6" in text and "IMAGE" in text
    assert "6 widgets_values, expected 7" in text


def test_bypassed_and_rerouted_nodes(comfy):
    ui = _ui_stock_graph("x.safetensors")
    # Put a Reroute between VAEDecode and PreviewImage.
    ui["nodes"].append({"id": 9, "type": "Reroute", "mode": 0,
                        "inputs": [{"name": "", "type": "*", "link": 9}],
                        "outputs": [{"name": "", "type": "IMAGE", "links": [10]}]})
    ui["links"][8] = [9, 6, 0, 9, 0, "IMAGE"]
    ui["links"].append([10, 9, 0, 7, 0, "IMAGE"])
    ui["nodes"][6]["inputs"][0]["link"] = 10
    api = ch.ui_workflow_to_api(ui)
    assert api["7"]["inputs"]["images"] == ["6", 0]
    assert "9" not in api


WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
WORKFLOW_IDS = [f"{p.parent.name}/{p.name}" for p in WORKFLOWS]


@pytest.mark.parametrize("path", WORKFLOWS, ids=WORKFLOW_IDS)
def test_shipped_workflows_are_consistent(comfy, path):
    problems = ch.check_ui_workflow(path)
    assert problems == [], "\n".join(problems)
    api = ch.ui_workflow_to_api(path)
    assert api, "workflow converted to an empty prompt"


@pytest.mark.slow
@pytest.mark.parametrize("path", WORKFLOWS, ids=WORKFLOW_IDS)
def test_shipped_workflows_execute(comfy, request, path):
    """Each shipped workflow runs headlessly on the tiny checkpoint of its family (64 px, 2 steps):
    SDXL workflows on ``tiny_sdxl_ckpt``, SD2.x ones on ``tiny_sd2_ckpt``, the rest on ``tiny_ckpt``.
    Slow (minutes on 2 CPU cores: MACE nodes encode many prompts with the 12-layer CLIP)."""
    api = ch.ui_workflow_to_api(path)
    names = {v["inputs"].get("ckpt_name") for v in api.values() if v["class_type"] == "CheckpointLoaderSimple"}
    family = ch.checkpoint_family(*names)
    ckpt = request.getfixturevalue({"sdxl": "tiny_sdxl_ckpt", "sd2": "tiny_sd2_ckpt"}.get(family, "tiny_ckpt"))
    api = ch.retarget_for_test(api, ckpt.name)
    history, _ = comfy.run_workflow(api)
    assert history["status"] == "success"
    for files in history["outputs"].values():
        for img in files.get("images", []):
            assert (comfy.output_dir / img["subfolder"] / img["filename"]).is_file() or \
                img["type"] == "temp"
