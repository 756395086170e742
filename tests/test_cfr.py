"""CFR: alignment invariants, closed-form optimality, mapping, preservation, errors."""
import pytest
import torch

from fakes import FakeTextEncoder, fake_kv_weights
from mace_ops.alignment import align, concept_positions
from mace_ops.cfr import CFRConfig, build_stats, cfr_transform, refine_cross_attention
from mace_ops.concepts import Concept, parse_concepts
from mace_ops.ridge import IllConditionedError
from mace_ops.templates import OBJECT_TEMPLATES, fill

ENC = FakeTextEncoder(multi_token={"vangogh": ["van", "gogh"]})
W0 = fake_kv_weights()


def enc1(prompt):
    return ENC.encode([prompt])[0]


@pytest.mark.parametrize("concept,anchor", [("ship", "ground"), ("van gogh", "art"), ("ship", ""), ("cat", "a person")])
def test_alignment_invariants(concept, anchor):
    tpl = "a photo of a {} at night"
    o, n = enc1(fill(tpl, concept)), enc1(fill(tpl, anchor))
    nc, na = len(ENC.tokenize(concept)), len(ENC.tokenize(anchor))
    a = align(o.ids, o.length, n.ids, n.length)
    assert len(a.old) == len(a.new) == ENC.window - max(nc, na)
    assert a.old[0] == a.new[0] == 0
    concept_pos = set(range(5, 5 + nc))  # <sos> a photo of a | concept
    assert not concept_pos & set(a.old)
    assert not set(range(5, 5 + na)) & set(a.new)
    after = [(i, j) for i, j in zip(a.old, a.new) if i >= 5 + nc]
    assert after and all(j - i == na - nc for i, j in after)
    assert all(o.ids[i] == n.ids[j] for i, j in zip(a.old, a.new))


def test_alignment_identity():
    e = enc1("a photo of a ship")
    a = align(e.ids, e.length, e.ids, e.length)
    assert a.old == a.new == tuple(range(ENC.window))


def test_concept_positions():
    e = enc1("a photo of ship")
    ids = ENC.tokenize("ship")
    assert concept_positions(e.ids, e.length, ids, ENC.end_id, False) == [4]
    assert concept_positions(e.ids, e.length, ids, ENC.end_id, True) == list(range(4, ENC.window))


def _system(stats, cfg):
    s = cfg.preserve_scale * stats.n_pairs / stats.n_preserve if stats.n_preserve else 0.0
    eye = torch.eye(stats.dim, dtype=torch.float64)
    return cfg.lamb * eye + stats.B + s * stats.P, cfg.lamb * eye + stats.G + s * stats.P


def test_normal_equations_hold():
    concepts = parse_concepts("ship, boat\ncar")
    cfg = CFRConfig(lamb=0.5, preserve_scale=2.0)
    res = refine_cross_attention(ENC, W0, concepts, OBJECT_TEMPLATES, "ground", ["a dog running on the grass"], cfg)
    A, R = _system(res.stats, cfg)
    for name, w in W0.items():
        lhs = res.weights[name].double() @ A
        rhs = w.double() @ R
        assert (lhs - rhs).norm() / rhs.norm() < 1e-6  # float32 storage of W'
        M = res.transforms[32]
        w64 = w.double() @ M
        assert (w64 @ A - w.double() @ R).norm() / rhs.norm() < 1e-10
        # the gradient of the objective vanishes at the solution
        grad = w64 @ A - w.double() @ R
        assert grad.abs().max() < 1e-8 * rhs.abs().max()


def test_factorisation_equals_per_layer_form():
    """Invariant 6: the shared d x d factor gives the same W' as the per-layer reference algebra."""
    concepts = parse_concepts("ship -> ground")
    cfg = CFRConfig(lamb=0.3)
    res = refine_cross_attention(ENC, W0, concepts, OBJECT_TEMPLATES[:5], config=cfg)
    pairs = []
    for t in OBJECT_TEMPLATES[:5]:
        o, n = enc1(fill(t, "ship")), enc1(fill(t, "ground"))
        a = align(o.ids, o.length, n.ids, n.length)
        pairs.append((o.features[list(a.old)].double(), n.features[list(a.new)].double()))
    for name, w in W0.items():
        w = w.double()
        mat1 = cfg.lamb * w + sum((w @ e.T) @ c for c, e in pairs)
        mat2 = cfg.lamb * torch.eye(32, dtype=torch.float64) + sum(c.T @ c for c, _ in pairs)
        ref = mat1 @ torch.inverse(mat2)
        assert (res.weights[name].double() - ref).abs().max() < 1e-5


