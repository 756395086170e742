"""Integration: FLUX.1 (dev, schnell) and SD3.5 in real ComfyUI -- detection, CFR on the text-entry
projection (``txt_in``, ``context_embedder``) and the pooled entry, Save/Load Erasure, the stock
LoraLoaderModelOnly, the base fingerprint, and what every other node says.

The checkpoints are ``dit_fixtures``' tiny random-weight files. CFR solves in the projection's input
space: SD3's is 4096 wide whatever the checkpoint (ComfyUI pads the CLIP features to T5's 4096), where
the 30 templates of a concept cost about a minute of float64 sums on two CPU cores; the executor
tests therefore give the CFR node the first 3 templates (``few_templates``) -- the node, the encoders
and the files are otherwise untouched.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import comfy_harness as ch
import dit_fixtures as df
from test_families_comfy import by_type, node_inputs

pytestmark = pytest.mark.integration

CONCEPT, PRESERVE = "van gogh", "claude monet"
FAMILIES = {  # fixture name -> (config class, model_base class, model type, clip class, entry key, pooled key)
    "flux_dev": ("Flux", "Flux", "FLUX", "FluxClipModel_", "txt_in.weight", "vector_in.in_layer.weight"),
    "flux_schnell": ("FluxSchnell", "Flux", "FLOW", "FluxClipModel_", "txt_in.weight", "vector_in.in_layer.weight"),
    "sd35": ("SD3", "SD3", "FLOW", "SD3ClipModel_", "context_embedder.weight", "y_embedder.mlp.0.weight"),
}
WORKFLOW_FOR = {"flux_dev": "erase_style_cfr_flux.json", "sd35": "erase_style_cfr_sd35.json"}


@pytest.fixture(scope="module")
def dit_ckpts(comfy, tmp_path_factory):
    df.install_tiny_dit_hook()
    d = tmp_path_factory.mktemp("tiny_dit")
    paths = {"flux_dev": df.make_tiny_flux_checkpoint(d / "mace_tiny_flux_dev.safetensors"),
             "flux_schnell": df.make_tiny_flux_checkpoint(d / "mace_tiny_flux_schnell.safetensors", schnell=True),
             "sd35": df.make_tiny_sd35_checkpoint(d / "mace_tiny_sd35.safetensors")}
    comfy.add_model_dir("checkpoints", d)
    return paths


@pytest.fixture
def few_templates(comfy, monkeypatch):
    node = comfy.pack_module.nodes.cfr_node
    real = node.templates_for
    monkeypatch.setattr(node, "templates_for", lambda kind: real(kind)[:3])
    return real


def _loras_folder(comfy) -> Path:
    folder = comfy.output_dir / "loras"
    folder.mkdir(parents=True, exist_ok=True)
    comfy.add_model_dir("loras", folder)
    return folder


@pytest.mark.parametrize("family", list(FAMILIES))
def test_comfy_detects_and_loads_the_family(comfy, dit_ckpts, family):
    """ComfyUI's detection and loader give the family's config, model class, model type and text
    encoder; the pack finds its text entry (sampling runs in the workflow tests)."""
    import comfy.model_detection as md

    config_name, base_name, model_type, clip_name, key, pooled = FAMILIES[family]
    path = dit_ckpts[family]
    sd = load_file(str(path))
    assert type(md.model_config_from_unet(sd, "model.diffusion_model.")).__name__ == config_name
    model, clip, _vae = ch.load_tiny_checkpoint(path)
    assert type(model.model.model_config).__name__ == config_name
    assert type(model.model).__name__ == base_name and model.model.model_type.name == model_type
    assert type(clip.cond_stage_model).__name__ == clip_name
    entry = comfy.pack_module.nodes.comfy_text_entry.text_entry(model)
    assert entry.keys == ("diffusion_model." + key,) and entry.pooled_key == "diffusion_model." + pooled


def _edit_prompt(comfy, ckpt_name: str, family: str) -> dict:
    """The family's shipped workflow on the tiny checkpoint; loader "1", CFR "2", Save Erasure "3"."""
    api = ch.retarget_for_test(ch.ui_workflow_to_api(ch.REPO_ROOT / "workflows" / WORKFLOW_FOR[family]), ckpt_name)
    api = ch.renumber(api, {by_type(api, "CheckpointLoaderSimple"): "1", by_type(api, "MaceRefineCrossAttention"): "2",
                            by_type(api, "MaceSaveErasure"): "3"})
    api["2"]["inputs"].update(preserve=PRESERVE, builtin_preserve=False, prior_weight=0.0)
    api["3"]["inputs"].update(dtype="fp32", filename_prefix=f"loras/mace_{family}_cfr")
    return api


def _patched(model, keys) -> dict:
    """The weights ComfyUI computes with once ``model``'s patches are applied (as sampling does)."""
    import comfy.model_management as mm

    mm.load_models_gpu([model], force_patch_weights=True)
    out = {k: v.detach().float().cpu().clone() for k, v in model.model.state_dict().items() if k in keys}
    mm.unload_all_models()
    return out


