"""Dynamic VRAM (newer ComfyUI on NVIDIA, on by default): the pack trains and differentiates only
through legacy patchers (``comfy_compat.static_patcher`` / ``static_clip``).

The real ``ModelPatcherDynamic`` needs a GPU and comfy-aimdo, so these tests use a fake with the
upstream contract as the pack meets it (read in upstream ``comfy/model_patcher.py``):
``is_dynamic()`` is True; its ``load`` rebuilds every layer's weight functions from
``weight_wrapper_patches`` (functions set directly on a module are dropped); and
``get_non_dynamic_delegate()`` returns a legacy ``ModelPatcher`` over a second copy of the model
made by the loader's factory (``cached_patcher_init``) with the same patches, or raises
``RuntimeError`` when the model came from no such loader. The checks: the LoRA forward, its
gradients and the CLIP's embedding gradients are the same through a dynamic model as through the
legacy one; the dynamic model's own modules are never wrapped; without a delegate the adapters
refuse, naming ``--disable-dynamic-vram``. ``bench/gpu_suite.sh`` (dynamic leg) runs the real
thing on a GPU.
"""
from __future__ import annotations

import pytest
import torch

import comfy_harness as ch

pytestmark = pytest.mark.integration


def _load(path):
    with torch.inference_mode():
        return ch.load_tiny_checkpoint(path, clip_layers=3)


def _fake_dynamic(patcher, reload):
    """A clone of ``patcher`` that behaves as upstream's dynamic patcher (see the module docstring);
    ``reload()`` gives a fresh legacy patcher of the same file, or is None (no loader factory)."""
    base = type(patcher)

    class FakeDynamicPatcher(base):
        def is_dynamic(self):
            return True

        def load(self, *args, **kwargs):
            out = super().load(*args, **kwargs)
            for name, m in self.model.named_modules():
                for part in ("weight", "bias"):
                    if hasattr(m, f"{part}_function"):
                        setattr(m, f"{part}_function", list(self.weight_wrapper_patches.get(f"{name}.{part}", [])))
            return out

        def get_non_dynamic_delegate(self):
            if reload is None:
                raise RuntimeError("Cannot create non-dynamic delegate: cached_patcher_init is not initialized.")
            n = reload().clone()
            n.patches = {k: v[:] for k, v in self.patches.items()}
            n.patches_uuid = self.patches_uuid
            n.object_patches = self.object_patches.copy()
            n.model_options = ch_deepcopy(self.model_options)
            n.attachments = dict(self.attachments)
            return n

    out = patcher.clone()
    out.__class__ = FakeDynamicPatcher
    return out


def ch_deepcopy(options):
    import copy
    return copy.deepcopy(options)


def _dynamic_clip(clip, reload):
    out = clip.clone()
    out.patcher = _fake_dynamic(clip.patcher, None if reload is None else lambda: reload().patcher)
    return out


@pytest.fixture(scope="module")
def env(comfy, tiny_ckpt):
    comfy.require_pack()
    model, clip, _vae = _load(tiny_ckpt)
    return comfy.pack_module, tiny_ckpt, model, clip


def _wrapped(model) -> list[str]:
    return [n for n, m in model.named_modules()
            if m.__dict__.get("weight_function") or m.__dict__.get("bias_function")]


def _lora_step(pack, model, ctx):
    """Forward + backward of one LoRA step: (denoised output, {name: up grad}, the denoiser's patcher model)."""
    den = pack.nodes.comfy_denoiser.ComfyDenoiser(model)
    try:
        lora = pack.mace_ops.lora.KVLora.for_weights(den.kv_weights(), rank=1, seed=0)
        for name in lora.names:
            with torch.no_grad():
                lora.up[name].normal_(0, 0.01, generator=torch.Generator().manual_seed(7))
        x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([300])
        probes = []
        with torch.inference_mode(False), torch.enable_grad():
            x_t = den.add_noise(x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)), t)
            out = den.forward_with_attention(x_t, t, ctx.clone(), probes.append, lora.weight_transform)
            torch.stack([p.probs[..., 4].sum() for p in probes]).sum().backward()
        grads = {n: lora.up[n].grad.clone() for n in lora.names if lora.up[n].grad is not None}
        inner = den.patcher.model
        assert _wrapped(inner)  # the wrappers are on the module the forward ran through
        return out.detach(), grads, inner
    finally:
        den.release()


