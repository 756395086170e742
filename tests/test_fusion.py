"""Closed-form LoRA fusion: plain merge (inv. 8), normal equations (inv. 1), non-interference
(inv. 9, exact and on trained LoRAs), preservation, streaming memory, order, errors."""
import gc
import weakref
import zlib

import pytest
import torch

from fake_denoiser import FakeDenoiser, concept_mass, fake_latents_and_masks, weights_transform
from fakes import FakeTextEncoder, fake_kv_weights
from mace_ops.concepts import Concept
from mace_ops.covariance import PairStats
from mace_ops.interfaces import EncodedPrompt
from mace_ops.fusion import FusionAccumulator, concept_covariance, fuse_loras, preserve_to_for
from mace_ops.lora import KVLora
from mace_ops.lora_train import LoraTrainConfig, train_concept_lora
from mace_ops.ridge import IllConditionedError
from mace_ops.templates import GENERIC_PRESERVE_PROMPTS, OBJECT_TEMPLATES, fill

torch.set_num_threads(1)


class AffineEncoder:
    """FakeTextEncoder features plus a fixed bias (like a LayerNorm's beta): without it every
    feature is zero-mean, so covariances have rank <= d - 1 and lambda = 0 solves are singular."""

    def __init__(self, enc, seed=0):
        self.enc, self.end_id, self.window = enc, enc.end_id, enc.window
        self.beta = 0.5 * torch.randn(enc.dim, generator=torch.Generator().manual_seed(seed))

    def tokenize(self, text):
        return self.enc.tokenize(text)

    def encode(self, prompts):
        return [EncodedPrompt(e.ids, e.length, e.features + self.beta) for e in self.enc.encode(prompts)]


class RandomVectorEncoder:
    """Independent random features per (prompt, position), the start token shared by all prompts:
    a well-conditioned set of vectors for the exact-fit invariant."""

    end_id = 1

    def __init__(self, dim=64, window=8):
        self.dim, self.window = dim, window
        self.sos = torch.randn(dim, generator=torch.Generator().manual_seed(0))

    def tokenize(self, text):
        return [2 + zlib.crc32(w.encode()) % 1000 for w in text.split()]

    def encode(self, prompts):
        out = []
        for p in prompts:
            f = torch.randn(self.window, self.dim, generator=torch.Generator().manual_seed(zlib.crc32(p.encode())))
            f[0] = self.sos
            ids = (0, *self.tokenize(p))[: self.window - 1] + (1,)
            ids = ids + (1,) * (self.window - len(ids))
            out.append(EncodedPrompt(ids, min(len(p.split()) + 2, self.window), f))
        return out


ENC = AffineEncoder(FakeTextEncoder())
W0 = fake_kv_weights()
g = torch.Generator().manual_seed(11)
WC = {k: w + 0.05 * torch.randn(w.shape, generator=g) for k, w in W0.items()}  # "CFR" weights
TPL = OBJECT_TEMPLATES


def random_lora(weights, seed, rank=1):
    lora = KVLora.for_weights(weights, rank=rank, seed=seed)
    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for u in lora.up.values():
            u.copy_(0.3 * torch.randn(u.shape, generator=gen))
    return lora


def features(enc, concept, templates):
    prompts = [fill(t, p) for p in concept.phrases for t in templates]
    return torch.cat([e.features.double() for e in enc.encode(prompts)])


def test_single_lora_full_rank_is_plain_merge():
    """Invariant 8: one LoRA, lambda = s = 0, C full rank => W* = W' + dW."""
    ship, lora = Concept(("ship", "boat")), random_lora(WC, 0)
    C, n = concept_covariance(ENC, ship, TPL)
    assert int(torch.linalg.matrix_rank(C)) == 32 and n == 2 * len(TPL) * ENC.window
    acc = FusionAccumulator(32)
    acc.add_concept(lora, C, n)
    d64, cond = acc.deltas64(WC, W0, lamb=0.0)
    for k, f in lora.factors().items():
        d = f.delta(torch.float64)
        assert (d64[k] - d).norm() / d.norm() < max(1e-12, 1e-15 * cond)  # forward error of C^-1
    res = fuse_loras(ENC, WC, W0, [(ship, lora)], TPL, lamb=0.0, preserve_scale=0.0)
    for k in WC:
        assert (res.weights[k] - (WC[k] + lora.deltas()[k])).abs().max() < 1e-5
        assert torch.equal(res.deltas[k], d64[k].float())


