"""Integration: continuous-embedding encoding through ComfyUI's CLIP (``ComfyTextEncoder`` as an
``EmbeddingTextEncoder``) and the soft-prompt attack through ComfyUI's model.

Tiny random-weight checkpoints, loaded under ``torch.inference_mode()`` as the executor loads them
(their weights are then inference tensors, which autograd cannot save). What must hold:

* a template encoded with the phrase's own token embeddings in its slot gives the features
  ``encode`` gives for the filled prompt (same ids elsewhere, ``SOFT_TOKEN_ID`` in the slot), on
  SD1 (CLIP-L), SD2 (OpenCLIP-H) and SDXL (CLIP-L + bigG concatenated), at the default layer and
  with a clip skip;
* the gradient of the features w.r.t. the embeddings is finite and non-zero, the CLIP's weights get
  none, and the shared modules are left as they were;
* ``mace_ops.attacks.soft_prompt_attack`` runs end to end through ``ComfyDenoiser`` (eps output):
  finite losses, the embeddings move. (Random weights: no claim that anything is recovered.)
"""
from __future__ import annotations

import math

import pytest
import torch

import comfy_harness as ch

pytestmark = pytest.mark.integration

TEMPLATES = ("a painting by {}", "{}, oil on canvas", "a photo of {} at night")
WORD = "van gogh"


def _load(path, clip_layers=None):
    with torch.inference_mode():
        return ch.load_tiny_checkpoint(path, clip_layers=clip_layers)


@pytest.fixture(scope="module")
def sd15(comfy, tiny_ckpt):
    comfy.require_pack()
    return _load(tiny_ckpt, clip_layers=3)


@pytest.fixture(scope="module")
def sd2(comfy, tiny_sd2_ckpt):
    comfy.require_pack()
    return _load(tiny_sd2_ckpt)


@pytest.fixture(scope="module")
def sdxl(comfy, tiny_sdxl_ckpt):
    comfy.require_pack()
    return _load(tiny_sdxl_ckpt)


def _encoder(comfy, clip, skip):
    clip = clip.clone()
    if skip is not None:
        clip.clip_layer(skip)
    return comfy.pack_module.nodes.comfy_text_encoder.ComfyTextEncoder(clip)


@pytest.mark.parametrize("family,skip,width", [("sd15", None, 768), ("sd15", -2, 768), ("sd2", -2, 1024),
                                               ("sdxl", None, 2048), ("sdxl", -1, 2048)])
def test_own_embeddings_give_the_prompt_features(comfy, request, family, skip, width):
    pack = comfy.pack_module
    fill, soft = pack.mace_ops.templates.fill, pack.mace_ops.interfaces.SOFT_TOKEN_ID
    _model, clip, _vae = request.getfixturevalue(family)
    enc = _encoder(comfy, clip, skip)
    assert isinstance(enc, pack.mace_ops.interfaces.EmbeddingTextEncoder)
    words = enc.word_embeddings(WORD)
    assert words.shape == (len(enc.tokenize(WORD)), width) and not words.requires_grad
    with torch.inference_mode():
        ref = enc.encode([fill(t, WORD) for t in TEMPLATES])
        other_layer = _encoder(comfy, clip, -3 if skip in (None, -2) else -2).encode([fill(TEMPLATES[0], WORD)])
    got = enc.encode_embeddings(TEMPLATES, words)
    for r, g in zip(ref, got):
        assert g.features.shape == r.features.shape == (77, width)
        assert torch.allclose(g.features, r.features, atol=1e-5, rtol=1e-5), float((g.features - r.features).abs().max())
        assert g.length == r.length
        slot = [i for i, x in enumerate(g.ids) if x == soft]
        assert len(slot) == words.shape[0]
        assert [x for i, x in enumerate(g.ids) if i not in slot] == [x for i, x in enumerate(r.ids) if i not in slot]
    # the clip-skip setting is honoured (another layer gives other features)
    assert not torch.allclose(other_layer[0].features, ref[0].features, atol=1e-3)


def test_gradient_reaches_the_embeddings_only(comfy, sd15):
    _model, clip, _vae = sd15
    enc = _encoder(comfy, clip, -2)
    modules = list(clip.cond_stage_model.modules())
    before = [(m.__dict__.get("weight_function"), m.__dict__.get("bias_function"), len(m._forward_pre_hooks))
              for m in modules]
    v = enc.word_embeddings("claude monet").clone().requires_grad_(True)
    with torch.inference_mode(False), torch.enable_grad():
        feats = torch.stack([e.features for e in enc.encode_embeddings(TEMPLATES, v)])
        (grad,) = torch.autograd.grad(feats.pow(2).sum(), [v])
    assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0
    assert all(g.abs().sum() > 0 for g in grad)  # every soft token gets a gradient
    assert all(p.grad is None for p in clip.cond_stage_model.parameters())
    after = [(m.__dict__.get("weight_function"), m.__dict__.get("bias_function"), len(m._forward_pre_hooks))
             for m in modules]
    assert after == before  # the scoped hooks and weight copies are gone
    with pytest.raises(ValueError, match="embeddings"):
        enc.encode_embeddings(TEMPLATES, torch.zeros(2, 100))


def test_soft_prompt_attack_runs_through_comfy(comfy, sd15):
    import importlib

    pack = comfy.pack_module
    attacks = importlib.import_module(pack.__name__ + ".mace_ops.attacks")
    model, clip, _vae = sd15
    enc = _encoder(comfy, clip, None)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    denoiser = pack.nodes.comfy_denoiser.ComfyDenoiser(model, backward=True, prediction="eps")
    try:
        config = attacks.SoftPromptConfig(tokens=2, steps=3, lr=0.3, batch_size=2, seed=0)
        start = enc.word_embeddings("art")
        with torch.inference_mode():  # as inside a node
            result = attacks.soft_prompt_attack(enc, denoiser, latents, TEMPLATES, "art", config)
    finally:
        denoiser.release()
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    assert result.embeddings.shape == (2, 768) and torch.isfinite(result.embeddings).all()
    assert not torch.allclose(result.embeddings, start[torch.arange(2) % start.shape[0]])
