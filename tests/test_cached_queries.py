"""Cached-query LoRA training on the fake denoiser and the toy UNet: the recorded queries reproduce
the denoiser's own attention, the first step matches the full path, only K trains, the concept
loses attention, and the settings are validated."""
import dataclasses

import pytest
import torch

from fake_denoiser import FakeDenoiser, concept_mass, fake_latents_and_masks
from fakes import FakeTextEncoder
from mace_ops.cached_queries import record_queries
from mace_ops.concepts import Concept
from mace_ops.lora import KVLora
from mace_ops.lora_train import LoraTrainConfig, train_concept_lora
from mace_ops.templates import OBJECT_TEMPLATES

torch.set_num_threads(1)
ENC, DEN = FakeTextEncoder(), FakeDenoiser()
LATENTS, MASKS = fake_latents_and_masks()
SHIP = Concept(("ship",), line=1)
CACHED = LoraTrainConfig(steps=60, lr=1e-2, seed=0, path="cached_queries")


def _context(n):
    return torch.stack([e.features for e in ENC.encode([OBJECT_TEMPLATES[i].format("ship") for i in range(n)])])


@pytest.mark.parametrize("transform", [False, True])
def test_recorded_queries_reproduce_the_attention(transform):
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t, ctx = torch.tensor([100, 400, 800]), _context(3)
    weights = DEN.kv_weights()
    lora = KVLora.for_weights(weights, rank=1, seed=3)
    with torch.no_grad():
        for name in lora.names:
            lora.up[name].normal_()
    wt = lora.weight_transform if transform else None
    probes = []
    with torch.no_grad():
        DEN.forward_with_attention(x, t, ctx, probes.append)
        cache = record_queries(DEN, x, t, ctx, weights)
        again = cache.probes(torch.arange(3), ctx, weights, wt)
    assert [p.layer for p in again] == [p.layer for p in probes]
    if not transform:  # the LoRA off: exactly the denoiser's own probabilities
        for a, b in zip(again, probes):
            torch.testing.assert_close(a.probs, b.probs, atol=1e-6, rtol=1e-5)
    else:  # the first layer's queries do not depend on K/V: its LoRA'd attention is exact too
        probes = []
        with torch.no_grad():
            DEN.forward_with_attention(x, t, ctx, probes.append, wt)
        torch.testing.assert_close(again[0].probs, probes[0].probs, atol=1e-6, rtol=1e-5)
        assert not torch.allclose(again[-1].probs, probes[-1].probs, atol=1e-4)  # later layers: an approximation


def test_first_step_matches_full_path_and_only_k_trains():
    full = train_concept_lora(DEN, ENC, SHIP, OBJECT_TEMPLATES, LATENTS, MASKS,
                              dataclasses.replace(CACHED, path="full", steps=3))
    cached = train_concept_lora(DEN, ENC, SHIP, OBJECT_TEMPLATES, LATENTS, MASKS, CACHED)
    assert cached.losses[0] == pytest.approx(full.losses[0], rel=1e-5)
    assert cached.losses[-1] < 0.7 * cached.losses[0]
    for name in cached.lora.names:
        delta = cached.lora.delta(name).detach()
        if ".to_v." in name:
            assert torch.count_nonzero(delta) == 0
        else:
            assert delta.abs().max() > 0
    assert cached.info()["settings"]["path"] == "cached_queries"
    before = concept_mass(DEN, ENC, "ship", None, True, LATENTS, MASKS)
    after = concept_mass(DEN, ENC, "ship", cached.lora.weight_transform, True, LATENTS, MASKS)
    assert after < 0.6 * before  # checked with the full denoiser, not the cached queries


def test_pool_size_and_determinism():
    five = dataclasses.replace(CACHED, query_samples=5)
    a = train_concept_lora(DEN, ENC, SHIP, OBJECT_TEMPLATES, LATENTS, MASKS, five)
    b = train_concept_lora(DEN, ENC, SHIP, OBJECT_TEMPLATES, LATENTS, MASKS, five)
    c = train_concept_lora(DEN, ENC, SHIP, OBJECT_TEMPLATES, LATENTS, MASKS, CACHED)
    assert a.losses == b.losses
    assert a.losses[5] == pytest.approx(a.losses[0], rel=0.5)  # sample 0 again, after 5 steps of training
    assert a.losses != c.losses


def test_settings_and_errors():
    full = LoraTrainConfig(path="full")
    assert "path" not in full.settings() and "query_samples" not in full.settings()  # older resume keys hold
    assert CACHED.settings()["path"] == "cached_queries"
    with pytest.raises(ValueError, match="path: unknown 'fast'"):
        LoraTrainConfig(path="fast").validate()
    with pytest.raises(ValueError, match="needs path 'full'"):
        LoraTrainConfig(path="cached_queries", objective="trajectory").validate()
    with pytest.raises(ValueError, match="query samples"):
        LoraTrainConfig(query_samples=-1).validate()

    class NoQueries(FakeDenoiser):
        def forward_with_attention(self, x_t, t, context, on_attention, weight_transform=None):
            def strip(p):
                on_attention(dataclasses.replace(p, query=None))
            return super().forward_with_attention(x_t, t, context, strip, weight_transform)

    with pytest.raises(ValueError, match="train with path 'full'"):
        train_concept_lora(NoQueries(), ENC, SHIP, OBJECT_TEMPLATES, LATENTS, MASKS, CACHED)


