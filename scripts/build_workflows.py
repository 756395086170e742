"""Write the pack's UI-format workflow JSONs into workflows/ (the one folder ComfyUI's template
browser lists for the pack; a second copy, e.g. example_workflows/, would list every template twice).

Each workflow is declared compactly below (nodes with their widget values, and links by socket
name); this script lays them out and emits the JSON the ComfyUI frontend saves and loads.
Socket lists mirror the nodes' declared schemas; tests/test_workflows.py checks every JSON
against the real node definitions, so a drift is caught.

    python scripts/build_workflows.py
"""
from __future__ import annotations

import json
import os
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# node type -> (input sockets [(name, type)], output sockets [(name, type)])
SOCKETS: dict[str, tuple[list, list]] = {
    "CheckpointLoaderSimple": ([], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "CLIPTextEncode": ([("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")]),
    "EmptyLatentImage": ([], [("LATENT", "LATENT")]),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")], [("LATENT", "LATENT")]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE")], []),
    "PreviewAny": ([("source", "*")], []),
    "LoraLoaderModelOnly": ([("model", "MODEL")], [("MODEL", "MODEL")]),
    "CheckpointSave": ([("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE")], []),
    "MaceRefineCrossAttention": ([("model", "MODEL"), ("clip", "CLIP")],
                                 [("model", "MODEL"), ("summary", "STRING")]),
    "MaceSaveErasure": ([("model", "MODEL"), ("clip", "CLIP")], [("path", "STRING")]),
    "MaceTextGate": ([("clip", "CLIP")], [("clip", "CLIP"), ("summary", "STRING")]),
    "MaceGatedErasure": ([("model", "MODEL"), ("clip", "CLIP")], [("model", "MODEL"), ("summary", "STRING")]),
    "MaceMassErase": ([("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE")],
                      [("model", "MODEL"), ("summary", "STRING")]),
    "MaceFuseLoras": ([("model", "MODEL"), ("clip", "CLIP")], [("model", "MODEL"), ("summary", "STRING")]),
    "MaceLoadErasure": ([("model", "MODEL"), ("clip", "CLIP")],
                        [("model", "MODEL"), ("info", "STRING"), ("clip", "CLIP")]),
    "PreviewImage": ([("images", "IMAGE")], []),
    "FluxGuidance": ([("conditioning", "CONDITIONING")], [("CONDITIONING", "CONDITIONING")]),
    "EmptySD3LatentImage": ([], [("LATENT", "LATENT")]),
    "MaceTrainingImages": ([("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE")],
                           [("images", "IMAGE"), ("prompts", "STRING")]),
    "MaceTrainConceptLora": ([("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE"), ("images", "IMAGE"),
                              ("masks", "MASK")],
                             [("model", "MODEL"), ("lora_path", "STRING"), ("summary", "STRING")]),
    "MaceErasureCheck": ([("base_model", "MODEL"), ("clip", "CLIP"), ("erased_model", "MODEL"), ("vae", "VAE"),
                          ("erased_clip", "CLIP"), ("clip_vision", "CLIP_VISION")],
                         [("table", "STRING"), ("worst_cases", "IMAGE"), ("json_path", "STRING")]),
}


def sampler_nodes(prefix: str, model: str, prompt: str, x: int, y: int, seed: int = 42, size: int = 512,
                  steps: int = 20, clip: tuple = ("ckpt", "CLIP")) -> dict:
    """Positive/negative prompts, an empty ``size`` latent, KSampler, decode and save."""
    return {
        f"{prefix}pos": ("CLIPTextEncode", [prompt], {"clip": clip}, (x, y)),
        f"{prefix}neg": ("CLIPTextEncode", ["blurry, low quality"], {"clip": clip}, (x, y + 220)),
        f"{prefix}latent": ("EmptyLatentImage", [size, size, 1], {}, (x, y + 440)),
        f"{prefix}sample": ("KSampler", [seed, "fixed", steps, 7.0, "euler", "normal", 1.0],
                            {"model": model, "positive": (f"{prefix}pos", "CONDITIONING"),
                             "negative": (f"{prefix}neg", "CONDITIONING"),
                             "latent_image": (f"{prefix}latent", "LATENT")}, (x + 420, y)),
        f"{prefix}decode": ("VAEDecode", [], {"samples": (f"{prefix}sample", "LATENT"), "vae": ("ckpt", "VAE")},
                            (x + 780, y)),
        f"{prefix}save": ("SaveImage", [f"mace/{prefix.rstrip('_') or 'image'}"],
                          {"images": (f"{prefix}decode", "IMAGE")}, (x + 1000, y)),
    }


