"""K/V LoRA and its training on a tiny fake denoiser: identity at init, where gradients go,
loss and attention-mass drop, determinism, interrupts, inference-mode inputs, derived masks."""
import dataclasses
import os

import pytest
import torch

from fake_denoiser import FakeDenoiser, concept_mass, fake_latents_and_masks
from fakes import FakeTextEncoder
from mace_ops.concepts import Concept
from mace_ops.lora import KVLora
from mace_ops.lora_file import save_concept_lora
from mace_ops.lora_train import (
    DEFAULTS_BY_TYPE,
    LoraTrainConfig,
    attention_masks,
    config_for,
    train_concept_lora,
)
from mace_ops.templates import OBJECT_TEMPLATES

torch.set_num_threads(1)
ENC = FakeTextEncoder()
DEN = FakeDenoiser()
LATENTS, MASKS = fake_latents_and_masks()
SHIP = Concept(("ship",), line=1)
FAST = LoraTrainConfig(steps=60, lr=1e-2, seed=0)  # the fake model needs a larger LR than SD


def sd1_shapes():
    """The 16 SD1.x attn2 modules (ComfyUI names) x {to_k, to_v}, all reading width 768."""
    blocks = [(f"input_blocks.{i}.1", c) for i, c in ((1, 320), (2, 320), (4, 640), (5, 640), (7, 1280), (8, 1280))]
    blocks += [(f"output_blocks.{i}.1", c) for i, c in zip(range(3, 12), (1280,) * 3 + (640,) * 3 + (320,) * 3)]
    blocks += [("middle_block.1", 1280)]
    return {
        f"diffusion_model.{b}.transformer_blocks.0.attn2.{kind}.weight": (c, 768)
        for b, c in blocks
        for kind in ("to_k", "to_v")
    }


def attention_mass(concept, transform, include_end, use_mask=True):
    return concept_mass(DEN, ENC, concept, transform, include_end, LATENTS, MASKS if use_mask else None)


@pytest.fixture(scope="module")
def trained():
    return train_concept_lora(DEN, ENC, SHIP, OBJECT_TEMPLATES, LATENTS, MASKS, FAST)


# ---------------------------------------------------------------------------------------------- LoRA


def test_sd1_parameter_count_and_rank():
    lora = KVLora(sd1_shapes(), rank=1)
    assert lora.num_parameters() == 49_536
    assert KVLora(sd1_shapes(), rank=2).num_parameters() == 2 * 49_536
    assert all(p.dtype == torch.float32 and p.requires_grad for p in lora.parameters())
    name = next(iter(lora.shapes))
    with torch.no_grad():
        lora.up[name].normal_()
    assert int(torch.linalg.matrix_rank(lora.delta(name).detach())) == 1


def test_init_is_exact_identity_and_scale():
    lora = KVLora.for_weights(DEN.kv_weights(), rank=2, seed=3)
    assert lora.scale == 1.0 and KVLora.for_weights(DEN.kv_weights(), rank=2, alpha=1.0).scale == 0.5
    ctx = torch.stack([e.features for e in ENC.encode(["a photo of a ship", "a cat"])])
    x, t = LATENTS[:2], torch.tensor([10, 500])
    with torch.no_grad():
        base = DEN.forward_with_attention(x, t, ctx, lambda p: None)
        with_lora = DEN.forward_with_attention(x, t, ctx, lambda p: None, lora.weight_transform)
    assert torch.equal(base, with_lora)
    assert all(float(d.abs().max()) == 0.0 for d in lora.deltas().values())


def test_weight_transform_casts_and_keeps_autograd():
    lora = KVLora({"a.weight": (3, 4)}, rank=1)
    w16 = torch.randn(3, 4).half()
    out = lora.weight_transform("a.weight", w16)
    assert out.dtype == torch.float16
    out.float().sum().backward()
    assert lora.up["a.weight"].grad is not None
    assert lora.weight_transform("other.weight", w16) is w16
    with pytest.raises(ValueError, match="LoRA made for"):
        lora.weight_transform("a.weight", torch.zeros(4, 3))


