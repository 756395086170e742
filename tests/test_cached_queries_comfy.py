"""Integration: cached-query LoRA training through the ComfyUI adapter, on the tiny SD1.5 model.

The recorded queries reproduce ComfyUI's own attention; the cached path wraps only the K/V
weights (no per-call copy of the other UNet weights, which the full path needs for autograd on
a model loaded in inference mode); the node's default trains K only and the concept's attention,
measured with the real UNet forward, drops.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from comfy_harness import load_tiny_checkpoint, make_tiny_sd15_checkpoint

pytestmark = pytest.mark.integration

MASK = torch.zeros(1, 64, 64)
MASK[:, 16:48, 8:40] = 1.0


@pytest.fixture(scope="module")
def env(comfy, tmp_path_factory):
    comfy.require_pack()
    path = make_tiny_sd15_checkpoint(tmp_path_factory.mktemp("tinyq") / "mace_tiny_q.safetensors",
                                     clip_layers=1, seed=0)
    with torch.inference_mode():
        model, clip, vae = load_tiny_checkpoint(path, clip_layers=1)
    return SimpleNamespace(model=model, clip=clip, vae=vae, pack=comfy.pack_module, comfy=comfy)


def _wrapped(den):
    return sum(len(m.__dict__.get(a, [])) for _, m in den.patcher.model.named_modules()
               for a in ("weight_function", "bias_function"))


def test_queries_reproduce_comfy_attention_and_only_kv_is_wrapped(env):
    nodes, ops = env.pack.nodes, env.pack.mace_ops
    enc = nodes.comfy_text_encoder.ComfyTextEncoder(env.clip)
    with torch.inference_mode():
        ctx = torch.stack([e.features for e in enc.encode(["a photo of a ship", "a ship at sea"])])
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([250, 700])
    counts = {}
    for backward in (False, True):
        den = nodes.comfy_denoiser.ComfyDenoiser(env.model, backward=backward)
        try:
            weights = den.kv_weights()
            with torch.inference_mode(False), torch.no_grad():
                x_t = den.add_noise(x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)), t)
                probes = []
                den.forward_with_attention(x_t, t, ctx.clone(), probes.append)
                counts[backward] = _wrapped(den)
                cache = ops.cached_queries.record_queries(den, x_t, t, ctx.clone(), weights)
                again = cache.probes(torch.arange(2), ctx.clone(), weights)
        finally:
            den.release()
        assert [p.layer for p in again] == [p.layer for p in probes] and len(probes) == 4
        for a, b in zip(again, probes):
            torch.testing.assert_close(a.probs, b.probs, atol=2e-5, rtol=1e-4)
    assert counts[False] == len(weights) == 8  # the cached path: K/V only
    assert counts[True] > 10 * counts[False]  # full backprop on an inference-mode model: every weight


def test_node_default_trains_k_against_cached_queries(env):
    nodes, ops = env.pack.nodes, env.pack.mace_ops
    with torch.inference_mode():
        images, _ = nodes.training_images_node.MaceTrainingImages.execute(
            env.model, env.clip, env.vae, "ship", "object", 2, 1, 5.0, 3, 64, 64, "euler", "normal", "").result
        _, path, summary = nodes.lora_train_node.MaceTrainConceptLora.execute(
            env.model, env.clip, env.vae, images, "ship", "object", "given", 8, 3e-2, 1, 7, "auto", True,
            "loras/mace_cached_test/{concept}", masks=MASK).result
    lora = ops.lora_file.load_concept_lora(path)
    assert lora.info["settings"]["path"] == "cached_queries" and "cached queries (8 recorded samples)" in summary
    deltas = lora.deltas()
    assert all((torch.count_nonzero(d) == 0) == (".to_v." in k) for k, d in deltas.items())
    # the concept's attention inside the mask, through the real UNet forward (queries not frozen)
    enc = nodes.comfy_text_encoder.ComfyTextEncoder(env.clip)
    with torch.inference_mode():
        enc_p = enc.encode(["a photo of a ship"])[0]
        ids = enc.tokenize("ship")
        latents = nodes.lora_train_node.encode_images(env.vae, env.model, images)
    pos = torch.zeros(2, len(enc_p.ids), dtype=torch.bool)
    pos[:, ops.alignment.concept_positions(enc_p.ids, enc_p.length, ids, enc.end_id, True)] = True
    den = nodes.comfy_denoiser.ComfyDenoiser(env.model, backward=False)
    mass = []
    try:
        with torch.inference_mode(False), torch.no_grad():
            t = torch.full((2,), 300)
            x_t = den.add_noise(latents, torch.randn(latents.shape, generator=torch.Generator().manual_seed(3)), t)
            for transform in (None, lora.to_lora().weight_transform):
                probes = []
                den.forward_with_attention(x_t, t, enc_p.features[None].repeat(2, 1, 1).clone(), probes.append,
                                           transform)
                mass.append(ops.attention_loss.concept_attention_mass(probes, pos, MASK.expand(2, -1, -1)))
    finally:
        den.release()
    assert mass[1] < 0.8 * mass[0]