def test_exact_fit_with_few_pairs():
    """Invariant 4: fewer pairs than dims and lambda -> 0 maps every context onto its target."""
    tpl = ["a photo of a {}"]
    res = refine_cross_attention(ENC, W0, parse_concepts("ship -> ground"), tpl, config=CFRConfig(lamb=1e-7))
    o, n = enc1("a photo of a ship"), enc1("a photo of a ground")
    a = align(o.ids, o.length, n.ids, n.length)
    assert len(a.old) < 32
    c, e = o.features[list(a.old)].double(), n.features[list(a.new)].double()
    for name, w in W0.items():
        target = e @ w.double().T
        got = c @ res.weights[name].double().T
        before = c @ w.double().T
        assert (got - target).norm() / target.norm() < 1e-4
        assert (before - target).norm() / target.norm() > 1e-2


def test_objective_drops_and_concept_prompt_moves_to_anchor():
    res = refine_cross_attention(ENC, W0, parse_concepts("ship"), OBJECT_TEMPLATES, "ground", config=CFRConfig(lamb=0.1))
    o, n = enc1("a blurry photo of a ship"), enc1("a blurry photo of a ground")
    a = align(o.ids, o.length, n.ids, n.length)
    c, e = o.features[list(a.old)], n.features[list(a.new)]
    for name, w in W0.items():
        before = (c @ w.T - e @ w.T).norm()
        after = (c @ res.weights[name].T - e @ w.T).norm()
        assert after < 0.5 * before


def _preserve_shift(res, prompts):
    feats = torch.cat([enc1(p).features for p in prompts])
    return sum(float((feats @ d.T).norm()) for d in res.deltas.values())


def test_preservation_reduces_drift_and_lambda_pulls_back():
    concepts = parse_concepts("ship, boat")
    keep = ["a dog running on the grass", "a cat sleeping on a sofa", "a horse standing in a field"]
    run = lambda lamb, s, pp: refine_cross_attention(  # noqa: E731
        ENC, W0, concepts, OBJECT_TEMPLATES, "ground", pp, CFRConfig(lamb=lamb, preserve_scale=s)
    )
    free = _preserve_shift(run(0.1, 0.0, ()), keep)
    shifts = [_preserve_shift(run(0.1, s, keep), keep) for s in (0.1, 1.0, 10.0, 100.0)]
    assert shifts[0] < free
    assert all(b <= a * (1 + 1e-9) for a, b in zip(shifts, shifts[1:]))
    assert shifts[-1] < 0.2 * free
    norms = [sum(float(d.norm()) for d in run(l, 0.0, ()).deltas.values()) for l in (0.01, 1.0, 100.0, 1e4)]
    assert all(b < a for a, b in zip(norms, norms[1:]))
    lam_shift = [_preserve_shift(run(l, 0.0, ()), keep) for l in (0.01, 100.0, 1e4)]
    assert lam_shift[2] < lam_shift[1] < lam_shift[0]


def test_synonyms_are_erased_too():
    probe = ["a photo of a boat", "a sketch of a boat"]
    pairs = []
    for p in probe:
        o, n = enc1(p), enc1(p.replace("boat", "ground"))
        a = align(o.ids, o.length, n.ids, n.length)
        pairs.append((o.features[list(a.old)], n.features[list(a.new)]))

    def residual(res):
        return sum(float((c @ res.weights[k].T - e @ w.T).norm()) for c, e in pairs for k, w in W0.items())

    only = refine_cross_attention(ENC, W0, parse_concepts("ship"), OBJECT_TEMPLATES, "ground")
    both = refine_cross_attention(ENC, W0, parse_concepts("ship, boat"), OBJECT_TEMPLATES, "ground")
    assert both.stats.n_pairs == 2 * only.stats.n_pairs
    assert residual(both) < 0.7 * residual(only)


def test_order_and_chunk_invariance():
    a = refine_cross_attention(ENC, W0, parse_concepts("ship\ncar\ncat"), OBJECT_TEMPLATES, "ground")
    b = refine_cross_attention(ENC, W0, parse_concepts("cat\nship\ncar"), OBJECT_TEMPLATES, "ground")
    s1 = build_stats(ENC, parse_concepts("ship"), OBJECT_TEMPLATES, "ground")
    s2 = build_stats(ENC, parse_concepts("car\ncat"), OBJECT_TEMPLATES, "ground")
    M, _ = cfr_transform(s1.merge(s2), CFRConfig())
    for k in W0:
        assert (a.weights[k] - b.weights[k]).abs().max() < 1e-5
        assert (a.transforms[32] - M).abs().max() < 1e-10


