"""Integration: the MACE Gated Erasure (ACE) node in real ComfyUI, its file, and the stock LoRA loader.

On the tiny random-weight SD1.5-layout checkpoint: the gate changes what the model samples for the
concept prompt and leaves a prompt without the concept as it was (the gate stays closed there);
MACE Save Erasure writes the gate, MACE Load Erasure restores the same output; the stock
LoraLoaderModelOnly applies only the file's .diff fallback (no attn2 patch).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import comfy_harness as ch

pytestmark = pytest.mark.integration
WORKFLOW = ch.REPO_ROOT / "workflows" / "erase_gated_ace.json"

# One of the style templates: on this random-weight CLIP a free-form prompt ("a painting by van gogh")
# peaks at cosine 0.965 to the prototypes, inside the captions' own range (median 0.92, max 0.97), so
# the prompt-level threshold (0.972) rightly keeps the gate closed there; a template prompt peaks at 1.
CONCEPT_PROMPT = "an artwork by van gogh"
OTHER_PROMPT = "a photo of a red apple on a wooden table"


def sampler(model, positive, seed=1):
    return {"class_type": "KSampler", "inputs": {"model": model, "positive": positive, "negative": ["3", 0],
                                                 "latent_image": ["4", 0], "seed": seed, "steps": 2, "cfg": 7.0,
                                                 "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}


def preview(samples):
    return {"class_type": "PreviewImage", "inputs": {"images": samples}}


def base_prompt(ckpt: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": CONCEPT_PROMPT, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": OTHER_PROMPT, "clip": ["1", 1]}},
    }


def decoded(samples_node):
    return {"class_type": "VAEDecode", "inputs": {"samples": [samples_node, 0], "vae": ["1", 2]}}


@pytest.fixture(scope="module")
def ace_run(comfy, tiny_ckpt_2layer):
    comfy.require_pack()
    api = base_prompt(Path(tiny_ckpt_2layer).name)
    api["10"] = {"class_type": "MaceGatedErasure", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "concepts": "van gogh", "concept_type": "style", "anchor": "",
        "preserve": "claude monet", "builtin_preserve": False, "rank": 8, "quantile": 0.999}}
    api["11"] = {"class_type": "MaceSaveErasure",
                 "inputs": {"model": ["10", 0], "filename_prefix": "loras/mace_test_ace", "dtype": "fp32"}}
    for i, (model, pos) in enumerate([(["1", 0], ["2", 0]), (["10", 0], ["2", 0]), (["1", 0], ["5", 0]),
                                      (["10", 0], ["5", 0])]):
        api[f"2{i}"] = sampler(model, pos)
        api[f"3{i}"] = decoded(f"2{i}")
        api[f"4{i}"] = preview([f"3{i}", 0])
    history, messages = comfy.run_workflow(api)
    ex = comfy.last_executor
    latents = {k: comfy.node_output(f"2{i}", 0, ex)["samples"].clone()
               for i, k in enumerate(["base_concept", "ace_concept", "base_other", "ace_other"])}
    path = Path(history["outputs"]["11"]["text"][0])
    comfy.add_model_dir("loras", path.parent)
    return api, history, messages, ex, latents, path


def test_gate_changes_the_concept_prompt_only(ace_run, comfy):
    api, history, messages, ex, lat, _ = ace_run
    assert history["status"] == "success"
    progress = [d for e, d in messages if e == "progress" and d.get("node") == "10"]
    assert progress and progress[-1]["value"] == progress[-1]["max"]
    summary = comfy.node_output("10", 1, ex)
    assert "ACE gate for 1 concept" in summary
    changed = float((lat["ace_concept"] - lat["base_concept"]).abs().max())
    other = float((lat["ace_other"] - lat["base_other"]).abs().max())
    scale = float(lat["base_concept"].abs().max())
    assert changed > 1e-2 * scale, (changed, scale)
    # The other prompt peaks below the threshold on this random CLIP (~0.05 under it): the ramp gate is
    # closed there, so its sample is the base model's exactly (the first, centred gate gave it ~0.07).
    assert other == 0.0, (other, changed)
    # the loaded model is never mutated: no attn2 patch on the loader's model
    base_model = comfy.node_output("1", 0, ex)
    assert "attn2_patch" not in base_model.model_options.get("transformer_options", {}).get("patches", {})


def test_save_then_load_restores_the_same_output(ace_run, comfy, tiny_ckpt_2layer):
    _, _, _, _, lat, path = ace_run
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["mace.format"] == "gate-1" and "mace.base_model" in meta and '"ace"' in meta["mace.gate"]
    assert keys and all(k.startswith("mace_gate.") for k in keys)  # no weight edit: no fallback part
    api = base_prompt(Path(tiny_ckpt_2layer).name)
    api["10"] = {"class_type": "MaceLoadErasure", "inputs": {"model": ["1", 0], "erasure_name": path.name,
                                                             "strength": 1.0, "allow_other_base": False}}
    api["20"], api["30"], api["40"] = sampler(["10", 0], ["2", 0]), decoded("20"), preview(["30", 0])
    history, _ = comfy.run_workflow(api)
    assert history["status"] == "success"
    loaded = comfy.node_output("20", 0, comfy.last_executor)["samples"]
    assert torch.equal(loaded, lat["ace_concept"])


def test_file_with_fallback_stock_loader_and_bad_input(ace_run, comfy):
    import comfy.model_management as mm

    pack = comfy.pack_module
    cm, gate_mod, io_nodes = pack.nodes.comfy_model, pack.nodes.comfy_gate, pack.nodes.erasure_io_nodes
    _, _, _, ex, _, path = ace_run
    base_model, gated = comfy.node_output("1", 0, ex), comfy.node_output("10", 0, ex)
    base = cm.effective_kv_weights(base_model)
    gen = torch.Generator().manual_seed(0)
    deltas = {k: 0.01 * torch.randn(w.shape, generator=gen) for k, w in base.items()}
    # a weight edit after the gate (as a CFR node would add): the gate rides along on the clone
    both = cm.apply_erasure(gated, deltas, base, {"method": "test"})
    assert gate_mod.get_gate(both) is gate_mod.get_gate(gated)
    saved = Path(io_nodes.MaceSaveErasure.execute(both, "loras/mace_test_ace_fallback", "fp32").result[0])

    (lora_model,) = comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(base_model, saved.name, 1.0)
    assert "attn2_patch" not in lora_model.model_options.get("transformer_options", {}).get("patches", {})
    mm.load_models_gpu([lora_model], force_patch_weights=True)
    patched = {k: v.detach().float().cpu().clone() for k, v in lora_model.model.state_dict().items() if k in base}
    mm.unload_all_models()
    for k in base:
        assert torch.allclose(patched[k], base[k] + deltas[k], atol=1e-3), k

    loaded, _info, _clip = io_nodes.MaceLoadErasure.execute(base_model, saved.name, 1.0, False).result
    assert gate_mod.get_gate(loaded) is not None
    assert len(loaded.model_options["transformer_options"]["patches"]["attn2_patch"]) == 1
    for k, d in cm.get_record(loaded).deltas.items():
        assert torch.allclose(d, deltas[k])

    # the weight edit before the gate (a CFR node, then ACE): the file still names the original base
    edited = cm.apply_erasure(base_model, deltas, base, {"method": "test"})
    record = gate_mod.GateRecord(gate_mod.get_gate(gated).erasure,
                                 gate_mod.base_fingerprint(edited, cm.effective_kv_weights(edited)), {})
    saved2 = Path(io_nodes.MaceSaveErasure.execute(gate_mod.apply_gate(edited, record), "loras/mace_test_ace_before",
                                                   "fp32").result[0])
    io_nodes.MaceLoadErasure.execute(base_model, saved2.name, 1.0, False)  # base check passes

    with pytest.raises(ValueError, match="strength"):
        io_nodes.MaceLoadErasure.execute(base_model, path.name, 0.5, False)
    with pytest.raises(ValueError, match="already carries an ACE gate"):
        io_nodes.MaceLoadErasure.execute(gated, path.name, 1.0, False)
    other = base_model.clone()
    key = sorted(base)[0]
    other.add_patches({key: ("diff", (torch.full_like(base[key], 0.05),))})
    with pytest.raises(ValueError, match="different base model"):
        io_nodes.MaceLoadErasure.execute(other, path.name, 1.0, False)
    io_nodes.MaceLoadErasure.execute(other, path.name, 1.0, True)  # explicitly allowed
    node = pack.nodes.ace_node.MaceGatedErasure
    clip = comfy.node_output("1", 1, ex)
    with pytest.raises(ValueError, match="quantile"):
        node.execute(base_model, clip, "van gogh", "style", "", "", False, 8, float("nan"))
    with pytest.raises(ValueError, match="concepts"):
        node.execute(base_model, clip, "  ", "style", "", "", False, 8, 0.999)


def test_cancel_stops_the_fit(ace_run, comfy):
    """Cancel pressed while the gate is being fitted: InterruptProcessingException, not a gated model."""
    pack = comfy.pack_module
    _, _, _, ex, _, _ = ace_run
    calls = ch.cancel_at_first_encode(pack, lambda: pack.nodes.ace_node.MaceGatedErasure.execute(
        comfy.node_output("1", 0, ex), comfy.node_output("1", 1, ex), "van gogh", "style", "", "", False, 8, 0.999))
    assert len(calls) == 1


ADV = {"adversarial_rounds": 1, "attack_steps": 2, "attack_images": 1, "image_size": 64, "sampling_steps": 1,
       "seed": 3}


def test_cancel_stops_the_attack_and_bad_input(ace_run, comfy, monkeypatch):
    """Cancel pressed during the first attack step: InterruptProcessingException, the private denoiser's
    wrappers are off the shared model. (The fit is the fixture's gate: no encoding here.)"""
    import comfy.model_management as mm

    pack = comfy.pack_module
    node_mod = pack.nodes.ace_node
    _, _, _, ex, _, _ = ace_run
    model, clip = comfy.node_output("1", 0, ex), comfy.node_output("1", 1, ex)
    plain = pack.nodes.comfy_gate.get_gate(comfy.node_output("10", 0, ex)).erasure
    monkeypatch.setattr(node_mod, "fit_gated_erasure", lambda *a, **k: plain)
    monkeypatch.setattr(node_mod.prior_input, "caption_encodings", lambda enc: ([], []))
    den_cls = pack.nodes.comfy_denoiser.ComfyDenoiser
    real_forward, calls = den_cls.forward_with_attention, []

    def forward(self, *args, **kwargs):
        calls.append(1)
        mm.interrupt_current_processing(True)  # the user presses Cancel
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(den_cls, "forward_with_attention", forward)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            node_mod.MaceGatedErasure.execute(model, clip, "van gogh", "style", "", "", False, 8, 0.999,
                                              temperature=0.002, **ADV)
    finally:
        mm.interrupt_current_processing(False)
    assert len(calls) == 1
    assert not [n for n, m in model.model.named_modules() if m.__dict__.get("weight_function")]
    with pytest.raises(ValueError, match="attack_steps"):
        node_mod.MaceGatedErasure.execute(model, clip, "van gogh", "style", "", "", False, 8, 0.999,
                                          **{**ADV, "attack_steps": 0})


def test_workflow_with_adversarial_refit_and_cached_captions(ace_run, comfy, tiny_ckpt_2layer):  # keep it last: see below
    """workflows/erase_gated_ace.json on the tiny checkpoint (64 px, 2 steps), its ACE node set to one
    adversarial round: an image drawn by the model, one soft-prompt attack through ComfyUI's denoiser,
    the refit. The refit gate holds the attack's soft-token prototypes (2 per template) on top of the
    plain gate's. The captions were encoded by the module fixture's run with this CLIP: this run reads
    them from the cache."""
    pack = comfy.pack_module
    _, _, _, ex, _, _ = ace_run
    plain = pack.nodes.comfy_gate.get_gate(comfy.node_output("10", 0, ex))
    captions = pack.mace_ops.prior.general_captions(pack.nodes.prior_input.PRIOR_CAPTIONS)
    captions = set(captions[2:])  # the first two are the cache key's probe prompts, encoded on every run
    api = ch.retarget_for_test(ch.ui_workflow_to_api(WORKFLOW), Path(tiny_ckpt_2layer).name)
    loader = next(k for k, v in api.items() if v["class_type"] == "CheckpointLoaderSimple")
    api = ch.renumber(api, {loader: "1"})  # the fixture's executor has the loaded checkpoint cached as "1"
    node = next(k for k, v in api.items() if v["class_type"] == "MaceGatedErasure")
    assert api[node]["inputs"]["adversarial_rounds"] == 0  # the shipped setting; one round here
    api[node]["inputs"].update(concepts="van gogh", anchor="", preserve="", builtin_preserve=False,
                               temperature=0.002, **ADV)
    save = next(k for k, v in api.items() if v["class_type"] == "MaceSaveErasure")
    api[save]["inputs"].update(dtype="fp32", filename_prefix="loras/mace_test_ace_workflow")
    enc_cls = pack.nodes.comfy_text_encoder.ComfyTextEncoder
    real_encode, seen = enc_cls.encode, []

    def encode(self, prompts):
        seen.extend(prompts)
        return real_encode(self, prompts)

    enc_cls.encode = encode
    try:
        history, messages = comfy.run_workflow(api, executor=ex)  # last test here: it may evict ex's outputs
    finally:
        enc_cls.encode = real_encode
    assert history["status"] == "success"
    assert seen and not captions & set(seen)
    ex2 = comfy.last_executor
    progress = [d for e, d in messages if e == "progress" and d.get("node") == node]
    assert progress and progress[-1]["value"] == progress[-1]["max"] and len(progress) > 3
    summary = comfy.node_output(node, 1, ex2)
    assert "1 adversarial round(s)" in summary, summary
    gate = pack.nodes.comfy_gate.get_gate(comfy.node_output(node, 0, ex2))
    templates = pack.mace_ops.templates.templates_for("style")
    assert gate.erasure.prototypes.shape[0] == plain.erasure.prototypes.shape[0] + 2 * len(templates)
    assert not torch.equal(gate.erasure.bases, plain.erasure.bases)
    assert gate.info["adversarial"]["rounds"] == 1
    assert Path(history["outputs"][save]["text"][0]).is_file()
    samplers = [k for k, v in api.items() if v["class_type"] == "KSampler"]
    assert len(samplers) == 2 and all(torch.isfinite(comfy.node_output(k, 0, ex2)["samples"]).all() for k in samplers)