def test_lora_training_through_a_dynamic_model_matches_the_legacy_one(env):
    pack, path, model, clip = env
    with torch.inference_mode():
        ctx = pack.nodes.comfy_text_encoder.ComfyTextEncoder(clip).encode(["a photo of a ship"])[0].features[None]
    dynamic = _fake_dynamic(model, lambda: _load(path)[0])
    want_out, want_grads, legacy_inner = _lora_step(pack, model, ctx)
    got_out, got_grads, inner = _lora_step(pack, dynamic, ctx)
    assert inner is not dynamic.model and inner is not legacy_inner  # a private copy, not the dynamic module
    assert not _wrapped(dynamic.model) and not _wrapped(model.model)
    assert torch.allclose(got_out, want_out, atol=1e-5)
    assert got_grads.keys() == want_grads.keys() and want_grads
    for name, g in want_grads.items():
        assert torch.allclose(got_grads[name], g, rtol=1e-4, atol=1e-7), name


def test_embedding_gradients_through_a_dynamic_clip_match_the_legacy_one(env):
    pack, path, _model, clip = env
    templates = ("a painting by {}", "{}, oil on canvas")

    def grads(c):
        enc = pack.nodes.comfy_text_encoder.ComfyTextEncoder(c)
        v = enc.word_embeddings("claude monet").clone().requires_grad_(True)
        with torch.inference_mode(False), torch.enable_grad():
            feats = torch.stack([e.features for e in enc.encode_embeddings(templates, v)])
            (g,) = torch.autograd.grad(feats.pow(2).sum(), [v])
        return feats.detach(), g

    dynamic = _dynamic_clip(clip, lambda: _load(path)[1])
    want_f, want_g = grads(clip)
    got_f, got_g = grads(dynamic)
    assert torch.allclose(got_f, want_f, atol=1e-5) and torch.allclose(got_g, want_g, rtol=1e-4, atol=1e-6)
    assert not _wrapped(dynamic.cond_stage_model)
    with torch.inference_mode():  # encoding without gradients keeps using the dynamic CLIP itself
        enc = pack.nodes.comfy_text_encoder.ComfyTextEncoder(dynamic)
        assert enc._static is None and enc.encode(["a ship"]) and enc._static is None


def test_a_dynamic_model_without_a_loader_factory_is_refused_by_name(env):
    pack, _path, model, clip = env
    compat = pack.nodes.comfy_compat
    with pytest.raises(compat.DynamicVramUnsupported, match="^model: .*--disable-dynamic-vram"):
        pack.nodes.comfy_denoiser.ComfyDenoiser(_fake_dynamic(model, None))
    enc = pack.nodes.comfy_text_encoder.ComfyTextEncoder(_dynamic_clip(clip, None))
    v = enc.word_embeddings("claude monet").clone().requires_grad_(True)
    with torch.inference_mode(False), torch.enable_grad(), \
            pytest.raises(compat.DynamicVramUnsupported, match="^clip: .*cached_patcher_init"):
        enc.encode_embeddings(("a painting by {}",), v)
    assert isinstance(compat.DynamicVramUnsupported("x"), ValueError)  # nodes show it as a plain error


def test_legacy_patchers_are_plain_clones(env):
    pack, _path, model, clip = env
    compat = pack.nodes.comfy_compat
    assert not compat.is_dynamic(model) and not compat.is_dynamic(object())
    out = compat.static_patcher(model)
    assert out is not model and out.model is model.model
    assert compat.static_clip(clip) is clip
