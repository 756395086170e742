"""Fast tests of the toy text-to-image world (toyworld/v1): vocabulary and token layout,
renderer and hue rule, model shapes, adapters vs. the mace_ops protocols, K/V weight
substitution, and deterministic DDIM sampling. Tests that need the trained weights skip when
toyworld/v1/weights/ lacks them."""
from __future__ import annotations

import pytest
import torch

from mace_ops.interfaces import AttentionProbe, CrossAttentionDenoiser, TextEncoder
from toyworld.v1 import checkpoint, data, diffusion, evaluate, scorer, templates, vocab
from toyworld.v1.adapters import ToyDenoiser, ToyTextEncoder, toy_kv_weights
from toyworld.v1.model import T2I, kv_weight_names

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model() -> T2I:
    torch.manual_seed(0)
    return T2I().eval().requires_grad_(False)


# ----------------------------------------------------------------------------- vocabulary
def test_vocab_layout_and_synonyms():
    assert vocab.VOCAB_SIZE == 44
    assert vocab.SYNONYMS["red"] == ("crimson", "scarlet")
    assert vocab.SYNONYMS["pink"] == ("magenta", "rose")
    assert len(set(vocab.TOKENS)) == len(vocab.TOKENS)
    ids, n = vocab.encode_ids("a red circle in plain style")
    assert len(ids) == vocab.CONTEXT_LENGTH == 16 and n == 8
    assert ids[0] == vocab.SOS_ID and ids[n - 1] == vocab.EOT_ID
    assert all(i == vocab.EOT_ID for i in ids[n:])  # SD1-style: padded with <eot> copies
    assert vocab.encode_ids("")[1] == 2


def test_unknown_word_raises_naming_word():
    with pytest.raises(ValueError, match="banana"):
        vocab.tokenize("a banana circle")
    with pytest.raises(ValueError, match="<eot>"):
        vocab.tokenize("a <eot>")


def test_every_template_prompt_fits():
    for p in templates.preserve_prompts([]) + list(templates.GENERIC_PRESERVE_PROMPTS):
        vocab.encode_ids(p)
    assert len(templates.ERASE_TEMPLATES) == 48
    assert templates.erase_prompts("red")[0] == "a red circle in plain style"
    assert "red" not in templates.preserve_words(["crimson"])


# ----------------------------------------------------------------------------- data
def test_renderer_and_hue_rule_ground_truth():
    gen = torch.Generator().manual_seed(5)
    batch = data.sample_batch(512, gen)
    assert batch.images.shape == (512, 3, 32, 32)
    assert batch.images.min() >= -1 and batch.images.max() <= 1
    assert (scorer.hue_colors(batch.images) == batch.colors).float().mean().item() == 1.0
    # backgrounds are achromatic: no saturated pixels without a shape
    bg = data.backgrounds(torch.arange(4).repeat(8), gen) * 2 - 1
    grey = bg.unsqueeze(1).expand(-1, 3, -1, -1)
    assert (scorer.hue_colors(grey) == scorer.NONE).all()
    n_empty = sum(c == "" for c in batch.captions)
    assert 20 <= n_empty <= 90  # ~10% caption dropout
    assert any(" any " in f" {c} " for c in batch.captions)


# ----------------------------------------------------------------------------- text encoder
def test_text_encoder_protocol_and_pad_alignment(model):
    te = ToyTextEncoder(model)
    assert isinstance(te, TextEncoder)
    assert te.end_id == vocab.EOT_ID
    a, b, c = te.encode(["a red circle in plain style", "a any circle in plain style", "a red circle"])
    assert a.features.shape == (16, 64) and a.length == b.length == 8 and c.length == 5
    assert a.ids[a.length:] == (te.end_id,) * (16 - a.length)
    # causal mask: the shared prefix "<sos> a" is identical, later tokens (pads too) carry the colour
    assert torch.allclose(a.features[:2], b.features[:2], atol=1e-6)
    assert not torch.allclose(a.features[a.length:], b.features[b.length:], atol=1e-4)
    assert torch.allclose(a.features[:4], c.features[:4], atol=1e-6)
    with pytest.raises(ValueError, match="banana"):
        te.tokenize("banana")


# ----------------------------------------------------------------------------- denoiser
def test_denoiser_protocol_kv_weights_and_attention(model):
    den = ToyDenoiser(model)
    assert isinstance(den, CrossAttentionDenoiser)
    kv = den.kv_weights()
    assert len(kv) == 14 and list(kv) == kv_weight_names(model)
    sd = model.state_dict()
    for name, w in kv.items():
        assert w.shape == (64, 64) and torch.equal(sd[name], w)
    assert "unet.down.1.xattn.to_k.weight" in kv
    ctx = ToyTextEncoder(model).context(["a red circle", ""])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    probes: list[AttentionProbe] = []
    out = den.forward_with_attention(x, torch.tensor([100, 900]), ctx, probes.append)
    assert out.shape == x.shape and len(probes) == 7
    for p in probes:
        assert p.probs.shape == (2, 4, p.height * p.width, 16)
        assert torch.allclose(p.probs.sum(-1), torch.ones(()), atol=1e-5)
    noisy = den.add_noise(x, torch.zeros_like(x), torch.tensor([0, 999]))
    assert torch.allclose(noisy[0], x[0] * diffusion.ALPHA_BAR[0].sqrt())


