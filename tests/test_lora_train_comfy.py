"""Integration: MACE stage 2 (per-concept LoRA) inside real ComfyUI, on a tiny SD1.5-layout model.

The model is the harness's tiny random-weight checkpoint with a 1-layer CLIP (fast on CPU);
images are 64x64 (8x8 latents). Nodes are called the way the executor calls them: inside
``torch.inference_mode()``, with a model loaded in inference mode. Checked: the training-images
node; the LoRA node trains, saves and applies; gradients reach only the LoRA factors; the shared
model's weights and modules are left as they were; the concept's attention inside the mask drops;
the file loads through the stock LoraLoaderModelOnly and patches W + up @ down * scale; an
interrupt propagates and leaves no file; a seed gives the same LoRA; attention-derived masks.
These run the full-backprop path (``lora_training="full"``); test_cached_queries_comfy.py the default.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from comfy_harness import load_tiny_checkpoint, make_tiny_sd15_checkpoint

pytestmark = pytest.mark.integration

STEPS, LR, SEED = 6, 3e-2, 7  # the tiny random model needs a far larger LR than SD (1e-5 .. 1e-4)
MASK = torch.zeros(1, 64, 64)
MASK[:, 16:48, 8:40] = 1.0


def _train(env, images, prefix, steps=STEPS, masks=MASK, mask_mode="given", seed=SEED, training="full"):
    node = env.pack.nodes.lora_train_node.MaceTrainConceptLora
    with torch.inference_mode():  # as the executor runs nodes
        out = node.execute(env.model, env.clip, env.vae, images, "ship", "object", mask_mode, steps, LR, 1, seed,
                           "auto", True, prefix, masks=masks, lora_training=training)
    return out.result


def _kv_state(model, keys):
    sd = model.model.state_dict()
    return {k: sd[k].detach().float().cpu().clone() for k in keys}


def _weight_functions(model):
    return [(n, f) for n, m in model.model.named_modules() for attr in ("weight_function", "bias_function")
            for f in m.__dict__.get(attr, [])]


@pytest.fixture(scope="module")
def env(comfy, tmp_path_factory):
    comfy.require_pack()
    path = make_tiny_sd15_checkpoint(tmp_path_factory.mktemp("tiny1") / "mace_tiny_clip1.safetensors",
                                     clip_layers=1, seed=0)
    with torch.inference_mode():
        model, clip, vae = load_tiny_checkpoint(path, clip_layers=1)
    pack = comfy.pack_module
    return SimpleNamespace(model=model, clip=clip, vae=vae, pack=pack, ops=pack.mace_ops, comfy=comfy)


@pytest.fixture(scope="module")
def images(env):
    node = env.pack.nodes.training_images_node.MaceTrainingImages
    with torch.inference_mode():
        out = node.execute(env.model, env.clip, env.vae, "ship", "object", 2, 1, 5.0, 3, 64, 64, "euler",
                           "normal", "")
    return out.result


@pytest.fixture(scope="module")
def trained(env, images):
    before = {k: v.detach().clone() for k, v in env.model.model.state_dict().items()}
    model_out, path, summary = _train(env, images[0], "loras/mace_lora_test/{concept}")
    return SimpleNamespace(model=model_out, path=path, summary=summary, before=before,
                           file=env.ops.lora_file.load_concept_lora(path))


def test_training_images_node(images):
    imgs, prompts = images
    assert tuple(imgs.shape) == (2, 64, 64, 3) and imgs.dtype == torch.float32
    assert torch.isfinite(imgs).all() and float(imgs.min()) >= 0.0 and float(imgs.max()) <= 1.0
    assert prompts.splitlines() == ["a photo of a ship", "a close-up photo of a ship"]


def test_lora_node_saves_and_reports(trained, env):
    path = trained.path
    assert os.path.isfile(path) and path.endswith("ship_00001_.safetensors")
    assert os.path.dirname(path) == str(env.comfy.output_dir / "loras" / "mace_lora_test")
    assert not [p for p in os.listdir(os.path.dirname(path)) if p.endswith(".tmp")]
    info = trained.file.info
    assert info["steps"] == STEPS and info["seed"] == SEED and info["concept"] == ["ship"]
    assert info["mask_mode"] == "given" and info["settings"]["masks_used"] is True
    assert len(info["losses"]) == STEPS and info["settings"]["sampler"] == "cfis"
    cm = env.pack.nodes.comfy_model
    base = cm.effective_kv_weights(env.model)
    assert trained.file.metadata["mace.base_model"] == env.ops.erasure_file.weights_fingerprint(base)
    assert sorted(trained.file.factors) == sorted(base) and len(base) == 8
    assert "loss" in trained.summary and path in trained.summary
    record = cm.get_record(trained.model)
    assert record is not None and record.stages[-1]["method"] == "lora"


def test_shared_model_untouched(trained, env):
    after = env.model.model.state_dict()
    assert sorted(after) == sorted(trained.before)
    for k, v in trained.before.items():
        assert torch.equal(after[k], v), k
    assert all(p.grad is None for p in env.model.model.parameters())
    assert not _weight_functions(env.model), "the training wrappers were left on the shared modules"
    assert not env.model.patches and not env.model.weight_wrapper_patches
    assert "patches_replace" not in env.model.model_options.get("transformer_options", {})


def test_gradients_reach_only_the_lora(env):
    ops = env.ops
    den = env.pack.nodes.comfy_denoiser.ComfyDenoiser(env.model)
    enc = env.pack.nodes.comfy_text_encoder.ComfyTextEncoder(env.clip)
    try:
        with torch.inference_mode():
            ctx = enc.encode(["a photo of a ship"])[0].features[None]
        weights = den.kv_weights()
        lora = ops.lora.KVLora.for_weights(weights, rank=1, seed=0)
        x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([300])
        with torch.inference_mode(False), torch.no_grad():
            x_t = den.add_noise(x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)), t)
            plain = den.forward_with_attention(x_t, t, ctx.clone(), lambda p: None)
            at_init = den.forward_with_attention(x_t, t, ctx.clone(), lambda p: None, lora.weight_transform)
        assert torch.equal(plain, at_init)  # up = 0: the LoRA starts as the identity
        for name in lora.names:
            with torch.no_grad():
                lora.up[name].normal_(0, 0.01)
        probes = []
        with torch.inference_mode(False), torch.enable_grad():
            den.forward_with_attention(x_t, t, ctx.clone(), probes.append, lora.weight_transform)
            assert len(probes) == 4
            assert [(p.height, p.width) for p in probes] == [(8, 8)] * 4  # one-level tiny UNet
            assert all(p.probs.dtype == torch.float32 and p.probs.requires_grad for p in probes)
            torch.stack([p.probs[..., 4].sum() for p in probes]).sum().backward()
        assert all(p.grad is None for p in env.model.model.parameters())
        got = {name for name in lora.names
               if lora.up[name].grad is not None and float(lora.up[name].grad.abs().max()) > 0}
        # every K reaches its own layer's attention; V only reaches later layers' (none after the last)
        last_v = "diffusion_model.output_blocks.1.1.transformer_blocks.0.attn2.to_v.weight"
        assert got == set(lora.names) - {last_v}
        assert all(lora.down[name].grad is not None for name in got)
    finally:
        den.release()
    assert not _weight_functions(env.model)


def test_half_precision_compute(env):
    """bf16 compute (as on GPUs): LoRA factors stay float32, probabilities are float32, grads finite."""
    model = env.model.clone()
    model.set_model_compute_dtype(torch.bfloat16)
    den = env.pack.nodes.comfy_denoiser.ComfyDenoiser(model)
    try:
        lora = env.ops.lora.KVLora.for_weights(den.kv_weights(), rank=1, seed=0)
        for name in lora.names:
            with torch.no_grad():
                lora.up[name].normal_(0, 0.01)
        gen = torch.Generator().manual_seed(2)
        x0, ctx, t = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, 768, generator=gen), torch.tensor([250])
        probes = []
        with torch.inference_mode(False), torch.enable_grad():
            den.forward_with_attention(den.add_noise(x0, torch.randn(x0.shape, generator=gen), t), t, ctx,
                                       probes.append, lora.weight_transform)
            torch.stack([p.probs[..., 1:5].sum() for p in probes]).sum().backward()
        assert all(p.probs.dtype == torch.float32 for p in probes)
        key = "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"
        grad = lora.up[key].grad
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and float(grad.abs().max()) > 0
    finally:
        den.release()
    assert not _weight_functions(env.model)
    assert env.model.model.manual_cast_dtype is None  # the object patch was undone


def _concept_mass(env, transforms):
    """Mean attention on 'ship' + end tokens inside the mask, 2 prompts x 2 latents at t=300, per transform."""
    ops = env.ops
    den = env.pack.nodes.comfy_denoiser.ComfyDenoiser(env.model)
    enc = env.pack.nodes.comfy_text_encoder.ComfyTextEncoder(env.clip)
    try:
        with torch.inference_mode():
            prompts = [ops.templates.fill(t, "ship") for t in ops.templates.OBJECT_TEMPLATES[:2]]
            encoded = enc.encode(prompts)
            ids = enc.tokenize("ship")
        ctx = torch.stack([e.features for e in encoded] * 2).clone()  # prompt j for latent 0 and latent 1
        pos = torch.zeros(len(ctx), len(encoded[0].ids), dtype=torch.bool)
        for j, e in enumerate(encoded * 2):
            pos[j, ops.alignment.concept_positions(e.ids, e.length, ids, enc.end_id, True)] = True
        gen = torch.Generator().manual_seed(11)
        x0 = torch.randn(2, 4, 8, 8, generator=gen).repeat_interleave(len(prompts), 0)
        t = torch.full((len(ctx),), 300)
        noise = torch.randn(x0.shape, generator=gen)
        values = []
        with torch.inference_mode(False), torch.no_grad():
            x_t = den.add_noise(x0, noise, t)
            for transform in transforms:
                probes = []
                den.forward_with_attention(x_t, t, ctx, probes.append, transform)
                values.append(ops.attention_loss.concept_attention_mass(probes, pos, MASK.expand(len(ctx), -1, -1)))
        return values
    finally:
        den.release()


def test_concept_attention_drops(trained, env):
    losses = trained.file.info["losses"]
    before, after = _concept_mass(env, [None, trained.file.to_lora().weight_transform])
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; concept attention mass in mask {before:.4f} -> {after:.4f} "
          f"({before / after:.2f}x)")
    assert after < 0.8 * before


def test_stock_lora_loader_applies_the_file(trained, env):
    import comfy.model_management as mm

    nodes = env.comfy.nodes
    name = os.path.relpath(trained.path, env.comfy.output_dir / "loras")
    cm = env.pack.nodes.comfy_model
    base = cm.effective_kv_weights(env.model)
    raw = load_file(trained.path)
    assert any(k.endswith(".lora_up.weight") for k in raw) and any(k.endswith(".alpha") for k in raw)
    (loaded,) = nodes.LoraLoaderModelOnly().load_lora_model_only(env.model, name, 1.0)
    try:
        mm.load_models_gpu([loaded], force_patch_weights=True)
        stock = _kv_state(loaded, base)
        mm.load_models_gpu([trained.model], force_patch_weights=True)
        ours = _kv_state(trained.model, base)
    finally:
        mm.unload_all_models()
    changed = 0
    for key, w in base.items():
        f = trained.file.factors[key]
        expected = w + f.scale * (f.up.float() @ f.down.float())
        assert torch.allclose(stock[key], expected, rtol=1e-5, atol=1e-6), key
        assert torch.allclose(ours[key], expected, rtol=1e-5, atol=1e-6), key
        changed += int(not torch.equal(stock[key], w))
    assert changed >= 7  # every K/V weight moved (the last layer's to_v may get no gradient)
    unpatched = _kv_state(env.model, base)  # after unloading, the shared module holds the originals again
    assert all(torch.equal(unpatched[k], base[k]) for k in base)


def test_same_seed_same_lora(env, images, trained):
    _, p1, _ = _train(env, images[0], "loras/mace_lora_det/{concept}", steps=1)
    _, p2, _ = _train(env, images[0], "loras/mace_lora_det/{concept}", steps=1)
    assert p1 != p2
    a, b = load_file(p1), load_file(p2)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    loaded = env.ops.lora_file.load_concept_lora(p1)
    assert loaded.info["losses"][0] == trained.file.info["losses"][0]  # same draws as the longer run


def test_interrupt_propagates_and_leaves_no_file(env, images):
    import comfy.model_management as mm
    import comfy.utils

    prefix = "loras/mace_lora_interrupt/{concept}"
    folder = env.comfy.output_dir / "loras" / "mace_lora_interrupt"
    before = {k: v.detach().clone() for k, v in env.model.model.state_dict().items()}
    seen = []
    old_hook = comfy.utils.PROGRESS_BAR_HOOK

    def hook(value, total, preview, prompt_id=None, node_id=None):
        seen.append(value)
        if value >= 1:
            mm.interrupt_current_processing(True)  # what POST /interrupt does

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _train(env, images[0], prefix, steps=50)
    finally:
        comfy.utils.set_progress_bar_global_hook(old_hook)
        mm.interrupt_current_processing(False)
    assert seen and max(seen) < 50
    assert not folder.exists() or not list(folder.iterdir())
    after = env.model.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not _weight_functions(env.model)


def test_masks_from_attention(env, images):
    ops = env.ops
    nodes = env.pack.nodes
    with torch.inference_mode():
        latents = nodes.lora_train_node.encode_images(env.vae, env.model, images[0])
        den = nodes.comfy_denoiser.ComfyDenoiser(env.model)
        try:
            masks = ops.lora_train.attention_masks(den, nodes.comfy_text_encoder.ComfyTextEncoder(env.clip),
                                                   ops.concepts.Concept(("ship",)),
                                                   ops.templates.OBJECT_TEMPLATES[:2], latents, seed=0)
        finally:
            den.release()
    assert tuple(latents.shape) == (2, 4, 8, 8)
    assert tuple(masks.shape) == (2, 8, 8)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert 0 < float(masks.sum()) < masks.numel()