def dit_sampler_nodes(prefix: str, model: tuple, prompt: str, x: int, y: int, *, flux: bool, steps: int,
                      cfg: float, scheduler: str, seed: int = 42, size: int = 1024) -> dict:
    """:func:`sampler_nodes` for FLUX.1 / SD3.5: a 16-channel SD3 latent; FLUX's guidance through
    FluxGuidance at cfg 1 (its negative prompt is then unused), SD3.5's through cfg."""
    nodes = sampler_nodes(prefix, model, prompt, x, y, seed=seed, size=size, steps=steps)
    nodes[f"{prefix}latent"] = ("EmptySD3LatentImage", [size, size, 1], {}, (x, y + 440))
    positive = (f"{prefix}pos", "CONDITIONING")
    if flux:
        nodes[f"{prefix}neg"] = ("CLIPTextEncode", [""], {"clip": ("ckpt", "CLIP")}, (x, y + 220))
        nodes[f"{prefix}guidance"] = ("FluxGuidance", [3.5], {"conditioning": positive}, (x + 210, y))
        positive = (f"{prefix}guidance", "CONDITIONING")
    typ, _widgets, links, at = nodes[f"{prefix}sample"]
    nodes[f"{prefix}sample"] = (typ, [seed, "fixed", steps, cfg, "euler", scheduler, 1.0],
                                {**links, "positive": positive}, at)
    return nodes


# The SD1.5 checkpoint ComfyUI's own templates use (and offer to download: the "models" property).
SD15 = "v1-5-pruned-emaonly-fp16.safetensors"
SD15_MODEL = {"name": SD15, "directory": "checkpoints",
              "url": "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
                     "v1-5-pruned-emaonly-fp16.safetensors?download=true"}

# SDXL base 1.0 and SD 2.1 768-v (v-prediction), as ComfyUI's own SDXL / SD2 examples name them.
SDXL = "sd_xl_base_1.0.safetensors"
SDXL_MODEL = {"name": SDXL, "directory": "checkpoints",
              "url": "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/"
                     "sd_xl_base_1.0.safetensors?download=true"}
SD21 = "v2-1_768-ema-pruned.safetensors"
SD21_MODEL = {"name": SD21, "directory": "checkpoints",
              "url": "https://huggingface.co/stabilityai/stable-diffusion-2-1/resolve/main/"
                     "v2-1_768-ema-pruned.safetensors?download=true"}
# FLUX.1-dev and SD3.5 Large as ComfyUI's own FLUX / SD3.5 examples name them: single files holding
# the diffusion model, its text encoders (CLIP-L + T5-XXL; CLIP-L + CLIP-G + T5-XXL) and VAE.
FLUX_DEV = "flux1-dev-fp8.safetensors"
FLUX_DEV_MODEL = {"name": FLUX_DEV, "directory": "checkpoints",
                  "url": "https://huggingface.co/Comfy-Org/flux1-dev/resolve/main/flux1-dev-fp8.safetensors?download=true"}
SD35 = "sd3.5_large_fp8_scaled.safetensors"
SD35_MODEL = {"name": SD35, "directory": "checkpoints",
              "url": "https://huggingface.co/Comfy-Org/stable-diffusion-3.5-fp8/resolve/main/"
                     "sd3.5_large_fp8_scaled.safetensors?download=true"}
MODELS = {SD15: SD15_MODEL, SDXL: SDXL_MODEL, SD21: SD21_MODEL, FLUX_DEV: FLUX_DEV_MODEL, SD35: SD35_MODEL}