@pytest.mark.parametrize("family", [
    "flux_dev", pytest.param("sd35", marks=pytest.mark.slow)])  # SD3: ~40 s of 4096-wide float64 solve
def test_cfr_workflow_save_stock_loader_and_fingerprint(comfy, dit_ckpts, few_templates, family):
    """The shipped workflow runs on the tiny checkpoint; CFR edits exactly the text-entry projection
    and moves the concept prompt's projected conditioning toward the anchor's; the stock
    LoraLoaderModelOnly reproduces the edited projection's output to 1e-4; Load Erasure reproduces the
    record; another base model is refused by the fingerprint."""
    pack = comfy.pack_module
    cm, tpl = pack.nodes.comfy_model, pack.mace_ops.templates
    _loras_folder(comfy)
    api = _edit_prompt(comfy, dit_ckpts[family].name, family)
    history, _ = comfy.run_workflow(api)
    assert history["status"] == "success"
    ex = comfy.last_executor
    base_model, clip, erased = comfy.node_output("1", 0, ex), comfy.node_output("1", 1, ex), comfy.node_output("2", 0, ex)
    entry = pack.nodes.comfy_text_entry.text_entry(base_model)
    (key,) = entry.keys
    record = cm.get_record(erased)
    assert set(record.deltas) == {key} and record.stages[0]["text_entry"] == [key[len("diffusion_model."):]]
    base = cm.effective_weights(base_model, [key])[key]
    bias = base_model.model.state_dict()[key[:-len("weight")] + "bias"].float()
    w_new = base + record.deltas[key]

    # the concept's projected conditioning moves toward the anchor's on the prompts CFR paired
    enc = entry.text_encoder(clip)
    anchor = api["2"]["inputs"]["anchor"]
    align = pack.mace_ops.alignment.align_encoded
    before = after = 0.0
    for t in tpl.templates_for("style")[:3]:
        o, n = enc.encode([tpl.fill(t, CONCEPT), tpl.fill(t, anchor)])
        a = align(o, n, True)
        c, e = o.features[list(a.old)], n.features[list(a.new)]
        before += float((c @ base.T - e @ base.T).norm() ** 2)
        after += float((c @ w_new.T - e @ base.T).norm() ** 2)
    assert after < 0.5 * before, (after, before)

    # the file and the stock loader: the projection's output on the concept's conditioning, to 1e-4
    path = Path(history["outputs"]["3"]["text"][0])
    assert set(load_file(str(path))) == {key[: -len(".weight")] + ".diff"}
    (lora_model,) = comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(base_model, path.name, 1.0)
    stock = _patched(lora_model, {key})[key]
    c = enc.encode([f"a painting by {CONCEPT}"])[0].features
    ours, theirs = c @ w_new.T + bias, c @ stock.T + bias
    assert float((ours - theirs).abs().max()) <= 1e-4 * float(ours.abs().max())
    assert not torch.equal(stock, base)

    load = pack.nodes.erasure_io_nodes.MaceLoadErasure
    loaded = load.execute(base_model, path.name, 1.0, False).result[0]
    assert torch.equal(cm.get_record(loaded).deltas[key], record.deltas[key])
    other = base_model.clone()
    other.add_patches({key: ("diff", (torch.full_like(base, 0.05),))})
    with pytest.raises(ValueError, match="different base model"):
        load.execute(other, path.name, 1.0, False)


def test_sd35_conditioning_segments_file_and_stock_loader(comfy, dit_ckpts):
    """SD3's text encoder for CFR gives exactly ComfyUI's conditioning, as two windows (CLIP's 77 positions
    by CLIP ids, then T5's by T5 ids); a context_embedder edit goes through Save Erasure, the stock
    LoraLoaderModelOnly and Load Erasure with its fingerprint (the CFR solve itself: the slow workflow test)."""
    pack = comfy.pack_module
    cm = pack.nodes.comfy_model
    model, clip, _vae = ch.load_tiny_checkpoint(dit_ckpts["sd35"])
    entry = pack.nodes.comfy_text_entry.text_entry(model)
    enc = entry.text_encoder(clip)
    prompts = [f"a painting by {CONCEPT}", PRESERVE]
    for p, got in zip(prompts, enc.encode(prompts)):  # batched, as CFR encodes
        cond = clip.encode_from_tokens(clip.tokenize(p))[0].float()
        assert torch.equal(got.features, cond), p
        (w1, n1), (w2, n2) = got.segments
        assert w1 == 77 and got.ids[n1 - 1] == enc.end_id and got.ids[w1 + n2 - 1] == 1  # CLIP end, T5 end
        assert got.features.shape == (w1 + w2, 4096)
    (key,) = entry.keys
    base = cm.effective_weights(model, [key])
    delta = 0.01 * torch.randn(base[key].shape, generator=torch.Generator().manual_seed(0))
    erased = cm.apply_erasure(model, {key: delta}, base, {"method": "test"})
    _loras_folder(comfy)
    path = Path(pack.nodes.erasure_io_nodes.MaceSaveErasure.execute(erased, "loras/mace_sd35", "fp32").result[0])
    assert set(load_file(str(path))) == {"diffusion_model.context_embedder.diff"}
    (lora_model,) = comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(model, path.name, 1.0)
    assert torch.allclose(_patched(lora_model, {key})[key], base[key] + delta, atol=1e-5, rtol=1e-5)
    load = pack.nodes.erasure_io_nodes.MaceLoadErasure
    assert torch.equal(cm.get_record(load.execute(model, path.name, 1.0, False).result[0]).deltas[key], delta)
    other = model.clone()
    other.add_patches({key: ("diff", (torch.full_like(base[key], 0.05),))})
    with pytest.raises(ValueError, match="different base model"):
        load.execute(other, path.name, 1.0, False)