def test_input_weights_untouched():
    before = {k: v.clone() for k, v in W0.items()}
    refine_cross_attention(ENC, W0, parse_concepts("ship"), OBJECT_TEMPLATES, "ground")
    assert all(torch.equal(before[k], W0[k]) for k in W0)


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("ship,,boat", "line 1: empty phrase"),
        ("ship\n\ncar, ship", "line 3: 'ship' is already listed on line 1"),
        ("ship -> a -> b", "more than one '->'"),
    ],
)
def test_parse_errors_name_the_line(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_concepts(text)


def test_parse_synonyms_anchor_comments():
    cs = parse_concepts("# header\nVan-Gogh, vincent van gogh -> Art  # note\n\nship")
    assert cs == [Concept(("van gogh", "vincent van gogh"), "art", 2), Concept(("ship",), None, 4)]


def test_unknown_token_and_anchor_equal_errors():
    with pytest.raises(ValueError, match="line 2: unknown word 'zeppelin'"):
        refine_cross_attention(ENC, W0, parse_concepts("ship\nzeppelin"), OBJECT_TEMPLATES, "ground")
    with pytest.raises(ValueError, match="equals its anchor"):
        refine_cross_attention(ENC, W0, parse_concepts("ground"), OBJECT_TEMPLATES, "ground")


def test_ill_conditioned_system_is_refused():
    with pytest.raises(IllConditionedError, match="raise lambda"):
        refine_cross_attention(ENC, W0, parse_concepts("ship"), ["a photo of a {}"], "ground", config=CFRConfig(lamb=0.0))


def test_model_clip_width_mismatch():
    with pytest.raises(ValueError, match="model/clip mismatch"):
        refine_cross_attention(ENC, fake_kv_weights(dim=16), parse_concepts("ship"), OBJECT_TEMPLATES, "ground")


@pytest.mark.parametrize("concept,anchor", [("ship", "ground"), ("van gogh", "art"), ("ship", ""), ("van gogh", "a person")])
def test_alignment_with_concept_tokens(concept, anchor):
    tpl = "a photo of a {} at night"
    o, n = enc1(fill(tpl, concept)), enc1(fill(tpl, anchor))
    nc, na = len(ENC.tokenize(concept)), len(ENC.tokenize(anchor))
    plain = align(o.ids, o.length, n.ids, n.length)
    full = align(o.ids, o.length, n.ids, n.length, include_concept=True)
    assert full.old[: len(plain.old)] == plain.old and full.new[: len(plain.new)] == plain.new
    extra = list(zip(full.old[len(plain.old):], full.new[len(plain.new):]))
    assert [i for i, _ in extra] == list(range(5, 5 + nc))  # every concept token, once
    targets = [j for _, j in extra]
    assert targets == sorted(targets)
    if na:
        assert set(targets) <= set(range(5, 5 + na))
    else:
        assert targets == [5] * nc and n.ids[5] == ENC.tokenize("at")[0]


def test_concept_tokens_option_moves_concept_token_outputs():
    tpl = ["a photo of a {}"]
    o, n = enc1("a photo of a ship"), enc1("a photo of a ground")
    c, e = o.features[5], n.features[5]
    for flag in (False, True):
        res = refine_cross_attention(ENC, W0, parse_concepts("ship"), tpl, "ground", config=CFRConfig(1e-6, 0, flag))
        w = W0["block.0.attn2.to_k.weight"]
        err = float((res.weights["block.0.attn2.to_k.weight"] @ c - w @ e).norm() / (w @ e).norm())
        assert (err < 1e-3) == flag, (flag, err)


def test_relative_lambda_is_scale_free():
    """A relative lambda counts in mean token energies: scaling every text feature by k leaves M
    unchanged, as a raw lambda scaled by k^2 does."""
    stats = build_stats(ENC, parse_concepts("ship\ncar"), OBJECT_TEMPLATES, "ground", ["a dog on the grass"])
    k = 7.0
    scaled = build_stats(ENC, parse_concepts("ship\ncar"), OBJECT_TEMPLATES, "ground", ["a dog on the grass"])
    scaled.G, scaled.B, scaled.P = stats.G * k * k, stats.B * k * k, stats.P * k * k
    energy = float(stats.B.trace()) / stats.n_pairs
    rel, _ = cfr_transform(stats, CFRConfig(lamb=0.5, relative_lambda=True))
    rel_scaled, _ = cfr_transform(scaled, CFRConfig(lamb=0.5, relative_lambda=True))
    raw, _ = cfr_transform(stats, CFRConfig(lamb=0.5 * energy))
    assert (rel - rel_scaled).abs().max() < 1e-8
    assert (rel - raw).abs().max() < 1e-8
