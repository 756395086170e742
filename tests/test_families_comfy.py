"""Integration: SD2.x and SDXL layouts in real ComfyUI -- detection, and every MACE node through
the executor.

The tiny checkpoints (``tiny_sd2_ckpt``, ``tiny_sdxl_ckpt``; ``comfy_harness.make_tiny_checkpoint``)
are random-weight files in each family's checkpoint layout.  ComfyUI's own detection
(``model_detection.model_config_from_unet`` over ``supported_models.models``) must map them to:

* SD2.x: ``supported_models.SD20`` (context_dim 1024, linear proj_in, no adm), ``model_base.BaseModel``
  with ``ModelType.V_PREDICTION`` (SD20.model_type's norm1.bias test on output_blocks.11), the
  ``SD2ClipModel`` (OpenCLIP-H, ``clip_h``) text encoder;
* SDXL: ``supported_models.KOALA_700M`` -- an ``SDXL`` subclass, first in ComfyUI's list whose
  ``unet_config`` matches (input transformer depth [0, 2, 5], context 2048, adm 2816) -- whose
  model is ``model_base.SDXL`` and whose text encoder is ``SDXLClipModel`` (``clip_l`` + ``clip_g``,
  features 768 + 1280 = 2048, pooled 1280).  SDXL proper needs depth [0, 0, 2, 2, 10, 10]
  (the full 2.6 B UNet), too big for CI; KOALA shares SDXL's model class, conditioning, CLIP and
  latent format, which is what the pack reads.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import comfy_harness as ch

pytestmark = pytest.mark.integration

EXPECTED = {  # family -> (supported_models class, model_base class, model type, clip class, width)
    "sd2": ("SD20", "BaseModel", "V_PREDICTION", "SD2ClipModel", 1024),
    "sdxl": ("KOALA_700M", "SDXL", "EPS", "SDXLClipModel", 2048),
}


def node_inputs(comfy, class_type: str, **overrides) -> dict:
    """The node's declared defaults (required + optional widgets), updated with ``overrides``; a
    ``preset`` input is ``custom`` (unless overridden), so the values given here are the ones that run."""
    spec = comfy.nodes.NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()
    out = {}
    for group in ("required", "optional"):
        for name, decl in spec.get(group, {}).items():
            opts = decl[1] if len(decl) > 1 and isinstance(decl[1], dict) else {}
            if "default" in opts:
                out[name] = opts["default"]
            elif isinstance(decl[0], list) and decl[0]:
                out[name] = decl[0][0]
    if "preset" in out:
        out["preset"] = "custom"
    out.update(overrides)
    return out


@pytest.mark.parametrize("family_ckpt", ["sd2", "sdxl"], indirect=True)
def test_comfy_detects_the_intended_family(comfy, family_ckpt, request):
    import comfy.model_base as model_base
    import comfy.model_detection as model_detection
    import comfy.supported_models as sm

    family = request.node.callspec.params["family_ckpt"]
    config_name, base_name, model_type, clip_name, width = EXPECTED[family]
    sd = load_file(str(family_ckpt))
    config = model_detection.model_config_from_unet(sd, "model.diffusion_model.")
    assert type(config).__name__ == config_name
    if family == "sdxl":
        assert isinstance(config, sm.SDXL) and not type(config) is sm.SDXL
        assert config.unet_config["adm_in_channels"] == 2816
    else:
        assert isinstance(config, sm.SD20)

    # the stock loader node, through the executor
    prompt = ch.stock_t2i_prompt(family_ckpt.name, steps=1, width=64, height=64)
    history, _ = comfy.run_workflow(prompt)
    assert history["status"] == "success"
    model, clip, _vae = (comfy.node_output("1", i) for i in range(3))
    assert type(model.model).__name__ == base_name
    assert isinstance(model.model, getattr(model_base, base_name))
    assert model.model.model_type.name == model_type
    assert type(clip.cond_stage_model).__name__ == clip_name
    if family == "sdxl":
        assert {"clip_l", "clip_g"} <= {n for n, _ in clip.cond_stage_model.named_children()}
        assert model.model.adm_channels == 2816
    cond = comfy.node_output("2", 0)
    assert cond[0][0].shape[-1] == width and torch.isfinite(cond[0][0]).all()
    image = comfy.node_output("6", 0)
    assert torch.isfinite(image).all()

    # every text-encoder weight the loader built came from the file (no uninitialised layers)
    clip_sd = type(config)(dict(config.unet_config)).process_clip_state_dict(dict(sd))
    live = clip.cond_stage_model.state_dict()
    missing = sorted(set(live) - set(clip_sd))
    assert not [k for k in missing if "layers" in k or "embeddings" in k], missing[:5]
    for k in clip_sd:
        if k in live and live[k].is_floating_point():
            assert torch.equal(live[k].float().cpu(), clip_sd[k].float()), k


# --------------------------------------------------------------------------------------------
# Every node through ComfyUI's executor
# --------------------------------------------------------------------------------------------

CONCEPT = "van gogh"
PRESERVE = "claude monet"
SMALL = dict(width=64, height=64)


WORKFLOW_FOR = {"sd2": "erase_object_cfr_sd2.json", "sdxl": "erase_style_cfr_sdxl.json"}
"""The family's shipped workflow (workflows/, built by scripts/build_workflows.py)."""


