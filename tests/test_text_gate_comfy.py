"""Integration: MACE Text Gate (compiled) in real ComfyUI, its file, and the stock LoraLoader.

On the tiny random-weight SD1.5-layout checkpoint (2-layer CLIP-L): the node edits only the four MLP
tensors of the layer clip skip reads, moves the concept prompt's conditioning and leaves prompts
without the concept nearly as they were; MACE Save Erasure writes ``text_encoders.*`` diffs that the
stock LoraLoader and MACE Load Erasure apply to give the node's conditioning. The captions are cut
to 100 (``prior_input.PRIOR_CAPTIONS``) to keep the CPU run short; the node's maths does not depend on the count.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import comfy_harness as ch

pytestmark = pytest.mark.integration
CONCEPT_PROMPT = "an artwork by van gogh"
OTHER_PROMPTS = ("an artwork by claude monet", "a photo of a red apple on a wooden table")
GATE = {"concepts": "van gogh", "concept_type": "style", "anchor": "", "preserve": "claude monet",
        "builtin_preserve": False, "quantile": 0.999}


def cond(clip, text):
    return clip.encode_from_tokens(clip.tokenize(text)).float()


def change(a, b, text):
    x = cond(a, text)
    return float((cond(b, text) - x).norm() / x.norm())


@pytest.fixture(scope="module")
def gate_run(comfy, tiny_ckpt_2layer):
    comfy.require_pack()
    mp = pytest.MonkeyPatch()
    mp.setattr(comfy.pack_module.nodes.prior_input, "PRIOR_CAPTIONS", 100)
    api = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": Path(tiny_ckpt_2layer).name}},
        "2": {"class_type": "MaceTextGate", "inputs": {"clip": ["1", 1], **GATE}},
        "3": {"class_type": "MaceSaveErasure", "inputs": {"clip": ["2", 0], "filename_prefix": "loras/mace_test_tg",
                                                          "dtype": "fp32"}},
    }
    try:
        history, _messages = comfy.run_workflow(api)
    finally:
        mp.undo()
    ex = comfy.last_executor
    path = Path(history["outputs"]["3"]["text"][0])
    comfy.add_model_dir("loras", path.parent)
    return comfy.node_output("1", 0, ex), comfy.node_output("1", 1, ex), comfy.node_output("2", 0, ex), path


def test_gate_edits_the_read_layers_mlp_and_moves_the_concept_only(gate_run, comfy):
    model, base, gated, _ = gate_run
    tg = comfy.pack_module.nodes.comfy_text_site
    record = tg.get_text_gate(gated)
    prefix = "clip_l.transformer.text_model.encoder.layers.1.mlp."  # SD1.x reads the last of the 2 layers
    assert sorted(record.deltas) == sorted(prefix + t for t in tg.MLP_TENSORS)
    assert sorted(gated.patcher.patches) == sorted(record.deltas)
    assert tg.get_text_gate(base) is None and not base.patcher.patches      # the loader's CLIP untouched
    moved = change(base, gated, CONCEPT_PROMPT)
    assert moved > 0.01
    for text in OTHER_PROMPTS:
        assert change(base, gated, text) < 0.2 * moved, text


def test_file_loads_with_stock_lora_loader_and_load_node(gate_run, comfy):
    model, base, gated, path = gate_run
    with safe_open(str(path), framework="pt") as f:
        keys = sorted(f.keys())
    stem = "text_encoders.clip_l.transformer.text_model.encoder.layers.1.mlp."
    assert keys == sorted(stem + k for k in ("fc1.diff", "fc1.diff_b", "fc2.diff", "fc2.diff_b"))
    import nodes

    stock_model, stock_clip = nodes.LoraLoader().load_lora(model, base, path.name, 1.0, 1.0)
    load = comfy.pack_module.nodes.erasure_io_nodes.MaceLoadErasure
    loaded_model, _info, loaded_clip = load.execute(model, path.name, 1.0, False, clip=base).result
    assert loaded_model is model                                          # no model part: the model as it was
    for text in (CONCEPT_PROMPT,) + OTHER_PROMPTS:
        want = cond(gated, text)
        for clip in (stock_clip, loaded_clip):
            assert torch.allclose(cond(clip, text), want, atol=1e-4, rtol=1e-4), text
    with pytest.raises(ValueError, match="clip"):
        load.execute(model, path.name, 1.0, False)                        # the text part needs a CLIP
    with pytest.raises(ValueError, match="strength: .* loads at strength 1 only"):
        load.execute(model, path.name, 0.5, False, clip=base)
    other = base.clone()
    key = sorted(comfy.pack_module.nodes.comfy_text_site.get_text_gate(gated).deltas)[0]
    other.add_patches({key: ("diff", (torch.full_like(base.patcher.model.state_dict()[key].float(), 0.05),))})
    with pytest.raises(ValueError, match="different base model"):
        load.execute(model, path.name, 1.0, False, clip=other)
    load.execute(model, path.name, 1.0, True, clip=other)                 # explicitly allowed


def test_clip_skip_second_gate_and_bad_input(gate_run, comfy, monkeypatch):
    model, base, gated, _ = gate_run
    pack = comfy.pack_module
    monkeypatch.setattr(pack.nodes.prior_input, "PRIOR_CAPTIONS", 20)
    node = pack.nodes.text_gate_node.MaceTextGate
    skipped = base.clone()
    skipped.clip_layer(-2)                                                # CLIPSetLastLayer -2: layer 0's output
    record = pack.nodes.comfy_text_site.get_text_gate(node.execute(skipped, **GATE).result[0])
    assert {k.split(".mlp.")[0].rsplit(".", 1)[1] for k in record.deltas} == {"0"}
    with pytest.raises(ValueError, match="already carries a compiled text gate"):
        node.execute(gated, **GATE)
    with pytest.raises(ValueError, match="quantile"):
        node.execute(base, **{**GATE, "quantile": float("nan")})
    with pytest.raises(ValueError, match="concepts"):
        node.execute(base, **{**GATE, "concepts": "  "})
    h = pack.nodes.comfy_text_site.mlp_sites(base)[0].mlp()["fc1.weight"].shape[0]
    too_many = "\n".join(f"concept{i}" for i in range(h // 2 + 1))
    calls = []
    monkeypatch.setenv("MACE_MAX_CONCEPTS", str(h))                      # the server's max_concepts guard let through
    monkeypatch.setattr(pack.nodes.comfy_text_site._Residuals, "encode", lambda self, p: calls.append(p))
    with pytest.raises(ValueError, match=f"concepts: {h // 2 + 1} need {h + 2} MLP units, the layer has {h}"):
        node.execute(base, **{**GATE, "concepts": too_many})
    assert calls == []                                                    # refused before any encoding
    monkeypatch.undo()
    monkeypatch.setattr(pack.nodes.prior_input, "PRIOR_CAPTIONS", 20)
    other_family = base.clone()
    other_family.cond_stage_model = torch.nn.Module()                    # e.g. Flux's CLIP-L + T5: no CLIP part
    with pytest.raises(ValueError, match="clip: the text gate compiles .* supported: SD1.x"):
        node.execute(other_family, **GATE)
    layer = base.cond_stage_model.clip_l.transformer.text_model.encoder.layers[1]
    monkeypatch.setattr(layer.mlp, "activation", lambda a: torch.nn.functional.gelu(a, approximate="tanh"))
    with pytest.raises(ValueError, match="clip: its MLP activation .* cannot hold a compiled gate"):
        node.execute(base, **GATE)
    monkeypatch.undo()
    save = pack.nodes.erasure_io_nodes.MaceSaveErasure
    with pytest.raises(ValueError, match="clip: carries no compiled text gate"):
        save.execute(None, "loras/mace_test_tg_bad", "fp32", clip=base)
    with pytest.raises(ValueError, match="carries no MACE erasure"):
        save.execute(None, "loras/mace_test_tg_bad", "fp32")


def test_a_second_run_reads_the_captions_residuals_from_the_disk_cache(gate_run, comfy, monkeypatch):
    """The captions' residuals at the MLP's input are cached per CLIP and layer (as ACE's caption
    encodings): a later run, in a new process's cache, encodes only the preserve, concept and anchor
    prompts and compiles the same tensors, bit for bit."""
    _model, base, gated, _ = gate_run
    pack = comfy.pack_module
    monkeypatch.setattr(pack.nodes.prior_input, "PRIOR_CAPTIONS", 100)       # the fixture's captions
    monkeypatch.setattr(pack.nodes.prior_input, "_CACHE", None)              # read back from disk
    enc_cls, sizes = pack.nodes.comfy_text_encoder.ComfyTextEncoder, []
    real = enc_cls.encode
    monkeypatch.setattr(enc_cls, "encode", lambda self, prompts: sizes.append(len(prompts)) or real(self, prompts))
    again = pack.nodes.text_gate_node.MaceTextGate.execute(base, **GATE).result[0]
    n = len(pack.mace_ops.templates.templates_for("style"))
    assert sum(sizes) == 3 + 5 * n      # the cache's 3 probes; preserve, anchor and concept in, anchor and concept out
    first, second = (pack.nodes.comfy_text_site.get_text_gate(c).deltas for c in (gated, again))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_cancel_stops_the_compile(gate_run, comfy):
    _model, base, _gated, _ = gate_run
    node = comfy.pack_module.nodes.text_gate_node.MaceTextGate
    assert len(ch.cancel_at_first_encode(comfy.pack_module, lambda: node.execute(base, **GATE))) == 1


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_families_each_encoder_gets_its_gate_and_the_stock_loader_applies_it(comfy, family, request, monkeypatch):
    """SD2.x (OpenCLIP-H, gelu, penultimate layer) and SDXL (CLIP-L + bigG, both penultimate): one
    gate per encoder, the layer clip skip reads; the saved file's CLIP part gives the node's
    conditioning through the stock LoraLoader."""
    import nodes

    pack = comfy.pack_module
    comfy.require_pack()
    monkeypatch.setattr(pack.nodes.prior_input, "PRIOR_CAPTIONS", 20)
    model, clip, _vae = ch.load_tiny_checkpoint(request.getfixturevalue(f"tiny_{family}_ckpt"))
    gated, summary = pack.nodes.text_gate_node.MaceTextGate.execute(clip, **GATE).result
    parts = {"sd2": ["clip_h"], "sdxl": ["clip_g", "clip_l"]}[family]
    record = pack.nodes.comfy_text_site.get_text_gate(gated)
    assert sorted({k.split(".")[0] for k in record.deltas}) == parts
    assert {k.split(".mlp.")[0].rsplit(".", 1)[1] for k in record.deltas} == {"1"}   # penultimate of 3 layers
    assert ("gelu" if family == "sd2" else "quick_gelu") in summary
    assert change(clip, gated, CONCEPT_PROMPT) > 0.002
    path = Path(pack.nodes.erasure_io_nodes.MaceSaveErasure.execute(
        None, f"loras/mace_test_tg_{family}", "fp32", clip=gated).result[0])
    comfy.add_model_dir("loras", path.parent)
    _m, stock_clip = nodes.LoraLoader().load_lora(model, clip, path.name, 1.0, 1.0)
    assert torch.allclose(cond(stock_clip, CONCEPT_PROMPT), cond(gated, CONCEPT_PROMPT), atol=1e-4, rtol=1e-4)


def test_cfr_on_the_gated_clip_saves_one_file_with_both_parts(gate_run, comfy):
    """The chain the toy bench measured best as weight edits (gate, then MACE's K/V stages fitted on
    the gated encoder): CFR reads the gated CLIP, Save Erasure writes K/V and CLIP diffs into one
    file, and Load Erasure gives back both the CFR model and the gated conditioning."""
    model, base, gated, _ = gate_run
    pack = comfy.pack_module
    cfr = pack.nodes.cfr_node.MaceRefineCrossAttention
    erased = cfr.execute(model, gated, "van gogh", "style", "", "claude monet", 0.1, 1.0, False,
                         prior_weight=0.0).result[0]
    record = pack.nodes.comfy_model.get_record(erased)
    path = Path(pack.nodes.erasure_io_nodes.MaceSaveErasure.execute(
        erased, "loras/mace_test_tg_cfr", "fp32", clip=gated).result[0])
    comfy.add_model_dir("loras", path.parent)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    text_keys = {k for k in keys if k.startswith("text_encoders.")}
    assert len(text_keys) == 4 and keys - text_keys == {k[: -len(".weight")] + ".diff" for k in record.deltas}
    assert meta["mace.base_model"] and meta["mace.base_text_encoder"]
    load = pack.nodes.erasure_io_nodes.MaceLoadErasure
    loaded_model, _info, loaded_clip = load.execute(model, path.name, 1.0, False, clip=base).result
    got = pack.nodes.comfy_model.effective_kv_weights(loaded_model)
    want = pack.nodes.comfy_model.effective_kv_weights(erased)
    assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)
    assert torch.allclose(cond(loaded_clip, CONCEPT_PROMPT), cond(gated, CONCEPT_PROMPT), atol=1e-4, rtol=1e-4)