def cfr_workflow(ckpt: str, cfr_widgets: list, save_prefix: str, prompt: str, sampler=None, **sampler_kw) -> dict:
    """The CFR-only workflow: checkpoint -> CFR -> MACE Save Erasure, the summary, one sample
    (``sampler``: the sampler-nodes builder, default :func:`sampler_nodes`)."""
    sampler = sampler or sampler_nodes
    return {
        "ckpt": ("CheckpointLoaderSimple", [ckpt], {}, (0, 0)),
        "cfr": ("MaceRefineCrossAttention", cfr_widgets, {"model": ("ckpt", "MODEL"), "clip": ("ckpt", "CLIP")},
                (380, 0)),
        "save_erasure": ("MaceSaveErasure", [save_prefix, "fp16"], {"model": ("cfr", "model")}, (820, -260)),
        "summary": ("PreviewAny", [], {"source": ("cfr", "summary")}, (820, -120)),
        **sampler("erased_", ("cfr", "model"), prompt, 820, 60, **sampler_kw),
    }


# Widget values in the order of the node's inputs (the frontend matches them by position): CFR's are
# concepts, concept_type, anchor, preserve, lambda, preserve_scale, builtin_preserve, erase_concept_tokens,
# erase_from, prior_weight, edit_pooled, preset. Under a preset other than "custom" the tuning values
# (lambda ... edit_pooled) are the preset's (nodes/presets.py); they are written out equal to it.
CFR_TAIL = ["", 1.0, False]  # erase_from, prior_weight, edit_pooled


def cfr_widgets(concepts: str, concept_type: str, anchor: str, preserve: str, preset: str = "recommended") -> list:
    tokens = preset != "paper"  # "paper": the concept tokens are left to the LoRA stage
    return [concepts, concept_type, anchor, preserve, 0.1, 1.0, True, tokens, *CFR_TAIL, preset, True]


VAN_GOGH_CFR = cfr_widgets("van gogh, vincent van gogh", "style", "art", "claude monet\npablo picasso\nrembrandt")
STARRY_NIGHT = "a painting of a starry night in the style of van gogh"