def by_type(api: dict, class_type: str) -> str:
    ids = [k for k, v in api.items() if v["class_type"] == class_type]
    assert len(ids) == 1, f"expected one {class_type}, found {ids}"
    return ids[0]


def edit_prompt(comfy, ckpt_name: str, family: str) -> dict:
    """The family's shipped workflow (CheckpointLoaderSimple -> CFR -> Save Erasure + a sample
    from the erased model), retargeted to the tiny checkpoint (64 px, 2 steps) with one preserve
    phrase, plus Before/After Grid and Concept Probe on original vs CFR.  Node ids: the loader
    is "1", CFR "2", Save Erasure "3", the grid "4" and the probe "6"."""
    api = ch.retarget_for_test(ch.ui_workflow_to_api(ch.REPO_ROOT / "workflows" / WORKFLOW_FOR[family]), ckpt_name)
    rename = {by_type(api, "CheckpointLoaderSimple"): "1", by_type(api, "MaceRefineCrossAttention"): "2",
              by_type(api, "MaceSaveErasure"): "3"}
    api = ch.renumber(api, rename)
    api["2"]["inputs"].update(preserve=PRESERVE, builtin_preserve=False)  # keep the CPU workload small
    api["3"]["inputs"].update(dtype="fp32", filename_prefix=f"loras/mace_{family}_cfr")
    concept = api["2"]["inputs"]["concepts"].split(",")[0].strip()
    ni = lambda ct, **kw: {"class_type": ct, "inputs": node_inputs(comfy, ct, **kw)}  # noqa: E731
    model, clip, vae = ["1", 0], ["1", 1], ["1", 2]
    api.update({
        "4": ni("MaceBeforeAfterGrid", original=model, erased=["2", 0], clip=clip, vae=vae,
                target_prompts=f"a picture of {concept}", synonym_prompts="",
                preserved_prompts=f"a picture of {PRESERVE}", steps=1, **SMALL),
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
        "6": ni("MaceConceptProbe", original=model, erased=["2", 0], clip=clip, concept=concept,
                prompts=f"a picture of {concept}", timesteps="500"),
        "7": {"class_type": "PreviewAny", "inputs": {"source": ["6", 0]}},
    })
    return api


def training_prompts(comfy, ckpt_name: str, family: str) -> tuple[dict, dict]:
    """Two prompts run one after the other on one executor: the family workflow's loader and CFR
    ("1", "2": on the executor :func:`edit_run` used, their cached outputs are reused), Training
    Images (original) -> Train Concept LoRA (on the CFR model); then Fuse (the LoRA folder the
    first wrote) -> Save, and Mass Erase on the original."""
    ni = lambda ct, **kw: {"class_type": ct, "inputs": node_inputs(comfy, ct, **kw)}  # noqa: E731
    model, clip, vae = ["1", 0], ["1", 1], ["1", 2]
    edit = edit_prompt(comfy, ckpt_name, family)
    head = {k: edit[k] for k in ("1", "2")}
    concept, kind = edit["2"]["inputs"]["concepts"].split(",")[0].strip(), edit["2"]["inputs"]["concept_type"]
    first = head | {
        "10": ni("MaceTrainingImages", model=model, clip=clip, vae=vae, concept=concept, concept_type=kind,
                 count=1, steps=1, **SMALL),
        "11": ni("MaceTrainConceptLora", model=["2", 0], clip=clip, vae=vae, images=["10", 0], concept=concept,
                 concept_type=kind, mask_mode="whole image", steps=2, rank=1, sampler="uniform",
                 filename_prefix=f"loras/mace_{family}/{{concept}}"),
    }
    second = head | {
        "12": ni("MaceFuseLoras", model=["2", 0], clip=clip, lora_files=f"mace_{family}/", concept_type=kind,
                 preserve=PRESERVE, builtin_preserve=False),
        "13": ni("MaceSaveErasure", model=["12", 0], filename_prefix=f"loras/mace_{family}_fused", dtype="fp32"),
        "14": ni("MaceMassErase", model=model, clip=clip, vae=vae, concepts=concept, concept_type=kind,
                 preserve=PRESERVE, builtin_preserve=False, run_name=f"fam_{family}", lora_steps=2,
                 images_per_concept=1, image_size=64, sampling_steps=1),
    }
    return first, second


