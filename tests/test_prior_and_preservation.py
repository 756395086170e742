"""Issue 16 building blocks: the general caption prior, the LoRA preservation term, the ANT-style
trajectory objective and fusion restricted to the concept's positions (fake models, fast)."""
import dataclasses

import pytest
import torch

from fake_denoiser import FakeDenoiser, fake_latents_and_masks
from fakes import FakeTextEncoder, fake_kv_weights
from mace_ops.cfr import refine_cross_attention
from mace_ops.concepts import Concept
from mace_ops.covariance import PairStats
from mace_ops.fusion import concept_covariance, fuse_loras
from mace_ops.lora import KVLora
from mace_ops.lora_train import LoraTrainConfig, _trajectory_loss, preservation_loss, train_concept_lora
from mace_ops.prior import PriorCache, add_prior, encoder_fingerprint, general_captions, prior_moment
from mace_ops.templates import OBJECT_TEMPLATES

torch.set_num_threads(1)
ENC = FakeTextEncoder()
SHIP = Concept(("ship",), line=1)
LATENTS, _ = fake_latents_and_masks()
KEEP = [t.replace("{}", w) for w in ("car", "dog") for t in OBJECT_TEMPLATES[:6]]
FAST = LoraTrainConfig(steps=40, lr=1e-2, seed=0, use_masks=False)


class WordEncoder(FakeTextEncoder):
    """The fake encoder with every word of the general captions in its vocabulary."""

    def tokenize(self, text):
        ids = []
        for w in text.split():
            if w not in self.vocab:
                self.vocab[w] = len(self.vocab)
                g = torch.Generator().manual_seed(len(self.vocab))
                self.embed = torch.cat([self.embed, torch.randn(1, self.dim, generator=g, dtype=torch.float64)])
            ids.append(self.vocab[w])
        return ids


def test_general_captions_are_deterministic_distinct_and_sized():
    a, b = general_captions(300, seed=1), general_captions(300, seed=1)
    assert a == b and len(set(a)) == 300
    assert general_captions(300, seed=2) != a
    with pytest.raises(ValueError, match="prior captions"):
        general_captions(0)


def test_add_prior_weighs_it_relative_to_the_preserve_list():
    enc = WordEncoder()
    M, n = prior_moment(enc, general_captions(50))
    assert M.shape == (32, 32) and n == 50 * enc.window and torch.allclose(M, M.T)
    stats = PairStats(32)
    stats.add_preserve(torch.randn(10, 32))
    P0 = stats.P.clone()
    add_prior(stats, M, 2.0)
    assert stats.n_preserve == 10
    assert torch.allclose(stats.P, P0 + 2.0 * 10 * M)
    empty = add_prior(PairStats(32), M, 0.5)  # no preserve list: the prior alone, weight 0.5 of one "list"
    assert empty.n_preserve == 1 and torch.allclose(empty.P, 0.5 * M)
    with pytest.raises(ValueError, match="prior_weight"):
        add_prior(PairStats(32), M, -1.0)


def test_prior_pulls_cfr_towards_the_original_on_prior_text():
    enc = WordEncoder()
    weights = fake_kv_weights()
    caps = general_captions(40)
    M, _ = prior_moment(enc, caps)
    feats = torch.cat([e.features for e in enc.encode(caps)]).double()

    def change(prior):
        out = refine_cross_attention(enc, weights, [SHIP], OBJECT_TEMPLATES, "boat", KEEP, prior=prior)
        return sum(float(((out.weights[k].double() - weights[k].double()) @ feats.T).norm()) for k in weights)

    assert change((M, 10.0)) < 0.5 * change(None)


def test_prior_cache_is_per_encoder_and_on_disk(tmp_path):
    a, b = WordEncoder(seed=0), WordEncoder(seed=1)
    caps = general_captions(20)
    cache = PriorCache(str(tmp_path))
    Ma = cache.moment(a, caps)
    assert len(list(tmp_path.glob("prior-*.safetensors"))) == 1
    assert encoder_fingerprint(a, caps[:2]) != encoder_fingerprint(b, caps[:2])
    assert not torch.allclose(cache.moment(b, caps), Ma)
    fresh = PriorCache(str(tmp_path))  # a new process: read back, not recomputed
    fresh_moment = fresh.moment(a, caps, on_batch=lambda: (_ for _ in ()).throw(AssertionError("recomputed")))
    assert torch.equal(fresh_moment, Ma)


def test_caption_encodings_are_cached_per_encoder_as_float16(tmp_path):
    a, b = WordEncoder(seed=0), WordEncoder(seed=1)
    caps = general_captions(12)
    cache = PriorCache(str(tmp_path), max_encodings=1)
    first = cache.encode(a, caps, batch=5)
    ref = a.encode(caps)
    assert [e.ids for e in first] == [e.ids for e in ref] and [e.length for e in first] == [e.length for e in ref]
    for e, r in zip(first, ref):
        assert e.features.dtype == torch.float32 and torch.equal(e.features, r.features.half().float())
    assert len(list(tmp_path.glob("captions-*.safetensors"))) == 1
    assert not torch.equal(cache.encode(b, caps)[0].features, first[0].features)  # per encoder (a evicted)
    fresh = PriorCache(str(tmp_path))  # a new process: read back, not re-encoded
    again = fresh.encode(a, caps, on_batch=lambda: (_ for _ in ()).throw(AssertionError("re-encoded")))
    assert all(torch.equal(x.features, y.features) for x, y in zip(again, first))
    assert torch.equal(PriorCache(str(tmp_path)).moment(a, caps), cache.moment(a, caps))  # the moment file too