WORKFLOWS = {
    "erase_style_cfr": cfr_workflow(SD15, VAN_GOGH_CFR, "loras/mace_van_gogh", STARRY_NIGHT),
    # MACE stages 1 + 2 for one concept: images of the concept from the original model, CFR, then the
    # concept's LoRA trained on the CFR model (the LoRA file is saved by the training node; the
    # combined CFR + LoRA edit is saved by MACE Save Erasure), then a sample from the erased model.
    "erase_style_lora": {
        "ckpt": ("CheckpointLoaderSimple", [SD15], {}, (0, 0)),
        "images": ("MaceTrainingImages",
                   ["van gogh, vincent van gogh", "style", 8, 30, 7.5, 0, "fixed", 512, 512, "dpmpp_2m", "karras",
                    "blurry, low quality"],
                   {"model": ("ckpt", "MODEL"), "clip": ("ckpt", "CLIP"), "vae": ("ckpt", "VAE")}, (380, 0)),
        "images_preview": ("PreviewImage", [], {"images": ("images", "images")}, (780, -360)),
        "cfr": ("MaceRefineCrossAttention",
                cfr_widgets("van gogh, vincent van gogh", "style", "art", "claude monet\npablo picasso\nrembrandt",
                            preset="paper"),
                {"model": ("ckpt", "MODEL"), "clip": ("ckpt", "CLIP")}, (380, 420)),
        "lora": ("MaceTrainConceptLora",
                 ["van gogh, vincent van gogh", "style", "auto", 50, 1e-4, 1, 2024, "fixed", "cfis", True,
                  "loras/mace_lora/{concept}", "attention"],
                 {"model": ("cfr", "model"), "clip": ("ckpt", "CLIP"), "vae": ("ckpt", "VAE"),
                  "images": ("images", "images")}, (780, 0)),
        "summary": ("PreviewAny", [], {"source": ("lora", "summary")}, (1180, -260)),
        "save_erasure": ("MaceSaveErasure", ["loras/mace_van_gogh_cfr_lora", "fp16"], {"model": ("lora", "model")},
                         (1180, -120)),
        **sampler_nodes("erased_", ("lora", "model"), STARRY_NIGHT,
                        1180, 60),
    },
    # MACE stages 1-3 for a list of people: CFR, one LoRA per person (images from the model itself,
    # kept in output/loras/mace_mass/<run_name>/ so a re-queued run resumes), closed-form fusion.
    "mass_erase_celebrities": {
        "ckpt": ("CheckpointLoaderSimple", [SD15], {}, (0, 0)),
        "mass": ("MaceMassErase",
                 ["tom cruise\ntaylor swift\nbarack obama\nemma watson\nbrad pitt\noprah winfrey\nlionel messi\nlady gaga\nelon musk\nscarlett johansson", "", "person", "a person",
                  "keanu reeves\nnatalie portman\nmorgan freeman", True, "celebrities_10", 0.1, 1.0, 0, 0.0, 8, 512,
                  20, 2024, "fixed", 0.001, "", "attention", 0.0, True, 1.0, "off", 8, "", "auto", 0.99,
                  "recommended", True],
                 {"model": ("ckpt", "MODEL"), "clip": ("ckpt", "CLIP"), "vae": ("ckpt", "VAE")}, (380, 0)),
        "summary": ("PreviewAny", [], {"source": ("mass", "summary")}, (820, -260)),
        "save_erasure": ("MaceSaveErasure", ["loras/mace_celebrities_10", "fp16"], {"model": ("mass", "model")},
                         (820, -120)),
        **sampler_nodes("erased_", ("mass", "model"), "a portrait photo of tom cruise", 820, 60),
    },
    # Nudity with synonyms on one line (all erased together), mapped onto a clothed person; CFR only.
    "erase_nudity_cfr": cfr_workflow(
        SD15, cfr_widgets("nudity, naked, nude, topless, erotic", "person", "a person wearing clothes",
                          "a person\na woman\na man"),
        "loras/mace_nudity", "a photo of a naked woman on the beach"),
    # SDXL (and its fine-tunes: Pony, Illustrious, NoobAI -- load yours instead): erase an art style
    # from both text encoders' features (CLIP-L + OpenCLIP-bigG, 2048 wide) with CFR; 1024 px sample.
    "erase_style_cfr_sdxl": cfr_workflow(SDXL, VAN_GOGH_CFR, "loras/mace_van_gogh_sdxl", STARRY_NIGHT,
                                         size=1024, steps=25),
    # ACE-style gated erasure: the style's directions are nulled out only where the prompt carries it (an
    # attn2 patch, no weight change); a second sample from a preserved painter shows the gate closed.
    # adversarial_rounds 0 here (seconds); 2 runs the adversarial refit (attacks through the model).
    "erase_gated_ace": {
        "ckpt": ("CheckpointLoaderSimple", [SD15], {}, (0, 0)),
        "ace": ("MaceGatedErasure",
                ["van gogh, vincent van gogh", "style", "art", "claude monet\npablo picasso\nrembrandt", True,
                 8, 0.999, 0.0, 0.005, 0, 40, 8, 512, 20, 0, "fixed", 0.05, "ramp", "recommended"],
                {"model": ("ckpt", "MODEL"), "clip": ("ckpt", "CLIP")}, (380, 0)),
        "save_erasure": ("MaceSaveErasure", ["loras/mace_van_gogh_ace", "fp16"], {"model": ("ace", "model")},
                         (820, -260)),
        "summary": ("PreviewAny", [], {"source": ("ace", "summary")}, (820, -120)),
        **sampler_nodes("erased_", ("ace", "model"), STARRY_NIGHT,
                        820, 60),
        **sampler_nodes("kept_", ("ace", "model"), "a painting of water lilies in the style of claude monet",
                        820, 760),
    },
    # The ACE gate compiled into the CLIP's MLP (a CLIP weight edit, no patch on the model): the
    # gated CLIP encodes both prompts; the saved file is a plain LoRA the stock LoraLoader applies.
    "erase_text_gate": {
        "ckpt": ("CheckpointLoaderSimple", [SD15], {}, (0, 0)),
        "gate": ("MaceTextGate",
                 ["van gogh, vincent van gogh", "style", "art", "claude monet\npablo picasso\nrembrandt", True,
                  0.999, 0.05, 0.01],
                 {"clip": ("ckpt", "CLIP")}, (380, 0)),
        "save_erasure": ("MaceSaveErasure", ["loras/mace_van_gogh_text_gate", "fp16"], {"clip": ("gate", "clip")},
                         (820, -260)),
        "summary": ("PreviewAny", [], {"source": ("gate", "summary")}, (820, -120)),
        **sampler_nodes("erased_", ("ckpt", "MODEL"), STARRY_NIGHT, 820, 60, clip=("gate", "clip")),
        **sampler_nodes("kept_", ("ckpt", "MODEL"), "a painting of water lilies in the style of claude monet",
                        820, 760, clip=("gate", "clip")),
    },
    # FLUX.1 (dev; schnell the same): CFR on txt_in, the one projection T5's features enter through
    # (4096 -> 3072): the same closed form, fitted on T5's features; 1024 px sample at guidance 3.5.
    "erase_style_cfr_flux": cfr_workflow(FLUX_DEV, VAN_GOGH_CFR, "loras/mace_van_gogh_flux", STARRY_NIGHT,
                                         sampler=dit_sampler_nodes, flux=True, steps=20, cfg=1.0,
                                         scheduler="simple"),
    # SD3.5 (Large; Medium the same): CFR on context_embedder, which reads CLIP-L|G's and T5's tokens.
    "erase_style_cfr_sd35": cfr_workflow(SD35, VAN_GOGH_CFR, "loras/mace_van_gogh_sd35", STARRY_NIGHT,
                                         sampler=dit_sampler_nodes, flux=False, steps=28, cfg=4.5,
                                         scheduler="sgm_uniform"),
    # SD 2.x (2.1 768-v is a v-prediction model; ComfyUI detects it): erase an object class with CFR.
    "erase_object_cfr_sd2": cfr_workflow(
        SD21, cfr_widgets("airplane, aeroplane, airliner, jet plane", "object", "sky", "ship\nbird\ncar"),
        "loras/mace_airplane_sd2", "a photo of an airplane above the clouds", size=768, steps=25),
    # Did it work? CFR on Van Gogh, then MACE Erasure Check: both models sample erased, held-out and kept
    # prompts; the base model judges every image (Acc_e / Acc_g / Acc_s / H before and after, worst cases).
    "check_erasure": {
        "ckpt": ("CheckpointLoaderSimple", [SD15], {}, (0, 0)),
        "cfr": ("MaceRefineCrossAttention", VAN_GOGH_CFR, {"model": ("ckpt", "MODEL"), "clip": ("ckpt", "CLIP")},
                (380, 0)),
        "check": ("MaceErasureCheck",
                  ["van gogh, vincent van gogh", "gogh, the painter of the starry night -> van gogh",
                   "claude monet\npablo picasso\nrembrandt", "style", "art", 12, 0, "fixed", 20, 7.0, 512, 512,
                   "dpmpp_2m", "karras", 8, "paul cezanne\npaul gauguin", "recommended"],
                  {"base_model": ("ckpt", "MODEL"), "clip": ("ckpt", "CLIP"), "erased_model": ("cfr", "model"),
                   "vae": ("ckpt", "VAE")}, (820, 0)),
        "table": ("PreviewAny", [], {"source": ("check", "table")}, (1300, 0)),
        "worst": ("PreviewImage", [], {"images": ("check", "worst_cases")}, (1300, 200)),
    },
}