def _loras_folder(comfy) -> Path:
    folder = comfy.output_dir / "loras"
    folder.mkdir(parents=True, exist_ok=True)
    comfy.add_model_dir("loras", folder)
    return folder


_EXECUTORS: dict = {}  # family -> the executor edit_run used (its cache holds the loader and CFR outputs)


@pytest.fixture(scope="module", params=["sd2", "sdxl"])
def edit_run(request, comfy):
    comfy.require_pack()
    family = request.param
    ckpt = request.getfixturevalue(f"tiny_{family}_ckpt")
    _loras_folder(comfy)
    api = edit_prompt(comfy, ckpt.name, family)
    history, messages = comfy.run_workflow(api)
    _EXECUTORS[family] = comfy.last_executor
    return family, ckpt, api, history, comfy.last_executor


def test_family_workflow_cfr_grid_probe_save_and_stock_loader(edit_run, comfy):
    """The shipped workflow runs (its sample is saved); CFR edits every attn2 K/V weight with one solve per input width; the erasure file's keys
    are applied by the stock LoraLoaderModelOnly (the weights change, to CFR's); Load Erasure
    reproduces the record and checks the base fingerprint."""
    import comfy.model_management as mm

    family, ckpt, api, history, ex = edit_run
    assert history["status"] == "success"
    images = history["outputs"][by_type(api, "SaveImage")]["images"]
    assert images and (comfy.output_dir / images[0]["subfolder"] / images[0]["filename"]).is_file()
    pack = comfy.pack_module
    cm = pack.nodes.comfy_model
    base_model = comfy.node_output("1", 0, ex)
    erased = comfy.node_output("2", 0, ex)
    kv = cm.effective_kv_weights(base_model)
    width = EXPECTED[family][4]
    assert len(kv) == len([k for k in base_model.model.state_dict() if re.search(r"\.attn2\.to_[kv]\.weight$", k)])
    assert all(w.shape[1] == width for w in kv.values())
    record = cm.get_record(erased)
    assert set(record.deltas) == set(kv)
    assert all(float(d.norm()) > 1e-4 * float(kv[k].norm()) for k, d in record.deltas.items())
    (cfr_stage,) = record.stages
    assert cfr_stage["method"] == "cfr"

    grid = comfy.node_output("4", 0, ex)
    assert grid.ndim == 4 and grid.shape[-1] == 3 and torch.isfinite(grid).all()
    ratio = comfy.node_output("6", 1, ex)
    # random weights attend almost uniformly, so the direction of the change means nothing here;
    # the probe must see the edit (ratio 1 for an unchanged model: test_preview_nodes_comfy)
    assert math.isfinite(ratio) and ratio > 0 and abs(ratio - 1.0) > 1e-6, ratio

    path = Path(history["outputs"]["3"]["text"][0])
    saved = load_file(str(path))
    assert {k[: -len(".diff")] + ".weight" for k in saved if k.endswith(".diff")} == set(kv)
    (lora_model,) = comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(base_model, path.name, 1.0)
    mm.load_models_gpu([lora_model], force_patch_weights=True)
    patched = {k: v.detach().float().cpu().clone() for k, v in lora_model.model.state_dict().items() if k in kv}
    mm.unload_all_models()
    for k, w in kv.items():
        assert not torch.equal(patched[k], w), k
        assert torch.allclose(patched[k], w + record.deltas[k], atol=1e-5, rtol=1e-5), k

    load = pack.nodes.erasure_io_nodes.MaceLoadErasure
    loaded = load.execute(base_model, path.name, 1.0, False).result[0]
    for k, d in record.deltas.items():
        assert torch.equal(cm.get_record(loaded).deltas[k], d)
    other = base_model.clone()
    key = sorted(kv)[0]
    other.add_patches({key: ("diff", (torch.full_like(kv[key], 0.05),))})
    with pytest.raises(ValueError, match="different base model"):
        load.execute(other, path.name, 1.0, False)