def test_toy_unet_reports_queries():
    from toyworld.v1.adapters import ToyDenoiser, ToyTextEncoder
    from toyworld.v1.model import T2I

    torch.manual_seed(0)
    model = T2I().eval().requires_grad_(False)
    den, enc = ToyDenoiser(model), ToyTextEncoder(model)
    x = torch.randn(2, 3, 32, 32)
    t, ctx = torch.tensor([100, 600]), enc.context(["a red circle", "a blue square"])
    probes = []
    with torch.no_grad():
        den.forward_with_attention(x, t, ctx, probes.append)
        again = record_queries(den, x, t, ctx, den.kv_weights()).probes(torch.arange(2), ctx, den.kv_weights())
    assert len(again) == len(probes) == 7
    for a, b in zip(again, probes):
        torch.testing.assert_close(a.probs, b.probs, atol=1e-5, rtol=1e-4)


def test_batched_concepts_equal_sequential():
    from mace_ops.lora_train import LoraJob, train_concept_loras
    from mace_ops.pipeline import OverrideDenoiser

    g = torch.Generator().manual_seed(4)
    base = DEN.kv_weights()
    concepts = [Concept((w,), line=i + 1) for i, w in enumerate(("ship", "car", "horse"))]
    jobs = []
    for i, c in enumerate(concepts):  # each concept its own weights (its own CFR), images and masks
        own = {k: w + 0.05 * torch.randn(w.shape, generator=g) for k, w in base.items()}
        lat, m = fake_latents_and_masks(seed=10 + i)
        jobs.append(LoraJob(OverrideDenoiser(DEN, own), c, lat, m))
    P = torch.eye(32) + 0.1
    config = dataclasses.replace(CACHED, steps=12, query_samples=6, preserve=0.5, grad_clip=0.05)
    together = train_concept_loras(jobs, ENC, OBJECT_TEMPLATES, config, preserve_moment=P)
    for job, got in zip(jobs, together):
        alone = train_concept_lora(job.denoiser, ENC, job.concept, OBJECT_TEMPLATES, job.latents, job.masks, config,
                                   preserve_moment=P)
        assert got.losses == pytest.approx(alone.losses, rel=1e-4, abs=1e-6)
        assert got.losses[-1] < got.losses[0]
        for name in alone.lora.names:
            torch.testing.assert_close(got.lora.delta(name), alone.lora.delta(name), atol=1e-6, rtol=1e-4)
    assert not torch.allclose(together[0].lora.delta(together[0].lora.names[0]),
                              together[1].lora.delta(together[1].lora.names[0]))


def test_one_concept_path_equals_a_plain_reference_loop():
    """C = 1 of the batched code against a plain loop: QueryCache.probes + attention_loss +
    preservation_loss + clip_grad_norm_ + AdamW on one KVLora's K factors."""
    from mace_ops.attention_loss import attention_loss
    from mace_ops.lora_train import LoraJob, _Run, preservation_loss

    P = torch.eye(32) + 0.1
    config = dataclasses.replace(CACHED, steps=8, query_samples=5, preserve=0.5, grad_clip=0.05)
    got = train_concept_lora(DEN, ENC, SHIP, OBJECT_TEMPLATES, LATENTS, MASKS, config, preserve_moment=P)
    run = _Run(LoraJob(DEN, SHIP, LATENTS, MASKS), ENC, OBJECT_TEMPLATES, config, P)
    pi, li, x_t, t = (torch.cat(z) for z in zip(*[run.draw() for _ in range(5)]))
    cache = record_queries(DEN, x_t, t, run.prompts.contexts[pi], run.weights)
    lora = run.lora
    params = [p for k in lora.names if ".to_k." in k for p in (lora.down[k], lora.up[k])]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    losses = []
    for step in range(config.steps):
        idx = torch.tensor([step % 5])
        probes = cache.probes(idx, run.prompts.contexts[pi[idx]], run.weights, lora.weight_transform)
        loss = attention_loss(probes, run.prompts.positions[pi[idx]], MASKS[li[idx]])
        loss = loss + config.preserve * preservation_loss(lora, run.weights, P)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
    assert got.losses == pytest.approx(losses, rel=1e-4, abs=1e-6)
    for name in lora.names:
        torch.testing.assert_close(got.lora.delta(name), lora.delta(name).detach(), atol=1e-6, rtol=1e-4)