@pytest.mark.parametrize("preserve_to", ["original", "current"])
def test_normal_equations(preserve_to):
    """Invariant 1: W* (lamb I + sum C + sP) = W'(lamb I + sum C) + sum dW_i C_i + s R P, with R = W0
    (preserve_to "original", the paper's form and the library default) or R = W' ("current")."""
    concepts = [Concept(("ship",)), Concept(("car", "automobile")), Concept(("cat",))]
    loras = [random_lora(WC, i) for i in range(3)]
    keep = list(GENERIC_PRESERVE_PROMPTS[:8])
    lamb, scale = 0.5, 2.0
    Cs = [features(ENC, c, TPL[:12]) for c in concepts]
    Cs = [(f.T @ f, f.shape[0]) for f in Cs]
    p = torch.cat([e.features.double() for e in ENC.encode(keep)])
    P, s = p.T @ p, scale * sum(n for _, n in Cs) / p.shape[0]
    acc = FusionAccumulator(32)
    for lora, (C, n) in zip(loras, Cs):
        acc.add_concept(lora, C, n)
    stats = PairStats(32)
    stats.add_preserve(p)
    d64, cond = acc.deltas64(WC, W0, lamb, stats, scale, preserve_to)
    eye = torch.eye(32, dtype=torch.float64)
    Csum = sum(C for C, _ in Cs)
    A = lamb * eye + Csum + s * P
    for k in WC:
        wc = WC[k].double()
        ref = W0[k].double() if preserve_to == "original" else wc
        dW = [l.factors()[k].delta(torch.float64) for l in loras]
        rhs = wc @ (lamb * eye + Csum) + sum(d @ C for d, (C, _) in zip(dW, Cs)) + s * ref @ P
        lhs = (wc + d64[k]) @ A
        assert (lhs - rhs).norm() / rhs.norm() < 1e-10
    res = fuse_loras(ENC, WC, W0, list(zip(concepts, loras)), TPL[:12], keep, lamb=lamb, preserve_scale=scale,
                     preserve_to=preserve_to)
    assert res.n_concepts == 3 and res.n_vectors == sum(n for _, n in Cs) and res.condition[32] == pytest.approx(cond)
    for k in WC:
        assert (res.deltas[k].double() - d64[k]).abs().max() < 1e-6


def test_fusion_to_current_weights_cannot_undo_cfr():
    """With no LoRA (zero deltas) fusion that keeps the preserve prompts at the current weights returns
    them exactly; keeping them at the original weights pulls the preserve prompts' K/V back toward W0's."""
    zero = {k: torch.zeros_like(v) for k, v in WC.items()}
    keep = list(GENERIC_PRESERVE_PROMPTS[:8])
    ship = Concept(("ship", "boat"))
    current = fuse_loras(ENC, WC, W0, [(ship, zero)], TPL, keep, lamb=0.1, preserve_scale=1.0, preserve_to="current")
    original = fuse_loras(ENC, WC, W0, [(ship, zero)], TPL, keep, lamb=0.1, preserve_scale=1.0,
                          preserve_to="original")
    p = torch.cat([e.features for e in ENC.encode(keep)])
    for k in WC:
        assert torch.equal(current.deltas[k], torch.zeros_like(WC[k]))
        gap_before = (p @ (WC[k] - W0[k]).T).norm()  # the preserve prompts' K/V, current vs original
        assert (p @ (original.weights[k] - W0[k]).T).norm() < 0.9 * gap_before
    current_no_w0 = fuse_loras(ENC, WC, None, [(ship, zero)], TPL, keep, lamb=0.1, preserve_to="current")
    assert all(torch.equal(current_no_w0.deltas[k], current.deltas[k]) for k in WC)  # W0 not needed
    with pytest.raises(ValueError, match="preserve_to.*'sideways'.*current"):
        fuse_loras(ENC, WC, W0, [(ship, zero)], TPL, keep, preserve_to="sideways")
    assert [preserve_to_for(t) for t in ("style", "person", "object", "nudity")] == \
        ["current", "original", "original", "original"]  # the nodes' "auto"
    assert preserve_to_for("style", "original") == "original"
    assert [preserve_to_for(t, null_space=True) for t in ("style", "person", "object")] == ["current"] * 3
    assert preserve_to_for("object", "original", null_space=True) == "original"  # a choice is kept
    with pytest.raises(ValueError, match="'auto'"):
        fuse_loras(ENC, WC, W0, [(ship, zero)], TPL, keep, preserve_to="auto")  # the nodes resolve it first