def test_schnell_pooled_entry_is_edited_saved_and_applied(comfy, dit_ckpts, few_templates):
    """edit_pooled on FLUX.1-schnell: vector_in.in_layer (CLIP-L's pooled embedding, all columns) is
    edited next to txt_in; both ride in the file and the stock loader applies both."""
    pack = comfy.pack_module
    cm = pack.nodes.comfy_model
    model, clip, _vae = ch.load_tiny_checkpoint(dit_ckpts["flux_schnell"])
    cfr = pack.nodes.cfr_node.MaceRefineCrossAttention
    inputs = node_inputs(comfy, "MaceRefineCrossAttention", model=model, clip=clip, concepts=CONCEPT,
                         concept_type="style", preserve=PRESERVE, builtin_preserve=False,
                         edit_pooled=True)  # the default caption prior: T5 encodes '' as its end token alone
    erased, summary = cfr.execute(**inputs).result
    keys = {"diffusion_model.txt_in.weight", "diffusion_model.vector_in.in_layer.weight"}
    record = cm.get_record(erased)
    assert set(record.deltas) == keys and "pooled text: edited vector_in.in_layer.weight" in summary
    _loras_folder(comfy)
    path = Path(pack.nodes.erasure_io_nodes.MaceSaveErasure.execute(erased, "loras/mace_schnell", "fp32").result[0])
    (lora_model,) = comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(model, path.name, 1.0)
    base = cm.effective_weights(model, sorted(keys))
    stock = _patched(lora_model, keys)
    for k in keys:
        assert torch.allclose(stock[k], base[k] + record.deltas[k], atol=1e-5, rtol=1e-5), k


def test_other_nodes_refuse_flux_and_sd3_naming_what_to_use(comfy, dit_ckpts):
    """Every node that needs cross-attention refuses FLUX.1 and SD3.5 before any work, naming the family
    and the nodes to use instead; the Text Gate refuses their text encoders; CFR refuses a family it
    does not cover (Chroma), naming it and the covered ones."""
    import comfy.model_patcher as model_patcher
    import comfy.supported_models as sm

    pack = comfy.pack_module
    io = pack.nodes.comfy_compat.io
    for family, name in (("flux_dev", "Flux"), ("sd35", "SD3")):
        model, clip, _vae = ch.load_tiny_checkpoint(dit_ckpts[family])
        refused = []
        for cls in pack.nodes.NODES:
            inputs = cls.define_schema().inputs
            models = [i.id for i in inputs if isinstance(i, io.Model.Input)]
            if getattr(cls, "EDITS_TEXT_ENTRY", False) or not models:
                continue
            kwargs = {i.id: (model if i.id in models else getattr(i, "default", None)) for i in inputs}
            with pytest.raises(ValueError) as err:
                cls.execute(**kwargs)
            msg = str(err.value)
            assert msg.startswith(f"{models[0]}: this is a {name} model") and \
                "use MACE Refine Cross-Attention (CFR), MACE Save Erasure and MACE Load Erasure" in msg, msg
            refused.append(cls.__name__)
        assert {"MaceGatedErasure", "MaceMassErase", "MaceTrainConceptLora", "MaceFuseLoras"} <= set(refused)
        gate = pack.nodes.text_gate_node.MaceTextGate
        kwargs = {i.id: getattr(i, "default", None) for i in gate.define_schema().inputs}
        with pytest.raises(ValueError, match=r"clip: this is (FLUX\.1|SD3)'s text encoder.*MACE Refine"):
            gate.execute(**{**kwargs, "clip": clip, "concepts": CONCEPT})

    chroma_cfg = dict(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=64, hidden_size=64,
                      mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000,
                      patch_size=2, qkv_bias=True, in_dim=64, out_dim=64, hidden_dim=64, n_layers=1)
    cpu = torch.device("cpu")
    chroma = model_patcher.ModelPatcher(sm.Chroma(chroma_cfg).get_model({}, device="cpu"), load_device=cpu,
                                        offload_device=cpu)
    cfr = pack.nodes.cfr_node.MaceRefineCrossAttention
    kwargs = {i.id: getattr(i, "default", None) for i in cfr.define_schema().inputs}
    with pytest.raises(ValueError, match=r"model: this is a Chroma model.*FLUX\.1 \(dev, schnell\) and SD3/SD3\.5"):
        cfr.execute(**{**kwargs, "model": chroma, "concepts": CONCEPT})