def test_encoding_the_captions_keeps_their_moment(tmp_path):
    """ACE's caption encodings also give CFR's prior moment, equal to computing it, so a later CFR run
    does not encode the captions again; encoded in other batches than the moment's, none is kept."""
    a = WordEncoder(seed=0)
    caps = general_captions(70)  # two batches of 64
    cache = PriorCache(str(tmp_path))
    cache.encode(a, caps)
    kept = cache.moment(a, caps, on_batch=lambda: (_ for _ in ()).throw(AssertionError("re-encoded")))
    assert torch.equal(kept, prior_moment(a, caps)[0])
    assert len(list(tmp_path.glob("prior-*.safetensors"))) == 1
    other = PriorCache(str(tmp_path / "other"))
    other.encode(a, caps, batch=5)
    assert not list((tmp_path / "other").glob("prior-*.safetensors")) and not other.memory
    unkept = PriorCache(str(tmp_path / "unkept"))          # e.g. a text gate's residuals: no CFR prior
    unkept.encode(a, caps, keep_moment=False)
    assert not list((tmp_path / "unkept").glob("prior-*.safetensors")) and not unkept.memory
    assert list((tmp_path / "unkept").glob("captions-*.safetensors"))


def _train(config, den, moment=None):
    return train_concept_lora(den, ENC, SHIP, OBJECT_TEMPLATES, LATENTS, None, config, preserve_moment=moment)


def test_lora_preservation_term_keeps_preserved_text():
    den = FakeDenoiser()
    weights = den.kv_weights()
    keep = torch.cat([e.features for e in ENC.encode(KEEP)]).double()
    P = (keep.T @ keep / keep.shape[0]).float()
    plain = _train(FAST, den)
    kept = _train(dataclasses.replace(FAST, preserve=100.0), den, P)
    with torch.no_grad():
        assert float(preservation_loss(kept.lora, weights, P)) < 0.5 * float(preservation_loss(plain.lora, weights, P))
    assert kept.losses[-1] < kept.losses[0]  # it still trains
    with pytest.raises(ValueError, match="preserve"):
        _train(dataclasses.replace(FAST, preserve=1.0), den, None)


def test_trajectory_objective_learns_the_reversed_guidance_target():
    den = FakeDenoiser()
    cfg = dataclasses.replace(FAST, objective="trajectory", steps=60)
    out = _train(cfg, den)
    g = torch.Generator().manual_seed(9)
    x_t = den.add_noise(LATENTS, torch.randn(LATENTS.shape, generator=g), torch.full((4,), 200))
    ctx = torch.stack([e.features for e in ENC.encode(["a photo of ship"] * 4)])
    uncond = ENC.encode([""])[0].features
    t = torch.tensor([200, 300, 700, 900])  # two reversed-guidance steps, two kept ones
    untrained = KVLora({k: tuple(w.shape) for k, w in den.kv_weights().items()}, 1)
    with torch.no_grad():
        before = float(_trajectory_loss(den, untrained.weight_transform, x_t, t, ctx, uncond, cfg))
        after = float(_trajectory_loss(den, out.lora.weight_transform, x_t, t, ctx, uncond, cfg))
    assert after < 0.8 * before
    with pytest.raises(ValueError, match="objective"):
        _train(dataclasses.replace(FAST, objective="nonsense"), den)


def test_fusion_concept_positions_drop_the_words_before_the_concept():
    templates = ["a photo of {}", "{} on the street"]
    C_all, n_all = concept_covariance(ENC, SHIP, templates)
    C_pos, n_pos = concept_covariance(ENC, SHIP, templates, positions="concept")
    assert n_pos == n_all - 5  # "<sos> a photo of" and the second prompt's "<sos>" are left out
    encs = ENC.encode(["a photo of ship", "ship on the street"])
    manual = encs[0].features[4:].double().T @ encs[0].features[4:].double()
    manual += encs[1].features[1:].double().T @ encs[1].features[1:].double()
    assert torch.allclose(C_pos, manual)
    with pytest.raises(ValueError, match="positions"):
        concept_covariance(ENC, SHIP, templates, positions="some")
    # fusion with one full-rank LoRA still reproduces it exactly on the concept's positions
    weights = fake_kv_weights()
    delta = {k: 0.1 * torch.randn(w.shape, generator=torch.Generator().manual_seed(3)) for k, w in weights.items()}
    fused = fuse_loras(ENC, weights, weights, [(SHIP, delta)], templates, (), 1e-6, 0.0, positions="concept")
    f = encs[0].features[4:]
    for k in weights:
        assert torch.allclose(fused.weights[k] @ f.T, (weights[k] + delta[k]) @ f.T, atol=1e-3)


def test_prior_cache_survives_an_unwritable_folder(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    cache = PriorCache(str(blocker / "sub"))  # makedirs fails: the moment is still returned
    M = cache.moment(WordEncoder(), general_captions(10))
    assert M.shape == (32, 32) and blocker.read_text() == "x"