def test_non_interference_exact():
    """Invariant 9: disjoint prompt vectors (< d in total), lamb ~ 0 => W* c = (W' + dW_i) c."""
    enc = RandomVectorEncoder(dim=64, window=8)
    w0 = fake_kv_weights(dim=64, seed=4)
    tpl = ["a photo of a {}", "{} at night"]
    concepts = [Concept(("ship",)), Concept(("car",))]
    loras = [random_lora(w0, i) for i in range(2)]
    res = fuse_loras(enc, w0, None, list(zip(concepts, loras)), tpl, lamb=1e-6, preserve_scale=0.0)
    feats = [features(enc, c, tpl) for c in concepts]
    assert sum(f.shape[0] for f in feats) < 64
    checked = 0
    for i, (f, lora) in enumerate(zip(feats, loras)):
        other = feats[1 - i]
        own = torch.stack([c for c in f if not any(torch.allclose(c, o, atol=1e-9) for o in other)])
        checked += own.shape[0]
        for k, w in w0.items():
            target = own @ (w.double() + lora.deltas()[k].double()).T
            got = own @ res.weights[k].double().T
            assert (got - target).norm() / target.norm() < 1e-5
    assert checked == 4 * 7  # every vector but the shared start token


def test_memory_does_not_grow_with_concepts_and_input_is_streamed():
    sizes = []
    acc = FusionAccumulator(32)
    for i, word in enumerate(("ship", "car", "cat", "dog", "cow", "horse")):
        C, n = concept_covariance(ENC, Concept((word,)), TPL[:3])
        acc.add_concept(random_lora(WC, i), C, n)
        sizes.append(acc.state_numel())
    assert len(set(sizes)) == 1 and sizes[0] == 32 * 32 + sum(w.numel() for w in WC.values())

    alive = []

    def stream():
        for i, word in enumerate(("ship", "car", "cat", "dog", "cow", "horse")):
            gc.collect()
            assert all(r() is None for r in alive[:-1])  # at most the previous LoRA is still referenced
            lora = random_lora(WC, i)
            alive.append(weakref.ref(lora))
            yield Concept((word,)), lora
            del lora

    res = fuse_loras(ENC, WC, W0, stream(), TPL[:3], lamb=1.0)
    assert res.n_concepts == 6


def test_order_invariance_and_factor_vs_full_delta():
    concepts = [Concept((w,)) for w in ("ship", "car", "cat")]
    loras = [random_lora(WC, i, rank=2) for i in range(3)]
    a = fuse_loras(ENC, WC, W0, list(zip(concepts, loras)), TPL[:6], GENERIC_PRESERVE_PROMPTS, lamb=0.1)
    b = fuse_loras(ENC, WC, W0, list(zip(concepts, loras))[::-1], TPL[:6], GENERIC_PRESERVE_PROMPTS, lamb=0.1)
    full = [(x, l.deltas()) for x, l in zip(concepts, loras)]
    c = fuse_loras(ENC, WC, W0, full, TPL[:6], GENERIC_PRESERVE_PROMPTS, lamb=0.1)
    for k in WC:
        assert (a.weights[k] - b.weights[k]).abs().max() < 1e-5
        assert (a.weights[k] - c.weights[k]).abs().max() < 1e-5


def test_ridge_and_preservation_limits():
    concepts, loras = [Concept(("ship",))], [random_lora(WC, 0)]
    norms = [
        sum(float(d.norm()) for d in fuse_loras(ENC, WC, W0, list(zip(concepts, loras)), TPL, lamb=lam).deltas.values())
        for lam in (0.0, 10.0, 1e3, 1e6, 1e9)
    ]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(norms, norms[1:])) and norms[-1] < 1e-4 * norms[0]
    keep = list(GENERIC_PRESERVE_PROMPTS)
    p = torch.cat([e.features for e in ENC.encode(keep)])

    def drift(scale, preserve_to):  # the preserve prompts' K/V against those they are kept at
        res = fuse_loras(ENC, WC, W0, list(zip(concepts, loras)), TPL, keep, lamb=0.1, preserve_scale=scale,
                         preserve_to=preserve_to)
        ref = W0 if preserve_to == "original" else WC
        return sum(float((p @ (res.weights[k] - ref[k]).T).norm()) for k in W0)

    for preserve_to in ("original", "current"):
        drifts = [drift(s, preserve_to) for s in (0.0, 0.1, 1.0, 10.0, 1000.0)]
        assert all(b <= a * (1 + 1e-6) for a, b in zip(drifts, drifts[1:])) and drifts[-1] < 0.05 * drifts[0]