def test_weight_transform_changes_output_and_keeps_autograd(model):
    den = ToyDenoiser(model)
    ctx = ToyTextEncoder(model).context(["a blue square in striped style"])
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500])
    base = den.forward_with_attention(x, t, ctx, lambda p: None)
    same = den.forward_with_attention(x, t, ctx, lambda p: None, weight_transform=lambda n, w: w)
    assert torch.allclose(base, same)
    delta = torch.zeros(64, 64, requires_grad=True)
    bump = torch.randn(64, 64, generator=torch.Generator().manual_seed(2))
    seen = []

    def transform(name, w):
        seen.append(name)
        return w + delta + (bump if name.endswith("to_v.weight") else 0.0)

    out = den.forward_with_attention(x, t, ctx, lambda p: None, weight_transform=transform)
    assert sorted(seen) == sorted(kv_weight_names(model))
    assert not torch.allclose(base, out, atol=1e-4)
    out.pow(2).mean().backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- sampling
def test_ddim_sampling_deterministic_and_kv_override(model):
    prompts = ["a red circle in plain style", "a navy cross in dotted style"]
    a = diffusion.sample(model, prompts, steps=3, cfg=7.0, seed=11)
    b = diffusion.sample(model, prompts, steps=3, cfg=7.0, seed=11, batch_size=1)
    c = diffusion.sample(model, prompts, steps=3, cfg=7.0, seed=12)
    assert a.shape == (2, 3, 32, 32)
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, c)
    before = toy_kv_weights(model)
    edited = {k: v * 0.0 for k, v in before.items()}
    d = diffusion.sample(model, prompts, steps=3, cfg=7.0, seed=11, kv_weights=edited)
    assert not torch.allclose(a, d)
    for k, v in toy_kv_weights(model).items():  # base model not mutated
        assert torch.equal(v, before[k])


def test_metrics_helpers(tmp_path):
    assert evaluate.harmonic_h(1.0, 0.0, 1.0) == 0.0
    assert evaluate.harmonic_h(0.0, 0.0, 0.0) == 0.0
    assert evaluate.harmonic_h(0.0, 0.0, 1.0) == pytest.approx(1.0)
    assert evaluate.harmonic_h(0.5, 0.5, 0.5) == pytest.approx(0.5)
    ps = evaluate.prompt_set(["red", "crimson"], 4, seed=3)
    assert len(ps.prompts) == 8 and (ps.colors == 0).all()
    assert ps.prompts == evaluate.prompt_set(["red", "crimson"], 4, seed=3).prompts
    with pytest.raises(FileNotFoundError, match="toyworld.safetensors"):
        evaluate.load_toyworld(tmp_path)
    sd = {"w": torch.randn(3, 3), "i": torch.arange(3)}
    checkpoint.save_state_dict(sd, tmp_path / "x.safetensors", {"seed": 1})
    back, meta = checkpoint.load_state_dict(tmp_path / "x.safetensors")
    assert back["w"].dtype == torch.float32 and meta["seed"] == "1"
    assert torch.allclose(back["w"], sd["w"], atol=1e-2) and torch.equal(back["i"], sd["i"])


# ----------------------------------------------------------------------------- trained weights
def _world():
    gen_file = checkpoint.WEIGHTS_DIR / checkpoint.GENERATOR_FILE
    probe_file = checkpoint.WEIGHTS_DIR / checkpoint.PROBE_FILE
    if not (gen_file.is_file() and probe_file.is_file()):
        pytest.skip(f"trained toy-world weights absent ({gen_file}); run scripts/train_toyworld.py")
    return evaluate.load_toyworld()


def test_trained_world_loads_and_follows_colour_prompts():
    world = _world()
    assert world.metadata.get("data_version") == data.DATA_VERSION
    assert all(p.dtype == torch.float32 for p in world.model.parameters())
    ps = evaluate.prompt_set(["red", "green", "blue", "teal"], 4, seed=0)
    sc = evaluate.score_prompt_set(world.model, ps, world.probe, steps=10, cfg=7.0)
    assert sc.n == 16 and sc.color_acc >= 0.75


def test_trained_probe_ground_truth_accuracy():
    world = _world()
    acc = scorer.probe_accuracy(world.probe, n=256)
    assert acc["color"] >= 0.97 and acc["shape"] >= 0.97 and acc["style"] >= 0.97