def test_init_is_seeded_and_order_independent():
    shapes = {"b.weight": (3, 5), "a.weight": (2, 5)}
    one, two = KVLora(shapes, seed=1), KVLora(dict(reversed(shapes.items())), seed=1)
    assert all(torch.equal(one.down[k], two.down[k]) for k in shapes)
    assert not torch.equal(one.down["a.weight"], KVLora(shapes, seed=2).down["a.weight"])
    assert abs(float(KVLora({"x.weight": (1, 20000)}, rank=4).down["x.weight"].detach().std()) - 0.25) < 0.01


# ------------------------------------------------------------------------------------------ training


def test_only_lora_factors_get_gradients():
    before = {k: v.detach().clone() for k, v in DEN.state_dict().items()}
    res = train_concept_lora(DEN, ENC, SHIP, OBJECT_TEMPLATES, LATENTS, MASKS, dataclasses.replace(FAST, steps=3))
    assert all(p.grad is None for p in DEN.parameters())
    assert all(torch.equal(before[k], v) for k, v in DEN.state_dict().items())
    ups = {k: float(u.detach().abs().max()) for k, u in res.lora.up.items()}
    assert all(ups[f"block.{i}.attn2.to_k.weight"] > 0 for i in range(3))
    # V only reaches the loss through later layers' queries: the last layer's to_v gets no gradient
    assert ups["block.0.attn2.to_v.weight"] > 0 and ups["block.1.attn2.to_v.weight"] > 0
    assert ups["block.2.attn2.to_v.weight"] == 0.0


def test_loss_decreases_and_concept_attention_drops(trained):
    losses = trained.losses
    assert len(losses) == FAST.steps
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first  # measured 2.71 -> 0.84
    # concept + end/pad positions inside the mask (what the loss trains): measured 0.662 -> 0.059 (11x)
    full_before = attention_mass("ship", None, True)
    full_after = attention_mass("ship", trained.lora.weight_transform, True)
    assert full_before / full_after > 5
    # the concept token alone: measured 0.0253 -> 0.0042 (6x)
    tok_before = attention_mass("ship", None, False)
    tok_after = attention_mass("ship", trained.lora.weight_transform, False)
    assert tok_before / tok_after > 3
    assert trained.metadata["concept"] == ["ship"] and trained.metadata["settings"]["masks_used"]


def test_deterministic_for_a_seed():
    cfg = dataclasses.replace(FAST, steps=4, batch_size=2)
    a = train_concept_lora(DEN, ENC, SHIP, OBJECT_TEMPLATES, LATENTS, MASKS, cfg)
    b = train_concept_lora(DEN, ENC, SHIP, OBJECT_TEMPLATES, LATENTS, MASKS, cfg)
    c = train_concept_lora(DEN, ENC, SHIP, OBJECT_TEMPLATES, LATENTS, MASKS, dataclasses.replace(cfg, seed=1))
    assert a.losses == b.losses and a.losses != c.losses
    for k in a.lora.up:
        assert torch.equal(a.lora.up[k], b.lora.up[k]) and torch.equal(a.lora.down[k], b.lora.down[k])


class Stop(Exception):
    pass


def test_interrupt_propagates_and_leaves_no_file(tmp_path):
    calls, seen = [], []

    def should_stop():
        calls.append(1)
        if len(calls) == 4:
            raise Stop("user pressed cancel")

    path = str(tmp_path / "ship.safetensors")

    def train_and_save():
        res = train_concept_lora(
            DEN, ENC, SHIP, OBJECT_TEMPLATES, LATENTS, MASKS, FAST, progress=lambda s, n: seen.append((s, n)),
            should_stop=should_stop,
        )
        save_concept_lora(path, res.lora, "fp", res.info())

    with pytest.raises(Stop, match="cancel"):
        train_and_save()
    assert seen == [(1, 60), (2, 60), (3, 60)]
    assert os.listdir(tmp_path) == []
    with pytest.raises(InterruptedError, match="stopped at step 0"):
        train_concept_lora(DEN, ENC, SHIP, OBJECT_TEMPLATES, LATENTS, MASKS, FAST, should_stop=lambda: True)


class InferenceModeEncoder:
    """Encodes under inference_mode, as ComfyUI's CLIP does inside a node."""

    end_id = ENC.end_id

    def tokenize(self, text):
        return ENC.tokenize(text)

    def encode(self, prompts):
        with torch.inference_mode():
            out = ENC.encode(prompts)
        assert out[0].features.is_inference()
        return out


