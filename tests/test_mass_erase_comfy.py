"""Integration: MACE Mass Erase (CFR -> LoRA per concept -> fusion) and MACE Fuse LoRAs in ComfyUI.

Tiny random-weight SD1.5-layout model with a 1-layer CLIP, 64x64 images, 2 concepts, a few steps:
checks the run finishes, saves one LoRA per concept, resumes (a second run trains nothing and
gives the same weights), honours interrupts, and that fusing the saved LoRAs with the Fuse node
on the CFR model gives the same K/V weights as the pipeline.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from comfy_harness import load_tiny_checkpoint, make_tiny_sd15_checkpoint

pytestmark = pytest.mark.integration
CONCEPTS = "ship, boat\ncar"


@pytest.fixture(scope="module")
def env(comfy, tmp_path_factory):
    comfy.require_pack()
    path = make_tiny_sd15_checkpoint(tmp_path_factory.mktemp("tiny_mass") / "mace_tiny_mass.safetensors",
                                     clip_layers=1, seed=1)
    with torch.inference_mode():
        model, clip, vae = load_tiny_checkpoint(path, clip_layers=1)
    return SimpleNamespace(model=model, clip=clip, vae=vae, pack=comfy.pack_module, comfy=comfy)


def mass_erase(env, run_name, concepts=CONCEPTS, **kw):
    node = env.pack.nodes.mass_erase_node.MaceMassErase
    with torch.inference_mode():
        return node.execute(env.model, env.clip, env.vae, concepts, "", "object", "", "", False, run_name,
                            1.0, 1.0, 3, 3e-2, 1, 64, 2, 5, 1e-3, **kw)


def test_mass_erase_runs_resumes_and_matches_fuse_node(env):
    cm = env.pack.nodes.comfy_model
    first = mass_erase(env, "t1")
    folder = os.path.join(env.comfy.output_dir, "loras", "mace_mass", "t1")
    files = sorted(os.listdir(folder))
    assert len(files) == 2 and all(f.endswith(".safetensors") for f in files)
    assert "2 trained, 0 reused" in first.result[1]
    rec1 = cm.get_record(first.result[0])
    base = cm.effective_kv_weights(env.model)
    assert set(rec1.deltas) == set(base) and all(float(d.abs().max()) > 0 for d in rec1.deltas.values())

    again = mass_erase(env, "t1")
    assert "0 trained, 2 reused" in again.result[1]
    rec2 = cm.get_record(again.result[0])
    for k in rec1.deltas:
        assert torch.equal(rec1.deltas[k], rec2.deltas[k])

    # the Fuse node on the CFR model with the saved LoRAs reproduces the pipeline's fusion
    cfr = env.pack.nodes.cfr_node.MaceRefineCrossAttention
    fuse = env.pack.nodes.fusion_node.MaceFuseLoras
    with torch.inference_mode():
        cfr_model = cfr.execute(env.model, env.clip, CONCEPTS, "object", "", "", 1.0, 1.0, False, True).result[0]
        fused, summary = fuse.execute(cfr_model, env.clip, "mace_mass/t1", "object", "", 1e-3, 1.0, False).result
    rec3 = cm.get_record(fused)
    # the LoRA files record null-space training (Mass Erase's default), so the Fuse node's "auto" is "current"
    assert rec3.stages[-1]["null_space_loras"] and rec3.stages[-1]["preserve_to"] == "current"
    assert "kept at the current weights" in summary
    for k in rec1.deltas:
        assert torch.allclose(rec3.deltas[k], rec1.deltas[k], atol=1e-5, rtol=1e-4), k


def test_mass_erase_interrupt_keeps_finished_concepts(env):
    import comfy.model_management as mm

    real = mm.throw_exception_if_processing_interrupted
    folder = os.path.join(env.comfy.output_dir, "loras", "mace_mass", "t2")

    def interrupt_late():  # the user presses stop once the first concept's LoRA is on disk
        if os.path.isdir(folder) and os.listdir(folder):
            raise mm.InterruptProcessingException()
        return real()

    mm.throw_exception_if_processing_interrupted = interrupt_late
    try:  # full backprop saves each concept as it finishes (cached queries save per group: test_pipeline)
        with pytest.raises(mm.InterruptProcessingException):
            mass_erase(env, "t2", lora_training="full")
    finally:
        mm.throw_exception_if_processing_interrupted = real
    done = os.listdir(folder)
    assert len(done) == 1 and not [f for f in done if f.endswith(".tmp")]
    resumed = mass_erase(env, "t2", lora_training="full")
    assert "1 trained, 1 reused" in resumed.result[1]


def test_malformed_concept_list_names_the_line(env):
    with pytest.raises(ValueError, match="concepts, line 2"):
        mass_erase(env, "t3", "ship\n,\n")


def test_mass_erase_objective_prior_and_lora_preserve_inputs(env):
    """The issue-16 inputs reach the pipeline: the prior changes the result and is cached per CLIP,
    the trajectory objective and the LoRA preservation term run, bad values are refused by name."""
    cm = env.pack.nodes.comfy_model
    node = env.pack.nodes.mass_erase_node.MaceMassErase
    args = (env.model, env.clip, env.vae, CONCEPTS, "", "object", "", "", True, "opts",
            1.0, 1.0, 2, 3e-2, 1, 64, 2, 5, 1e-3)
    with torch.inference_mode():
        default = cm.get_record(node.execute(*args).result[0])
        with_prior = default.deltas
        without = cm.get_record(node.execute(*args, prior_weight=0.0).result[0]).deltas
        traj = node.execute(*args, objective="trajectory", lora_preserve=5.0, prior_weight=0.0)
        plain = cm.get_record(node.execute(*args, lora_null_space=0.0).result[0])
        to_cfr = cm.get_record(node.execute(*args, lora_null_space=0.0, fusion_preserve_to="current").result[0])
    assert any(not torch.allclose(with_prior[k], without[k]) for k in with_prior)
    assert default.stages[-1]["settings"]["fusion_preserve_to"] == "current"  # auto, with null-space LoRAs
    assert default.stages[-1]["settings"]["lora"]["null_space"] == 0.99
    assert plain.stages[-1]["settings"]["fusion_preserve_to"] == "original"  # auto, for objects, no null space
    assert plain.stages[-1]["settings"]["lora"]["null_space"] == 0
    assert to_cfr.stages[-1]["settings"]["fusion_preserve_to"] == "current"
    assert any(not torch.allclose(plain.deltas[k], to_cfr.deltas[k]) for k in with_prior)  # the LoRAs reused
    assert any(not torch.allclose(with_prior[k], plain.deltas[k]) for k in with_prior)  # the null space acts
    with torch.inference_mode(), pytest.raises(ValueError, match="preserve_to.*'sideways'"):
        node.execute(*args, fusion_preserve_to="sideways")
    with torch.inference_mode(), pytest.raises(ValueError, match="lora_null_space"):
        node.execute(*args, lora_null_space=1.0)
    assert cm.get_record(traj.result[0]).stages[-1]["settings"]["lora"]["objective"] == "trajectory"
    cache = os.path.join(env.comfy.folder_paths.get_user_directory(), "mace_cache")
    assert [f for f in os.listdir(cache) if f.startswith("prior-") and f.endswith(".safetensors")]
    with torch.inference_mode(), pytest.raises(ValueError, match="objective"):
        node.execute(*args, objective="reverse")
    with torch.inference_mode(), pytest.raises(ValueError, match="lora_preserve"):
        node.execute(*args[:8], False, *args[9:], lora_preserve=1.0, prior_weight=0.0)
    with torch.inference_mode(), pytest.raises(ValueError, match="lora_null_space > 0 needs something to preserve"):
        node.execute(*args[:8], False, *args[9:], prior_weight=0.0)


def test_mass_erase_shards_then_fuse_match_one_run(env):
    """Two shards on a shared run folder, then shard 'fuse': the same deltas as one run (bit-identical
    with full backprop: test_pipeline; within float tolerance here, where one run batches the concepts
    and the shards do not); a shard passes
    the model on unchanged; bad shard strings and a fuse before the shards are refused by name."""
    cm = env.pack.nodes.comfy_model
    node = env.pack.nodes.mass_erase_node.MaceMassErase

    def run(name, shard, training="auto"):
        with torch.inference_mode():
            return node.execute(env.model, env.clip, env.vae, CONCEPTS, "", "object", "", "", False, name,
                                1.0, 1.0, 3, 3e-2, 1, 64, 2, 5, 1e-3, shard=shard, lora_training=training).result

    one = cm.get_record(run("sh_one", "")[0])
    with pytest.raises(ValueError, match="shard 'fuse': no finished LoRA for 2 concept"):
        run("sh_parts", "fuse")
    model, summary = run("sh_parts", "1/2")
    assert model is env.model and "shard 1/2: 1 LoRA(s) trained" in summary and "No erasure applied" in summary
    assert "shard 2/2: 1 LoRA(s) trained" in run("sh_parts", "2/2")[1]
    fused = run("sh_parts", "fuse")
    assert "0 trained, 2 reused" in fused[1]
    rec = cm.get_record(fused[0])
    for k in one.deltas:  # one run trains the two concepts as one batch, the shards one each: float tolerance
        d = (one.deltas[k] - rec.deltas[k]).abs().max() / one.deltas[k].abs().max()
        assert d < 1e-4, (k, float(d))
    assert one.stages[-1]["settings"]["lora"]["path"] == "cached_queries"
    for bad in ("3/2", "one of two"):
        with pytest.raises(ValueError, match="shard: "):
            run("sh_bad", bad)
    with pytest.raises(ValueError, match="lora_training: unknown 'fast'"):
        run("sh_bad", "", training="fast")


def test_mass_erase_on_the_gated_clip_saves_one_file_with_both_parts(env):
    """Text Gate (compiled) -> Mass Erase on its CLIP -> one Save: the toy's "compiled gate + full
    MACE" as a graph. The file holds the fused K/V and the CLIP's MLP diffs; Load Erasure gives both
    back (K/V to 1e-5, the gated conditioning to 1e-4)."""
    from pathlib import Path

    pack = env.pack
    with torch.inference_mode():
        gated = pack.nodes.text_gate_node.MaceTextGate.execute(env.clip, CONCEPTS, "object", "", "", False,
                                                                0.999).result[0]
    node = pack.nodes.mass_erase_node.MaceMassErase
    with torch.inference_mode():
        erased = node.execute(env.model, gated, env.vae, CONCEPTS, "", "object", "", "", False, "gated",
                              1.0, 1.0, 3, 3e-2, 1, 64, 2, 5, 1e-3).result[0]
        path = Path(pack.nodes.erasure_io_nodes.MaceSaveErasure.execute(erased, "loras/mace_test_gated_mass", "fp32",
                                                                        clip=gated).result[0])
        env.comfy.add_model_dir("loras", path.parent)
        loaded, _info, clip = pack.nodes.erasure_io_nodes.MaceLoadErasure.execute(env.model, path.name, 1.0, False,
                                                                                  clip=env.clip).result
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    assert sum(k.startswith("text_encoders.") for k in keys) == 4 and sum(k.startswith("diffusion_model.") for k in keys) > 0
    cm = pack.nodes.comfy_model
    want, got = cm.effective_kv_weights(erased), cm.effective_kv_weights(loaded)
    assert any(not torch.equal(w, b) for w, b in zip(want.values(), cm.effective_kv_weights(env.model).values()))
    assert want.keys() == got.keys() and all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)
    text = "a photo of a ship"
    with torch.inference_mode():
        a = clip.encode_from_tokens(clip.tokenize(text)).float()
        b = gated.encode_from_tokens(gated.tokenize(text)).float()
        base = env.clip.encode_from_tokens(env.clip.tokenize(text)).float()
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4) and not torch.allclose(a, base, atol=1e-4)


def test_mass_erase_with_the_lora_stage_off_is_the_cfr_stage_alone(env):
    """lora_training 'off': the CFR node's edit with the same settings, no images, no LoRA files;
    a shard with the stage off is refused."""
    cm = env.pack.nodes.comfy_model
    off = mass_erase(env, "t_off", lora_training="off", relative_lambda=True)
    folder = os.path.join(env.comfy.output_dir, "loras", "mace_mass", "t_off")
    assert not os.path.exists(folder)
    assert "LoRA stage off" in off.result[1]
    cfr = env.pack.nodes.cfr_node.MaceRefineCrossAttention
    with torch.inference_mode():   # Mass Erase's CFR: prior 1 (its default), concept tokens on, no builtin set
        alone = cfr.execute(env.model, env.clip, CONCEPTS, "object", "", "", 1.0, 1.0, False, True,
                            prior_weight=1.0, relative_lambda=True).result[0]
    got, want = cm.get_record(off.result[0]), cm.get_record(alone)
    assert got.stages[-1]["lora_stage"] == "off"
    for k in want.deltas:
        assert torch.allclose(got.deltas[k], want.deltas[k], atol=1e-6), k
    with pytest.raises(ValueError, match="shard: .* lora_training 'off'"):
        mass_erase(env, "t_off", lora_training="off", shard="1/2")