# Layout: nodes keep their declared (x, y) only as an ordering -- columns by x, top to bottom by
# y -- and get sizes estimated from their sockets and widgets, so that no two nodes overlap in
# the frontend (a test checks the rectangles; tests/test_browser.py measures the real ones).
MULTILINE = {"CLIPTextEncode": 1, "MaceRefineCrossAttention": 2, "MaceGatedErasure": 2, "MaceTextGate": 2, "MaceMassErase": 2, "MaceFuseLoras": 2,
             "MaceErasureCheck": 4,
             "MaceTrainingImages": 0, "MaceTrainConceptLora": 0, "PreviewAny": 1}
TITLE_H, SLOT_H, WIDGET_H, MULTILINE_H = 30, 22, 26, 110
COL_GAP, ROW_GAP = 60, 50


def node_size(typ: str, n_widgets: int) -> list[int]:
    ins, outs = SOCKETS[typ]
    multi = MULTILINE.get(typ, 0)
    h = 16 + max(len(ins), len(outs)) * SLOT_H + (n_widgets - multi) * WIDGET_H + multi * MULTILINE_H
    if typ in ("SaveImage", "PreviewImage"):
        h = max(h, 300)  # image preview area
    w = 420 if multi > 1 or typ.startswith("Mace") else 340
    return [w, h]