def test_runs_from_inference_mode_inputs():
    """ComfyUI runs nodes under inference_mode: latents, masks and text features are inference tensors."""
    cfg = dataclasses.replace(FAST, steps=2)
    with torch.inference_mode():
        latents, masks = LATENTS.clone(), MASKS.clone()
        res = train_concept_lora(DEN, InferenceModeEncoder(), SHIP, OBJECT_TEMPLATES, latents, masks, cfg)
    ref = train_concept_lora(DEN, ENC, SHIP, OBJECT_TEMPLATES, LATENTS, MASKS, cfg)
    assert res.losses == ref.losses
    assert len(res.losses) == 2 and not any(p.is_inference() for p in res.lora.parameters())
    assert float(res.lora.up["block.0.attn2.to_k.weight"].detach().abs().max()) > 0


def test_masks_optional_and_style_ignores_masks():
    cfg = dataclasses.replace(FAST, steps=2)
    free = train_concept_lora(DEN, ENC, SHIP, OBJECT_TEMPLATES, LATENTS, None, cfg)
    full = train_concept_lora(DEN, ENC, SHIP, OBJECT_TEMPLATES, LATENTS, torch.ones(4, 8, 8), cfg)
    assert free.losses == full.losses and not free.metadata["settings"]["masks_used"]
    style = dataclasses.replace(DEFAULTS_BY_TYPE["style"], steps=2, lr=1e-2, seed=0)
    a = train_concept_lora(DEN, ENC, SHIP, OBJECT_TEMPLATES, LATENTS, MASKS, style)
    b = train_concept_lora(DEN, ENC, SHIP, OBJECT_TEMPLATES, LATENTS, None, style)
    assert a.losses == b.losses


def test_defaults_by_type():
    d = DEFAULTS_BY_TYPE
    assert (d["object"].lr, d["object"].steps, d["object"].sampler) == (1e-5, 50, "cfis")
    assert (d["person"].lr, d["person"].steps, d["person"].sampler) == (1e-4, 50, "cfis")
    assert (d["style"].lr, d["style"].steps, d["style"].use_masks) == (1e-4, 50, False)
    assert (d["nudity"].lr, d["nudity"].steps, d["nudity"].sampler) == (1e-5, 120, "uniform")
    for c in d.values():
        assert c.rank == 1 and c.include_end_tokens and c.weight_decay == 0.01 and c.grad_clip == 1.0
    assert config_for("person", steps=7).steps == 7
    with pytest.raises(ValueError, match="unknown 'animal'"):
        config_for("animal")


def test_input_errors():
    with pytest.raises(ValueError, match="masks must be"):
        train_concept_lora(DEN, ENC, SHIP, OBJECT_TEMPLATES, LATENTS, MASKS[:2], FAST)
    with pytest.raises(ValueError, match="line 1: unknown word 'zeppelin'"):
        train_concept_lora(DEN, ENC, Concept(("zeppelin",), line=1), OBJECT_TEMPLATES, LATENTS, None, FAST)
    with pytest.raises(ValueError, match="LoRA steps: 0 is outside"):
        train_concept_lora(DEN, ENC, SHIP, OBJECT_TEMPLATES, LATENTS, None, dataclasses.replace(FAST, steps=0))
    with pytest.raises(ValueError, match="unknown 'normal'"):
        train_concept_lora(DEN, ENC, SHIP, OBJECT_TEMPLATES, LATENTS, None, dataclasses.replace(FAST, sampler="normal"))


def test_attention_masks_follow_concept_attention():
    m = attention_masks(DEN, ENC, SHIP, OBJECT_TEMPLATES, LATENTS, t=300, threshold=0.5, seed=0, batch_size=3)
    assert m.shape == (4, 8, 8) and m.dtype == torch.float32
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert 0 < float(m.mean()) < 1
    assert torch.equal(m, attention_masks(DEN, ENC, SHIP, OBJECT_TEMPLATES, LATENTS, t=300, seed=0))
    assert float(attention_masks(DEN, ENC, SHIP, OBJECT_TEMPLATES, LATENTS, threshold=-1).min()) == 1.0