def _run_training(comfy, family: str, ckpt: Path):
    comfy.require_pack()
    folder = _loras_folder(comfy)
    first, second = training_prompts(comfy, ckpt.name, family)
    comfy.run_workflow(first, executor=_EXECUTORS.get(family))
    ex = comfy.last_executor
    lora_model = comfy.node_output("11", 0, ex)
    lora_path = Path(comfy.node_output("11", 1, ex))
    history, _ = comfy.run_workflow(second, executor=ex)
    assert history["status"] == "success"
    cm = comfy.pack_module.nodes.comfy_model
    kv = cm.effective_kv_weights(comfy.node_output("1", 0, ex))
    assert lora_path.is_file() and lora_path.parent == folder / f"mace_{family}"
    for nid, model in (("11", lora_model), ("12", comfy.node_output("12", 0, ex)),
                       ("14", comfy.node_output("14", 0, ex))):
        rec = cm.get_record(model)
        assert set(rec.deltas) == set(kv), nid
        assert all(torch.isfinite(d).all() for d in rec.deltas.values()), nid
        assert any(float(d.abs().max()) > 0 for d in rec.deltas.values()), nid
    assert [s["method"] for s in cm.get_record(lora_model).stages] == ["cfr", "lora"]
    fused = Path(history["outputs"]["13"]["text"][0])
    assert set(load_file(str(fused))) == {k[: -len(".weight")] + ".diff" for k in kv}


def test_training_nodes_on_sd2_v_prediction(comfy, tiny_sd2_ckpt):
    """Training Images, Train Concept LoRA, Fuse and Mass Erase through the executor on the
    v-prediction SD2 layout; the trainer's denoiser noises and predicts with ComfyUI's own
    v-prediction model_sampling (what KSampler uses for this model)."""
    import comfy.model_sampling as model_sampling

    _run_training(comfy, "sd2", tiny_sd2_ckpt)
    model = comfy.node_output("1", 0)
    clip = comfy.node_output("1", 1)
    den = comfy.pack_module.nodes.comfy_denoiser.ComfyDenoiser(model)
    try:
        assert isinstance(den.model_sampling, model_sampling.V_PREDICTION)
        assert den.model_sampling is model.get_model_object("model_sampling")
        gen = torch.Generator().manual_seed(0)
        x0, noise = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
        t = torch.tensor([600])
        sigma = den.sigma(t)
        x_t = den.add_noise(x0, noise, t)
        assert torch.equal(x_t, den.model_sampling.noise_scaling(sigma, noise, x0))
        ctx = comfy.pack_module.nodes.comfy_text_encoder.ComfyTextEncoder(clip).encode([CONCEPT])[0].features[None]
        with torch.inference_mode():
            out = den.forward_with_attention(x_t, t, ctx, lambda probe: None)
            ref = model.model.apply_model(x_t, sigma, c_crossattn=ctx)  # calculate_denoised of a v model
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    finally:
        den.release()


def test_training_nodes_on_sdxl(comfy, tiny_sdxl_ckpt):
    """The same on the SDXL layout (~50 s on 2 quiet CPU cores -- every CFR/fusion solve is
    2048 wide and the prompts go through CLIP-L and CLIP-G)."""
    _run_training(comfy, "sdxl", tiny_sdxl_ckpt)


# --------------------------------------------------------------------------------------------
# Clip skip: the features CFR and fusion read are the ones sampling reads
# --------------------------------------------------------------------------------------------

CLIP_SKIP_PROMPT = "a painting by van gogh"