def layout(spec: dict) -> dict[str, tuple[list[int], list[int]]]:
    """key -> (pos, size) with non-overlapping columns (each as wide as its widest node)."""
    sizes = {k: node_size(typ, len(widgets)) for k, (typ, widgets, _ins, _pos) in spec.items()}
    xs = sorted({pos[0] for (_t, _w, _i, pos) in spec.values()})
    col_x, x = {}, 0
    for cx in xs:
        col_x[cx] = x
        x += max(sizes[k][0] for k, v in spec.items() if v[3][0] == cx) + COL_GAP
    out = {}
    for cx in xs:
        y = 0
        for k in sorted((k for k, v in spec.items() if v[3][0] == cx), key=lambda k: spec[k][3][1]):
            out[k] = ([col_x[cx], y + TITLE_H], sizes[k])
            y += TITLE_H + sizes[k][1] + ROW_GAP
    return out


def build(spec: dict) -> dict:
    placed = layout(spec)
    ids = {key: i + 1 for i, key in enumerate(spec)}
    nodes, links = [], []
    outputs_links: dict[tuple[str, str], list[int]] = {}
    for key, (typ, widgets, ins, pos) in spec.items():
        for sock_name, (src, src_out) in ins.items():
            link_id = len(links) + 1
            src_type = spec[src][0]
            out_names = [o[0] for o in SOCKETS[src_type][1]]
            slot = out_names.index(src_out)
            in_names = [i[0] for i in SOCKETS[typ][0]]
            typ_name = SOCKETS[src_type][1][slot][1]
            links.append([link_id, ids[src], slot, ids[key], in_names.index(sock_name), typ_name])
            outputs_links.setdefault((src, src_out), []).append(link_id)
    link_into = {(l[3], l[4]): l[0] for l in links}
    for order, (key, (typ, widgets, ins, pos)) in enumerate(spec.items()):
        in_socks, out_socks = SOCKETS[typ]
        nodes.append({
            "id": ids[key], "type": typ, "pos": placed[key][0], "size": placed[key][1], "flags": {},
            "order": order,
            "mode": 0,
            "inputs": [{"name": n, "type": t, "link": link_into.get((ids[key], i))} for i, (n, t) in enumerate(in_socks)],
            "outputs": [{"name": n, "type": t, "links": outputs_links.get((key, n), []), "slot_index": i}
                        for i, (n, t) in enumerate(out_socks)],
            "properties": {"Node name for S&R": typ,
                           **({"models": [MODELS[widgets[0]]]} if typ == "CheckpointLoaderSimple" else {})},
            "widgets_values": widgets,
        })
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, "comfyui-mace/" + json.dumps(spec, sort_keys=True, default=str))),
        "revision": 0, "last_node_id": len(nodes), "last_link_id": len(links),
        "nodes": nodes, "links": links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
        "version": 0.4,
    }


def main() -> None:
    os.makedirs(os.path.join(ROOT, "workflows"), exist_ok=True)
    for name, spec in WORKFLOWS.items():
        path = os.path.join(ROOT, "workflows", f"{name}.json")
        with open(path, "w") as f:
            json.dump(build(spec), f, indent=1)
            f.write("\n")
        print("wrote", path)


if __name__ == "__main__":
    main()