def test_errors():
    ship, lora = Concept(("ship",)), random_lora(WC, 0)
    with pytest.raises(IllConditionedError, match="raise lambda"):
        fuse_loras(ENC, WC, W0, [(ship, lora)], ["a {}"], lamb=0.0)
    with pytest.raises(ValueError, match="model/clip mismatch"):
        fuse_loras(ENC, fake_kv_weights(dim=16), None, [(ship, random_lora(fake_kv_weights(dim=16), 0))], TPL)
    with pytest.raises(ValueError, match="no concept LoRA"):
        fuse_loras(ENC, WC, W0, [], TPL)
    with pytest.raises(ValueError, match="lacks 1 LoRA weight"):
        fuse_loras(ENC, {k: v for k, v in list(WC.items())[1:]}, W0, [(ship, lora)], TPL)
    with pytest.raises(ValueError, match="original weights"):  # only the paper's form needs W0
        fuse_loras(ENC, WC, None, [(ship, lora)], TPL, GENERIC_PRESERVE_PROMPTS, preserve_scale=1.0,
                   preserve_to="original")


# ------------------------------------------------------------ trained LoRAs on the fake denoiser

LATENTS, MASKS = fake_latents_and_masks()
PLAIN = FakeTextEncoder()  # the measured numbers below are for the plain fake encoder
CONCEPT_ONLY = LoraTrainConfig(steps=60, lr=1e-2, seed=0, include_end_tokens=False)


def test_two_trained_loras_do_not_undo_each_other():
    den = FakeDenoiser()
    loras = {
        w: train_concept_lora(den, PLAIN, Concept((w,)), TPL, LATENTS, MASKS, CONCEPT_ONLY).lora for w in ("ship", "car")
    }
    W = den.kv_weights()
    res = fuse_loras(PLAIN, W, W, [(Concept((w,)), l) for w, l in loras.items()], TPL, lamb=1e-3)
    fused = weights_transform(res.weights)
    mass = lambda w, tf: concept_mass(den, PLAIN, w, tf, False, LATENTS, MASKS)  # noqa: E731
    for word, other in (("ship", "car"), ("car", "ship")):
        base, own, after = mass(word, None), mass(word, loras[word].weight_transform), mass(word, fused)
        alone_other = mass(word, loras[other].weight_transform)
        # measured: ship 0.0253 / own 0.0013 / fused 0.0014; car 0.0632 / 0.0015 / 0.0028
        assert after < 2.5 * own and base / after > 8
        assert alone_other > 3 * own  # the other concept's LoRA alone does not erase this one


def test_preserve_prompts_keep_other_concepts_after_fusion():
    """The LoRA alone is not selective (rank-1 K on random features); fusion's preservation is."""
    enc, den = FakeTextEncoder(dim=128), FakeDenoiser(ctx_dim=128)
    lora = train_concept_lora(den, enc, Concept(("ship",)), TPL, LATENTS, MASKS, CONCEPT_ONLY).lora
    W = den.kv_weights()
    others = ("car", "dog", "cat", "boat")
    keep = [fill(t, o) for t in TPL[10:20] for o in others] + list(GENERIC_PRESERVE_PROMPTS)
    mass = lambda w, tf, m=None: concept_mass(den, enc, w, tf, False, LATENTS, m)  # noqa: E731
    base = {w: mass(w, None) for w in others}
    ship_base = mass("ship", None, MASKS)

    def ratios(transform):
        return ship_base / mass("ship", transform, MASKS), [mass(w, transform) / base[w] for w in others]

    drop, lora_only = ratios(lora.weight_transform)  # measured 56x; others 0.64, 12.6, 0.43, 0.99
    assert drop > 20 and max(max(lora_only), 1 / min(lora_only)) > 2.5
    res = fuse_loras(enc, W, W, [(Concept(("ship",)), lora)], TPL, keep, lamb=1e-3, preserve_scale=3.0)
    drop, kept = ratios(weights_transform(res.weights))  # measured 40x; others 0.59, 0.72, 0.78, 0.62
    assert drop > 15
    assert all(0.4 < r < 2.5 for r in kept)