@pytest.mark.parametrize("family_ckpt", ["sd15", "sd2", "sdxl"], indirect=True)
def test_clip_skip_features_follow_clip_set_last_layer(comfy, family_ckpt):
    """CheckpointLoaderSimple -> CLIPSetLastLayer(-1 / -2 / -3) -> CLIPTextEncode, through the
    executor: the pack's text encoder on that CLIP gives exactly CLIPTextEncode's conditioning
    for every setting (so CFR and fusion solve for the features sampling uses), and the
    settings give different features."""
    comfy.require_pack()
    enc_cls = comfy.pack_module.nodes.comfy_text_encoder.ComfyTextEncoder
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": family_ckpt.name}}}
    for i, layer in enumerate((-1, -2, -3)):
        prompt[f"s{i}"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["1", 1], "stop_at_clip_layer": layer}}
        prompt[f"e{i}"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": [f"s{i}", 0], "text": CLIP_SKIP_PROMPT}}
        prompt[f"p{i}"] = {"class_type": "PreviewAny", "inputs": {"source": [f"e{i}", 0]}}
    comfy.run_workflow(prompt)
    ex = comfy.last_executor
    feats = []
    prints = set()
    for i in range(3):
        cond = comfy.node_output(f"e{i}", 0, ex)[0][0][0].float()
        encoder = enc_cls(comfy.node_output(f"s{i}", 0, ex))
        ours = encoder.encode([CLIP_SKIP_PROMPT, PRESERVE])  # batched, as CFR encodes
        assert torch.equal(ours[0].features, cond), f"layer {-1 - i}"
        feats.append(ours[0].features)
        # the cached caption prior is keyed per CLIP *and* clip skip
        prints.add(comfy.pack_module.mace_ops.prior.encoder_fingerprint(encoder, [PRESERVE]))
    assert not torch.allclose(feats[0], feats[1]) and not torch.allclose(feats[1], feats[2])
    assert len(prints) == 3


# --------------------------------------------------------------------------------------------
# Unsupported families: every node refuses at once
# --------------------------------------------------------------------------------------------

TINY_FLUX_CONFIG = dict(image_model="flux", in_channels=16, patch_size=2, out_channels=16, vec_in_dim=768,
                        context_in_dim=4096, hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=1,
                        depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000, qkv_bias=True,
                        guidance_embed=False)


@pytest.fixture(scope="module")
def tiny_flux(comfy):
    """A real ComfyUI Flux MODEL (supported_models.Flux -> model_base.Flux, 0.56 M parameters):
    joint/single-stream attention, no attn2."""
    import comfy.model_patcher as model_patcher
    import comfy.supported_models as sm

    model = sm.Flux(dict(TINY_FLUX_CONFIG)).get_model({}, device="cpu")
    cpu = torch.device("cpu")
    return model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


CLIP_ONLY = ("MaceTextGate",)


def _pack_nodes(comfy):
    return list(comfy.pack_module.nodes.NODES)


def test_every_node_refuses_a_flux_model_naming_the_families(comfy, tiny_flux):
    comfy.require_pack()
    supported = comfy.pack_module.nodes.comfy_model.SUPPORTED_FAMILIES
    assert "SD1.x" in supported and "SD2.x" in supported and "SDXL" in supported
    io = comfy.pack_module.nodes.comfy_compat.io
    checked, text_entry = [], []
    for cls in _pack_nodes(comfy):
        inputs = cls.define_schema().inputs
        models = [i.id for i in inputs if isinstance(i, io.Model.Input)]
        if cls.__name__ in CLIP_ONLY:  # edits the CLIP only: its refusals in test_text_gate_comfy
            assert not models, cls.__name__
            continue
        if getattr(cls, "EDITS_TEXT_ENTRY", False):  # CFR, Save/Load Erasure take FLUX: test_text_entry_comfy
            text_entry.append(cls.__name__)
            continue
        assert models, f"{cls.__name__} takes no MODEL"
        kwargs = {i.id: (tiny_flux if i.id in models else getattr(i, "default", None)) for i in inputs}
        with pytest.raises(ValueError) as err:
            cls.execute(**kwargs)
        msg = str(err.value)
        assert msg.startswith(f"{models[0]}: this is a Flux model") and supported in msg, (cls.__name__, msg)
        checked.append(cls.__name__)
    assert sorted(text_entry) == ["MaceLoadErasure", "MaceRefineCrossAttention", "MaceSaveErasure"]
    assert len(checked) + len(CLIP_ONLY) + len(text_entry) == len(_pack_nodes(comfy)), checked  # every node


# --------------------------------------------------------------------------------------------
# SDXL's pooled text path
# --------------------------------------------------------------------------------------------

def test_sdxl_pooled_path_edit_is_saved_and_applied_by_the_stock_loader(comfy, tiny_sdxl_ckpt, tiny_sd2_ckpt):
    """The pooled embedding changes the UNet output for the concept prompt (through y ->
    label_emb, with the context held fixed); the pooled edit maps the concept's pooled input of
    label_emb.0.0 onto the anchor's, leaves the size columns alone, rides in the erasure file,
    and the stock LoraLoaderModelOnly applies it; SD2 has nothing to edit."""
    import comfy.model_management as mm

    comfy.require_pack()
    pack = comfy.pack_module
    cm, cfr_node = pack.nodes.comfy_model, pack.nodes.cfr_node
    tpl = pack.mace_ops.templates
    with torch.inference_mode():
        model, clip, _vae = ch.load_tiny_checkpoint(tiny_sdxl_ckpt)
        enc = pack.nodes.comfy_text_encoder.ComfyTextEncoder(clip)
        concept, anchor = f"a painting by {CONCEPT}", "a painting by "
        (c_ctx, c_pool), (a_ctx, a_pool) = (clip.encode_from_tokens(clip.tokenize(p), return_pooled=True)
                                            for p in (concept, anchor))
        assert torch.equal(enc.encode_pooled([concept])[0], c_pool[0].float())
        ys = [model.model.encode_adm(pooled_output=p, width=64, height=64) for p in (c_pool, a_pool)]
        mm.load_models_gpu([model], force_full_load=True)
        sampling = model.get_model_object("model_sampling")
        sigma = sampling.sigmas[500].reshape(1)
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        out_c, out_a = (model.model.apply_model(x, sigma, c_crossattn=a_ctx, y=y) for y in ys)
        assert float((out_c - out_a).norm()) > 1e-3 * float(out_a.norm())  # the pooled path carries the prompt

        templates = tpl.templates_for("style")[:4]
        parsed = pack.mace_ops.concepts.parse_concepts(CONCEPT, "concepts")
        keep = [tpl.fill(t, PRESERVE) for t in templates]
        config = pack.mace_ops.cfr.CFRConfig(1.0, 1.0)
        edit, weight, why = cfr_node.pooled_edit(model, enc, parsed, templates, "", keep, config, ())
        assert why == "" and edit.key == cm.POOLED_KEY and weight.shape == (1280, 2816)
        d = cm.pooled_text_width(model)
        assert d == 1280 and float(edit.delta[:, d:].abs().max()) == 0 and float(edit.delta[:, :d].abs().max()) > 0
        w_new = weight + edit.delta
        pc = enc.encode_pooled([tpl.fill(t, CONCEPT) for t in templates])
        pa = enc.encode_pooled([tpl.fill(t, "") for t in templates])
        pq = enc.encode_pooled(keep)
        before = (weight[:, :d] @ (pc - pa).T).norm()
        after = (w_new[:, :d] @ pc.T - weight[:, :d] @ pa.T).norm()
        assert after < 0.1 * before, (float(after), float(before))
        kept = (w_new[:, :d] @ pq.T - weight[:, :d] @ pq.T).norm() / (weight[:, :d] @ pq.T).norm()
        assert kept < 0.05, float(kept)

        # in the record and the file; the stock loader applies it
        base = cm.effective_kv_weights(model)
        erased = cm.apply_erasure(model, {edit.key: edit.delta}, {**base, edit.key: weight}, {"method": "test"})
        folder = _loras_folder(comfy)
        path = Path(pack.nodes.erasure_io_nodes.MaceSaveErasure.execute(
            erased, "loras/mace_pooled_test", "fp32").result[0])
        assert path.parent == folder and "diffusion_model.label_emb.0.0.diff" in load_file(str(path))
        (lora_model,) = comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(model, path.name, 1.0)
        mm.load_models_gpu([lora_model], force_patch_weights=True)
        patched = lora_model.model.state_dict()[edit.key].float().cpu().clone()
        mm.unload_all_models()
        assert torch.allclose(patched, w_new, atol=1e-5) and not torch.equal(patched, weight)
        loaded = pack.nodes.erasure_io_nodes.MaceLoadErasure.execute(model, path.name, 1.0, False).result[0]
        assert torch.equal(cm.get_record(loaded).deltas[edit.key], edit.delta)

        sd2, sd2_clip, _ = ch.load_tiny_checkpoint(tiny_sd2_ckpt)
        sd2_enc = pack.nodes.comfy_text_encoder.ComfyTextEncoder(sd2_clip)
        assert cfr_node.pooled_edit(sd2, sd2_enc, parsed, templates, "", keep, config, ())[2] == \
            "this model reads no pooled text"
